"""The HTTP side of provisioning (issue 16), with the real app and storage and the pretend libvirt
host of ``tests/unit/fake_host.py``: request shapes (the network as a name or a bridge, unknown
fields refused), status codes, problem codes, the 201 answer and the delete's query."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from entrypoints import bootstrap
from entrypoints.http.app import create_app
from tests.support import Api, KeyMaterial, make_settings, portal_client
from tests.unit.fake_host import FakeHost


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def client(tmp_path: Path, host: FakeHost) -> Iterator[Api]:
    runtime = bootstrap.build_runtime(make_settings(tmp_path, MANAGEMENT_VM_DOMAIN_TYPE="qemu"), shell=host)
    yield Api(portal_client(create_app(runtime)))
    runtime.close()


@pytest.fixture
def key(client: Api) -> str:
    return str(client.sign_up()["api_key"])


@pytest.fixture
def agent(client: Api, key: str, keys: KeyMaterial) -> dict[str, Any]:
    result = client.call("POST", "/agents", key, json=client.agent_body(keys, host_key=keys.host_key))
    assert result.status_code == 201, result.text
    return dict(result.json)


def body(**changes: Any) -> dict[str, Any]:
    return {"name": "web1", "vcpus": 1, "memory_mib": 512, "network": "default",
            "disk": {"pool": "images", "size_gib": 4, "base_volume": "debian-12.qcow2"},
            "cloud_init": {"hostname": "web1"}, **changes}


def test_create_answers_201_with_the_vm_its_volumes_and_where_it_lives(client: Api, key: str, agent: dict[str, Any],
                                                        host: FakeHost) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms", key, json=body(network={"bridge": "br0"}))
    assert result.status_code == 201, result.text
    assert result.json["dominfo"]["name"] == "web1" and result.json["state"] is None
    assert result.headers["Location"] == f"/agents/{agent['id']}/vms/web1"
    assert [v["name"] for v in result.json["volumes"]] == ["web1.qcow2", "web1-seed.iso"]
    assert "<domain type=\"qemu\">" in host.stdins["define"].decode()


@pytest.mark.parametrize(("changes", "field"), [
    ({"xml": "<domain/>"}, "xml"),
    ({"network": 7}, "network"),
    ({"network": {"bridge": "br0", "script": "/tmp/x"}}, "script"),
    ({"disk": {"pool": "images"}}, "size_gib"),
    ({"vcpus": "2"}, "vcpus"),
])
def test_malformed_requests_are_422_naming_the_field(client: Api, key: str, agent: dict[str, Any],
                                                     host: FakeHost, changes: dict[str, Any], field: str) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms", key, json=body(**changes))
    assert result.status_code == 422, result.text
    assert field in result.text
    assert host.mutations == []


@pytest.mark.parametrize(("changes", "status", "code"), [
    ({"disk": {"pool": "nope", "size_gib": 1}}, 404, "pool_not_found"),
    ({"network": "nope"}, 404, "network_not_found"),
    ({"disk": {"pool": "images", "size_gib": 500}}, 409, "insufficient_storage"),
])
def test_host_refusals_carry_their_codes(client: Api, key: str, agent: dict[str, Any], changes: dict[str, Any],
                                         status: int, code: str) -> None:
    result = client.call("POST", f"/agents/{agent['id']}/vms", key, json=body(**changes))
    assert (result.status_code, result.json["code"]) == (status, code)


def test_delete_takes_force_and_remove_storage_as_true_or_false(client: Api, key: str, agent: dict[str, Any],
                                                                host: FakeHost) -> None:
    assert client.call("POST", f"/agents/{agent['id']}/vms", key, json=body()).status_code == 201
    running = client.call("DELETE", f"/agents/{agent['id']}/vms/web1", key)
    assert (running.status_code, running.json["code"]) == (409, "vm_running")
    assert client.call("DELETE", f"/agents/{agent['id']}/vms/web1?force=yes", key).status_code == 422
    gone = client.call("DELETE", f"/agents/{agent['id']}/vms/web1?force=true&remove_storage=true", key)
    assert gone.status_code == 204
    assert set(host.pools["images"]) == {"debian-12.qcow2"}


def test_inventory_routes_answer_the_documented_fields(client: Api, key: str, agent: dict[str, Any]) -> None:
    pools = client.call("GET", f"/agents/{agent['id']}/pools", key).json
    assert set(pools[0]) == {"name", "state", "autostart", "capacity_bytes", "allocation_bytes", "available_bytes"}
    volumes = client.call("GET", f"/agents/{agent['id']}/pools/images/volumes", key).json
    assert set(volumes[0]) == {"name", "path", "format", "capacity_bytes", "allocation_bytes"}
    networks = client.call("GET", f"/agents/{agent['id']}/networks", key).json
    assert networks == [{"name": "default", "state": "active", "autostart": False, "bridge": "virbr0"}]
