"""JSON in and out: one strict cattrs converter, and the response shapes (views) of the API.

Requests are structured into ``core.commands`` classes (unknown fields rejected, no type coercion:
``"22"`` is not a port); responses are views built from domain objects and unstructured. The OpenAPI
document is generated from these same classes.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from core.commands import BridgeRequest
from core.consoles import IssuedTicket
from core.errors import FieldError, ValidationFailed
from core.live import Event, Webhook
from core.model import Agent, AgentCredentials, ApiKey, AuditEvent, User
from core.ports import CommandResult
from core.results import AgentCheck, CreatedVm, Failure, FleetEntry, HostFacts, VmInfo, WaitedAction
from core.virsh import INT_DIGITS_MAX, GuestInterface, Network, Pool, Snapshot, VmStats, VmSummary, Volume
from core.webhooks import DeliveryRecord, NewWebhookSecret

T = TypeVar("T")


def _strict(kind: type, label: str) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        if type(value) is not kind:  # bool is not an int, 1 is not a bool, "1" is not an int
            raise TypeError(f"must be {label}")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")  # JSON's \ud800 escapes decode to lone surrogates
            except UnicodeEncodeError:
                raise TypeError("must be valid Unicode text (no lone surrogates)") from None
        return value

    return structure


def make_converter(*, forbid_extra_keys: bool = True) -> cattrs.Converter:
    """The JSON rules: strict types both ways, times in ISO 8601 (UTC as ``Z``). The HTTP client
    (entrypoints/client.py) reads answers with ``forbid_extra_keys=False``: a newer server's fields."""
    converter = cattrs.Converter(forbid_extra_keys=forbid_extra_keys)
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(bool, _strict(bool, "true or false"))
    converter.register_unstructure_hook(datetime, _iso_time)
    converter.register_structure_hook(datetime, _datetime)
    return converter


def _iso_time(value: datetime) -> str:
    # Remembered: the rows of a fleet view from the live mirror share a handful of times (one per
    # agent's last confirmation, most of them equal), and formatting was a third of its cost. Keyed
    # with the offset too: equal instants at other offsets are equal datetimes, but print otherwise.
    return _iso_time_at(value, value.utcoffset())


@functools.lru_cache(maxsize=1024)
def _iso_time_at(value: datetime, _offset: timedelta | None) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _datetime(value: Any, _type: Any) -> datetime:
    if type(value) is not str:
        raise TypeError("must be a date-time string")
    return datetime.fromisoformat(value)


converter = make_converter()


def structure(data: Any, command: type[T]) -> T:
    """Turn decoded JSON into ``command`` or raise ``ValidationFailed`` naming each bad field."""
    if not isinstance(data, dict):
        raise ValidationFailed.one("body", "must be a JSON object")
    try:
        return converter.structure(data, command)
    except ClassValidationError as group:
        raise ValidationFailed(_field_errors(group)) from None
    except ForbiddenExtraKeysError as error:
        raise ValidationFailed([FieldError(k, "unknown field") for k in sorted(error.extra_fields)]) from None


def _field_errors(group: BaseException) -> list[FieldError]:
    errors: list[FieldError] = []
    for error in getattr(group, "exceptions", ()):
        notes = [n for n in getattr(error, "__notes__", []) if n.startswith("Structuring class")]
        field = _note_field(getattr(error, "__notes__", []))
        if isinstance(error, ForbiddenExtraKeysError):
            errors += [FieldError(k, "unknown field") for k in sorted(error.extra_fields)]
        elif isinstance(error, KeyError) and field:
            errors.append(FieldError(field, "is required"))
        elif isinstance(error, ClassValidationError):
            errors += _field_errors(error)
        elif field:
            message = str(error) if isinstance(error, TypeError) and str(error).startswith("must") else None
            errors.append(FieldError(field, message or "has the wrong type"))
        elif not notes:
            errors.append(FieldError("body", str(error)))
    return errors or [FieldError("body", "is not valid")]


def _note_field(notes: list[str]) -> str | None:
    for note in notes:
        # cattrs notes look like "Structuring class NewAgent @ attribute port"
        marker = "@ attribute "
        if marker in note:
            return note.split(marker, 1)[1].strip()
    return None


# ---------------------------------------------------------------------- response shapes


@attrs.frozen
class UserView:
    id: int
    name: str
    email: str | None
    api_key_prefix: str
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserView:
        return cls(user.id, user.name, user.email, user.api_key_prefix, user.created_at)


@attrs.frozen
class UserWithKeyView(UserView):
    """A user together with their new API key; the only time the key is ever shown."""

    api_key: str = attrs.field(kw_only=True, repr=False)

    @classmethod
    def with_key(cls, user: User, api_key: str) -> UserWithKeyView:
        return cls(user.id, user.name, user.email, user.api_key_prefix, user.created_at, api_key=api_key)


@attrs.frozen
class AgentView:
    id: int
    name: str
    hostname: str
    port: int
    username: str
    allow_unknown_hosts: bool
    host_key: str | None
    host_key_fingerprint: str | None
    key_fingerprint: str
    public_key: str
    libvirt_uri: str
    created_at: datetime
    updated_at: datetime
    key_exportable: bool = attrs.field(
        metadata={"doc": "Whether GET /agents/{id}/credentials exports the private key: uploaded keys are, "
                         "keys the portal generated are not (409 key_not_exportable)."})

    @classmethod
    def of(cls, agent: Agent) -> AgentView:
        return cls(**_agent_fields(agent))


@attrs.frozen
class CredentialsView(AgentView):
    private_key: str = attrs.field(kw_only=True, repr=False)
    private_key_passphrase: str | None = attrs.field(kw_only=True, repr=False)

    @classmethod
    def of_credentials(cls, credentials: AgentCredentials) -> CredentialsView:
        return cls(
            **_agent_fields(credentials.agent),
            private_key=credentials.private_key,
            private_key_passphrase=credentials.private_key_passphrase,
        )


# Where scripts/agent-install.sh installs the restricted shell every portal command is forced through.
AGENT_SHELL = "/usr/local/libexec/playr-agent-shell"


@attrs.frozen
class PublicKeyView:
    """The agent's SSH public key, ready for the hypervisor's ``authorized_keys``."""

    agent_id: int
    public_key: str
    key_fingerprint: str
    authorized_keys_line: str

    @classmethod
    def of(cls, agent: Agent) -> PublicKeyView:
        return cls.of_view(AgentView.of(agent))

    @classmethod
    def of_view(cls, agent: AgentView) -> PublicKeyView:
        """From the agent's view (what the command line has, locally or through the HTTP client)."""
        return cls(agent_id=agent.id, public_key=agent.public_key, key_fingerprint=agent.key_fingerprint,
                   authorized_keys_line=f'restrict,pty,command="{AGENT_SHELL}" {agent.public_key} '
                                        f"playr-portal-agent-{agent.id}")


def _agent_fields(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "hostname": agent.hostname,
        "port": agent.port,
        "username": agent.username,
        "allow_unknown_hosts": agent.allow_unknown_hosts,
        "host_key": agent.host_key.openssh if agent.host_key else None,
        "host_key_fingerprint": agent.host_key.fingerprint if agent.host_key else None,
        "key_fingerprint": agent.client_key.fingerprint,
        "public_key": agent.client_key.public_key,
        "libvirt_uri": agent.libvirt_uri,
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
        "key_exportable": not agent.key_generated,
    }


@attrs.frozen
class AuditEventView:
    id: int
    action: str
    outcome: str
    agent_id: int | None
    vm: str | None
    detail: str | None
    request_id: str
    client_address: str
    created_at: datetime
    key_id: int | None = attrs.field(metadata={"doc": "The API key that acted (null: sign-up, or the host's "
                                                      "operator on the command line)."})
    key_name: str | None = attrs.field(metadata={"doc": "That key's name when it acted."})

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventView:
        return cls(event.id, event.action, event.outcome, event.agent_id, event.vm, event.detail,
                   event.request_id, event.client_address, event.created_at, event.key_id, event.key_name)


@attrs.frozen
class AuditPage:
    """A page of audit events, newest first; pass ``next_before`` as ``before`` for the next page."""

    events: list[AuditEventView]
    next_before: int | None


@attrs.frozen
class VmView:
    """A VM as ``virsh list --all`` shows it; ``id`` is null when it is not running. ``source``
    says where the row comes from: ``live`` (the agent's watcher mirror) or ``host`` (virsh ran for
    this answer); ``observed_at`` when it was known to be true."""

    name: str
    state: str
    id: int | None
    source: str = "host"
    observed_at: datetime | None = None

    @classmethod
    def of(cls, vm: VmSummary) -> VmView:
        return cls(vm.name, vm.state, vm.id, vm.source, vm.observed_at)


@attrs.frozen
class CommandView:
    """What ran on the agent and what it answered."""

    command: list[str]
    exit_status: int
    stdout: str
    stderr: str

    @classmethod
    def of(cls, result: CommandResult) -> CommandView:
        return cls(list(result.command), result.exit_status, result.stdout, result.stderr)


@attrs.frozen
class DomInfoView:
    """``virsh dominfo`` with typed values: counts as integers, memory in KiB (``*_kib``), yes/no
    and enable/disable as booleans, ``null`` for what virsh did not print or printed otherwise;
    ``text`` keeps every line as virsh printed it, under snake_case keys."""

    id: int | None
    name: str | None
    uuid: str | None
    os_type: str | None
    state: str | None
    cpus: int | None
    cpu_time_seconds: float | None
    max_memory_kib: int | None
    used_memory_kib: int | None
    persistent: bool | None
    autostart: bool | None
    managed_save: bool | None
    security_model: str | None
    text: dict[str, str]

    @classmethod
    def of(cls, dominfo: dict[str, str | int | None]) -> DomInfoView:
        raw_id = dominfo.get("id")
        # in the order virsh printed them (the command line prints ``text``)
        text = {key: str(value) if isinstance(value, str) else "-" if value is None else str(value)
                for key, value in dominfo.items() if isinstance(value, str) or key == "id"}
        return cls(id=raw_id if isinstance(raw_id, int) else None, name=text.get("name"), uuid=text.get("uuid"),
                   os_type=text.get("os_type"), state=text.get("state"), cpus=_count(text.get("cpus")),
                   cpu_time_seconds=_seconds(text.get("cpu_time")), max_memory_kib=_kib(text.get("max_memory")),
                   used_memory_kib=_kib(text.get("used_memory")), persistent=_yes(text.get("persistent")),
                   autostart=_yes(text.get("autostart")), managed_save=_yes(text.get("managed_save")),
                   security_model=text.get("security_model"), text=text)


def _count(value: str | None) -> int | None:
    """Digits as an integer; None for anything else, or for more digits than any real count has
    (``int()`` of thousands of digits is slow, and past 4,300 it raises)."""
    ok = value is not None and len(value) <= INT_DIGITS_MAX and value.isascii() and value.isdigit()
    return int(value) if ok and value is not None else None


def _kib(value: str | None) -> int | None:
    """``"98304 KiB"`` → 98304 (virsh prints dominfo memory in KiB)."""
    number, _, unit = (value or "").partition(" ")
    return _count(number) if unit.strip() == "KiB" else None


def _seconds(value: str | None) -> float | None:
    """``"12.3s"`` → 12.3."""
    if value is None or not value.endswith("s"):
        return None
    number = value[:-1]
    if len(number) > INT_DIGITS_MAX or not number.isascii() or not number.replace(".", "", 1).isdigit():
        return None
    return float(number)


def _yes(value: str | None) -> bool | None:
    """virsh's yes/no and enable/disable words as a boolean; anything else None."""
    return {"yes": True, "enable": True, "no": False, "disable": False}.get((value or "").lower())


@attrs.frozen
class VmInfoView:
    """``virsh dominfo`` parsed and typed, with the raw command result."""

    dominfo: DomInfoView
    raw: CommandView

    @classmethod
    def of(cls, info: VmInfo) -> VmInfoView:
        return cls(dominfo=DomInfoView.of(info.dominfo), raw=CommandView.of(info.raw))


@attrs.frozen
class Health:
    status: str


# ---------------------------------------------------------------- waits, autostart, stats, snapshots, fleet, hosts
# Views copy the core value's fields by keyword (``_by_keyword``): a core field renamed or dropped
# fails loudly here instead of silently changing the public API.


def _by_keyword(view: type[T], value: object, **overrides: Any) -> T:
    """``view`` built from the same-named attributes of ``value`` (and ``overrides``)."""
    fields = {f.name: getattr(value, f.name) for f in attrs.fields(view) if f.name not in overrides}  # type: ignore[arg-type]
    return view(**fields, **overrides)


@attrs.frozen
class WaitedActionView(CommandView):
    """What ran on the agent, and (with ``?wait=``) the state the VM reached and how long it took."""

    state: str = attrs.field(kw_only=True)
    waited_seconds: float = attrs.field(kw_only=True)

    @classmethod
    def of_waited(cls, waited: WaitedAction) -> WaitedActionView:
        result = waited.result
        return cls(list(result.command), result.exit_status, result.stdout, result.stderr, state=waited.state,
                   waited_seconds=round(waited.waited_seconds, 3))


@attrs.frozen
class AutostartView:
    """Whether libvirt now starts the VM with the host, and the command that set it."""

    vm: str
    enabled: bool
    result: CommandView


@attrs.frozen
class FailureView:
    """Why one part of a larger answer failed: the error's stable code and its detail."""

    code: str
    detail: str

    @classmethod
    def of(cls, failure: Failure | None) -> FailureView | None:
        return None if failure is None else cls(code=failure.code, detail=failure.detail)


@attrs.frozen
class FleetEntryView:
    """One agent of the fleet view: its VMs, or (``vms`` null) the error that agent answered."""

    agent_id: int
    agent_name: str
    vms: list[VmView] | None
    error: FailureView | None

    @classmethod
    def of(cls, entry: FleetEntry) -> FleetEntryView:
        vms = None if entry.vms is None else [VmView.of(vm) for vm in entry.vms]
        return cls(agent_id=entry.agent_id, agent_name=entry.agent_name, vms=vms, error=FailureView.of(entry.error))


@attrs.frozen
class SnapshotView:
    """One internal snapshot. ``state`` is the VM's state when it was taken (``running``,
    ``shutoff``, ``paused``, ``disk-snapshot``); ``created_at`` null if virsh printed an odd time."""

    name: str
    created_at: datetime | None
    state: str
    parent: str | None
    current: bool

    @classmethod
    def of(cls, snapshot: Snapshot) -> SnapshotView:
        return _by_keyword(cls, snapshot)


@attrs.frozen
class CpuStatsView:
    """Host CPU time the VM used, in nanoseconds."""

    time_ns: int | None
    user_ns: int | None
    system_ns: int | None


@attrs.frozen
class VcpuStatsView:
    current: int | None
    maximum: int | None


@attrs.frozen
class BalloonStatsView:
    """Guest memory as the balloon driver reports it, in KiB (most need a balloon device in the guest)."""

    current_kib: int | None
    maximum_kib: int | None
    rss_kib: int | None
    available_kib: int | None
    usable_kib: int | None
    unused_kib: int | None


@attrs.frozen
class BlockStatsView:
    """One disk: requests and bytes read, written and flushed; sizes in bytes."""

    name: str | None
    path: str | None
    read_requests: int | None
    read_bytes: int | None
    write_requests: int | None
    write_bytes: int | None
    flush_requests: int | None
    allocation: int | None
    capacity: int | None
    physical: int | None


@attrs.frozen
class NetStatsView:
    """One network interface: bytes, packets, errors and drops received and sent."""

    name: str | None
    rx_bytes: int | None
    rx_packets: int | None
    rx_errors: int | None
    rx_drops: int | None
    tx_bytes: int | None
    tx_packets: int | None
    tx_errors: int | None
    tx_drops: int | None


@attrs.frozen
class VmStatsView:
    """``virsh domstats`` of one VM, structured; ``fields`` keeps every field virsh printed."""

    name: str
    state: str | None
    state_reason: int | None
    cpu: CpuStatsView
    vcpus: VcpuStatsView
    balloon: BalloonStatsView
    block: list[BlockStatsView]
    net: list[NetStatsView]
    fields: dict[str, str]

    @classmethod
    def of(cls, stats: VmStats) -> VmStatsView:
        return _by_keyword(cls, stats, cpu=_by_keyword(CpuStatsView, stats.cpu),
                           vcpus=_by_keyword(VcpuStatsView, stats.vcpus),
                           balloon=_by_keyword(BalloonStatsView, stats.balloon),
                           block=[_by_keyword(BlockStatsView, b) for b in stats.block],
                           net=[_by_keyword(NetStatsView, n) for n in stats.net], fields=dict(stats.fields))


@attrs.frozen
class NodeInfoView:
    """``virsh nodeinfo``: the host's processors and memory."""

    cpu_model: str | None
    cpus: int | None
    cpu_mhz: int | None
    cpu_sockets: int | None
    cores_per_socket: int | None
    threads_per_core: int | None
    numa_cells: int | None
    memory_kib: int | None


@attrs.frozen
class VersionsView:
    """The libvirt library virsh uses, the daemon it talks to, and the hypervisor with its version."""

    libvirt: str | None
    daemon: str | None
    hypervisor: str | None
    hypervisor_version: str | None


@attrs.frozen
class HostFactsView:
    """What a hypervisor says about itself: host name, processors and memory, versions."""

    hostname: str | None
    node: NodeInfoView
    versions: VersionsView

    @classmethod
    def of(cls, facts: HostFacts) -> HostFactsView:
        return cls(hostname=facts.hostname, node=_by_keyword(NodeInfoView, facts.node),
                   versions=_by_keyword(VersionsView, facts.versions))


@attrs.frozen
class AgentCheckView:
    """How an agent answered a check; ``error`` says why it failed (``reachable`` and
    ``authenticated`` say how far the connection got). Always 200: the check itself worked."""

    reachable: bool
    authenticated: bool
    host_key_fingerprint: str | None
    libvirt_reachable: bool
    round_trip_ms: float | None
    error: FailureView | None

    @classmethod
    def of(cls, check: AgentCheck) -> AgentCheckView:
        return _by_keyword(cls, check, error=FailureView.of(check.error))


# ---------------------------------------------------------------------- events (issue 18)


@attrs.frozen
class EventView:
    """One event: ``type`` is ``vm.<libvirt event>`` (vm.started, vm.stopped…), ``agent.<what>``
    (agent.watching, agent.unreachable) or ``action.<action>`` (the portal's own VM actions)."""

    id: int
    at: datetime
    agent_id: int | None
    vm: str | None
    type: str
    detail: str

    @classmethod
    def of(cls, event: Event) -> EventView:
        return cls(id=event.id, at=event.at, agent_id=event.agent_id, vm=event.vm, type=event.type,
                   detail=event.detail)


@attrs.frozen
class EventPage:
    """Events oldest first; pass ``last_id`` as ``after`` to read on from here."""

    events: list[EventView]
    last_id: int


def dump(value: Any) -> Any:
    return converter.unstructure(value)


# ---------------------------------------------------------------------- API keys and scopes (issue 20)


@attrs.frozen
class ApiKeyView:
    """An API key as its owner sees it: never the key itself, which is shown once at creation."""

    id: int
    name: str
    prefix: str = attrs.field(metadata={"doc": "The key's public prefix (its first characters)."})
    scopes: list[str]
    agents: list[int] | None = attrs.field(metadata={"doc": "The only agents the key sees; null: every agent."})
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None = attrs.field(metadata={
        "doc": "When the key was last used, to the minute (written at most once a minute per key)."})
    full: bool = attrs.field(metadata={"doc": "The user's full key (sign-up, rotate): every scope, every agent."})

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyView:
        return cls(**_key_fields(key))


@attrs.frozen
class NewApiKeyView(ApiKeyView):
    """A key just created, with the key itself: the only time it is ever shown."""

    api_key: str = attrs.field(kw_only=True, repr=False)

    @classmethod
    def with_key(cls, key: ApiKey, api_key: str) -> NewApiKeyView:
        return cls(**_key_fields(key), api_key=api_key)


def _key_fields(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "prefix": key.prefix,
            "scopes": sorted(scope.value for scope in key.scopes),
            "agents": None if key.agents is None else sorted(key.agents), "expires_at": key.expires_at,
            "created_at": key.created_at, "last_used_at": key.last_used_at, "full": key.full}


# ---------------------------------------------------------------------- provisioning (issue 16)


def _network_choice(value: Any, _type: Any) -> str | BridgeRequest | None:
    """``network``: a libvirt network's name, or ``{"bridge": NAME}``."""
    if value is None:
        return None
    if isinstance(value, str):
        return str(_strict(str, "a string")(value, str))
    if isinstance(value, dict):
        return converter.structure(value, BridgeRequest)
    raise TypeError('must be a libvirt network name or {"bridge": NAME}')


converter.register_structure_hook(str | BridgeRequest | None, _network_choice)


@attrs.frozen
class PoolView:
    """A storage pool; sizes in bytes (null when the pool is inactive)."""

    name: str
    state: str | None
    autostart: bool | None
    capacity_bytes: int | None
    allocation_bytes: int | None
    available_bytes: int | None

    @classmethod
    def of(cls, pool: Pool) -> PoolView:
        return _by_keyword(cls, pool)


@attrs.frozen
class VolumeView:
    """A volume of a pool; sizes in bytes."""

    name: str
    path: str | None
    format: str | None
    capacity_bytes: int | None
    allocation_bytes: int | None

    @classmethod
    def of(cls, volume: Volume) -> VolumeView:
        return _by_keyword(cls, volume)


@attrs.frozen
class NetworkView:
    """A libvirt network: ``state`` active or inactive, ``bridge`` its host bridge."""

    name: str
    state: str | None
    autostart: bool | None
    bridge: str | None

    @classmethod
    def of(cls, network: Network) -> NetworkView:
        return _by_keyword(cls, network)


@attrs.frozen
class GuestAddressView:
    type: str
    address: str
    prefix: int | None


@attrs.frozen
class GuestInterfaceView:
    """A guest interface: its name (the host's vnet device), MAC, libvirt network (or bridge) and
    addresses (empty until the guest agent or a DHCP lease knows one)."""

    name: str
    mac: str | None
    network: str | None
    addresses: list[GuestAddressView]

    @classmethod
    def of(cls, interface: GuestInterface) -> GuestInterfaceView:
        return cls(name=interface.name, mac=interface.mac, network=interface.network,
                   addresses=[_by_keyword(GuestAddressView, a) for a in interface.addresses])


@attrs.frozen
class CreatedVolumeView:
    pool: str
    name: str
    format: str
    capacity_bytes: int


@attrs.frozen
class CreatedVmView(VmInfoView):
    """The new VM as ``GET /agents/{id}/vms/{vm}`` shows it, the volumes created for it, and with
    ``?wait=`` the state it reached and how long that took (else null)."""

    volumes: list[CreatedVolumeView] = attrs.field(kw_only=True)
    state: str | None = attrs.field(kw_only=True)
    waited_seconds: float | None = attrs.field(kw_only=True)

    @classmethod
    def of_created(cls, created: CreatedVm) -> CreatedVmView:
        info = VmInfoView.of(created.info)
        return cls(dominfo=info.dominfo, raw=info.raw,
                   volumes=[_by_keyword(CreatedVolumeView, v) for v in created.volumes], state=created.state,
                   waited_seconds=None if created.waited_seconds is None else round(created.waited_seconds, 3))


# --- consoles (issue 17)


@attrs.frozen
class ConsoleTicketView:
    """A one-time console ticket: open ``url`` (relative to the portal's base URL, as ws:// or
    wss://) as a WebSocket within 30 s; it works once. ``vnc`` speaks raw RFB (subprotocol
    ``binary``, for noVNC); ``serial`` carries the serial console's bytes."""

    ticket: str
    url: str
    expires_at: datetime
    kind: str

    @classmethod
    def of(cls, issued: IssuedTicket) -> ConsoleTicketView:
        return cls(ticket=issued.ticket, url=f"/console/{issued.ticket}", expires_at=issued.expires_at,
                   kind=issued.kind.value)


# ---------------------------------------------------------------------- the fleet view at scale (issue 22)


def _vm_row(vm: VmView) -> dict[str, Any]:
    # Written out by hand: a fleet view from the live mirror is thousands of rows, and cattrs'
    # generic path (two optional fields per row) was half of its cost. Kept equal to the generic
    # unstructuring by tests/unit/test_views.py.
    return {"name": vm.name, "state": vm.state, "id": vm.id, "source": vm.source,
            "observed_at": None if vm.observed_at is None else _iso_time(vm.observed_at)}


converter.register_unstructure_hook(VmView, _vm_row)


# --- webhooks (issue 18)


@attrs.frozen
class WebhookView:
    """A webhook as its owner sees it: never its secret, which is shown on create and rotate only."""

    id: int
    url: str
    events: list[str] = attrs.field(metadata={"doc": "Event types or families (vm.*) delivered; empty: every event."})
    agents: list[int] | None = attrs.field(metadata={"doc": "Only events of these agents; null: every agent."})
    active: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, hook: Webhook) -> WebhookView:
        return cls(**_webhook_fields(hook))


@attrs.frozen
class NewWebhookView(WebhookView):
    """A webhook with its signing secret: shown this once (create, rotate-secret), never again."""

    secret: str = attrs.field(kw_only=True, repr=False, metadata={
        "doc": "HMAC-SHA256 key of the X-Playr-Signature header (docs/events.md shows how to verify it)."})

    @classmethod
    def with_secret(cls, created: NewWebhookSecret) -> NewWebhookView:
        return cls(**_webhook_fields(created.webhook), secret=created.secret)


def _webhook_fields(hook: Webhook) -> dict[str, Any]:
    return {"id": hook.id, "url": hook.url, "events": list(hook.types),
            "agents": None if hook.agent_ids is None else sorted(hook.agent_ids), "active": hook.active,
            "created_at": hook.created_at, "updated_at": hook.updated_at}


@attrs.frozen
class DeliveryAttemptView:
    """One POST of a delivery: the receiver's status code and the start of its answer, or the error."""

    number: int
    at: datetime
    seconds: float
    status_code: int | None
    error: str | None
    response: str | None = attrs.field(metadata={"doc": "The first characters of the receiver's answer."})


@attrs.frozen
class DeliveryView:
    """One event on its way to the webhook: ``pending`` (next attempt at ``next_attempt_at``),
    ``delivered`` (a 2xx answer) or ``failed`` (every attempt failed). ``id`` is the
    ``X-Playr-Delivery`` header: the same on every attempt."""

    id: int
    event_id: int
    event_type: str
    status: str
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    attempts: list[DeliveryAttemptView]

    @classmethod
    def of(cls, record: DeliveryRecord) -> DeliveryView:
        d = record.delivery
        return cls(id=d.id, event_id=d.event_id, event_type=d.event_type, status=d.status, next_attempt_at=d.next_at,
                   created_at=d.created_at, finished_at=d.finished_at,
                   attempts=[DeliveryAttemptView(number=a.number, at=a.at, seconds=a.seconds,
                                                 status_code=a.status_code, error=a.error, response=a.response)
                             for a in record.attempts])
