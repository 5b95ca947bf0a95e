"""Provisioning use cases (issue 16) against a pretend libvirt host (``tests/unit/fake_host.py``):
inventory, create with a cloud-init seed, what a failure at each step leaves behind (nothing),
delete with and without storage, clone, guest addresses."""

from __future__ import annotations

import asyncio
import io
import xml.etree.ElementTree as ElementTree
from typing import Any

import pycdlib
import pytest

from adapters.memory import CountingKeyHasher, FakeSshKeys, InMemoryStorage, ManualClock, ReversibleSecretBox
from adapters.seed_iso import PycdlibSeedImages
from core.commands import BridgeRequest, CloneRequest, CloudInitRequest, DiskRequest, NewVm
from core.errors import (
    AgentConnectionLost,
    InsufficientStorage,
    NetworkNotFound,
    PoolNotFound,
    PortalError,
    ValidationFailed,
    VirshFailed,
    VmNameTaken,
    VmNotFound,
    VmRunning,
    VolumeInUse,
    VolumeNotFound,
)
from core.model import Caller
from core.portal import assemble
from tests.unit.fake_host import GIB, FakeHost
from tests.unit.world import FakeTime, World, events, make_caller, register

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFM2E/czXew0GqdT4+fRLYhvrQ7UybvOwNhROlcaT9yd ops@example"


@pytest.fixture
def world() -> World:
    storage, clock, host, fake_time = InMemoryStorage(), ManualClock(), FakeHost(), FakeTime()
    portal = assemble(storage=storage, hasher=CountingKeyHasher(), secrets=ReversibleSecretBox(),
                      ssh_keys=FakeSshKeys(), clock=clock, shell=host, monotonic=fake_time.monotonic,
                      sleep=fake_time.sleep, seeds=PycdlibSeedImages(), domain_type="qemu")
    return World(storage, portal, clock, host, fake_time)  # type: ignore[arg-type]


@pytest.fixture
def host(world: World) -> FakeHost:
    assert isinstance(world.shell, FakeHost)
    return world.shell


@pytest.fixture
def alice(world: World) -> Caller:
    return make_caller(world, "alice")


@pytest.fixture
def agent_id(world: World, alice: Caller) -> int:
    return register(world, alice).id


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def request(**changes: Any) -> NewVm:
    fields: dict[str, Any] = {
        "name": "web1", "vcpus": 2, "memory_mib": 1024,
        "disk": DiskRequest(pool="images", size_gib=10, base_volume="debian-12.qcow2"), "network": "default",
        "cloud_init": CloudInitRequest(hostname="web1", ssh_authorized_keys=[KEY], user_data="#cloud-config\n"
                                       "packages: [nginx]\n")}
    return NewVm(**{**fields, **changes})


def seed_files(image: bytes) -> tuple[str, dict[str, str]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for name in ("meta-data", "user-data", "network-config"):
            out = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            files[name] = out.getvalue().decode()
        return label, files
    finally:
        iso.close()


# ---------------------------------------------------------------------- inventory


def test_pools_list_every_pool_with_its_sizes_in_bytes(world: World, alice: Caller, agent_id: int) -> None:
    [pool] = run(world.portal.provisioning.list_pools(alice, agent_id))
    assert (pool.name, pool.state, pool.autostart) == ("images", "running", True)
    assert pool.available_bytes == 100 * GIB and pool.allocation_bytes == 2 * GIB
    assert pool.capacity_bytes == 102 * GIB


def test_volumes_list_the_pools_volumes_with_path_format_and_sizes(world: World, alice: Caller,
                                                                   agent_id: int) -> None:
    [volume] = run(world.portal.provisioning.list_volumes(alice, agent_id, "images"))
    assert volume.name == "debian-12.qcow2" and volume.format == "qcow2" and volume.capacity_bytes == 2 * GIB
    assert volume.path == "/var/lib/libvirt/images/debian-12.qcow2"


def test_volumes_of_an_unknown_pool_is_pool_not_found(world: World, alice: Caller, agent_id: int) -> None:
    with pytest.raises(PoolNotFound):
        run(world.portal.provisioning.list_volumes(alice, agent_id, "nope"))


def test_networks_list_name_state_autostart_and_bridge(world: World, alice: Caller, agent_id: int) -> None:
    [network] = run(world.portal.provisioning.list_networks(alice, agent_id))
    assert (network.name, network.state, network.autostart, network.bridge) == ("default", "active", False, "virbr0")


# ---------------------------------------------------------------------- create


def test_create_makes_an_overlay_a_seed_and_a_started_vm_and_answers_them(world: World, host: FakeHost,
                                                                          alice: Caller, agent_id: int) -> None:
    created = run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    assert [(v.pool, v.name, v.format) for v in created.volumes] == [("images", "web1.qcow2", "qcow2"),
                                                                     ("images", "web1-seed.iso", "raw")]
    disk = host.pools["images"]["web1.qcow2"]
    assert disk.backing == "/var/lib/libvirt/images/debian-12.qcow2" and disk.capacity == 10 * GIB
    assert host.domains["web1"].state == "running"
    assert created.info.dominfo["name"] == "web1"
    event = events(world)[-1]
    assert (event.action, event.vm, event.outcome) == ("vm.create", "web1", "ok")


def test_the_seed_is_a_cidata_iso_with_meta_data_user_data_and_the_keys(world: World, host: FakeHost,
                                                                        alice: Caller, agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request(cloud_init=CloudInitRequest(
        hostname="web-1.example", ssh_authorized_keys=[KEY], network_config="version: 2\nethernets: {}\n"))))
    label, files = seed_files(host.pools["images"]["web1-seed.iso"].data)
    assert label == "cidata"
    assert "local-hostname: web-1.example\n" in files["meta-data"] and "instance-id: iid-" in files["meta-data"]
    assert files["user-data"].startswith("#cloud-config\n") and KEY in files["user-data"]
    assert files["network-config"] == "version: 2\nethernets: {}\n"


def test_the_domain_xml_is_the_portals_own_with_the_disks_network_console_and_loopback_vnc(
        world: World, host: FakeHost, alice: Caller, agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request(network=BridgeRequest(bridge="br0"))))
    domain = ElementTree.fromstring(host.stdins["define"])
    assert domain.get("type") == "qemu"
    assert [(d.get("device"), d.find("source").get("volume")) for d in domain.iter("disk")] == [  # type: ignore[union-attr]
        ("disk", "web1.qcow2"), ("cdrom", "web1-seed.iso")]
    assert domain.find("devices/interface/source").get("bridge") == "br0"  # type: ignore[union-attr]
    assert domain.find("devices/graphics/listen").get("address") == "127.0.0.1"  # type: ignore[union-attr]
    assert domain.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]
    assert domain.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"  # type: ignore[union-attr]


@pytest.mark.parametrize(("changes", "field"), [
    ({"name": "-rf"}, "name"),
    ({"name": "1234"}, "name"),
    ({"vcpus": 0}, "vcpus"),
    ({"memory_mib": 32}, "memory_mib"),
    ({"disk": DiskRequest(pool="images; rm", size_gib=10)}, "disk.pool"),
    ({"network": "--help"}, "network"),
    ({"network": BridgeRequest(bridge="br0; id")}, "network.bridge"),
    ({"cloud_init": CloudInitRequest(hostname="not_a_host")}, "cloud_init.hostname"),
    ({"cloud_init": CloudInitRequest(ssh_authorized_keys=["not a key"])}, "cloud_init.ssh_authorized_keys[0]"),
    ({"cloud_init": CloudInitRequest(user_data="#cloud-config\nfoo: [unclosed\n")}, "cloud_init.user_data"),
    ({"cloud_init": CloudInitRequest(user_data="#!/bin/sh\n" + "x" * 65536)}, "cloud_init.user_data"),
    ({"cloud_init": CloudInitRequest(network_config="a: b: c:")}, "cloud_init.network_config"),
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_sent(world: World, host: FakeHost, alice: Caller,
                                                                   agent_id: int, changes: dict[str, Any],
                                                                   field: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        run(world.portal.provisioning.create_vm(alice, agent_id, request(**changes)))
    assert field in [e.field for e in refused.value.errors]
    assert host.calls == []
    assert events(world)[-1].outcome == "validation_failed"


@pytest.mark.parametrize(("changes", "field"), [
    ({"vcpus": 5}, "vcpus"),
    ({"memory_mib": 8 * 1024 + 1}, "memory_mib"),
    ({"disk": DiskRequest(pool="images", size_gib=1, base_volume="debian-12.qcow2")}, "disk.size_gib"),
])
def test_requests_beyond_the_host_are_refused_before_anything_is_made(world: World, host: FakeHost, alice: Caller,
                                                                      agent_id: int, changes: dict[str, Any],
                                                                      field: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        run(world.portal.provisioning.create_vm(alice, agent_id, request(**changes)))
    assert [e.field for e in refused.value.errors] == [field]
    assert host.mutations == []


@pytest.mark.parametrize(("changes", "error"), [
    ({"disk": DiskRequest(pool="nope", size_gib=10)}, PoolNotFound),
    ({"disk": DiskRequest(pool="images", size_gib=10, base_volume="nope.qcow2")}, VolumeNotFound),
    ({"network": "nope"}, NetworkNotFound),
    ({"disk": DiskRequest(pool="images", size_gib=101)}, InsufficientStorage),
])
def test_unknown_pool_volume_or_network_and_a_full_pool_are_refused(world: World, host: FakeHost, alice: Caller,
                                                                    agent_id: int, changes: dict[str, Any],
                                                                    error: type[PortalError]) -> None:
    with pytest.raises(error):
        run(world.portal.provisioning.create_vm(alice, agent_id, request(**changes)))
    assert host.mutations == []
    assert events(world)[-1].outcome == error.code


def test_a_taken_name_is_vm_name_taken(world: World, host: FakeHost, alice: Caller, agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    before = host.snapshot()
    with pytest.raises(VmNameTaken):
        run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    assert host.snapshot() == before


@pytest.mark.parametrize("step", ["vol-create-as", "vol-upload", "define", "autostart", "start"])
@pytest.mark.parametrize("how", ["error", "lost"])
def test_a_failure_at_any_step_removes_what_the_request_made(world: World, host: FakeHost, alice: Caller,
                                                             agent_id: int, step: str, how: str) -> None:
    before = host.snapshot()
    host.fail_on[step] = how
    with pytest.raises((VirshFailed, AgentConnectionLost)):
        run(world.portal.provisioning.create_vm(alice, agent_id, request(autostart=True)))
    assert host.snapshot() == before
    event = events(world)[-1]
    assert event.action == "vm.create" and event.outcome in ("virsh_failed", "agent_connection_lost")
    if step != "vol-create-as":
        assert "removed " in (event.detail or "") and "images/web1.qcow2" in (event.detail or "")


def test_a_failing_second_volume_still_removes_the_first(world: World, host: FakeHost, alice: Caller,
                                                         agent_id: int) -> None:
    host.pools["images"]["web1-seed.iso"] = host.pools["images"]["debian-12.qcow2"]  # left by someone else
    before = host.snapshot()
    with pytest.raises(PortalError):
        run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    assert host.snapshot() == before  # theirs kept, ours removed


def test_what_could_not_be_removed_is_said_in_the_error_and_the_audit(world: World, host: FakeHost, alice: Caller,
                                                                      agent_id: int) -> None:
    host.fail_on["define"] = "error"
    host.fail_on["vol-delete"] = "lost"
    with pytest.raises(VirshFailed) as failed:
        run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    assert "left on the host" in failed.value.detail
    assert "COULD NOT REMOVE images/web1-seed.iso" in (events(world)[-1].detail or "")


def test_create_with_wait_answers_the_state_reached(world: World, alice: Caller, agent_id: int) -> None:
    created = run(world.portal.provisioning.create_vm(alice, agent_id, request(), wait=30))
    assert created.state == "running"


def test_a_blank_disk_has_no_backing_file_and_no_seed_without_cloud_init(world: World, host: FakeHost,
                                                                         alice: Caller, agent_id: int) -> None:
    created = run(world.portal.provisioning.create_vm(alice, agent_id, request(
        disk=DiskRequest(pool="images", size_gib=5), cloud_init=None, start=False)))
    assert [v.name for v in created.volumes] == ["web1.qcow2"]
    assert host.pools["images"]["web1.qcow2"].backing is None
    assert host.domains["web1"].state == "shut off"


# ---------------------------------------------------------------------- delete


def test_delete_refuses_a_running_vm_unless_forced(world: World, host: FakeHost, alice: Caller,
                                                   agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    with pytest.raises(VmRunning):
        run(world.portal.provisioning.delete_vm(alice, agent_id, "web1"))
    run(world.portal.provisioning.delete_vm(alice, agent_id, "web1", force=True))
    assert "web1" not in host.domains and "web1.qcow2" in host.pools["images"]
    assert any(c[1][3] == "undefine" and "--snapshots-metadata" in c[1] for c in host.calls)


def test_delete_with_storage_removes_its_volumes_and_keeps_the_base(world: World, host: FakeHost, alice: Caller,
                                                                     agent_id: int) -> None:
    before = host.snapshot()
    run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    run(world.portal.provisioning.delete_vm(alice, agent_id, "web1", force=True, remove_storage=True))
    assert host.snapshot() == before
    assert "removed images/web1.qcow2" in (events(world)[-1].detail or "")


def test_delete_with_storage_refuses_a_volume_another_vm_uses_and_changes_nothing(
        world: World, host: FakeHost, alice: Caller, agent_id: int) -> None:
    # "base" uses the cloud image as its own disk; web1's overlay is backed by it
    run(world.portal.provisioning.create_vm(alice, agent_id, request(start=False, cloud_init=None)))
    host.domains["base"] = type(host.domains["web1"])(
        "<domain><name>base</name><devices><disk type='volume' device='disk'>"
        "<source pool='images' volume='debian-12.qcow2'/><target dev='vda'/></disk></devices></domain>")
    before = host.snapshot()
    with pytest.raises(VolumeInUse):
        run(world.portal.provisioning.delete_vm(alice, agent_id, "base", remove_storage=True))
    assert host.snapshot() == before
    run(world.portal.provisioning.delete_vm(alice, agent_id, "web1", remove_storage=True))  # its own overlay only
    assert "debian-12.qcow2" in host.pools["images"] and "web1.qcow2" not in host.pools["images"]


def test_delete_of_an_unknown_vm_is_vm_not_found(world: World, alice: Caller, agent_id: int) -> None:
    with pytest.raises(VmNotFound):
        run(world.portal.provisioning.delete_vm(alice, agent_id, "ghost"))


# ---------------------------------------------------------------------- clone


def test_clone_copies_the_disks_and_gets_a_new_uuid_and_mac(world: World, host: FakeHost, alice: Caller,
                                                            agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request(start=False)))
    created = run(world.portal.provisioning.clone_vm(alice, agent_id, "web1", CloneRequest(name="web2")))
    assert [v.name for v in created.volumes] == ["web2.qcow2"]
    source = ElementTree.fromstring(host.domains["web1"].xml)
    clone = ElementTree.fromstring(host.domains["web2"].xml)
    assert source.findtext("uuid") != clone.findtext("uuid")
    assert source.find("devices/interface/mac").get("address") != \
        clone.find("devices/interface/mac").get("address")  # type: ignore[union-attr]
    disks = [(d.get("device"), d.find("source")) for d in clone.iter("disk")]
    assert disks[0][1].get("volume") == "web2.qcow2"  # type: ignore[union-attr]
    assert disks[1] == ("cdrom", None)  # the seed belongs to web1


def test_clone_refuses_a_running_source(world: World, alice: Caller, agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    with pytest.raises(VmRunning):
        run(world.portal.provisioning.clone_vm(alice, agent_id, "web1", CloneRequest(name="web2")))


def test_a_clone_whose_define_fails_leaves_no_volume(world: World, host: FakeHost, alice: Caller,
                                                     agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request(start=False)))
    before = host.snapshot()
    host.fail_on["define"] = "error"
    with pytest.raises(VirshFailed):
        run(world.portal.provisioning.clone_vm(alice, agent_id, "web1", CloneRequest(name="web2")))
    assert host.snapshot() == before


# ---------------------------------------------------------------------- addresses


def test_interfaces_fall_back_from_the_guest_agent_to_the_lease(world: World, host: FakeHost, alice: Caller,
                                                                agent_id: int) -> None:
    run(world.portal.provisioning.create_vm(alice, agent_id, request()))
    [interface] = run(world.portal.provisioning.interfaces(alice, agent_id, "web1"))
    assert interface.name == "vnet0" and interface.mac == "52:54:00:00:01:00" and interface.network == "default"
    assert [(a.type, a.address, a.prefix) for a in interface.addresses] == [("ipv4", "192.168.123.31", 24)]
    assert [c[1][-1] for c in host.calls if c[1][3] == "domifaddr"] == ["agent", "lease"]


def test_interfaces_of_a_stopped_vm_is_vm_not_running(world: World, alice: Caller, agent_id: int) -> None:
    from core.errors import VmNotRunning

    run(world.portal.provisioning.create_vm(alice, agent_id, request(start=False)))
    with pytest.raises(VmNotRunning):
        run(world.portal.provisioning.interfaces(alice, agent_id, "web1", "lease"))
