"""Falcon resources: parse the request, call one use case, answer with its view.

Use cases are synchronous (storage is SQLAlchemy Core); they run in a worker thread so a database
waiting on a lock never stalls the event loop that other requests share.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

import falcon
import falcon.asgi

from core.audit import AUDIT_PAGE_DEFAULT
from core.commands import AgentChanges, AutostartChange, NewAgent, NewSnapshot, NewUser
from core.errors import FieldError, ValidationFailed
from core.model import Agent, Caller, Origin
from core.portal import Portal
from core.virsh import VmAction
from entrypoints.http.cache import UntilChanged
from entrypoints.http.errors import Problem
from entrypoints.shapes import (
    AgentView,
    AuditEventView,
    AuditPage,
    AutostartView,
    CommandView,
    CredentialsView,
    FleetEntryView,
    Health,
    PublicKeyView,
    UserView,
    UserWithKeyView,
    VmInfoView,
    VmView,
    WaitedActionView,
    dump,
    structure,
)

T = TypeVar("T")


async def run(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(function, *args)


async def read_json(req: falcon.asgi.Request, command: type[T]) -> T:
    """The request body as ``command``: 415 unless JSON, 413 past the limit, 400 if unparseable,
    422 naming each invalid field."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Problem(415, "unsupported_media_type",
                      "send the body as JSON with 'Content-Type: application/json'",
                      title="Unsupported media type")
    limit: int = req.context.max_body_bytes
    raw = await req.stream.read(limit + 1)
    if len(raw) > limit:
        raise Problem(413, "body_too_large", f"the request body is over the limit of {limit} bytes",
                      title="Request body too large")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise Problem(400, "malformed_json", "the request body nests too deeply", title="Malformed JSON") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise Problem(400, "malformed_json", f"the request body is not valid JSON ({error})",
                      title="Malformed JSON") from None
    return structure(data, command)


def caller(req: falcon.asgi.Request) -> Caller:
    return Caller(user=req.context.user, request_id=req.context.request_id,
                  client_address=req.context.client_address)


def origin(req: falcon.asgi.Request) -> Origin:
    return Origin(request_id=req.context.request_id, client_address=req.context.client_address)


def answer(resp: falcon.asgi.Response, value: Any, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.media = dump(value)


class HealthResource:
    public_methods = frozenset({"GET", "HEAD"})

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        answer(resp, Health(status="ok"))

    async def on_head(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.status = falcon.HTTP_200


class OpenApiResource:
    public_methods = frozenset({"GET"})

    def __init__(self, document: dict[str, Any]) -> None:
        self.body = json.dumps(document)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.body


class UsersResource:
    public_methods = frozenset({"POST"})

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request = await read_json(req, NewUser)
        created = await run(self.portal.users.sign_up, request, origin(req))
        resp.set_header("Cache-Control", "no-store")
        answer(resp, UserWithKeyView.with_key(created.user, created.api_key), 201)


class CurrentUserResource:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        answer(resp, UserView.of(req.context.user))

    async def on_post_rotate(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rotated = await run(self.portal.users.rotate_api_key, caller(req))
        resp.set_header("Cache-Control", "no-store")
        answer(resp, UserWithKeyView.with_key(rotated.user, rotated.api_key))

    async def on_get_audit(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        limit = _int_param(req, "limit", AUDIT_PAGE_DEFAULT)
        before = _int_param(req, "before", None)
        events = await run(lambda: self.portal.audit.audit_events(caller(req), limit=limit, before=before))
        next_before = events[-1].id if len(events) == limit else None
        answer(resp, AuditPage(events=[AuditEventView.of(e) for e in events], next_before=next_before))


class AgentsResource:
    def __init__(self, portal: Portal, lists: UntilChanged[int, list[Agent]] | None = None) -> None:
        self.portal = portal
        # Each user's agents, read again only once the database has changed (entrypoints.http.cache).
        self.lists: UntilChanged[int, list[Agent]] = lists if lists is not None else UntilChanged(None)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        version = self.lists.version()
        agents = self.lists.get(req.context.user.id, version)
        if agents is None:
            agents = await run(self.portal.agents.list_agents, caller(req))
            self.lists.put(req.context.user.id, version, agents)
        answer(resp, [AgentView.of(a) for a in agents])

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request = await read_json(req, NewAgent)
        agent = await run(self.portal.agents.register_agent, caller(req), request)
        resp.location = f"/agents/{agent.id}"
        answer(resp, AgentView.of(agent), 201)


class AgentResource:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        answer(resp, AgentView.of(await run(self.portal.agents.get_agent, caller(req), agent_id)))

    async def on_patch(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        changes = await read_json(req, AgentChanges)
        answer(resp, AgentView.of(await run(self.portal.agents.update_agent, caller(req), agent_id, changes)))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        await run(self.portal.agents.delete_agent, caller(req), agent_id)
        resp.status = falcon.HTTP_204

    async def on_get_public_key(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        answer(resp, PublicKeyView.of(await run(self.portal.agents.get_agent, caller(req), agent_id)))

    async def on_post_rotate_key(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        answer(resp, AgentView.of(await run(self.portal.agents.rotate_agent_key, caller(req), agent_id)))

    async def on_get_credentials(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                                 agent_id: int) -> None:
        credentials = await run(self.portal.agents.read_credentials, caller(req), agent_id)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("Pragma", "no-cache")
        answer(resp, CredentialsView.of_credentials(credentials))


class VmsResource:
    """The VMs of one agent, driven over SSH (the use cases are async: no thread needed)."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        vms = await self.portal.vms.list_vms(caller(req), agent_id)
        answer(resp, [VmView.of(vm) for vm in vms])


class VmResource:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str) -> None:
        answer(resp, VmInfoView.of(await self.portal.vms.vm_info(caller(req), agent_id, vm)))

    async def _act(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                   action: VmAction) -> None:
        raw_wait = _single_param(req, "wait")
        wait = None if raw_wait is None else _int_value("wait", raw_wait)
        if wait is None:
            result = await self.portal.vms.vm_action(caller(req), agent_id, vm, action)
            answer(resp, CommandView.of(result))
        else:  # polls asynchronously on the event loop: no thread, no transaction held while waiting
            waited = await self.portal.vms.vm_action_and_wait(caller(req), agent_id, vm, action, wait)
            answer(resp, WaitedActionView.of_waited(waited))

    async def on_post_start(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                            vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.START)

    async def on_post_shutdown(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                               vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.SHUTDOWN)

    async def on_post_force_stop(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                                 vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.FORCE_STOP)

    async def on_post_reboot(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                             vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.REBOOT)

    async def on_post_suspend(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                              vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.SUSPEND)

    async def on_post_resume(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                             vm: str) -> None:
        await self._act(req, resp, agent_id, vm, VmAction.RESUME)

    async def on_put_autostart(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                               vm: str) -> None:
        change = await read_json(req, AutostartChange)
        result = await self.portal.vms.set_autostart(caller(req), agent_id, vm, change.enabled)
        answer(resp, AutostartView(vm=vm, enabled=change.enabled, result=CommandView.of(result)))

    async def on_get_stats(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                           vm: str) -> None:
        answer(resp, await self.portal.vms.vm_stats(caller(req), agent_id, vm))


class SnapshotsResource:
    """A VM's libvirt internal snapshots."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str) -> None:
        answer(resp, await self.portal.snapshots.list_snapshots(caller(req), agent_id, vm))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str) -> None:
        request = await read_json(req, NewSnapshot)
        answer(resp, await self.portal.snapshots.create_snapshot(caller(req), agent_id, vm, request), 201)

    async def on_delete_one(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                            snapshot: str) -> None:
        await self.portal.snapshots.delete_snapshot(caller(req), agent_id, vm, snapshot)
        resp.status = falcon.HTTP_204

    async def on_post_revert(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                             snapshot: str) -> None:
        answer(resp, CommandView.of(await self.portal.snapshots.revert_snapshot(caller(req), agent_id, vm, snapshot)))


class FleetResource:
    """Every VM on every agent of the caller (``GET /vms``)."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        agent_ids = [_int_value("agent", raw) for raw in req.get_param_as_list("agent") or []]
        states = req.get_param_as_list("state") or []
        entries = await self.portal.fleet.fleet(caller(req), agent_ids=agent_ids, states=states)
        answer(resp, [FleetEntryView.of(entry) for entry in entries])


class AgentHostResource:
    """What an agent's host says about itself, and whether the portal can reach it."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        answer(resp, await self.portal.fleet.host_facts(caller(req), agent_id))

    async def on_post_check(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        answer(resp, await self.portal.fleet.check_agent(caller(req), agent_id))


def _int_param(req: falcon.asgi.Request, name: str, default: Any) -> Any:
    raw = req.get_param(name)
    if raw is None:
        return default
    return _int_value(name, raw)


def _single_param(req: falcon.asgi.Request, name: str) -> str | None:
    """A query parameter that may be given once (``wait=1&wait=300`` is ambiguous: refused)."""
    values = req.get_param_as_list(name)
    if not values:
        return None
    if len(values) > 1:
        raise ValidationFailed([FieldError(name, "must be given once")])
    return str(values[0])


def _int_value(name: str, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ValidationFailed([FieldError(name, "must be a whole number (digits only)")])
    return int(raw)
