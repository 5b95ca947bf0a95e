"""Reaching agents over SSH: the pooled asyncssh transport (``shell.py``) and the resolution and
checking of agent addresses against ``MANAGEMENT_AGENT_NETWORKS`` (``addresses.py``), which the
transport and registration share."""

from adapters.ssh.addresses import ResolvingAgentAddresses
from adapters.ssh.shell import AsyncsshShell

__all__ = ["AsyncsshShell", "ResolvingAgentAddresses"]
