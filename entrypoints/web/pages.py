"""The pages of the web console, one small Falcon resource each.

Every page reads and acts through the operation table (``entrypoints/operations.py``): it builds a
``Call`` with the signed-in user as caller and runs the operation as the HTTP API and the library
do, so validation, isolation and audit are the API's. What a page shows is the operation's view
(the JSON the API answers), rendered by Jinja2 with autoescaping on everything.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import falcon
import falcon.asgi
import jinja2

from core.errors import (
    PortalError,
    SessionEnded,
    TooManyAuthFailures,
    Unauthenticated,
    ValidationFailed,
    VmNotFound,
)
from core.model import Caller, Origin
from core.portal import Portal
from core.virsh import VM_STATES
from entrypoints.http.errors import status_of
from entrypoints.http.middleware import FailureLimiter, HttpsRequired
from entrypoints.http.stream import EventStreamResource
from entrypoints.operations import BY_NAME, OPERATIONS, Call
from entrypoints.settings import Settings
from entrypoints.shapes import dump, structure
from entrypoints.web import guard
from entrypoints.web.guard import SignedInUser

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
VENDOR_DIR = STATIC_DIR / "vendor"

# Actions that lose work or availability: asked again on a page of their own before they run.
DESTRUCTIVE = {"shutdown": "Shut down", "force-stop": "Force off", "reboot": "Reboot", "suspend": "Suspend"}
ACTIONS = {"start": "Start", "resume": "Resume", **DESTRUCTIVE}
ACTION_OPERATION = {"start": "start_vm", "shutdown": "shutdown_vm", "force-stop": "force_stop_vm",
                    "reboot": "reboot_vm", "suspend": "suspend_vm", "resume": "resume_vm"}
# What makes sense in each state (virsh's words); in any other state, or unknown, every action is offered
ACTIONS_IN_STATE = {"running": ("shutdown", "force-stop", "reboot", "suspend"), "idle": ("shutdown", "force-stop",
                    "reboot", "suspend"), "shut off": ("start",), "crashed": ("start", "force-stop"),
                    "paused": ("resume", "force-stop"), "pmsuspended": ("start", "force-stop")}
ACTION_WAIT = 30  # seconds a page waits for the state an action leads to (the API's ?wait=)


def segment(value: object) -> str:
    """A path segment for a URL (VM and snapshot names may hold spaces, %, :, @ ...)."""
    return quote(str(value), safe="")


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["seg"] = segment
    env.filters["shell"] = shlex.quote  # commands to copy into a shell: a name may hold ; $( ) ...
    return env


# Operations of features built in parallel (issues 16, 17, 20), found by their contract's route: a
# page of a feature this build does not have stays hidden, and its route answers 404.
CONSOLE = ("POST", "/agents/{agent_id}/vms/{vm}/console")
CREATE_VM = ("POST", "/agents/{agent_id}/vms")
POOLS = ("GET", "/agents/{agent_id}/pools")
NETWORKS = ("GET", "/agents/{agent_id}/networks")
INTERFACES = ("GET", "/agents/{agent_id}/vms/{vm}/interfaces")
API_KEYS = ("GET", "/users/me/keys")
NEW_API_KEY = ("POST", "/users/me/keys")
REVOKE_API_KEY = ("DELETE", "/users/me/keys/{key_id}")


def _shape(path: str) -> str:
    """A path template with its parameters unnamed (``/users/me/keys/{id}`` is ``/users/me/keys/{}``)."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def operation_at(route: tuple[str, str]) -> str | None:
    """The name of the operation answering ``route`` (method, path template, whatever its parameters
    are named), if this build has one."""
    method, path = route
    return next((op.name for op in OPERATIONS if op.method == method and _shape(op.path) == _shape(path)), None)


def feature(route: tuple[str, str]) -> bool:
    return operation_at(route) is not None


class Pages:
    """What every page needs: the portal, the settings, the templates, and running an operation."""

    def __init__(self, portal: Portal, settings: Settings, limiter: FailureLimiter) -> None:
        self.portal = portal
        self.settings = settings
        self.limiter = limiter
        self.env = templates()
        self.https = HttpsRequired(settings.allow_plain_http)

    async def run(self, name: str, who: SignedInUser | None, req: falcon.asgi.Request, *,
                  path: Mapping[str, Any] | None = None, body: Mapping[str, Any] | None = None,
                  query: Mapping[str, list[str]] | None = None) -> Any:
        """Run the operation ``name`` as ``who``; answers its view as the API's JSON would be.

        Scoped keys (issue 20): the session's caller carries the key it was signed in with, and
        ``Operation.execute`` checks the operation's scope against it, as the API does."""
        op = BY_NAME[name]
        assert op.run is not None
        command = structure(dict(body or {}), op.request) if op.request is not None else body
        parsed = {q.name: q.parse((query or {}).get(q.name, [])) for q in op.query}
        call = Call(caller=who.caller if who is not None else None,
                    origin=Origin(request_id=req.context.request_id, client_address=req.context.client_address),
                    path=dict(path or {}), body=command, query=parsed)
        result = await op.execute(self.portal, call)
        return dump(op.view(result, call)) if op.view is not None else None

    async def attempt(self, name: str, who: SignedInUser, req: falcon.asgi.Request,
                      **kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
        """``run``, with a failure as ``(None, {code, detail})`` for pages that show it inline."""
        try:
            return await self.run(name, who, req, **kwargs), None
        except PortalError as error:
            return None, failure(error)

    def render(self, resp: falcon.asgi.Response, template: str, who: SignedInUser | None, *,
               status: int = 200, **context: Any) -> None:
        resp.status = falcon.code_to_http_status(status)
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Cache-Control", "no-store")
        resp.text = self.env.get_template(template).render(
            me=who.user if who is not None else None, csrf=who.form_token if who is not None else "",
            features={"console": feature(CONSOLE), "create_vm": feature(CREATE_VM),
                      "api_keys": feature(API_KEYS), "interfaces": feature(INTERFACES)},
            **context)

    async def last_event_id(self, who: SignedInUser) -> int:
        """The user's newest event id, read *before* a page reads what it shows: the page's stream
        starts after it, so a change between the two reads is replayed, never lost."""
        return await asyncio.to_thread(self.portal.events.last_id, who.user.id)

    def error_page(self, resp: falcon.asgi.Response, who: SignedInUser | None, error: PortalError) -> None:
        self.render(resp, "error.html", who, status=status_of(error), error=failure(error))

    async def who(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> SignedInUser | None:
        """The signed-in user, or None after sending the browser to the sign-in page."""
        try:
            return await guard.signed_in(self.portal, req)
        except SessionEnded:
            guard.clear_session_cookie(req, resp)
            resp.status = falcon.HTTP_303
            resp.location = "/ui/sign-in"
            return None

    async def changing(self, req: falcon.asgi.Request, resp: falcon.asgi.Response
                       ) -> tuple[SignedInUser, dict[str, str]] | None:
        """A state change: same origin, signed in, with the session's form token; else refused
        with a page that says why (403) or sent to sign in (401)."""
        try:
            guard.check_same_origin(req)
            self.https.check(req)
            form = await guard.read_form(req)
            who = await guard.signed_in(self.portal, req)
            guard.check_form_token(self.portal, who, form)
        except SessionEnded as error:
            guard.clear_session_cookie(req, resp)
            self.render(resp, "sign_in.html", None, status=401, error=failure(error), signup=False)
            return None
        except PortalError as error:
            self.error_page(resp, None, error)
            return None
        return who, form


def failure(error: PortalError) -> dict[str, Any]:
    fields = {e.field: e.message for e in error.errors} if isinstance(error, ValidationFailed) else {}
    return {"code": error.code, "detail": error.detail, "status": status_of(error), "fields": fields}


class Page:
    """A page resource. Pages authenticate by session cookie themselves (``Pages.who``,
    ``Pages.changing``): the API's Bearer authentication skips them (``public_methods``)."""

    public_methods: ClassVar[frozenset[str]] = frozenset({"GET", "POST"})

    def __init__(self, pages: Pages) -> None:
        self.pages = pages


# ---------------------------------------------------------------------- signing in and out


class SignIn(Page):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        signup = await asyncio.to_thread(self.pages.portal.users.signup_possible)
        notice = "You are signed out." if req.get_param("signed_out") == "1" else None
        self.pages.render(resp, "sign_in.html", None, error=None, signup=signup, notice=notice)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            guard.check_same_origin(req)
            self.pages.https.check(req)  # the key crosses the wire in this form: as with the API
            form = await guard.read_form(req)
            address = req.context.client_address
            try:
                signed = await asyncio.to_thread(
                    self.pages.portal.sessions.sign_in, form.get("api_key", "").strip(),
                    Origin(request_id=req.context.request_id, client_address=address))
            except Unauthenticated:
                # as the API does: only failures are limited, a valid key always gets through
                wait = self.pages.limiter.retry_after(address, time.monotonic())
                if wait is not None:
                    raise TooManyAuthFailures(f"too many failed sign-ins from {address}; retry in {wait} s",
                                              retry_after=wait) from None
                self.pages.limiter.record_failure(address, time.monotonic())
                raise
        except PortalError as error:
            self.pages.render(resp, "sign_in.html", None, status=status_of(error), error=failure(error),
                              signup=False, notice=None)
            return
        guard.set_session_cookie(req, resp, signed.token, int(self.pages.settings.session_lifetime))
        resp.status = falcon.HTTP_303
        resp.location = "/"


class SignUp(Page):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.pages.render(resp, "sign_up.html", None, error=None, form={})

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        form: dict[str, str] = {}
        try:
            guard.check_same_origin(req)
            self.pages.https.check(req)  # the answer carries a new key, as POST /users
            form = await guard.read_form(req)
            body = {"name": form.get("name", ""), "email": form.get("email") or None}
            created = await self.pages.run("sign_up", None, req, body=body)
            signed = await asyncio.to_thread(
                self.pages.portal.sessions.sign_in, created["api_key"],
                Origin(request_id=req.context.request_id, client_address=req.context.client_address))
        except PortalError as error:
            self.pages.render(resp, "sign_up.html", None, status=status_of(error), error=failure(error), form=form)
            return
        guard.set_session_cookie(req, resp, signed.token, int(self.pages.settings.session_lifetime))
        who = SignedInUser(user=signed.user, token=signed.token,
                           form_token=self.pages.portal.sessions.form_token(signed.token),
                           caller=Caller(user=signed.user, request_id=req.context.request_id,
                                         client_address=req.context.client_address))
        self.pages.render(resp, "new_key.html", who, status=201, api_key=created["api_key"],
                          title="Your account is ready")


class SignOut(Page):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, _form = changing
        await asyncio.to_thread(self.pages.portal.sessions.sign_out, who.token,
                                Origin(request_id=req.context.request_id, client_address=req.context.client_address))
        guard.clear_session_cookie(req, resp)
        resp.status = falcon.HTTP_303
        resp.location = "/ui/sign-in?signed_out=1"


# ---------------------------------------------------------------------- fleet


def fleet_filters(req: falcon.asgi.Request) -> dict[str, list[str]]:
    states = [s for s in req.get_param_as_list("state") or [] if s in VM_STATES]
    agents = [a for a in req.get_param_as_list("agent") or [] if a.isascii() and a.isdigit() and len(a) < 10]
    return {"state": states, "agent": agents}


class Fleet(Page):
    """``/``: every agent with its VMs; ``/ui/fleet/rows``: the same table's body, for polling."""

    def __init__(self, pages: Pages, *, rows_only: bool = False) -> None:
        super().__init__(pages)
        self.rows_only = rows_only

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        who = await self.pages.who(req, resp)
        if who is None:
            if self.rows_only:
                resp.status = falcon.HTTP_401
                resp.text = ""
            return
        query = fleet_filters(req)
        try:
            after = 0 if self.rows_only else await self.pages.last_event_id(who)
            entries = await self.pages.run("list_fleet", who, req, query=query)
            agents = await self.pages.run("list_agents", who, req)
        except PortalError as error:
            self.pages.error_page(resp, who, error)
            return
        template = "fleet_rows.html" if self.rows_only else "fleet.html"
        self.pages.render(resp, template, who, entries=entries, agents=agents, states=VM_STATES, after=after,
                          chosen_states=query["state"], chosen_agents=[int(a) for a in query["agent"]])


class LiveEvents(Page):
    """``/ui/events/stream``: the signed-in user's events, as ``GET /events/stream`` serves them (the
    same filters, ``Last-Event-ID``, heartbeats, the same resource), for the fleet and VM pages'
    live updates. A page's ``EventSource`` cannot send a Bearer key, so this endpoint takes the
    session cookie like every page; it only reads, so it needs no form token, but a request another
    site started is refused. Events come as plain ``message`` events (their type in the data).
    Every heartbeat interval, busy or idle, the session is checked again: signed out, expired or
    rotated ends the stream, and the browser's reconnection is refused (401)."""

    public_methods: ClassVar[frozenset[str]] = frozenset({"GET"})

    def __init__(self, pages: Pages, stream: EventStreamResource) -> None:
        super().__init__(pages)
        self.stream = stream

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        guard.check_same_origin(req)
        portal = self.pages.portal
        try:
            who = await guard.signed_in(portal, req)
        except SessionEnded as error:
            guard.clear_session_cookie(req, resp)
            resp.status = falcon.HTTP_401
            resp.content_type = falcon.MEDIA_JSON
            resp.text = json.dumps({"error": {"code": error.code, "detail": error.detail}})
            return

        async def still_signed_in() -> bool:
            try:
                await asyncio.to_thread(portal.sessions.resolve_with_key, who.token)
            except SessionEnded:
                return False
            return True

        await self.stream.respond(req, resp, who.caller, named=False, still_allowed=still_signed_in)


# ---------------------------------------------------------------------- agents


def _agent_body(form: Mapping[str, str], *, new: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"name": form.get("name", ""), "hostname": form.get("hostname", ""),
                            "username": form.get("username", "")}
    port = form.get("port", "").strip()
    if port:
        body["port"] = int(port) if port.isascii() and port.isdigit() and len(port) < 7 else port
    if new or "allow_unknown_hosts_shown" in form:
        body["allow_unknown_hosts"] = form.get("allow_unknown_hosts") == "on"
    if new:
        host_key = form.get("host_key", "").strip()
        if host_key:
            body["host_key"] = host_key
        private_key = form.get("private_key", "").strip()
        if private_key:
            body["private_key"] = private_key + "\n"
            if form.get("private_key_passphrase"):
                body["private_key_passphrase"] = form["private_key_passphrase"]
        else:
            body["generate_key"] = True
    return body


class NewAgent(Page):
    """``/ui/agents/new``: the enrollment command to copy, or a form to register a host by hand."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        who = await self.pages.who(req, resp)
        if who is not None:
            self.pages.render(resp, "agent_new.html", who, error=None, form={}, portal_url=guard.own_origin(req))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        try:
            agent = await self.pages.run("register_agent", who, req, body=_agent_body(form, new=True))
        except PortalError as error:
            self.pages.render(resp, "agent_new.html", who, status=status_of(error), error=failure(error), form=form,
                              portal_url=guard.own_origin(req))
            return
        resp.status = falcon.HTTP_303
        resp.location = f"/ui/agents/{agent['id']}"


class Agent(Page):
    """``/ui/agents/{id}``: host facts, check, VMs, edit, delete, key rotation."""

    VERBS = {"edit", "delete", "rotate-key", "check"}

    async def _show(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, who: SignedInUser, agent_id: int,
                    *, status: int = 200, **extra: Any) -> None:
        path = {"agent_id": agent_id}
        try:
            agent = await self.pages.run("get_agent", who, req, path=path)
        except PortalError as error:
            self.pages.error_page(resp, who, error)
            return
        (vms, vms_error), (host, host_error) = await asyncio.gather(
            self.pages.attempt("list_vms", who, req, path=path), self.pages.attempt("get_host", who, req, path=path))
        context: dict[str, Any] = {"check": None, "result": None, "error": None, "form": {}, "new_key": False}
        context.update(extra)
        self.pages.render(resp, "agent.html", who, status=status, agent=agent, vms=vms, vms_error=vms_error,
                          host=host, host_error=host_error, portal_url=guard.own_origin(req), **context)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        who = await self.pages.who(req, resp)
        if who is not None:
            await self._show(req, resp, who, agent_id)

    async def on_post_verb(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                           verb: str) -> None:
        if verb not in self.VERBS:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        path = {"agent_id": agent_id}
        try:
            if verb == "delete":
                await self.pages.run("delete_agent", who, req, path=path)
                resp.status = falcon.HTTP_303
                resp.location = "/"
                return
            if verb == "check":
                check = await self.pages.run("check_agent", who, req, path=path)
                await self._show(req, resp, who, agent_id, check=check)
            elif verb == "rotate-key":
                await self.pages.run("rotate_agent_key", who, req, path=path)
                await self._show(req, resp, who, agent_id, result="A new key pair was generated. Install the new "
                                 "public key on the host (run agent-install.sh again) before the next connection.",
                                 new_key=True)
            else:
                await self.pages.run("update_agent", who, req, path=path, body=_agent_body(form, new=False))
                await self._show(req, resp, who, agent_id, result="Saved.")
        except PortalError as error:
            await self._show(req, resp, who, agent_id, status=status_of(error), error=failure(error), form=form)


# ---------------------------------------------------------------------- VMs


class Vm(Page):
    """``/ui/agents/{id}/vms/{vm}``: dominfo, live stats, actions, autostart, snapshots."""

    async def _show(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, who: SignedInUser, agent_id: int,
                    vm: str, *, status: int = 200, **extra: Any) -> None:
        path = {"agent_id": agent_id, "vm": vm}
        try:
            after = await self.pages.last_event_id(who)
            agent = await self.pages.run("get_agent", who, req, path={"agent_id": agent_id})
        except PortalError as error:
            self.pages.error_page(resp, who, error)
            return
        (info, info_error), (snapshots, snapshots_error) = await asyncio.gather(
            self.pages.attempt("get_vm", who, req, path=path),
            self.pages.attempt("list_snapshots", who, req, path=path))
        interfaces_op = operation_at(INTERFACES)  # issue 16: shown once that feature is in
        interfaces, interfaces_error = (await self.pages.attempt(interfaces_op, who, req, path=path)
                                        if interfaces_op is not None else (None, None))
        if info_error is not None and info_error["code"] in (VmNotFound.code, ValidationFailed.code) and not extra:
            status = info_error["status"]
        context: dict[str, Any] = {"result": None, "error": None}
        context.update(extra)
        state = info["dominfo"]["state"] if info is not None else None
        offered = ACTIONS_IN_STATE.get(state or "", tuple(ACTIONS))
        self.pages.render(resp, "vm.html", who, status=status, agent=agent, vm=vm, info=info, info_error=info_error,
                          offered=offered,
                          snapshots=snapshots, snapshots_error=snapshots_error, interfaces=interfaces,
                          interfaces_error=interfaces_error, actions=ACTIONS,
                          destructive=DESTRUCTIVE, after=after, **context)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str) -> None:
        who = await self.pages.who(req, resp)
        if who is not None:
            await self._show(req, resp, who, agent_id, vm)

    async def on_get_confirm(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                             action: str) -> None:
        if action not in ACTIONS:
            raise falcon.HTTPNotFound()
        who = await self.pages.who(req, resp)
        if who is not None:
            agent, error = await self.pages.attempt("get_agent", who, req, path={"agent_id": agent_id})
            if agent is None:
                self.pages.render(resp, "error.html", who, status=error["status"] if error else 404, error=error)
                return
            self.pages.render(resp, "confirm.html", who, agent=agent, vm=vm, action=action, label=ACTIONS[action])

    async def on_get_stats(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                           vm: str) -> None:
        """The VM's stats as the API answers them, for the page's live chart (session, not key)."""
        try:
            who = await guard.signed_in(self.pages.portal, req)
            stats = await self.pages.run("get_vm_stats", who, req, path={"agent_id": agent_id, "vm": vm})
        except PortalError as error:
            resp.status = falcon.code_to_http_status(status_of(error))
            stats = {"error": {"code": error.code, "detail": error.detail}}
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header("Cache-Control", "no-store")
        resp.text = json.dumps(stats)

    async def on_post_action(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                             action: str) -> None:
        if action not in ACTIONS:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, _form = changing
        path = {"agent_id": agent_id, "vm": vm}
        wait = [] if action == "reboot" else [str(ACTION_WAIT)]
        try:
            done = await self.pages.run(ACTION_OPERATION[action], who, req, path=path, query={"wait": wait})
        except PortalError as error:
            await self._show(req, resp, who, agent_id, vm, status=status_of(error), error=failure(error),
                             did=ACTIONS[action])
            return
        state = done.get("state")
        message = f"{ACTIONS[action]}: done" + (f", the VM is now {state}." if state else ".")
        await self._show(req, resp, who, agent_id, vm, result=message, output=done.get("stdout", ""))

    async def on_post_autostart(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                                vm: str) -> None:
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        enabled = form.get("enabled") == "true"
        try:
            await self.pages.run("set_autostart", who, req, path={"agent_id": agent_id, "vm": vm},
                                 body={"enabled": enabled})
        except PortalError as error:
            await self._show(req, resp, who, agent_id, vm, status=status_of(error), error=failure(error))
            return
        await self._show(req, resp, who, agent_id, vm,
                         result="Autostart is on: the VM starts with its host." if enabled
                         else "Autostart is off.")

    async def on_post_snapshots(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                                vm: str) -> None:
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        body = {"name": form.get("name", ""), "description": form.get("description") or None}
        try:
            taken = await self.pages.run("create_snapshot", who, req, path={"agent_id": agent_id, "vm": vm}, body=body)
        except PortalError as error:
            await self._show(req, resp, who, agent_id, vm, status=status_of(error), error=failure(error))
            return
        await self._show(req, resp, who, agent_id, vm, result=f"Snapshot {taken['name']} taken.")

    async def on_post_snapshot(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str,
                               snapshot: str, verb: str) -> None:
        if verb not in ("revert", "delete"):
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, _form = changing
        path = {"agent_id": agent_id, "vm": vm, "snapshot": snapshot}
        try:
            await self.pages.run("revert_snapshot" if verb == "revert" else "delete_snapshot", who, req, path=path)
        except PortalError as error:
            await self._show(req, resp, who, agent_id, vm, status=status_of(error), error=failure(error))
            return
        done = "reverted to" if verb == "revert" else "deleted"
        await self._show(req, resp, who, agent_id, vm, result=f"Snapshot {snapshot} {done}.")


# ---------------------------------------------------------------------- audit and account


class Audit(Page):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        who = await self.pages.who(req, resp)
        if who is None:
            return
        before = req.get_param("before")
        try:
            page = await self.pages.run("list_audit_events", who, req,
                                        query={"limit": ["50"], "before": [before] if before else []})
        except PortalError as error:
            self.pages.error_page(resp, who, error)
            return
        self.pages.render(resp, "audit.html", who, page=page)


class Account(Page):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        who = await self.pages.who(req, resp)
        if who is not None:
            self.pages.render(resp, "account.html", who)

    async def on_post_rotate(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, _form = changing
        try:
            rotated = await self.pages.run("rotate_api_key", who, req)
            # rotating ends every session of the user (core.users): this browser signs in anew
            signed = await asyncio.to_thread(
                self.pages.portal.sessions.sign_in, rotated["api_key"],
                Origin(request_id=req.context.request_id, client_address=req.context.client_address))
        except PortalError as error:
            self.pages.error_page(resp, who, error)
            return
        guard.set_session_cookie(req, resp, signed.token, int(self.pages.settings.session_lifetime))
        fresh = SignedInUser(user=signed.user, token=signed.token,
                             form_token=self.pages.portal.sessions.form_token(signed.token), caller=who.caller)
        self.pages.render(resp, "new_key.html", fresh, api_key=rotated["api_key"], title="Your new API key")


def add_routes(app: falcon.asgi.App[Any, Any], portal: Portal, settings: Settings,
               limiter: FailureLimiter | None = None, events: EventStreamResource | None = None) -> None:
    """Mount the pages and their static files on the app (beside the API's routes). ``limiter`` is
    the API's limiter of failed authentications: a key typed on the sign-in page counts there too;
    ``events`` is the API's event stream, which the pages follow with their session."""
    pages = Pages(portal, settings, limiter or FailureLimiter(settings.auth_failure_limit,
                                                              settings.auth_failure_window))
    agent, vm, account = Agent(pages), Vm(pages), Account(pages)
    vm_path = "/ui/agents/{agent_id:int(min=1, max=2147483647)}/vms/{vm}"
    app.add_route("/", Fleet(pages))
    app.add_route("/ui/fleet/rows", Fleet(pages, rows_only=True))
    app.add_route("/ui/events/stream", LiveEvents(pages, events or EventStreamResource(portal)))
    app.add_route("/ui/sign-in", SignIn(pages))
    app.add_route("/ui/sign-up", SignUp(pages))
    app.add_route("/ui/sign-out", SignOut(pages))
    app.add_route("/ui/agents/new", NewAgent(pages))
    app.add_route("/ui/agents/{agent_id:int(min=1, max=2147483647)}", agent)
    app.add_route("/ui/agents/{agent_id:int(min=1, max=2147483647)}/{verb}", agent, suffix="verb")
    app.add_route(vm_path, vm)
    app.add_route(vm_path + "/confirm/{action}", vm, suffix="confirm")
    app.add_route(vm_path + "/do/{action}", vm, suffix="action")
    app.add_route(vm_path + "/stats.json", vm, suffix="stats")
    app.add_route(vm_path + "/autostart", vm, suffix="autostart")
    app.add_route(vm_path + "/snapshots", vm, suffix="snapshots")
    app.add_route(vm_path + "/snapshots/{snapshot}/{verb}", vm, suffix="snapshot")
    app.add_route("/ui/audit", Audit(pages))
    app.add_route("/ui/account", account)
    app.add_route("/ui/account/rotate-key", account, suffix="rotate")
    add_parallel_feature_routes(app, pages, vm_path)
    app.add_static_route("/static", str(STATIC_DIR))



# ---------------------------------------------------------------------- features built in parallel
# (issues 16, 17, 20): written against their contracts; hidden until their operations exist


class Console(Page):
    """``…/vms/{vm}/console``: the serial console in xterm.js or the screen in noVNC, over the
    console WebSocket of issue 17 (a one-use ticket asked for by the page, with the form token)."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int, vm: str) -> None:
        if not feature(CONSOLE):
            raise falcon.HTTPNotFound()
        who = await self.pages.who(req, resp)
        if who is None:
            return
        kind = "vnc" if req.get_param("kind") == "vnc" else "serial"
        agent, error = await self.pages.attempt("get_agent", who, req, path={"agent_id": agent_id})
        if agent is None:
            self.pages.render(resp, "error.html", who, status=error["status"] if error else 404, error=error)
            return
        nonce = secrets.token_urlsafe(16)
        resp.set_header("Content-Security-Policy", guard.policy_with_style_nonce(nonce))
        self.pages.render(resp, "console.html", who, agent=agent, vm=vm, kind=kind, nonce=nonce)

    async def on_post_ticket(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int,
                             vm: str) -> None:
        name = operation_at(CONSOLE)
        if name is None:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        kind = "vnc" if form.get("kind") == "vnc" else "serial"
        try:
            answer = await self.pages.run(name, who, req, path={"agent_id": agent_id, "vm": vm}, body={"kind": kind})
        except PortalError as error:
            resp.status = falcon.code_to_http_status(status_of(error))
            answer = {"error": {"code": error.code, "detail": error.detail}}
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header("Cache-Control", "no-store")
        resp.text = json.dumps(answer, default=str)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _number(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 10 else text


class CreateVm(Page):
    """``/ui/agents/{id}/vms/new``: the create form of issue 16; the API's 422 details are shown next
    to the fields, which carry the API's own (dotted) field names."""

    async def _choices(self, req: falcon.asgi.Request, who: SignedInUser, agent_id: int) -> dict[str, Any]:
        path = {"agent_id": agent_id}
        pools_op, networks_op = operation_at(POOLS), operation_at(NETWORKS)
        pools = (await self.pages.attempt(pools_op, who, req, path=path))[0] if pools_op else None
        networks = (await self.pages.attempt(networks_op, who, req, path=path))[0] if networks_op else None
        return {"pools": pools or [], "networks": networks or []}

    async def _form(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, who: SignedInUser, agent_id: int,
                    *, status: int = 200, error: dict[str, Any] | None = None, form: Mapping[str, str] | None = None
                    ) -> None:
        agent, failed = await self.pages.attempt("get_agent", who, req, path={"agent_id": agent_id})
        if agent is None:
            self.pages.render(resp, "error.html", who, status=failed["status"] if failed else 404, error=failed)
            return
        self.pages.render(resp, "vm_new.html", who, status=status, agent=agent, error=error, form=form or {},
                          **await self._choices(req, who, agent_id))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        if not feature(CREATE_VM):
            raise falcon.HTTPNotFound()
        who = await self.pages.who(req, resp)
        if who is not None:
            await self._form(req, resp, who, agent_id)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent_id: int) -> None:
        name = operation_at(CREATE_VM)
        if name is None:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        disk: dict[str, Any] = {"pool": form.get("disk.pool", ""), "size_gib": _number(form.get("disk.size_gib", ""))}
        if form.get("disk.base_volume"):
            disk["base_volume"] = form["disk.base_volume"]
        cloud_init: dict[str, Any] = {}
        if form.get("cloud_init.hostname"):
            cloud_init["hostname"] = form["cloud_init.hostname"]
        if _lines(form.get("cloud_init.ssh_authorized_keys", "")):
            cloud_init["ssh_authorized_keys"] = _lines(form["cloud_init.ssh_authorized_keys"])
        body: dict[str, Any] = {"name": form.get("name", ""), "vcpus": _number(form.get("vcpus", "")),
                                "memory_mib": _number(form.get("memory_mib", "")), "disk": disk,
                                "start": form.get("start") == "on", "autostart": form.get("autostart") == "on"}
        if form.get("network"):
            body["network"] = form["network"]
        if cloud_init:
            body["cloud_init"] = cloud_init
        try:
            created = await self.pages.run(name, who, req, path={"agent_id": agent_id}, body=body)
        except PortalError as error:
            await self._form(req, resp, who, agent_id, status=status_of(error), error=failure(error), form=form)
            return
        vm_name = created.get("name", body["name"]) if isinstance(created, dict) else body["name"]
        resp.status = falcon.HTTP_303
        resp.location = f"/ui/agents/{agent_id}/vms/{segment(vm_name)}"


SCOPES = ("read", "operate", "provision", "agents", "credentials", "keys")


class ApiKeys(Page):
    """``/ui/keys``: the scoped keys of issue 20 (list, create with scopes, revoke)."""

    async def _show(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, who: SignedInUser, *,
                    status: int = 200, **extra: Any) -> None:
        name = operation_at(API_KEYS)
        assert name is not None
        keys, error = await self.pages.attempt(name, who, req)
        context: dict[str, Any] = {"error": error, "form": {}, "new_key": None, "result": None}
        context.update(extra)
        self.pages.render(resp, "keys.html", who, status=status, keys=keys or [], scopes=SCOPES, **context)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not feature(API_KEYS):
            raise falcon.HTTPNotFound()
        who = await self.pages.who(req, resp)
        if who is not None:
            await self._show(req, resp, who)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        name = operation_at(NEW_API_KEY)
        if name is None:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, form = changing
        body: dict[str, Any] = {"name": form.get("name", ""),
                                "scopes": [scope for scope in SCOPES if form.get(f"scope.{scope}") == "on"]}
        agents = [a.strip() for a in form.get("agents", "").split(",") if a.strip()]
        if agents:
            body["agents"] = [_number(a) for a in agents]
        if form.get("expires_at"):
            body["expires_at"] = form["expires_at"]
        try:
            created = await self.pages.run(name, who, req, body=body)
        except PortalError as error:
            await self._show(req, resp, who, status=status_of(error), error=failure(error), form=form)
            return
        await self._show(req, resp, who, status=201, new_key=created.get("api_key"))

    async def on_post_revoke(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key_id: int) -> None:
        name = operation_at(REVOKE_API_KEY)
        if name is None:
            raise falcon.HTTPNotFound()
        changing = await self.pages.changing(req, resp)
        if changing is None:
            return
        who, _form = changing
        try:
            await self.pages.run(name, who, req, path={BY_NAME[name].path_parameters[-1]: key_id})
        except PortalError as error:
            await self._show(req, resp, who, status=status_of(error), error=failure(error))
            return
        await self._show(req, resp, who, result="The key was revoked: it stops working at once.")


def add_parallel_feature_routes(app: falcon.asgi.App[Any, Any], pages: Pages, vm_path: str) -> None:
    """Routes of the pages above; each answers 404 while its feature is missing from the build."""
    console, keys = Console(pages), ApiKeys(pages)
    app.add_route(vm_path + "/console", console)
    app.add_route(vm_path + "/console/ticket", console, suffix="ticket")
    app.add_route("/ui/agents/{agent_id:int(min=1, max=2147483647)}/vms/new", CreateVm(pages))
    app.add_route("/ui/keys", keys)
    app.add_route("/ui/keys/{key_id:int(min=1, max=2147483647)}/revoke", keys, suffix="revoke")
