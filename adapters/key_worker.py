"""The child process that imports private keys for ``adapters.sshkeys`` (run as a script).

Importing a user's key can cost seconds of CPU (decryption runs a KDF) or more on crafted input;
the portal's worker process hands each key to a child like this one and kills it past a deadline,
so a hostile key costs at most that deadline and never a thread of the shared pool for longer.

Protocol, one JSON object per line: the child says ``{"ready": true}`` once asyncssh is imported,
then answers each ``{"text": ..., "passphrase": ...}`` with ``{"ok": true, "public_key": ...,
"fingerprint": ...}`` or ``{"ok": false, "error": <kind>, "reason": ...}``. It exits at end of
input (its parent closed the pipe or died).

Standard library and asyncssh only: it runs with ``python -I``, outside the project's packages.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def inspect(text: str, passphrase: str | None) -> dict[str, Any]:
    """What asyncssh makes of the key: its public half, or why it cannot be used."""
    import asyncssh

    try:
        key = asyncssh.import_private_key(text, passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as error:
        reason = str(error)
        if "assphrase" in reason or "decrypt" in reason.lower() or isinstance(error, asyncssh.KeyEncryptionError):
            return {"ok": False, "error": "passphrase_required" if passphrase is None else "passphrase_wrong",
                    "reason": reason}
        return {"ok": False, "error": "unparsable", "reason": reason}
    except Exception:  # crafted input can make the parser raise anything
        return {"ok": False, "error": "unparsable", "reason": ""}
    public = key.export_public_key("openssh").decode("ascii").split()
    return {"ok": True, "public_key": " ".join(public[:2]), "fingerprint": key.get_fingerprint("sha256")}


def main() -> int:
    import asyncssh  # noqa: F401 - imported before "ready", so a parse's deadline never pays for it

    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = inspect(request["text"], request.get("passphrase"))
        except Exception:  # a malformed request from the parent: answer, never die
            answer = {"ok": False, "error": "unparsable", "reason": "bad request"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
