"""An agent's SSH credentials: finding an agent its caller owns, and sealing or opening its key.

Shared by the agent registry (which seals keys) and remote commands (which open them to connect).
"""

from __future__ import annotations

from core.errors import AgentNotFound
from core.model import Agent, AgentCredentials, Caller
from core.ports import SecretBox, Transaction


def owned_agent(tx: Transaction, caller: Caller, agent_id: int) -> Agent:
    """One of the caller's agents; ``AgentNotFound`` if it is not theirs or does not exist — the
    same answer either way, so nobody learns that another user's agent exists. A caller whose key
    is limited to some agents gets the same answer for the user's other agents: every path to an
    agent goes through here (or filters lists with ``Caller.sees_agent``)."""
    agent = tx.get_agent(caller.user.id, agent_id) if caller.sees_agent(agent_id) else None
    if agent is None:
        raise AgentNotFound()
    return agent


class Keyring:
    """Seals agents' private keys and passphrases with the server's key, and opens them again."""

    def __init__(self, secrets: SecretBox) -> None:
        self.secrets = secrets

    def seal(self, owner_id: int, what: str, plaintext: str) -> str:
        return self.secrets.seal(plaintext, context=_seal_context(owner_id, what))

    def seal_optional(self, owner_id: int, what: str, plaintext: str | None) -> str | None:
        return None if plaintext is None else self.seal(owner_id, what, plaintext)

    def open(self, agent: Agent) -> AgentCredentials:
        """The agent with its key material in clear (``SecretUnreadable`` with another server key)."""
        passphrase = agent.sealed_passphrase
        return AgentCredentials(
            agent=agent,
            private_key=self.secrets.unseal(agent.sealed_private_key,
                                            context=_seal_context(agent.owner_id, "private_key")),
            private_key_passphrase=None if passphrase is None else self.secrets.unseal(
                passphrase, context=_seal_context(agent.owner_id, "passphrase")),
        )


def _seal_context(owner_id: int, what: str) -> str:
    # Binding the owner into the ciphertext means a sealed key copied into another user's row in
    # the database will not open.
    return f"agent-credential/{what}/user:{owner_id}"
