"""SSH key parsing with asyncssh: private keys (OpenSSH and PEM, encrypted or not) and host keys."""

from __future__ import annotations

import asyncssh

from core.model import ClientKey, HostKey


class AsyncsshKeys:
    """Implements ``core.ports.SshKeys``."""

    def inspect_private_key(self, text: str, passphrase: str | None) -> ClientKey:
        if "PRIVATE KEY" not in text:
            raise ValueError("is not an SSH private key (expected OpenSSH or PEM text)")
        try:
            key = asyncssh.import_private_key(text, passphrase)
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
            reason = str(error)
            if "assphrase" in reason or "decrypt" in reason.lower() or isinstance(error, asyncssh.KeyEncryptionError):
                if passphrase is None:
                    raise ValueError("passphrase required: the private key is encrypted") from error
                raise ValueError("passphrase does not decrypt the private key") from error
            raise ValueError(f"cannot be parsed as an SSH private key ({reason})") from error
        except (ValueError, TypeError) as error:
            raise ValueError("cannot be parsed as an SSH private key") from error
        public = key.export_public_key("openssh").decode("ascii").split()
        return ClientKey(public_key=" ".join(public[:2]), fingerprint=key.get_fingerprint("sha256"))

    def parse_host_key(self, text: str) -> HostKey:
        line = text.strip()
        if "\n" in line or "\r" in line:
            raise ValueError("must be a single OpenSSH public key line")
        parts = line.split()
        if len(parts) < 2:
            raise ValueError("must look like 'ssh-ed25519 AAAA...'")
        try:
            key = asyncssh.import_public_key(" ".join(parts[:2]))
        except (asyncssh.KeyImportError, ValueError, TypeError) as error:
            raise ValueError("is not an OpenSSH public key") from error
        openssh = " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])
        return HostKey(openssh=openssh, fingerprint=key.get_fingerprint("sha256"))
