"""Issue 14 item 5: CPU the SSH adapter spends on requests to an agent whose host refuses its key.

The agent's key is an encrypted OpenSSH key (128 bcrypt rounds); an asyncssh server on 127.0.0.1
refuses it, so every request fails with ``agent_auth_failed``. Before, each failed connection
dropped the imported key and the next request ran the KDF again; now the parsed key is kept per
agent revision.

    .venv/bin/python bench/kdf_failures.py [N]                          # this checkout
    (cd /tmp/old && PYTHONPATH=/tmp/old ../path/to/.venv/bin/python .../bench/kdf_failures.py)

Run from the checkout to measure (its ``adapters``/``core`` are imported). Touches only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
import time
import warnings
from datetime import UTC, datetime
from typing import Any

import asyncssh

from adapters.ssh import AsyncsshShell
from core.model import Agent, AgentCredentials, ClientKey, HostKey


def shell() -> Any:
    try:
        from core.networks import AgentNetworks

        return AsyncsshShell(connect_timeout=5, networks=AgentNetworks.parse("127.0.0.0/8"))
    except (ImportError, TypeError):  # a checkout from before MANAGEMENT_AGENT_NETWORKS
        return AsyncsshShell(connect_timeout=5)


async def main(n: int) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(authorized.export_public_key("openssh").decode()))
    port = server.sockets[0].getsockname()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused_key = asyncssh.generate_private_key("ssh-ed25519").export_private_key(
            "openssh", passphrase="pw", rounds=128).decode()  # noqa: S106 - a throwaway key
    now = datetime(2026, 1, 1, tzinfo=UTC)
    agent = Agent(id=1, owner_id=1, name="hv", hostname="127.0.0.1", port=port, username="u",
                  allow_unknown_hosts=False,
                  host_key=HostKey(host_key.export_public_key("openssh").decode().strip(),
                                   host_key.get_fingerprint("sha256")),
                  libvirt_uri="qemu:///system", client_key=ClientKey("x", "y"), sealed_private_key="",
                  sealed_passphrase=None, created_at=now, updated_at=now)
    adapter = shell()
    cpu, wall = time.process_time(), time.monotonic()
    codes = set()
    for _ in range(n):
        try:
            await adapter.run(AgentCredentials(agent, refused_key, "pw"), ["echo", "x"])
        except Exception as error:  # a benchmark reports whatever failed
            codes.add(getattr(error, "code", type(error).__name__))
    print(f"{n} failing requests: {time.process_time() - cpu:.2f} s CPU, {time.monotonic() - wall:.2f} s wall; "
          f"errors {sorted(codes)}")
    await adapter.close()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
