"""What callers ask the portal to do: the request shapes of the use cases.

The HTTP layer turns JSON into these with one cattrs converter (unknown fields rejected, types
checked strictly) and the OpenAPI document is generated from them, so each shape is written once.
Field metadata ``doc`` describes the field for the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

import attrs

from core.model import DEFAULT_LIBVIRT_URI, DEFAULT_SSH_PORT


class _Unchanged:
    """Marks a PATCH field the caller did not send (distinct from an explicit ``null``)."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        return False


UNCHANGED: Any = _Unchanged()


def is_set(value: object) -> bool:
    return value is not UNCHANGED


def doc(text: str, **schema: Any) -> dict[str, Any]:
    return {"doc": text, "schema": schema}


@attrs.frozen(kw_only=True)
class NewUser:
    name: str = attrs.field(metadata=doc("Display name, 1-100 characters.", minLength=1, maxLength=100))
    email: str | None = attrs.field(
        default=None, metadata=doc("Optional e-mail address, unique across users.", maxLength=255)
    )


@attrs.frozen(kw_only=True)
class NewAgent:
    """A hypervisor to register. Send either private_key (an uploaded key, with its passphrase if it
    is encrypted) or "generate_key": true (the portal generates an ed25519 pair): exactly one of
    them, else a 422 names the field. (Said in words rather than as an anyOf of consts, which common
    client generators turn into invalid code.)"""

    name: str = attrs.field(metadata=doc("Name of the hypervisor, unique for its owner.", minLength=1, maxLength=100))
    hostname: str = attrs.field(metadata=doc("DNS name or IP address of the SSH server.", maxLength=255))
    username: str = attrs.field(metadata=doc("SSH user on the hypervisor.", maxLength=64))
    private_key: str | None = attrs.field(
        default=None, repr=False,
        metadata=doc("SSH private key, OpenSSH or PEM text (sealed at rest). Required unless generate_key is true."),
    )
    generate_key: bool = attrs.field(
        default=False,
        metadata=doc("Let the portal generate an ed25519 key pair instead of uploading private_key; the answer's "
                     "public_key goes into the hypervisor's authorized_keys."),
    )
    port: int = attrs.field(default=DEFAULT_SSH_PORT, metadata=doc("SSH port.", minimum=1, maximum=65535))
    private_key_passphrase: str | None = attrs.field(
        default=None, repr=False, metadata=doc("Passphrase of an encrypted private key.")
    )
    allow_unknown_hosts: bool = attrs.field(
        default=False,
        metadata=doc("Trust the first host key seen and pin it (like OpenSSH accept-new)."),
    )
    host_key: str | None = attrs.field(
        default=None, metadata=doc("Pinned SSH host public key, one OpenSSH line (ssh-ed25519 AAAA...).")
    )
    libvirt_uri: str | None = attrs.field(
        default=None, metadata=doc(f"libvirt connection URI on the host (default {DEFAULT_LIBVIRT_URI}).")
    )


@attrs.frozen(kw_only=True)
class AgentChanges:
    """A partial update: fields left ``UNCHANGED`` keep their value; ``null`` clears optional ones."""

    name: str = attrs.field(default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.name.metadata)
    hostname: str = attrs.field(default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.hostname.metadata)
    username: str = attrs.field(default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.username.metadata)
    private_key: str = attrs.field(
        default=UNCHANGED, repr=False,
        metadata=doc("A new SSH private key, OpenSSH or PEM text (or POST rotate-key to have one generated)."),
    )
    port: int = attrs.field(default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.port.metadata)
    private_key_passphrase: str | None = attrs.field(
        default=UNCHANGED, repr=False, metadata=NewAgent.__attrs_attrs__.private_key_passphrase.metadata
    )
    allow_unknown_hosts: bool = attrs.field(
        default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.allow_unknown_hosts.metadata
    )
    host_key: str | None = attrs.field(default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.host_key.metadata)
    libvirt_uri: str | None = attrs.field(
        default=UNCHANGED, metadata=NewAgent.__attrs_attrs__.libvirt_uri.metadata
    )


@attrs.frozen(kw_only=True)
class NewSnapshot:
    """A libvirt internal snapshot to take of a VM (its disks need to be qcow2)."""

    name: str = attrs.field(metadata=doc(
        "Snapshot name, same rules as VM names: letters, digits, inner spaces and . _ - + : @ , = %.",
        minLength=1, maxLength=200))
    description: str | None = attrs.field(
        default=None, metadata=doc("Optional free text kept with the snapshot in libvirt; one line.", maxLength=1000)
    )


@attrs.frozen(kw_only=True)
class AutostartChange:
    """Whether libvirt starts the VM when the host (libvirtd) starts."""

    enabled: bool = attrs.field(metadata=doc("true: start with the host (virsh autostart); false: do not."))


# ---------------------------------------------------------------------- API keys and scopes (issue 20)


@attrs.frozen(kw_only=True)
class NewKey:
    """An API key to create, with at most the creating key's powers."""

    name: str = attrs.field(metadata=doc("What the key is for, 1-100 characters (e.g. \"ci-restart-web\").",
                                         minLength=1, maxLength=100))
    scopes: list[str] = attrs.field(metadata=doc(
        "What the key may do: any of read, operate, provision, agents, credentials, keys (each only if the "
        "creating key has it).", minItems=1,
        items={"type": "string", "enum": ["read", "operate", "provision", "agents", "credentials", "keys"]}))
    agents: list[int] | None = attrs.field(default=None, metadata=doc(
        "Only these agents (ids of yours); others are 404 to the key, as if they did not exist. Omit or null: "
        "every agent (only a key not limited to agents may create one)."))
    expires_at: str | None = attrs.field(default=None, metadata=doc(
        "When the key stops working (RFC 3339 with a zone, e.g. 2027-01-31T00:00:00Z); then 401 "
        "api_key_expired. Omit: never (or the creating key's expiry, if it has one).", format="date-time"))


# ---------------------------------------------------------------------- provisioning (issue 16)


@attrs.frozen(kw_only=True)
class DiskRequest:
    """The VM's disk: a new qcow2 volume in ``pool``, an overlay on ``base_volume`` (a volume of the
    same pool, e.g. a cloud image) grown to ``size_gib``, or a blank disk of that size."""

    pool: str = attrs.field(metadata=doc("Storage pool on the host (GET /agents/{id}/pools).", minLength=1,
                                         maxLength=200))
    size_gib: int = attrs.field(metadata=doc("Disk size in GiB (at least the base volume's size).", minimum=1,
                                             maximum=65536))
    base_volume: str | None = attrs.field(
        default=None, metadata=doc("A volume of the same pool the disk starts from (copy-on-write overlay); "
                                   "without it the disk is blank.", minLength=1, maxLength=200))


@attrs.frozen(kw_only=True)
class BridgeRequest:
    """Attach the VM to a host bridge instead of a libvirt network."""

    bridge: str = attrs.field(metadata=doc("Name of a bridge on the host (e.g. br0).", minLength=1, maxLength=15))


@attrs.frozen(kw_only=True)
class CloudInitRequest:
    """What the NoCloud seed (a CD labelled ``cidata``) gives the guest's cloud-init."""

    hostname: str | None = attrs.field(
        default=None, metadata=doc("Guest host name (RFC 1123; default: the VM name when it is one).", maxLength=253))
    ssh_authorized_keys: list[str] = attrs.field(
        factory=list, metadata=doc("OpenSSH public keys for the default user, one per item.", maxItems=100))
    user_data: str | None = attrs.field(
        default=None, metadata=doc("User data (at most 64 KiB): '#cloud-config' YAML (checked) or a script; merged "
                                   "with hostname and keys as a multipart message.", maxLength=65536))
    network_config: str | None = attrs.field(
        default=None, metadata=doc("cloud-init network-config (version 1 or 2) as YAML text, at most 64 KiB.",
                                   maxLength=65536))


@attrs.frozen(kw_only=True)
class NewVm:
    """A VM to create on an agent. The portal writes its domain XML from these fields (never from
    a client's XML): virtio disk and network, a serial console, VNC on the host's loopback, a
    qemu-guest-agent channel, and the cloud-init seed as a CD-ROM."""

    name: str = attrs.field(metadata=doc("VM name (same rules as the {vm} path parameter).", minLength=1,
                                         maxLength=200))
    vcpus: int = attrs.field(metadata=doc("Virtual CPUs (at most the host's CPUs).", minimum=1, maximum=1024))
    memory_mib: int = attrs.field(metadata=doc("Memory in MiB (at least 64, at most the host's memory).", minimum=64,
                                               maximum=16777216))
    disk: DiskRequest = attrs.field(metadata=doc("The VM's disk."))
    network: str | BridgeRequest | None = attrs.field(
        default=None, metadata=doc("A libvirt network name (GET /agents/{id}/networks), or {\"bridge\": NAME}; "
                                   "none: no network interface."))
    cloud_init: CloudInitRequest | None = attrs.field(default=None, metadata=doc("Build and attach a NoCloud seed."))
    start: bool = attrs.field(default=True, metadata=doc("Start the VM once defined (default true)."))
    autostart: bool = attrs.field(default=False, metadata=doc("Start the VM with the host (default false)."))


@attrs.frozen(kw_only=True)
class CloneRequest:
    """A copy of a shut-off VM: its disks copied as new volumes, new UUID and MAC addresses."""

    name: str = attrs.field(metadata=doc("The new VM's name.", minLength=1, maxLength=200))
    start: bool = attrs.field(default=False, metadata=doc("Start the clone once defined (default false)."))


# --- consoles (issue 17)


@attrs.frozen(kw_only=True)
class NewConsole:
    """Which console of the VM to open: its serial console, or its VNC display (raw RFB)."""

    kind: str = attrs.field(metadata=doc("serial (virsh console) or vnc (RFB, for noVNC).",
                                         enum=["serial", "vnc"]))


# --- webhooks (issue 18)


@attrs.frozen(kw_only=True)
class NewWebhook:
    """A webhook: where the portal POSTs your events, signed with a secret shown once."""

    url: str = attrs.field(metadata=doc(
        "http:// or https:// URL the portal POSTs each event to (no user:password@, no #fragment). Its host must "
        "be, and resolve to, addresses within MANAGEMENT_WEBHOOK_ALLOW (by default: not loopback, link-local, "
        "multicast, unspecified or reserved), else 422 webhook_target_refused.", minLength=1, maxLength=2000))
    events: list[str] = attrs.field(factory=list, metadata=doc(
        "Event types to deliver (vm.started, agent.unreachable, action.start…) or families (vm.*); empty or "
        "omitted: every event.", maxItems=50, items={"type": "string", "maxLength": 64}))
    agents: list[int] | None = attrs.field(default=None, metadata=doc(
        "Only events of these agents (ids of yours). Omit or null: every agent (a key limited to agents: its "
        "agents)."))
    active: bool = attrs.field(default=True, metadata=doc("false: paused; events meanwhile are not queued for it, "
                                                          "pending deliveries wait until set true again."))


@attrs.frozen(kw_only=True)
class WebhookChanges:
    """A partial update of a webhook: fields left out keep their value."""

    url: str = attrs.field(default=UNCHANGED, metadata=NewWebhook.__attrs_attrs__.url.metadata)
    events: list[str] = attrs.field(default=UNCHANGED, metadata=NewWebhook.__attrs_attrs__.events.metadata)
    agents: list[int] | None = attrs.field(default=UNCHANGED, metadata=NewWebhook.__attrs_attrs__.agents.metadata)
    active: bool = attrs.field(default=UNCHANGED, metadata=NewWebhook.__attrs_attrs__.active.metadata)
