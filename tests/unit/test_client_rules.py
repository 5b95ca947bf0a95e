"""The HTTP client's and the remote command line's rules, without a server: the configuration
file's permission check, the exit code of each HTTP status, the exception of each problem code,
how requests are built from the operation table, and when a request is sent again."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import errors
from entrypoints import remote
from entrypoints.client import (
    ApiError,
    AsyncClient,
    Client,
    PortalUnreachable,
    build_request,
    problem_error,
)
from entrypoints.http.errors import status_of_class
from entrypoints.operations import BY_NAME
from entrypoints.settings import ConfigError

# ---------------------------------------------------------------------- the configuration file


def write_config(home: Path, text: str, mode: int) -> Path:
    path = home / "manage-playrservers" / "config.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@settings(max_examples=60, deadline=None)
@given(mode=st.integers(min_value=0o400, max_value=0o777))
def test_the_config_file_is_read_only_when_nobody_else_may_read_or_write_it(tmp_path_factory: pytest.TempPathFactory,
                                                                            mode: int) -> None:
    home = tmp_path_factory.mktemp("home")
    path = write_config(home, 'url = "https://manage.example.com"\n', mode | 0o400)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        with pytest.raises(ConfigError, match="chmod 600"):
            remote.read_config(path)
    else:
        assert remote.read_config(path) == {"url": "https://manage.example.com"}


def test_no_config_file_is_no_values(tmp_path: Path) -> None:
    assert remote.read_config(tmp_path / "missing.toml") == {}


@pytest.mark.parametrize(("text", "message"), [("url = ", "not valid TOML"), ('colour = "blue"', "unknown key"),
                                               ("api_key = 5", "must be a string"), ('timeout = "x"', "number")])
def test_a_wrong_config_file_names_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        remote.read_config(write_config(tmp_path, text, 0o600))


def test_options_beat_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    write_config(tmp_path, 'url = "https://file.example"\napi_key = "mgmt_file"\ntimeout = 5\n', 0o600)
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    none = SimpleNamespace(url=None, api_key=None, ca_file=None, timeout=None)
    from_file = remote.choose(none, env).target
    assert from_file == remote.Target("https://file.example", "mgmt_file", None, 5.0)
    env["MANAGEMENT_URL"] = "https://env.example"
    assert remote.choose(none, env).target == remote.Target("https://env.example", "mgmt_file", None, 5.0)
    option = SimpleNamespace(url="http://127.0.0.1:1", api_key="mgmt_option", ca_file=None, timeout=None)
    assert remote.choose(option, env).target == remote.Target("http://127.0.0.1:1", "mgmt_option", None, 5.0)


def test_without_a_url_user_commands_stay_local(tmp_path: Path) -> None:
    none = SimpleNamespace(url=None, api_key=None, ca_file=None, timeout=None)
    choice = remote.choose(none, {"XDG_CONFIG_HOME": str(tmp_path), "MANAGEMENT_API_KEY": "mgmt_k"})
    assert choice == remote.Choice(None, "mgmt_k")
    with pytest.raises(ConfigError, match="MANAGEMENT_URL"):
        remote.choose(none, {"XDG_CONFIG_HOME": str(tmp_path), "MANAGEMENT_URL": "ftp://x"})


# ---------------------------------------------------------------------- exit codes


@given(status=st.integers(min_value=400, max_value=599))
def test_every_error_status_has_its_documented_exit_code(status: int) -> None:
    code = remote.exit_code(status)
    documented = dict(remote.EXIT_CODES)
    assert code in documented and code != remote.EXIT_OK
    expected = {404: remote.EXIT_NOT_FOUND, 401: remote.EXIT_DENIED, 403: remote.EXIT_DENIED,
                409: remote.EXIT_CONFLICT, 429: remote.EXIT_SLOW_DOWN}
    if status in expected:
        assert code == expected[status]
    elif status >= 500:
        assert code == remote.EXIT_FAILED  # 502 remote error, 504 time-out, 503…
    else:
        assert code == remote.EXIT_USAGE  # 400, 413, 415, 422…


def test_each_error_class_exits_by_its_kind() -> None:
    for cls in errors.error_classes():
        code = remote.exit_code(status_of_class(cls))
        if issubclass(cls, errors.NotFound):
            assert code == remote.EXIT_NOT_FOUND, cls
        elif issubclass(cls, errors.Conflict):
            assert code == remote.EXIT_CONFLICT, cls
        elif issubclass(cls, errors.Unauthenticated | errors.Forbidden | errors.SignupRefused):
            assert code == remote.EXIT_DENIED, cls
        elif issubclass(cls, errors.RemoteError | errors.Unavailable):
            assert code == remote.EXIT_FAILED, cls
        elif issubclass(cls, errors.ValidationFailed):
            assert code == remote.EXIT_USAGE, cls


# ---------------------------------------------------------------------- problems → exceptions


def test_every_code_raises_its_own_core_class_with_the_wire_fields() -> None:
    for cls in errors.error_classes():
        status = status_of_class(cls)
        error = problem_error(status, {"code": cls.code, "detail": "why", "request_id": "r1"})
        assert type(error).__mro__[1] is cls and isinstance(error, ApiError)
        assert (error.code, error.detail, error.status, error.request_id) == (cls.code, "why", status, "r1")
    assert errors.error_classes().count(errors.VmNotFound) == 1  # the client's copies are not the vocabulary's


@given(status=st.sampled_from([400, 401, 403, 404, 409, 413, 415, 422, 429, 431, 502, 503, 504, 500, 418]),
       code=st.from_regex(r"[a-z]{3,12}_new", fullmatch=True))
def test_an_unknown_code_raises_the_class_of_its_status_and_keeps_the_code(status: int, code: str) -> None:
    error = problem_error(status, {"code": code, "detail": "d"})
    assert error.code == code and status_of_class(type(error).__mro__[1]) in (status, 500)
    assert isinstance(error, {404: errors.NotFound, 409: errors.Conflict, 422: errors.ValidationFailed,
                              502: errors.RemoteError, 504: errors.RemoteTimeout}.get(status, errors.PortalError))


def test_problem_extras_reach_the_exception() -> None:
    waited = problem_error(504, {"code": "wait_timeout", "detail": "d", "state": "paused", "target_state": "running"})
    assert isinstance(waited, errors.WaitTimedOut) and (waited.state, waited.target_state) == ("paused", "running")
    invalid = problem_error(422, {"code": "validation_failed", "detail": "d",
                                  "errors": [{"field": "name", "message": "is required"}]})
    assert isinstance(invalid, errors.ValidationFailed)
    assert invalid.errors == (errors.FieldError("name", "is required"),)
    slow = problem_error(429, {"code": "too_many_requests", "detail": "d"}, retry_after=7)
    assert isinstance(slow, errors.TooManyRequests) and slow.retry_after == 7


# ---------------------------------------------------------------------- requests from the table


@given(vm=st.text(min_size=1, max_size=40), snapshot=st.text(min_size=1, max_size=40))
def test_path_values_are_one_encoded_segment_each(vm: str, snapshot: str) -> None:
    request = build_request(BY_NAME["revert_snapshot"], (3, vm, snapshot), {})
    parts = request.path.split("/")
    assert parts[1:4] == ["agents", "3", "vms"] and parts[5] == "snapshots" and parts[7] == "revert"
    assert (unquote(parts[4]), unquote(parts[6])) == (vm, snapshot)
    assert httpx.URL("https://portal.test" + request.path).raw_path.decode() == request.path  # no dot-segment removal


def test_body_fields_positionally_or_by_keyword_and_repeated_query_values() -> None:
    created = build_request(BY_NAME["create_snapshot"], (1, "web 1", "before"), {"description": "x"})
    assert created.body == {"name": "before", "description": "x"} and created.path == "/agents/1/vms/web%201/snapshots"
    fleet = build_request(BY_NAME["list_fleet"], (), {"agent": [1, 2], "state": ["running"]})
    assert fleet.params == [("agent", "1"), ("agent", "2"), ("state", "running")] and fleet.idempotent
    started = build_request(BY_NAME["start_vm"], (1, "web1"), {"wait": 60})
    assert started.params == [("wait", "60")] and started.wait == 60 and not started.idempotent
    with pytest.raises(errors.ValidationFailed):
        build_request(BY_NAME["list_fleet"], (), {"agent": "1"})
    with pytest.raises(TypeError):
        build_request(BY_NAME["get_agent"], (1, 2), {})


# ---------------------------------------------------------------------- retries, time-outs


class Script:
    """A MockTransport handler answering from a list: an ``httpx.Response`` or an exception to raise."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


def problem(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "detail": code, "status": status},
                          headers={"content-type": "application/problem+json", **headers})


def client(script: Script) -> Client:
    return Client("https://portal.test", "mgmt_k", transport=httpx.MockTransport(script), backoff=0.001)


def test_a_connection_never_made_is_retried_even_for_an_action() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json={"command": ["virsh"], "exit_status": 0,
                                                                            "stdout": "", "stderr": ""}))
    assert client(script).start_vm(1, "web1").exit_status == 0
    assert [r.method for r in script.requests] == ["POST", "POST"]


def test_an_action_is_never_sent_twice_once_sent() -> None:
    for answer in (problem(503, "database_busy", **{"retry-after": "0"}), httpx.ReadError("dropped")):
        script = Script(answer)
        with pytest.raises((errors.Unavailable, PortalUnreachable)):
            client(script).start_vm(1, "web1")
        assert len(script.requests) == 1


def test_reads_are_retried_after_503_and_429_as_retry_after_says_and_after_a_dropped_connection() -> None:
    script = Script(problem(503, "database_busy", **{"retry-after": "0"}), httpx.ReadError("dropped"),
                    httpx.Response(200, json=[]))
    assert client(script).list_agents() == []
    assert len(script.requests) == 3
    slow = Script(problem(429, "too_many_requests", **{"retry-after": "3600"}))
    with pytest.raises(errors.TooManyRequests) as refused:  # longer than max_retry_after: say so at once
        client(slow).list_agents()
    assert refused.value.retry_after == 3600 and len(slow.requests) == 1


def test_retries_stop_after_the_limit() -> None:
    script = Script(*[httpx.ConnectError("refused")] * 3)
    with pytest.raises(PortalUnreachable, match=r"cannot reach the portal at https://portal\.test"):
        client(script).list_agents()
    assert len(script.requests) == 3  # the first try and two retries


def test_a_wait_gets_a_read_time_out_that_allows_for_it_and_the_key_goes_only_where_needed() -> None:
    script = Script(httpx.Response(200, json={"command": [], "exit_status": 0, "stdout": "", "stderr": "",
                                              "state": "running", "waited_seconds": 1.5}),
                    httpx.Response(200, json={"status": "ok"}))
    portal = client(script)
    assert portal.start_vm(1, "web1", wait=120).state == "running"
    assert script.requests[0].extensions["timeout"]["read"] == 120 + portal.timeout
    assert script.requests[0].headers["authorization"] == "Bearer mgmt_k"
    portal.get_health()
    assert "authorization" not in script.requests[1].headers


def test_the_async_client_retries_by_the_same_rules() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json=[]))

    async def run() -> Any:
        async with AsyncClient("https://portal.test", "k", transport=httpx.MockTransport(script),
                               backoff=0.001) as portal:
            return await portal.list_vms(1)

    assert asyncio.run(run()) == [] and len(script.requests) == 2


def test_a_config_file_of_another_user_is_refused_even_if_private(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'url = "https://manage.example.com"\n', 0o600)
    if os.geteuid() != 0:
        pytest.skip("giving the file to another user needs root")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to another user"):
        remote.read_config(path)


def test_an_operation_added_to_the_table_is_a_client_method_with_no_other_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.model import Scope
    from entrypoints.operations import Operation
    from entrypoints.shapes import CommandView

    added = Operation("frobnicate_vm", "POST", "/agents/{agent_id}/vms/{vm}/frobnicate", "vms", "Frobnicate",
                      None, response=CommandView, scope=Scope.OPERATE)
    monkeypatch.setitem(BY_NAME, added.name, added)
    script = Script(httpx.Response(200, json={"command": ["virsh"], "exit_status": 0, "stdout": "ok", "stderr": ""}))
    assert client(script).frobnicate_vm(1, "web 1") == CommandView(["virsh"], 0, "ok", "")
    assert script.requests[0].url.raw_path == b"/agents/1/vms/web%201/frobnicate"


def test_answers_that_are_not_the_portals_are_unexpected_answers() -> None:
    from entrypoints.client import UnexpectedAnswer

    for answer in (httpx.Response(200, text="<html>hello</html>"), httpx.Response(200, json={"unrelated": 1}),
                   httpx.Response(404, text="Not Found", headers={"content-type": "text/html"}),
                   httpx.Response(301, headers={"location": "https://portal.test/"})):
        with pytest.raises(UnexpectedAnswer) as unexpected:
            client(Script(answer)).get_agent(1)
        assert unexpected.value.status == answer.status_code
