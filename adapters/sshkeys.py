"""SSH key parsing with asyncssh: private keys (OpenSSH and PEM, encrypted or not) and host keys.

Every failure of the parser, whatever its type, is a ``ValueError`` with a reason: the input is
hostile until parsed. A private key is checked in three steps:

1. **Exactly one key block.** The text must be one PEM block (``-----BEGIN … PRIVATE KEY-----`` to
   its END line) with nothing but whitespace around it. The block is located and decoded with
   asyncssh's own framing functions, so what is checked next is byte for byte what asyncssh would
   decrypt (a line before the block, or a header line inside it, cannot hide the real cost).
2. **Every KDF capped** before any decryption, from the cost the key names itself:
   OpenSSH bcrypt at most ``MAX_BCRYPT_ROUNDS`` rounds; PKCS#8 PBES2/PBKDF2 at most
   ``MAX_PBKDF2_ITERATIONS`` iterations (and no key length beyond 64 bytes, which would multiply
   the work); legacy PKCS#8 PBES1 and PKCS#12 PBE at most ``MAX_LEGACY_ITERATIONS`` (asyncssh runs
   those loops in pure Python). PKCS#1 PEM encryption (``DEK-Info``) is one MD5, nothing to cap.
   Each cap costs at most about 2.5 s of CPU on the reference machine (docs/security.md).
3. **Parsed in a child process with a deadline** (``KeyParserPool``): asyncssh runs in one of at
   most ``workers`` long-lived children, killed past ``deadline`` seconds, so no key, capped or
   not, can keep a thread of the shared pool busy for longer, and the KDF's CPU is spent outside
   the worker process.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.asn1 import ObjectIdentifier, der_decode
from asyncssh.packet import SSHPacket
from asyncssh.pbe import _ES2, _ES2_PBKDF2, _pbe_p12, _pbes1, _pkcs8_handler
from asyncssh.public_key import _match_next

from core.errors import KeyParserBusy
from core.model import ClientKey, HostKey

MAX_BCRYPT_ROUNDS = 256  # ssh-keygen uses 16 by default; `-a 100` is the usual hardened choice
MAX_KDF_ROUNDS = MAX_BCRYPT_ROUNDS  # the name this cap had before PKCS#8 was capped too
MAX_PBKDF2_ITERATIONS = 1_000_000  # OpenSSL writes 2048; OWASP asks 600,000 for PBKDF2-SHA256
MAX_LEGACY_ITERATIONS = 100_000  # OpenSSL writes 2048; asyncssh loops in Python (~1.7 µs each)
MAX_PBKDF2_KEY_LENGTH = 64  # bytes; AES-256 needs 32
_OPENSSH_MAGIC = b"openssh-key-v1\x00"
_WORKER_SCRIPT = Path(__file__).with_name("key_worker.py")


def _refuse_cost(what: str, asked: int, most: int, advice: str) -> ValueError:
    return ValueError(f"the key's encryption asks for {asked} {what}; the portal accepts at most {most} "
                      f"(re-encrypt it with: {advice})")


def key_block(text: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The one PEM block ``text`` holds, as asyncssh reads it: (PEM name, headers, decoded body).

    ``ValueError`` unless the text is exactly one ``… PRIVATE KEY`` block, alone but for
    whitespace, whose BEGIN line starts a line (asyncssh only sees such a line)."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("cannot be parsed as an SSH private key (it is not ASCII text)") from None
    body = data.lstrip()
    leading = data[: len(data) - len(body)]
    first_line = body.split(b"\n", 1)[0].rstrip()
    if (leading and not leading.endswith(b"\n")) or not first_line.startswith(b"-----BEGIN ") \
            or not first_line.endswith(b" PRIVATE KEY-----"):
        raise ValueError("must be one private key block, starting with its '-----BEGIN ... PRIVATE KEY-----' "
                         "line (no text before it)")
    try:
        fmt, info, end = _match_next(data, b"PRIVATE KEY")
    except asyncssh.KeyImportError as error:
        raise ValueError(f"cannot be parsed as an SSH private key ({error})") from None
    if fmt != "pem" or end is None:
        raise ValueError("cannot be parsed as an SSH private key")
    if data[end:].strip():
        raise ValueError("must hold exactly one private key block (found text after its END line)")
    inner = data[len(leading) + len(first_line): end]
    if inner.count(b"-----") > 2:  # the END line's two runs; anything else is another block's line
        raise ValueError("must hold exactly one private key block (found another '-----' line inside it)")
    pem_name, headers, decoded = info
    return bytes(pem_name), dict(headers), bytes(decoded)


def check_kdf_cost(text: str) -> None:
    """Refuse (``ValueError``) a key whose decryption would cost more than the caps allow, reading
    the cost from exactly the bytes asyncssh would decrypt. Costs nothing but the parsing."""
    pem_name, _headers, body = key_block(text)
    if pem_name == b"OPENSSH":
        _check_openssh(body)
    elif pem_name == b"ENCRYPTED":
        _check_pkcs8(body)
    # PKCS#1 (RSA/DSA/EC) PEM encryption derives its key with one MD5: nothing to cap.


def _check_openssh(body: bytes) -> None:
    if not body.startswith(_OPENSSH_MAGIC):
        return  # asyncssh refuses it before any decryption
    try:
        packet = SSHPacket(body[len(_OPENSSH_MAGIC):])
        cipher, kdf, kdf_data = packet.get_string(), packet.get_string(), packet.get_string()
    except ValueError:  # PacketDecodeError: asyncssh refuses it the same way
        return
    if cipher == b"none" or kdf != b"bcrypt":
        return  # no KDF runs (asyncssh knows only bcrypt)
    try:
        options = SSHPacket(kdf_data)
        options.get_string()  # salt
        rounds = options.get_uint32()
    except ValueError:
        raise ValueError("cannot be parsed as an SSH private key (unreadable bcrypt options)") from None
    if rounds > MAX_BCRYPT_ROUNDS:
        raise _refuse_cost("bcrypt rounds", rounds, MAX_BCRYPT_ROUNDS, "ssh-keygen -p -a 100 -f KEYFILE")


def _check_pkcs8(body: bytes) -> None:
    """Mirror of asyncssh's ``pkcs8_decrypt``: read the count each scheme would use, fail closed on
    any shape it would try to use but this cannot read."""
    try:
        key_data = der_decode(body)
    except Exception:  # ASN1DecodeError, or RecursionError on crafted nesting
        raise ValueError("cannot be parsed as an SSH private key (invalid PKCS#8 data)") from None
    unreadable = ValueError("cannot be parsed as an SSH private key (unreadable PKCS#8 encryption parameters)")
    if not isinstance(key_data, tuple) or len(key_data) != 2 or not isinstance(key_data[0], tuple) \
            or len(key_data[0]) != 2:
        return  # asyncssh refuses it before any decryption
    alg, params = key_data[0]
    if alg == _ES2:
        kdf = params[0] if isinstance(params, tuple) and params and isinstance(params[0], tuple) else None
        if not kdf or kdf[0] != _ES2_PBKDF2:
            return  # asyncssh knows no other PBES2 KDF: refused before any work
        if len(kdf) != 2 or not isinstance(kdf[1], tuple) or len(kdf[1]) < 2 or not isinstance(kdf[1][1], int):
            raise unreadable
        count = kdf[1][1]
        key_length = kdf[1][2] if len(kdf[1]) > 2 and isinstance(kdf[1][2], int) else None
        if count > MAX_PBKDF2_ITERATIONS:
            raise _refuse_cost("PBKDF2 iterations", count, MAX_PBKDF2_ITERATIONS,
                               "openssl pkcs8 -topk8 -v2 aes-256-cbc -iter 100000, or ssh-keygen -p")
        if key_length is not None and not 0 < key_length <= MAX_PBKDF2_KEY_LENGTH:
            raise ValueError(f"the key's encryption asks PBKDF2 for a {key_length}-byte key; the portal "
                             f"accepts at most {MAX_PBKDF2_KEY_LENGTH}")
        return
    if isinstance(alg, ObjectIdentifier) and alg in _pkcs8_handler:
        handler = _pkcs8_handler[alg][0]
        if handler not in (_pbes1, _pbe_p12):
            raise unreadable  # an asyncssh with a scheme this module does not know: fail closed
        if not isinstance(params, tuple) or len(params) != 2 or not isinstance(params[1], int):
            return  # asyncssh refuses these parameters before any work
        if params[1] > MAX_LEGACY_ITERATIONS:
            scheme = "PBES1" if handler is _pbes1 else "PKCS#12"
            raise _refuse_cost(f"{scheme} iterations", params[1], MAX_LEGACY_ITERATIONS,
                               "ssh-keygen -p -f KEYFILE (a modern format)")


class KeyParserPool:
    """At most ``workers`` child processes that import keys (``adapters/key_worker.py``), each
    parse bounded by ``deadline`` seconds: past it the child is killed and the key refused.

    A caller waits at most ``queue_timeout`` for a free child (then ``KeyParserBusy``, 503), so a
    thread calling ``inspect`` is back within ``queue_timeout + deadline`` whatever the key (plus a
    child's start, once per child). Children are started on first use and kept; one that was
    killed is replaced on the next parse."""

    def __init__(self, workers: int = 2, deadline: float = 20.0, queue_timeout: float = 5.0,
                 start_timeout: float = 60.0) -> None:
        self.deadline = deadline
        self.queue_timeout = queue_timeout
        self.start_timeout = start_timeout
        self._slots = threading.BoundedSemaphore(workers)
        self._idle: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self.started = 0  # children started, ever (tests count work with it)
        self.killed = 0  # children killed past their deadline
        self.parses = 0  # keys handed to a child

    def inspect(self, text: str, passphrase: str | None) -> dict[str, Any]:
        if not self._slots.acquire(timeout=self.queue_timeout):
            raise KeyParserBusy(f"every key parser stayed busy for {self.queue_timeout:g} s; try again shortly")
        try:
            child = self._take()
            request = json.dumps({"text": text, "passphrase": passphrase}).encode("utf-8") + b"\n"
            with self._lock:
                self.parses += 1
            try:
                answer = _exchange(child, request, self.deadline)
            except TimeoutError:
                self._kill(child, counted=True)
                raise ValueError(f"took longer than {self.deadline:g} s to parse; refused") from None
            except (OSError, ValueError):
                self._kill(child, counted=False)
                raise ValueError("cannot be parsed as an SSH private key (the parser failed)") from None
            with self._lock:
                self._idle.append(child)
            return answer
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stop every idle child (busy ones are stopped by their caller)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            self._kill(child, counted=False)

    def _take(self) -> subprocess.Popen[bytes]:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.poll() is None:
                    return child
        child = subprocess.Popen(  # noqa: S603 - our own script, with the interpreter running us
            [sys.executable, "-I", str(_WORKER_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0, env={"LC_ALL": "C"}, close_fds=True)
        with self._lock:
            self.started += 1
        try:
            ready = _exchange(child, b"", self.start_timeout)
        except (TimeoutError, OSError, ValueError):
            self._kill(child, counted=False)
            raise KeyParserBusy("the key parser could not be started; try again shortly") from None
        if ready != {"ready": True}:
            self._kill(child, counted=False)
            raise KeyParserBusy("the key parser could not be started; try again shortly")
        return child

    def _kill(self, child: subprocess.Popen[bytes], *, counted: bool) -> None:
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
        if counted:
            with self._lock:
                self.killed += 1


def _exchange(child: subprocess.Popen[bytes], request: bytes, timeout: float) -> dict[str, Any]:
    """Write ``request`` to the child and read one answer line, all within ``timeout`` seconds
    (``TimeoutError`` past it). Non-blocking both ways: a stuck child cannot block the caller."""
    assert child.stdin is not None and child.stdout is not None
    end = time.monotonic() + timeout
    out_fd, in_fd = child.stdout.fileno(), child.stdin.fileno()
    os.set_blocking(out_fd, False)
    os.set_blocking(in_fd, False)
    answer = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(out_fd, selectors.EVENT_READ)
        if request:
            selector.register(in_fd, selectors.EVENT_WRITE)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _events in selector.select(left):
                if key.fd == in_fd:
                    request = request[os.write(in_fd, request):]
                    if not request:
                        selector.unregister(in_fd)
                    continue
                chunk = os.read(out_fd, 65536)
                if not chunk:
                    raise ValueError("the key parser exited")
                answer += chunk
                if answer.endswith(b"\n"):
                    decoded = json.loads(answer)
                    if not isinstance(decoded, dict):
                        raise ValueError("the key parser answered nonsense")
                    return decoded


_SHARED_POOL: tuple[int, KeyParserPool] | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> KeyParserPool:
    """The process's key parsers: one pool per process, started lazily (a forked worker never
    shares its parent's children or pipes)."""
    global _SHARED_POOL
    with _SHARED_LOCK:
        if _SHARED_POOL is None or _SHARED_POOL[0] != os.getpid():
            _SHARED_POOL = (os.getpid(), KeyParserPool())
        return _SHARED_POOL[1]


class AsyncsshKeys:
    """Implements ``core.ports.SshKeys``. ``inspect_private_key`` blocks its calling thread on a
    child process, at most the pool's queue time-out plus its deadline (the port is synchronous)."""

    def __init__(self, parsers: KeyParserPool | None = None) -> None:
        self._parsers = parsers

    def inspect_private_key(self, text: str, passphrase: str | None) -> ClientKey:
        if "PRIVATE KEY" not in text:
            raise ValueError("is not an SSH private key (expected OpenSSH or PEM text)")
        check_kdf_cost(text)
        parsers = self._parsers or shared_pool()
        answer = parsers.inspect(text, passphrase)
        if answer.get("ok") is True:
            return ClientKey(public_key=str(answer["public_key"]), fingerprint=str(answer["fingerprint"]))
        error, reason = answer.get("error"), str(answer.get("reason") or "")
        if error == "passphrase_required":
            raise ValueError("passphrase required: the private key is encrypted")
        if error == "passphrase_wrong":
            raise ValueError("passphrase does not decrypt the private key")
        raise ValueError(f"cannot be parsed as an SSH private key ({reason})" if reason
                         else "cannot be parsed as an SSH private key")

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
