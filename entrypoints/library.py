"""The library facade: drive the portal from a Python automation script, synchronously, in-process.

It opens the same database with the same configuration as the server (the ``MANAGEMENT_*``
variables) and calls the same use cases, so validation, isolation and audit are exactly those of
the HTTP API. Errors are the core's (``core.errors``), each with its stable ``code``::

    from entrypoints.library import connect

    with connect() as portal:                      # reads MANAGEMENT_* like the server
        me = portal.login("mgmt_…")                # act as the owner of this API key
        agent = me.register_agent(name="hv1", hostname="192.0.2.15", username="qemu-admin",
                                  private_key=open("id_ed25519").read())
        for vm in me.vms(agent.id):
            print(vm.name, vm.state)
        me.start_vm(agent.id, "web1")
"""

from __future__ import annotations

import asyncio
import getpass
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from core.commands import NewUser, NewVm
from core.errors import ValidationFailed
from core.events import EVENT_PAGE_MAX, check_filter
from core.live import Event
from core.model import ApiKey, Caller, Origin, User
from core.portal import Portal
from core.ports import CommandResult
from core.results import CreatedVm, FleetEntry, NewApiKey, WaitedAction
from core.virsh import VmAction
from entrypoints import bootstrap
from entrypoints.operations import ALIASES, BY_NAME, OPERATIONS, Call, Operation
from entrypoints.settings import Settings
from entrypoints.shapes import structure

T = TypeVar("T")


def connect(env: Mapping[str, str] | None = None, *, settings: Settings | None = None) -> PortalLibrary:
    """Open the portal described by ``settings`` (default: the ``MANAGEMENT_*`` environment)."""
    return PortalLibrary(settings or Settings.from_env(env))


class PortalLibrary:
    """An open portal. Use it as a context manager, or call ``close()`` when done."""

    def __init__(self, settings: Settings, *, runtime: bootstrap.Runtime | None = None) -> None:
        self._runtime = runtime or bootstrap.build_runtime(settings)
        self.portal: Portal = self._runtime.portal
        # VM operations are asynchronous inside; one private event loop carries them (and the SSH
        # connection pool) across calls, so consecutive calls reuse connections.
        self._runner = asyncio.Runner()

    def __enter__(self) -> PortalLibrary:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close SSH connections and the database."""
        try:
            self._runner.run(self._runtime.close_connections())
        finally:
            self._runner.close()
            self._runtime.close()

    def _await(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    def login(self, api_key: str) -> Session:
        """Act as the owner of ``api_key``, with that key's scopes and agents; raises
        ``core.errors.Unauthenticated`` if it is not valid (``ApiKeyExpired`` once it has expired)."""
        found = self.portal.users.authenticate_key(api_key)
        return Session(self, found.user, found.key)

    def login_as(self, user: User) -> Session:
        """Act as ``user`` without their key: for the host's operator (e.g. to rotate a lost key)."""
        return Session(self, user)

    def create_user(self, name: str, email: str | None = None) -> NewApiKey:
        """Create a user as the host's operator (the sign-up policy does not apply here)."""
        return self.portal.users.create_user(structure({"name": name, "email": email}, NewUser), _origin())


class Session:
    """What one user can do. Every call is checked, scoped and audited as an HTTP request would be.

    Every operation of the API that acts as a user is a method named by its ``operationId``
    (``entrypoints/operations.py``): path values first, in path order (``agent_id, vm, snapshot``),
    then the body's fields (positionally in their declared order, or by keyword), and query
    parameters by keyword. ``me.list_vms(1)``, ``me.start_vm(1, "web1", wait=60)``,
    ``me.register_agent(name=…, hostname=…, username=…, generate_key=True)``,
    ``me.create_snapshot(1, "web1", "before-upgrade")``. Answers are the core's values
    (``core.model``, ``core.results``, ``core.virsh``); errors are ``core.errors`` classes.
    """

    def __init__(self, library: PortalLibrary, user: User, key: ApiKey | None = None) -> None:
        self._library = library
        self.portal = library.portal
        self.user = user
        self.key = key  # None: the host's operator acting as the user (``login_as``), every power

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = BY_NAME.get(ALIASES.get(name, name))
        if op is None or not op.library:
            raise AttributeError(f"{type(self).__name__!r} has no operation {name!r}")

        def method(*args: Any, **kwargs: Any) -> Any:
            return self.call(op.name, *args, **kwargs)

        method.__name__ = name
        method.__doc__ = op.summary
        return method

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(op.name for op in OPERATIONS if op.library), *ALIASES})

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run the operation named ``operation`` as this user (see the class's docstring)."""
        op = BY_NAME[operation]
        return self.run(op, self.prepare(op, *args, **kwargs))

    def prepare(self, op: Operation, *args: Any, **kwargs: Any) -> Call:
        """The call of ``op`` that these arguments make, checked as the HTTP API checks a request."""
        names = op.path_parameters
        if len(args) < len(names):
            raise TypeError(f"{op.name}() needs {', '.join(names)}")
        path = dict(zip(names, args[:len(names)], strict=False))
        query = {q.name: q.check(kwargs.pop(q.name)) if q.name in kwargs else q.parse([]) for q in op.query}
        body: Any = None
        if op.request is not None:
            fields = dict(zip([f.name for f in attrs.fields(op.request)], args[len(names):], strict=False))
            body = structure({**fields, **kwargs}, op.request)
        elif args[len(names):] or kwargs:
            raise TypeError(f"{op.name}() takes {', '.join(names) or 'no arguments'}"
                            + (f" and {', '.join(q.name for q in op.query)} by keyword" if op.query else ""))
        return Call(caller=self._caller(), origin=_origin(), path=path, body=body, query=query)

    def run(self, op: Operation, call: Call) -> Any:
        """Run a prepared call of ``op``; answers the use case's value (``op.view`` makes the wire's)."""
        return self._library._await(op.execute(self.portal, call))

    def _caller(self, operation: str | None = None) -> Caller:
        """This session as a caller; with ``operation``, checked against that operation's scope
        (for the methods below, written by hand, that call a use case directly)."""
        origin = _origin()
        caller = Caller(user=self.user, request_id=origin.request_id, client_address=origin.client_address,
                        key=self.key)
        if operation is not None:
            BY_NAME[operation].authorize(caller)
        return caller

    def rotate_api_key(self) -> str:
        """A new secret for this session's key (returned once); the old one stops working at once."""
        rotated = self.portal.users.rotate_api_key(self._caller("rotate_api_key"))
        self.user = rotated.user
        if self.key is not None:
            self.key = self.portal.users.authenticate_key(rotated.api_key).key
        return rotated.api_key

    def vm_action(self, agent_id: int, vm: str, action: VmAction | str) -> CommandResult:
        """Run ``start``, ``shutdown``, ``force-stop``, ``reboot``, ``suspend`` or ``resume`` on a VM."""
        return self._library._await(self.portal.vms.vm_action(self._caller("start_vm"), agent_id, vm, _action(action)))

    def vm_action_and_wait(self, agent_id: int, vm: str, action: VmAction | str, wait: int,
                           progress: Callable[[str | None, float], None] | None = None) -> WaitedAction:
        """Run an action, then wait up to ``wait`` seconds (0-300) for the VM to reach the action's state
        (``.state``); raises ``core.errors.WaitTimedOut`` (``.state``: where it is) when time is up.
        ``progress(state, elapsed_seconds)`` is called after every poll."""
        return self._library._await(
            self.portal.vms.vm_action_and_wait(self._caller("start_vm"), agent_id, vm, _action(action), wait, progress))

    def follow_events(self, *, after: int | None = None, agent_id: int | None = None, vm: str | None = None,
                      types: Sequence[str] = (), poll: float = 0.5) -> Iterator[Event]:
        """Your events as they happen, forever (break out of the loop to stop): those after
        ``after`` (default: from now on), filtered like ``list_events``. Reads the database every
        ``poll`` seconds while nothing happens, so it sees what every instance's watchers record."""
        wanted = check_filter(after=after, agent_id=agent_id, vm=vm, types=types)
        cursor = wanted.after if after is not None else self.portal.events.last_id(self.user.id)
        while True:
            events = self.portal.events.read(self.user.id, attrs.evolve(wanted, after=cursor), EVENT_PAGE_MAX)
            yield from events
            if events:
                cursor = events[-1].id
            else:
                time.sleep(poll)

    def fleet(self, *, agent_ids: Sequence[int] = (), states: Sequence[str] = ()) -> list[FleetEntry]:
        """Every VM on every agent of yours (or of ``agent_ids``), agents asked in parallel; an agent
        that fails has ``.vms`` None and ``.error`` (code, detail)."""
        if isinstance(agent_ids, str | bytes) or not all(isinstance(a, int) and not isinstance(a, bool)
                                                         for a in agent_ids):
            raise ValidationFailed.one("agent", "must be a sequence of agent ids (integers)")
        caller = self._caller("list_fleet")
        return self._library._await(self.portal.fleet.fleet(caller, agent_ids=agent_ids, states=states))


    # --- provisioning (issue 16)
    def create_vm_and_watch(self, agent_id: int, request: NewVm, *, wait: int | None = None,
                            progress: Callable[[str | None, float], None] | None = None) -> CreatedVm:
        """``create_vm``, telling ``progress(step, elapsed_seconds)`` of every step (disk, seed,
        upload, define, start) and, with ``wait``, of every poll of the new VM's state."""
        return self._library._await(self.portal.provisioning.create_vm(self._caller(), agent_id, request, wait=wait,
                                                                       progress=progress))


def _action(action: VmAction | str) -> VmAction:
    """``action`` as a ``VmAction``; a name that is none is a ``ValidationFailed`` like any bad input."""
    try:
        return VmAction(action)
    except ValueError:
        choices = ", ".join(a.value for a in VmAction)
        raise ValidationFailed.one("action", f"must be one of {choices}") from None


def _origin() -> Origin:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Origin(request_id=f"lib-{uuid.uuid4().hex}", client_address=f"local:{who}"[:64])
