"""Properties of the provisioning parsers and builders (issue 16), and of the restricted shell's
check of the domain XML ``virsh define`` reads: the portal's own XML always passes it, with any
names; hostile XML (generated) never does."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import domains, virsh
from core.domains import DiskSpec, DomainSpec
from tests.unit.test_agent_shell import POOL, POOLS, SHELL_FILE, URI, shell

text = st.text(st.characters(codec="utf-8"), max_size=300)
names = st.from_regex(r"\A\w[\w .+:@,=%-]{0,40}\Z").filter(lambda n: virsh.check_vm_name(n) is None and
                                                           n == n.strip())
volumes = st.from_regex(r"\A\w[\w.+:@,=%-]{0,40}\Z").filter(lambda n: virsh.check_object_name(n) is None)


@given(text)
def test_every_parser_reads_any_text_without_raising(stdout: str) -> None:
    virsh.parse_pool_info(stdout, "p")
    virsh.parse_network_info(stdout, "n")
    virsh.parse_volume_list(stdout)
    virsh.parse_domifaddr(stdout)
    virsh.parse_volume_xml(stdout, "v")
    virsh.parse_domain_xml(stdout)
    virsh.parse_names(stdout)


@given(st.lists(st.tuples(volumes, st.from_regex(r"\A/[\w /.-]{0,40}\Z")), max_size=8))
def test_volume_lists_are_read_back_whatever_the_names_and_paths(rows: list[tuple[str, str]]) -> None:
    # virsh pads each cell to the widest one, counted in display cells (a wide character takes two)
    width = max([4, *(virsh._width(name) for name, _ in rows)])
    pad = lambda cell: cell + " " * (width - virsh._width(cell))  # noqa: E731
    stdout = f" {pad('Name')}   Path\n" + "-" * 40 + "\n" + "".join(
        f" {pad(name)}   {path}\n" for name, path in rows) + "\n"
    assert virsh.parse_volume_list(stdout) == [(name, path.strip()) for name, path in rows]


@given(st.integers(0, 2**63), st.integers(0, 2**63), st.integers(0, 2**63))
def test_pool_sizes_are_read_in_bytes(capacity: int, allocation: int, available: int) -> None:
    pool = virsh.parse_pool_info(f"Name:           p\nState:          running\nAutostart:      no\n"
                                 f"Capacity:       {capacity}\nAllocation:     {allocation}\n"
                                 f"Available:      {available}\n", "p")
    assert (pool.capacity_bytes, pool.allocation_bytes, pool.available_bytes) == (capacity, allocation, available)


def test_xml_with_a_doctype_is_never_parsed() -> None:
    bomb = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
            "<volume><name>&b;</name></volume>")
    assert virsh.parse_volume_xml(bomb, "v").path is None
    assert virsh.parse_domain_xml(bomb).disks == []


def spec(name: str, pool: str, volume: str, network: str | None, bridge: str | None) -> DomainSpec:
    return DomainSpec(name=name, vcpus=2, memory_mib=512, network=network, bridge=bridge, domain_type="qemu",
                      disks=[DiskSpec(pool, volume, "qcow2"), DiskSpec(pool, volume + "-seed.iso", "raw", cdrom=True)])


@given(name=names, volume=volumes, network=st.none() | volumes)
def test_the_portals_domain_xml_says_exactly_the_names_it_was_given(name: str, volume: str,
                                                                    network: str | None) -> None:
    root = ElementTree.fromstring(domains.domain_xml(spec(name, POOL, volume, network, None)))
    assert root.findtext("name") == name
    assert [d.find("source").get("volume") for d in root.iter("disk")] == [volume, volume + "-seed.iso"]  # type: ignore[union-attr]
    if network is not None:
        assert root.find("devices/interface/source").get("network") == network  # type: ignore[union-attr]


@given(name=names, volume=volumes, network=st.none() | volumes, bridge=st.sampled_from([None, "br0", "virbr-x"]))
def test_the_agent_shell_accepts_every_domain_the_portal_writes(name: str, volume: str, network: str | None,
                                                                bridge: str | None) -> None:
    shell.check_domain_xml(domains.domain_xml(spec(name, POOL, volume, network, bridge)), POOLS)


@given(name=names)
def test_the_agent_shell_accepts_every_clone_the_portal_writes(name: str) -> None:
    source = domains.domain_xml(spec("web1", POOL, "web1.qcow2", "default", None))
    clone = domains.clone_xml(source, name, {"vda": DiskSpec(POOL, "copy.qcow2", "qcow2")})
    shell.check_domain_xml(clone, POOLS)
    assert ElementTree.fromstring(clone).findtext("name") == name


HOSTILE_DEVICES = [
    "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='2' function='0'/></source>"
    "</hostdev>",
    "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>",
    "<interface type='direct'><source dev='eth0' mode='bridge'/></interface>",
    "<interface type='hostdev'><source><address type='pci' bus='1'/></source></interface>",
    "<interface type='ethernet'><script path='/tmp/x.sh'/></interface>",
    "<interface type='network'><source network='default'/><script path='/tmp/x.sh'/></interface>",
    "<disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdz'/></disk>",
    "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz'/></disk>",
    "<disk type='volume' device='disk'><source pool='other' volume='x'/><target dev='vdz'/></disk>",
    "<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='10.0.0.1'/></source>"
    "<target dev='vdz'/></disk>",
    "<serial type='file'><source path='/root/.ssh/authorized_keys'/></serial>",
    "<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4444'/></serial>",
    "<serial type='pty'><log file='/etc/cron.d/x'/></serial>",
    "<serial type='pty'><log file='/var/log/libvirt/qemu/../../../etc/x'/></serial>",
    "<channel type='unix'><source mode='bind' path='/run/x.sock'/><target type='virtio' name='x'/></channel>",
    "<graphics type='vnc' port='-1' listen='0.0.0.0'/>",
    "<graphics type='vnc' port='-1'><listen type='address' address='0.0.0.0'/></graphics>",
    "<graphics type='vnc' port='-1'/>",
    "<graphics type='spice'><listen type='network' network='default'/></graphics>",
    "<emulator>/tmp/evil</emulator>",
    "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event0'/></input>",
    "<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>",
    "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>",
    "<shmem name='x'><model type='ivshmem-plain'/></shmem>",
    "<redirdev bus='usb' type='tcp'><source mode='connect' host='10.0.0.1' service='4000'/></redirdev>",
    "<smartcard mode='passthrough' type='tcp'><source mode='bind' host='0.0.0.0' service='2001'/></smartcard>",
    "<audio id='1' type='file' path='/etc/x'/>",
]
HOSTILE_TOP = [
    "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-x'/>"
    "</qemu:commandline>",
    "<seclabel type='none'/>",
    "<memoryBacking><source type='file'/></memoryBacking>",
    "<os><type>hvm</type><kernel>/etc/shadow</kernel></os>",
    "<os><type>hvm</type><initrd>/root/secret</initrd></os>",
    "<os><type>hvm</type><loader>/tmp/evil.fd</loader></os>",
    "<os><type>hvm</type><acpi><table type='slic'>/etc/shadow</table></acpi></os>",
]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, device=st.sampled_from(HOSTILE_DEVICES), top=st.sampled_from([None, *HOSTILE_TOP]),
       place=st.integers(0, 30))
def test_the_agent_shell_refuses_generated_hostile_domains(name: str, device: str, top: str | None,
                                                          place: int) -> None:
    root = ElementTree.fromstring(domains.domain_xml(spec(name, POOL, "disk.qcow2", "default", None)))
    devices = root.find("devices")
    assert devices is not None
    if top is not None:
        element = ElementTree.fromstring(top)
        if element.tag == "os":
            root.remove(root.find("os"))  # type: ignore[arg-type]
        root.insert(min(place, len(root)), element)
    else:
        devices.insert(min(place, len(devices)), ElementTree.fromstring(device))
    with pytest.raises(shell.Refused):
        shell.check_domain_xml(ElementTree.tostring(root, encoding="unicode"), POOLS)


@pytest.mark.parametrize("xml", [
    '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain type="qemu">'
    "<name>&x;</name></domain>",
    "<domain type='xen'><name>x</name></domain>",
    "<network><name>x</name></network>",
    "<domain type='qemu'><name>x</name>",
    "<domain type='qemu'><name>x</name><devices><disk type='volume' device='disk'><source pool='images' "
    "volume='a'/><backingStore type='file'><source file='/etc/shadow'/></backingStore></disk></devices></domain>",
])
def test_the_agent_shell_refuses_entities_other_types_and_broken_xml(xml: str) -> None:
    with pytest.raises(shell.Refused):
        shell.check_domain_xml(xml, POOLS)


@given(pool=volumes.filter(lambda p: p != POOL), volume=volumes,
       sub=st.sampled_from(["vol-create-as", "vol-upload", "vol-clone", "vol-delete"]))
def test_the_agent_shell_writes_volumes_only_into_configured_pools(pool: str, volume: str, sub: str) -> None:
    argv = {"vol-create-as": virsh.volume_create_command(URI, pool, volume, 1 << 20, "raw"),
            "vol-upload": virsh.volume_upload_command(URI, pool, volume),
            "vol-clone": virsh.volume_clone_command(URI, pool, volume, volume),
            "vol-delete": virsh.volume_delete_command(URI, pool, volume)}[sub]
    with pytest.raises(shell.Refused, match="pool"):
        shell.parse(virsh.command_line(argv), frozenset({URI}), POOLS)
    assert shell.parse(virsh.command_line(argv), frozenset({URI}), POOLS | {pool}) == list(argv)


@pytest.mark.parametrize("command", [
    "virsh --connect qemu:///system vol-upload --pool images --vol x --file /etc/shadow",
    "virsh --connect qemu:///system define --file /tmp/evil.xml",
    "virsh --connect qemu:///system vol-create-as --pool images --name x --capacity 1G --format raw",
    "virsh --connect qemu:///system vol-create-as --pool images --name x --capacity 1 --format vmdk",
    "virsh --connect qemu:///system vol-download --pool images --vol x --file /dev/stdout",
    "virsh --connect qemu:///system domifaddr --domain g --source all",
    "virsh --connect qemu:///system undefine --domain g --remove-all-storage --snapshots-metadata",
    "virsh --connect qemu:///system vol-create-as --pool images --name ../x --capacity 1 --format raw",
    "virsh --connect qemu:///system pool-destroy --pool images",
    "virsh --connect qemu:///system net-destroy --network default",
])
def test_the_agent_shell_refuses_provisioning_commands_the_portal_never_sends(command: str) -> None:
    with pytest.raises(shell.Refused):
        shell.parse(command, frozenset({URI}), POOLS)


def _define(tmp_path: Path, xml: bytes) -> tuple[subprocess.CompletedProcess[bytes], Path]:
    received = tmp_path / "received.xml"
    fake_virsh = tmp_path / "virsh"
    fake_virsh.write_text(f"#!/bin/sh\n[ \"$5\" = /dev/stdin ] && exec cat \"$5\" > {received}\nexit 3\n")
    fake_virsh.chmod(0o755)
    config = tmp_path / "shell.conf"
    config.write_text(f"libvirt_uris = {URI}\npools = {POOL}\nlog_file = {tmp_path / 'log'}\nvirsh = {fake_virsh}\n")
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": virsh.command_line(virsh.define_command(URI))}
    result = subprocess.run([sys.executable, "-IS", str(SHELL_FILE), "--config", str(config)], env=env, input=xml,
                            capture_output=True, timeout=30)
    return result, received


def test_define_hands_virsh_exactly_the_checked_xml_on_stdin(tmp_path: Path) -> None:
    xml = domains.domain_xml(spec("web 1", POOL, "web1.qcow2", "default", None)).encode()
    result, received = _define(tmp_path, xml)
    assert result.returncode == 0, result.stderr
    assert received.read_bytes() == xml


def test_define_of_hostile_xml_exits_126_and_never_runs_virsh(tmp_path: Path) -> None:
    root = ElementTree.fromstring(domains.domain_xml(spec("web1", POOL, "web1.qcow2", "default", None)))
    root.find("devices").append(ElementTree.fromstring(HOSTILE_DEVICES[0]))  # type: ignore[union-attr]
    result, received = _define(tmp_path, ElementTree.tostring(root))
    assert result.returncode == 126 and b"hostdev" in result.stderr
    assert not received.exists()
