"""One Falcon resource per path of the operation table: read the request (path, query, JSON body),
call the operation, answer with its view.

Nothing here knows a particular operation except the three the HTTP layer answers itself (health
and this API's document): adding an operation to ``entrypoints/operations.py`` adds its route.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import falcon
import falcon.asgi

from core.errors import BodyTooLarge, MalformedBody, UnsupportedMediaType
from core.model import Caller, Origin
from core.portal import Portal
from entrypoints.exposition import CONTENT_TYPE as EXPOSITION_CONTENT_TYPE
from entrypoints.exposition import Exposition
from entrypoints.http.cache import UntilChanged
from entrypoints.http.metrics import PortalMetrics
from entrypoints.operations import Call, Operation
from entrypoints.shapes import Health, dump, structure

T = TypeVar("T")

Responder = Callable[..., Awaitable[None]]


async def read_json(req: falcon.asgi.Request, command: type[T]) -> T:
    """The request body as ``command``: 415 unless JSON, 413 past the limit, 400 if unparseable,
    422 naming each invalid field."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType("send the body as JSON with 'Content-Type: application/json'")
    limit: int = req.context.max_body_bytes
    raw = await req.stream.read(limit + 1)
    if len(raw) > limit:
        raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise MalformedBody("the request body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedBody(f"the request body is not valid JSON ({error})") from None
    return structure(data, command)


def caller(req: falcon.asgi.Request) -> Caller:
    return Caller(user=req.context.user, request_id=req.context.request_id,
                  client_address=req.context.client_address, key=getattr(req.context, "key", None))


def origin(req: falcon.asgi.Request) -> Origin:
    return Origin(request_id=req.context.request_id, client_address=req.context.client_address)


async def _until_client_leaves(req: falcon.asgi.Request, left: asyncio.Event) -> None:
    """Set ``left`` when the client disconnects. Only for operations without a body: once the
    (empty) body has been read, the ASGI server's ``receive`` answers nothing until the client
    disconnects, so waiting on it consumes nothing the responder needs. Falcon keeps ``receive``
    as ``req._receive`` (Falcon 4; pinned below 5 in setup.cfg)."""
    receive = req._receive
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            left.set()
            return


_NOT_TAKEN = object()  # no data version taken for this request yet


class OperationsResource:
    """The operations of one path, each answered by an ``on_<method>`` responder made from its
    declaration. ``public_methods`` tells the authentication middleware which need no key."""

    def __init__(self, portal: Portal, operations: list[Operation], *, document_body: str,
                 lists: UntilChanged[Any, Any] | None = None, metrics: PortalMetrics | None = None) -> None:
        self.portal = portal
        self.metrics = metrics if metrics is not None else PortalMetrics(None, None)
        self.document_body = document_body
        # Reads kept per user until the database changes (entrypoints.http.cache).
        self.lists: UntilChanged[Any, Any] = lists if lists is not None else UntilChanged(None)
        self.public_methods = frozenset(op.method for op in operations if op.public)
        for op in operations:
            setattr(self, f"on_{op.method.lower()}", self._responder(op))

    def _responder(self, op: Operation) -> Responder:
        async def responder(req: falcon.asgi.Request, resp: falcon.asgi.Response, **params: Any) -> None:
            await self._answer(op, req, resp, params)

        responder.__name__ = f"on_{op.method.lower()}"
        responder.operation = op  # type: ignore[attr-defined]
        return responder

    async def _answer(self, op: Operation, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                      params: dict[str, Any]) -> None:
        if op.run is None:
            if op.name == "get_portal_metrics":
                await self.metrics.answer(req, resp)
                return
            self._answer_itself(op, resp)
            return
        me = None if op.public else caller(req)
        op.authorize(me)  # before the body is read: a key without the scope learns nothing more
        body: Any = None
        if op.request is not None:
            body = await read_json(req, op.request)
        query = {q.name: q.parse([str(v) for v in req.get_param_as_list(q.name) or []]) for q in op.query}
        call = Call(caller=me, origin=origin(req), path=params, body=body,
                    query=query, abandoned=asyncio.Event() if op.long_running else None)
        version = getattr(req.context, "data_version", _NOT_TAKEN)  # by the authentication middleware
        if call.abandoned is None:
            result = await self._run(op, call, version)
        else:
            watcher = asyncio.create_task(_until_client_leaves(req, call.abandoned))
            try:
                result = await self._run(op, call, version)
            finally:
                watcher.cancel()
        if op.no_store:
            resp.set_header("Cache-Control", "no-store")
            resp.set_header("Pragma", "no-cache")
        if op.location is not None:
            resp.location = op.location(result)
        for name, value in (op.headers(result, call) if op.headers is not None else {}).items():
            resp.set_header(name, value)
        resp.status = falcon.code_to_http_status(op.ok)
        if op.view is not None:
            view = op.view(result, call)
            if isinstance(view, Exposition):  # Prometheus text (GET /metrics/vms), not JSON
                resp.content_type = EXPOSITION_CONTENT_TYPE
                resp.text = view.text
            else:
                resp.media = dump(view)

    async def _run(self, op: Operation, call: Call, version: Any = _NOT_TAKEN) -> Any:
        if not op.cached_per_user:
            return await op.execute(self.portal, call)
        op.authorize(call.caller)
        # per user and per agent limitation: keys of one user limited to other agents see other lists
        key = (call.me.user.id, call.me.agent_ids, tuple(sorted(call.query.items())))
        if version is _NOT_TAKEN:
            version = await self.lists.fresh_version()
        result = self.lists.get(key, version)
        if result is None:
            result = await op.execute(self.portal, call)
            self.lists.put(key, version, result)
        return result

    def _answer_itself(self, op: Operation, resp: falcon.asgi.Response) -> None:
        resp.status = falcon.HTTP_200
        if op.name == "get_health":
            resp.media = dump(Health(status="ok"))
        elif op.name == "get_openapi":
            resp.content_type = falcon.MEDIA_JSON
            resp.text = self.document_body
