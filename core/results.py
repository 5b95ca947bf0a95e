"""What use cases answer with, beyond the domain model: parsed remote facts and summaries.

These are core values; the entrypoints turn each into a view (``entrypoints/shapes.py``) before it
reaches the wire, so renaming a field here never silently changes the public API.
"""

from __future__ import annotations

import attrs

from core.errors import PortalError
from core.model import User
from core.ports import CommandResult
from core.virsh import NodeInfo, Versions, VmSummary


@attrs.frozen
class NewApiKey:
    """A user together with the plaintext API key just issued to them (shown once)."""

    user: User
    api_key: str = attrs.field(repr=False)


@attrs.frozen
class VmInfo:
    """``virsh dominfo`` parsed, with the command result it came from."""

    dominfo: dict[str, str | int | None]
    raw: CommandResult


@attrs.frozen
class WaitedAction:
    """A VM action and the wait that followed it: the state reached and how long it took."""

    result: CommandResult
    state: str
    waited_seconds: float


@attrs.frozen
class HostFacts:
    """What a hypervisor says about itself: host name, processors and memory, versions."""

    hostname: str | None
    node: NodeInfo
    versions: Versions


@attrs.frozen
class Failure:
    """Why one part of a larger answer failed: the error's stable code and its detail."""

    code: str
    detail: str

    @classmethod
    def of(cls, error: PortalError) -> Failure:
        return cls(error.code, error.detail)


@attrs.frozen
class FleetEntry:
    """One agent of the fleet view: its VMs, or (``vms`` None) why they could not be listed."""

    agent_id: int
    agent_name: str
    vms: list[VmSummary] | None
    error: Failure | None


@attrs.frozen
class AgentCheck:
    """How an agent answered a check. ``host_key_fingerprint`` is the pinned key's; the round trip
    is one virsh command over the pooled connection (connecting first if none was open)."""

    reachable: bool
    authenticated: bool
    host_key_fingerprint: str | None
    libvirt_reachable: bool
    round_trip_ms: float | None
    error: Failure | None


# ---------------------------------------------------------------------- provisioning (issue 16)


@attrs.frozen
class CreatedVolume:
    """A volume a provisioning request created on the host."""

    pool: str
    name: str
    format: str
    capacity_bytes: int


@attrs.frozen
class CreatedVm:
    """A VM just created (or cloned): as ``GET /agents/{id}/vms/{vm}`` shows it, the volumes made
    for it, and with ``?wait=`` the state reached and how long it took."""

    info: VmInfo
    volumes: list[CreatedVolume]
    state: str | None = None
    waited_seconds: float | None = None
