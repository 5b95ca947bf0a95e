"""SSH key parsing with asyncssh: private keys (OpenSSH and PEM, encrypted or not) and host keys.

Every failure of the parser, whatever its type, is a ``ValueError`` with a reason: the input is
hostile until parsed. An encrypted OpenSSH key names its own bcrypt KDF cost; a key that asks for
more than ``MAX_KDF_ROUNDS`` is refused before any decryption is attempted, so a crafted key cannot
keep a worker thread busy for hours.
"""

from __future__ import annotations

import base64
import binascii
import struct

import asyncssh

from core.model import ClientKey, HostKey

MAX_KDF_ROUNDS = 256  # ssh-keygen uses 16 by default; `-a 100` is the usual hardened choice
_OPENSSH_MAGIC = b"openssh-key-v1\x00"


def openssh_kdf_rounds(text: str) -> int | None:
    """The bcrypt rounds an OpenSSH-format private key asks for, or None if it names none."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN OPENSSH PRIVATE KEY-----":
        return None
    body = "".join(line for line in lines[1:] if not line.startswith("-----"))
    try:
        raw = base64.b64decode(body)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(_OPENSSH_MAGIC):
        return None
    offset = len(_OPENSSH_MAGIC)
    fields = []
    for _ in range(3):  # cipher name, KDF name, KDF options
        if offset + 4 > len(raw):
            return None
        (length,) = struct.unpack(">I", raw[offset:offset + 4])
        fields.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    kdf_name, options = fields[1], fields[2]
    if kdf_name != b"bcrypt" or len(options) < 8:
        return None
    (salt_length,) = struct.unpack(">I", options[:4])
    if len(options) < 4 + salt_length + 4:
        return None
    (rounds,) = struct.unpack(">I", options[4 + salt_length:8 + salt_length])
    return int(rounds)


class AsyncsshKeys:
    """Implements ``core.ports.SshKeys``."""

    def inspect_private_key(self, text: str, passphrase: str | None) -> ClientKey:
        if "PRIVATE KEY" not in text:
            raise ValueError("is not an SSH private key (expected OpenSSH or PEM text)")
        rounds = openssh_kdf_rounds(text)
        if rounds is not None and rounds > MAX_KDF_ROUNDS:
            raise ValueError(f"the key's encryption asks for {rounds} bcrypt rounds; the portal accepts at most "
                             f"{MAX_KDF_ROUNDS} (re-encrypt it with: ssh-keygen -p -a 100 -f KEYFILE)")
        try:
            key = asyncssh.import_private_key(text, passphrase)
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
            reason = str(error)
            if "assphrase" in reason or "decrypt" in reason.lower() or isinstance(error, asyncssh.KeyEncryptionError):
                if passphrase is None:
                    raise ValueError("passphrase required: the private key is encrypted") from error
                raise ValueError("passphrase does not decrypt the private key") from error
            raise ValueError(f"cannot be parsed as an SSH private key ({reason})") from error
        except Exception as error:  # crafted input can make the parser raise anything
            raise ValueError("cannot be parsed as an SSH private key") from error
        public = key.export_public_key("openssh").decode("ascii").split()
        return ClientKey(public_key=" ".join(public[:2]), fingerprint=key.get_fingerprint("sha256"))

    def generate_private_key(self) -> str:
        key = asyncssh.generate_private_key("ssh-ed25519")
        return key.export_private_key("openssh").decode("ascii")

    def parse_host_key(self, text: str) -> HostKey:
        line = text.strip()
        if "\n" in line or "\r" in line:
            raise ValueError("must be a single OpenSSH public key line")
        parts = line.split()
        if len(parts) < 2:
            raise ValueError("must look like 'ssh-ed25519 AAAA...'")
        try:
            key = asyncssh.import_public_key(" ".join(parts[:2]))
        except Exception as error:  # crafted input can make the parser raise anything
            raise ValueError("is not an OpenSSH public key") from error
        openssh = " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])
        return HostKey(openssh=openssh, fingerprint=key.get_fingerprint("sha256"))
