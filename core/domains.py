"""What the portal writes to a host when it provisions: the domain XML of a new VM (from a validated
request, never from a client's XML), the rewrite of a VM's XML into its clone's, and the files of a
cloud-init NoCloud seed.

Pure functions, property-tested. XML is built with ``xml.etree.ElementTree`` (every value is
escaped by the serializer; nothing is pasted into markup). The seed's files are text the portal
writes; the ISO image itself is packed by an adapter (``core.ports.SeedImages``).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import attrs

DOMAIN_TYPES = ("kvm", "qemu")
SERIAL_LOG_DIR = "/var/log/libvirt/qemu"  # where libvirt keeps each VM's logs; the serial log goes beside them
USER_DATA_MAX = 64 * 1024  # bytes (UTF-8) of user data, and of network config
SEED_LABEL = "cidata"
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_BRIDGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


@attrs.frozen
class DiskSpec:
    """A disk of the new VM: a volume of a pool, as a disk or as a CD-ROM (the seed)."""

    pool: str
    volume: str
    format: str  # qcow2 or raw
    cdrom: bool = False


@attrs.frozen
class DomainSpec:
    """Everything the domain XML says, checked by the provisioning use case before it is built."""

    name: str
    vcpus: int
    memory_mib: int
    disks: Sequence[DiskSpec]
    network: str | None = None
    bridge: str | None = None
    domain_type: str = "kvm"


def check_hostname(name: str) -> str | None:
    """Why ``name`` is refused as a guest host name (RFC 1123: dot-separated labels of letters,
    digits and inner hyphens, 63 characters each, 253 in all), or None."""
    if not 1 <= len(name) <= 253:
        return "must be 1 to 253 characters"
    if not all(_HOSTNAME_LABEL.fullmatch(label) for label in name.split(".")):
        return "must be dot-separated labels of letters, digits and inner hyphens (at most 63 characters each)"
    return None


def check_bridge(name: str) -> str | None:
    """Why ``name`` is refused as a host bridge name (a Linux interface name), or None."""
    if not _BRIDGE.fullmatch(name):
        return "must be a Linux interface name: 1 to 15 letters, digits, '_', '.', '-', not starting with one of '_.-'"
    return None


def serial_log_path(vm: str) -> str:
    """The file libvirt copies the VM's serial console to (besides the pty): readable on the host."""
    return f"{SERIAL_LOG_DIR}/{vm}-serial0.log"


def _sub(parent: ElementTree.Element, tag: str, text: str | None = None, **attributes: str) -> ElementTree.Element:
    element = ElementTree.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def _disk(devices: ElementTree.Element, disk: DiskSpec, index: int) -> None:
    element = _sub(devices, "disk", type="volume", device="cdrom" if disk.cdrom else "disk")
    _sub(element, "driver", name="qemu", type=disk.format)
    _sub(element, "source", pool=disk.pool, volume=disk.volume)
    if disk.cdrom:
        # virtio-scsi: every machine type has it, and so do cloud kernels (Debian's has no AHCI)
        _sub(element, "target", dev=f"sd{chr(ord('a') + index)}", bus="scsi")
        _sub(element, "readonly")
    else:
        _sub(element, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")


def domain_xml(spec: DomainSpec) -> str:
    """The domain XML of a new VM. libvirt gives it a UUID and MAC addresses when it is defined."""
    if spec.domain_type not in DOMAIN_TYPES:
        raise ValueError(f"domain type must be one of {DOMAIN_TYPES}")
    domain = ElementTree.Element("domain", type=spec.domain_type)
    _sub(domain, "name", spec.name)
    _sub(domain, "description", "created by the PlayrServers portal")
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus))
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm")
    _sub(os_element, "boot", dev="hd")
    _sub(os_element, "boot", dev="cdrom")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.domain_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    disks = [d for d in spec.disks if not d.cdrom]
    cdroms = [d for d in spec.disks if d.cdrom]
    for index, disk in enumerate(disks):
        _disk(devices, disk, index)
    if cdroms:
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for index, disk in enumerate(cdroms):
        _disk(devices, disk, index)
    if spec.network is not None:
        interface = _sub(devices, "interface", type="network")
        _sub(interface, "source", network=spec.network)
        _sub(interface, "model", type="virtio")
    elif spec.bridge is not None:
        interface = _sub(devices, "interface", type="bridge")
        _sub(interface, "source", bridge=spec.bridge)
        _sub(interface, "model", type="virtio")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    _sub(serial, "log", file=serial_log_path(spec.name), append="off")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    graphics = _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")
    _sub(graphics, "listen", type="address", address="127.0.0.1")
    _sub(devices, "memballoon", model="virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    return ElementTree.tostring(domain, encoding="unicode")


def clone_xml(source_xml: str, name: str, disks: dict[str, DiskSpec]) -> str:
    """The XML of ``source_xml``'s clone called ``name``: no UUID and no MAC addresses (libvirt
    makes new ones), each disk whose target is a key of ``disks`` on its new volume, every other
    CD-ROM emptied (a cloud-init seed belongs to its VM), the serial log and NVRAM file its own."""
    if "<!DOCTYPE" in source_xml.upper() or "<!ENTITY" in source_xml.upper():
        raise ValueError("the source VM's XML has a DOCTYPE")
    domain = ElementTree.fromstring(source_xml)  # noqa: S314 - no DOCTYPE, so no entities
    for tag in ("uuid", "name"):
        for element in domain.findall(tag):
            domain.remove(element)
    domain.insert(0, _element("name", name))
    devices = domain.find("devices")
    if devices is None:
        devices = ElementTree.SubElement(domain, "devices")
    os_element = domain.find("os")
    if os_element is not None:
        for nvram in os_element.findall("nvram"):
            os_element.remove(nvram)  # libvirt gives the clone a UEFI variables file of its own
    for element in devices.findall("interface"):
        for mac in element.findall("mac"):
            element.remove(mac)
        for vnet in element.findall("target"):
            element.remove(vnet)  # vnetN names belong to the running source
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        source = disk.find("source")
        if dev in disks:
            spec = disks[dev]
            disk.set("type", "volume")
            if source is not None:
                disk.remove(source)
            disk.insert(1, _element("source", pool=spec.pool, volume=spec.volume))
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", spec.format)
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
        elif disk.get("device") == "cdrom" and source is not None:
            disk.remove(source)
            disk.set("type", "file")
    for log in domain.findall("devices/serial/log") + domain.findall("devices/console/log"):
        log.set("file", serial_log_path(name))
    return ElementTree.tostring(domain, encoding="unicode")


def _element(tag: str, text: str | None = None, **attributes: str) -> ElementTree.Element:
    element = ElementTree.Element(tag, attributes)
    element.text = text
    return element


# ---------------------------------------------------------------------- the cloud-init seed


def meta_data(instance_id: str, hostname: str) -> str:
    """NoCloud ``meta-data``: plain ``key: value`` lines (both values are checked words: an
    instance id of hex digits and dashes, an RFC 1123 host name)."""
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def user_data(hostname: str, keys: Sequence[str], extra: str | None) -> str:
    """The seed's ``user-data``: the portal's own ``#cloud-config`` (host name, SSH keys) written
    as JSON, which YAML reads as it is (nothing to escape by hand). With the caller's user data as
    well, both go as a MIME multipart message, which cloud-init merges part by part."""
    ours = "#cloud-config\n" + json.dumps({"hostname": hostname, "preserve_hostname": False,
                                           "ssh_authorized_keys": list(keys)}, indent=1) + "\n"
    if extra is None:
        return ours
    message = MIMEMultipart()
    # no charset given: ASCII text (ours always is: JSON escapes the rest) travels as it is, 7bit;
    # other text as UTF-8 in base64
    message.attach(MIMEText(ours, "cloud-config"))
    subtype = "cloud-config" if extra.startswith("#cloud-config") else \
        "x-shellscript" if extra.startswith("#!") else "plain"
    message.attach(MIMEText(extra, subtype))
    return message.as_string()


def seed_files(instance_id: str, hostname: str, keys: Sequence[str], extra_user_data: str | None,
               network_config: str | None) -> dict[str, bytes]:
    """The files of a NoCloud seed, by name."""
    files = {"meta-data": meta_data(instance_id, hostname).encode(),
             "user-data": user_data(hostname, keys, extra_user_data).encode()}
    if network_config is not None:
        files["network-config"] = network_config.encode()
    return files
