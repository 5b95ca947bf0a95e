"""The HTTP client: drive a portal from any machine with its URL and an API key.

    from entrypoints.client import Client

    with Client("https://manage.example.com", "mgmt_…") as portal:
        for vm in portal.list_vms(1):                   # typed views (entrypoints/shapes.py)
            print(vm.name, vm.state)
        portal.start_vm(1, "web1", wait=120)            # ?wait=: 200 once running, else WaitTimedOut

Every operation of the table (``entrypoints/operations.py``) is a method named by its
``operationId``, called exactly like the in-process library's ``Session`` (``entrypoints.library``)
— path values first (``agent_id, vm, snapshot``), then the body's fields (positionally or by
keyword), query parameters by keyword — and the library's aliases (``vms``, ``agents``…) work too.
Nothing here names a particular operation: an operation added to the table is a method here.

Answers are the views the server serialises, decoded by the same cattrs rules. A problem answer
raises the ``core.errors`` class of its ``code`` (so ``except core.errors.VmNotFound`` works as
with the library), mixed with ``ApiError`` which adds ``status``, ``request_id`` and the whole
``problem``. When the portal cannot be reached or does not answer as the portal does, a
``TransportError`` says why (``PortalUnreachable``, ``TlsError``, ``PortalTimeout``,
``UnexpectedAnswer``).

Retries happen only where they are safe: a connection that could not be opened (nothing was
sent) is retried for any method; GET/HEAD are retried after a dropped connection and on 429/503,
waiting as ``Retry-After`` says (up to ``max_retry_after`` seconds). TLS certificates are verified
unless ``verify=False``; ``verify`` may also name a CA file or be an ``ssl.SSLContext``.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote

import attrs
import cattrs
import httpx

from core import errors
from core.errors import FieldError, PortalError
from entrypoints.http.errors import STATUS_OF
from entrypoints.operations import ALIASES, BY_NAME, OPERATIONS, Operation
from entrypoints.shapes import make_converter

__all__ = ["ApiError", "AsyncClient", "Client", "PortalTimeout", "PortalUnreachable", "TlsError",
           "TransportError", "UnexpectedAnswer"]

DEFAULT_TIMEOUT = 30.0  # seconds for any one request (connect at most 10 of them); ?wait= adds its wait
CONNECT_TIMEOUT_MAX = 10.0
USER_AGENT = "manage-playrservers-client/0.1"

# The same rules as the server's converter (strict types, ISO 8601 times), tolerant of fields a
# newer server has added, so an older client keeps working against a newer portal.
converter = make_converter(forbid_extra_keys=False)


# ---------------------------------------------------------------------- errors


class TransportError(Exception):
    """The portal could not be asked, or did not answer as the portal does."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class PortalUnreachable(TransportError):
    """No connection to the portal: the name did not resolve, the port refused, no route."""


class TlsError(PortalUnreachable):
    """The TLS handshake failed: certificate not trusted or not for this name, or not TLS at all."""


class PortalTimeout(PortalUnreachable):
    """The portal did not answer within the time-out."""


class UnexpectedAnswer(TransportError):
    """Something answered, but not as the portal does (not JSON, or not a problem document): a
    wrong URL, a proxy's error page."""

    def __init__(self, message: str, *, url: str, status: int) -> None:
        super().__init__(message, url=url)
        self.status = status


class ApiError(Exception):
    """Mixed into the ``core.errors`` class of a problem answer: what the wire said besides the
    class's ``code`` and the ``detail``."""

    status: int
    request_id: str | None
    problem: dict[str, Any]
    code: str
    detail: str


_CODES: dict[str, type[PortalError]] = {}
_REMOTE_CLASSES: dict[type[PortalError], type[PortalError]] = {}
# The class of each status for codes this client does not know (403: Forbidden, listed after SignupRefused).
_BASE_OF_STATUS: dict[int, type[PortalError]] = {status: cls for cls, status in STATUS_OF.items()}


def error_class(code: str, status: int) -> type[PortalError]:
    """The ``core.errors`` class of ``code`` (a code this client does not know: the class of its status)."""
    if not _CODES:
        for cls in errors.error_classes():
            _CODES.setdefault(cls.code, cls)
    return _CODES.get(code) or _BASE_OF_STATUS.get(status, PortalError)


def _remote_class(cls: type[PortalError]) -> type[PortalError]:
    """``cls`` with ``ApiError`` mixed in (made once per class)."""
    made = _REMOTE_CLASSES.get(cls)
    if made is None:
        made = type(cls.__name__, (cls, ApiError), {"__module__": __name__, "__qualname__": cls.__qualname__})
        _REMOTE_CLASSES[cls] = made
    return made


def problem_error(status: int, problem: Mapping[str, Any], retry_after: int | None = None) -> PortalError:
    """The exception a problem answer stands for: its ``core.errors`` class, with ``ApiError``'s fields."""
    code = str(problem.get("code") or f"http_{status}")
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    base = error_class(code, status)
    cls = _remote_class(base)
    error = cls.__new__(cls)
    Exception.__init__(error, detail)  # the core classes' own __init__ take what they were raised with
    error.detail = detail
    remote = typing.cast(ApiError, error)
    remote.status = status
    remote.request_id = problem.get("request_id")
    remote.problem = dict(problem)
    if base.code != code:
        remote.code = code  # a code this client does not know, kept as the server said it
    if isinstance(error, errors.ValidationFailed):
        error.errors = tuple(FieldError(str(e.get("field", "")), str(e.get("message", "")))
                             for e in problem.get("errors") or [] if isinstance(e, dict))
    if isinstance(error, errors.WaitTimedOut):
        error.state = problem.get("state")
        error.target_state = str(problem.get("target_state") or "")
    if isinstance(error, errors.TooManyRequests):
        error.retry_after = retry_after
    return error


# ---------------------------------------------------------------------- requests, built from the table


@attrs.frozen
class Request:
    """One HTTP request of an operation."""

    op: Operation
    method: str
    path: str
    params: list[tuple[str, str | int | float | bool | None]]
    body: Any  # JSON, or None
    wait: int | None  # the ?wait= seconds, which the read time-out must allow for

    @property
    def idempotent(self) -> bool:
        return self.method in ("GET", "HEAD")


def build_request(op: Operation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Request:
    """The request that ``op(*args, **kwargs)`` makes, with the library's calling convention."""
    names = op.path_parameters
    kwargs = dict(kwargs)
    path_values = list(args[:len(names)])
    for name in names[len(path_values):]:
        if name not in kwargs:
            raise TypeError(f"{op.name}() needs {', '.join(names)}")
        path_values.append(kwargs.pop(name))
    path = op.path
    for name, value in zip(names, path_values, strict=True):
        segment = quote(str(value), safe="")
        segment = segment.replace(".", "%2E") if segment in (".", "..") else segment  # not a dot-segment
        path = path.replace("{" + name + "}", segment)
    params: list[tuple[str, str | int | float | bool | None]] = []
    wait: int | None = None
    for q in op.query:
        if q.name not in kwargs:
            continue
        value = q.check(kwargs.pop(q.name))  # the library's type rules, before anything is sent
        if q.name == "wait" and value is not None:
            wait = int(value)
        params += [(q.name, str(v)) for v in (value if q.repeat else [value]) if v is not None]
    body: Any = None
    rest = args[len(names):]
    if op.request is not None:
        fields = [f.name for f in attrs.fields(op.request)]
        if len(rest) > len(fields):
            raise TypeError(f"{op.name}() takes at most {len(fields)} body fields: {', '.join(fields)}")
        body = {**dict(zip(fields, rest, strict=False)), **kwargs}
    elif rest or kwargs:
        raise TypeError(f"{op.name}() takes {', '.join(names) or 'no arguments'}"
                        + (f" and {', '.join(q.name for q in op.query)} by keyword" if op.query else ""))
    return Request(op, op.method, path, params, body, wait)


def decode(op: Operation, response: httpx.Response) -> Any:
    """The typed answer of a successful ``response`` to ``op``."""
    if op.method == "HEAD" or response.status_code == 204 or not response.content:
        return None
    data = _json(response)
    if op.response is None:
        return data  # what the HTTP layer answers itself (health, the OpenAPI document)
    try:
        return converter.structure(data, op.response)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as error:
        raise UnexpectedAnswer(f"{response.request.url} answered JSON that is not a {_type_name(op.response)} "
                               f"({error}): is the URL the portal's, and this client as new as it?",
                               url=str(response.request.url), status=response.status_code) from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("entrypoints.shapes.", "")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise UnexpectedAnswer(f"{response.request.url} answered HTTP {response.status_code} with something "
                               "that is not JSON: is the URL the portal's?", url=str(response.request.url),
                               status=response.status_code) from None


def failure(response: httpx.Response) -> Exception:
    """The exception an unsuccessful ``response`` stands for."""
    url = str(response.request.url)
    media = response.headers.get("content-type", "").split(";")[0].strip()
    problem: Any = None
    if media.endswith("json"):
        try:
            problem = response.json()
        except ValueError:
            problem = None
    if response.is_redirect:
        return UnexpectedAnswer(f"{url} redirects to {response.headers.get('location', '?')}: give that URL "
                                "(the client does not follow redirects with your API key)", url=url,
                                status=response.status_code)
    if not isinstance(problem, dict) or "code" not in problem:
        return UnexpectedAnswer(f"{url} answered HTTP {response.status_code} "
                                f"{response.reason_phrase or ''}".rstrip() + ", not a problem document of the portal "
                                "(is the URL the portal's?)", url=url, status=response.status_code)
    return problem_error(response.status_code, problem, _retry_after(response))


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0, int((when - datetime.now(UTC)).total_seconds()))


def transport_error(error: httpx.TransportError, url: str) -> TransportError:
    """A clear exception for a failure of the connection itself."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TlsError(f"TLS certificate of {url} not trusted: {cause.verify_message or cause.reason} "
                            "(give the CA that signed it: verify=<CA file>, --ca-file or MANAGEMENT_CA_FILE)",
                            url=url)
        if isinstance(cause, ssl.SSLError):
            hint = " (is it plain HTTP? try http://)" if "WRONG_VERSION" in str(cause) or "record" in str(cause) \
                else ""
            return TlsError(f"TLS handshake with {url} failed: {cause.reason or cause}{hint}", url=url)
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, httpx.TimeoutException):
        return PortalTimeout(f"{url} did not answer in time ({type(error).__name__})", url=url)
    if isinstance(error, httpx.RemoteProtocolError):
        return UnexpectedAnswer(f"{url} closed the connection without an HTTP answer (is it HTTPS? try https://): "
                                f"{error}", url=url, status=0)
    return PortalUnreachable(f"cannot reach the portal at {url}: {error or type(error).__name__}", url=url)


def _sent_nothing(error: httpx.TransportError) -> bool:
    """Whether the request surely never reached the server (so any method may be sent again)."""
    return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout) and not _is_tls(error)


def _is_tls(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _verify(verify: bool | str | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


# ---------------------------------------------------------------------- the two clients


class _Base:
    """What both clients share: the operations as methods, the request and retry rules."""

    remote: ClassVar[bool] = True

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 verify: bool | str | ssl.SSLContext = True, retries: int = 2, max_retry_after: float = 30.0,
                 backoff: float = 0.25) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the portal's URL must start with https:// or http:// (got {url!r})")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.max_retry_after = max_retry_after
        self.backoff = backoff
        self._verify = _verify(verify)

    def _headers(self, op: Operation) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/problem+json"}
        if self.api_key and not op.public:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _timeout(self, request: Request) -> httpx.Timeout:
        read = self.timeout + (request.wait or 0)
        return httpx.Timeout(read, connect=min(self.timeout, CONNECT_TIMEOUT_MAX))

    def _operation(self, name: str) -> Operation:
        op = BY_NAME.get(ALIASES.get(name, name))
        if op is None:
            raise AttributeError(f"{type(self).__name__!r} has no operation {name!r}")
        return op

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(op.name for op in OPERATIONS), *ALIASES})

    def _retry_delay(self, request: Request, attempt: int,
                     outcome: httpx.Response | httpx.TransportError) -> float | None:
        """Seconds to wait before sending ``request`` again, or None to give up."""
        if attempt >= self.retries:
            return None
        if isinstance(outcome, httpx.TransportError):
            if _sent_nothing(outcome) or (request.idempotent and not _is_tls(outcome)
                                          and not isinstance(outcome, httpx.TimeoutException)):
                return float(self.backoff * 2 ** attempt)
            return None
        if request.idempotent and outcome.status_code in (429, 503):
            after = _retry_after(outcome)
            delay = float(self.backoff * 2 ** attempt) if after is None else float(after)
            return delay if delay <= self.max_retry_after else None
        return None

    def _answer(self, request: Request, response: httpx.Response) -> Any:
        if response.is_success:
            result = decode(request.op, response)
            if request.op.name == "rotate_api_key" and getattr(result, "api_key", None):
                self.api_key = result.api_key  # the old key died with this answer
            return result
        raise failure(response)

    @staticmethod
    def _action_operation(action: str) -> str:
        name = f"{str(getattr(action, 'value', action)).replace('-', '_')}_vm"
        op = BY_NAME.get(name)
        if op is None or "wait" not in {q.name for q in op.query}:
            raise errors.ValidationFailed.one("action", "must be one of start, shutdown, force-stop, reboot, "
                                                        "suspend, resume")
        return name


class Client(_Base):
    """A synchronous client of one portal (``with Client(url, key) as portal: portal.list_vms(1)``)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 verify: bool | str | ssl.SSLContext = True, retries: int = 2, max_retry_after: float = 30.0,
                 backoff: float = 0.25, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout=timeout, verify=verify, retries=retries,
                         max_retry_after=max_retry_after, backoff=backoff)
        self._http = httpx.Client(base_url=self.url, verify=self._verify, transport=transport, trust_env=True,
                                  follow_redirects=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = self._operation(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            return self.call(op.name, *args, **kwargs)

        method.__name__ = name
        method.__doc__ = op.summary
        return method

    def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run the operation named ``operation`` (its ``operationId``) and answer its view."""
        request = build_request(BY_NAME[operation], args, kwargs)
        return self._answer(request, self._send(request))

    def _send(self, request: Request) -> httpx.Response:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(request.method, request.path, params=request.params,
                                             json=request.body, headers=self._headers(request.op),
                                             timeout=self._timeout(request))
            except httpx.TransportError as error:
                outcome = error
            delay = self._retry_delay(request, attempt, outcome)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise transport_error(outcome, self.url) from None
                return outcome
            time.sleep(delay)
            attempt += 1

    def vm_action(self, agent_id: int, vm: str, action: str) -> Any:
        """Run ``start``, ``shutdown``, ``force-stop``, ``reboot``, ``suspend`` or ``resume`` on a VM."""
        return self.call(self._action_operation(action), agent_id, vm)

    def vm_action_and_wait(self, agent_id: int, vm: str, action: str, wait: int,
                           progress: Callable[[str | None, float], None] | None = None,
                           poll_interval: float = 1.0) -> Any:
        """An action with ``?wait=`` (one request, answered when the VM is in the action's state, or
        ``WaitTimedOut``); ``progress(state, elapsed_seconds)`` is called as the VM's state is polled
        meanwhile (``get_vm``), like the library's."""
        name = self._action_operation(action)
        if progress is None:
            return self.call(name, agent_id, vm, wait=wait)
        done = threading.Event()
        started = time.monotonic()

        def poll() -> None:
            while not done.wait(poll_interval):
                try:
                    state = self.call("get_vm", agent_id, vm).dominfo.state
                except (PortalError, TransportError):
                    continue  # the wait's own answer says what went wrong
                if not done.is_set():
                    progress(state, time.monotonic() - started)

        poller = threading.Thread(target=poll, name="client-progress", daemon=True)
        poller.start()
        try:
            result = self.call(name, agent_id, vm, wait=wait)
        finally:
            done.set()
            poller.join()
        progress(result.state, result.waited_seconds)
        return result


class AsyncClient(_Base):
    """The asynchronous client: the same methods, awaited (``await portal.list_vms(1)``)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 verify: bool | str | ssl.SSLContext = True, retries: int = 2, max_retry_after: float = 30.0,
                 backoff: float = 0.25, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout=timeout, verify=verify, retries=retries,
                         max_retry_after=max_retry_after, backoff=backoff)
        self._http = httpx.AsyncClient(base_url=self.url, verify=self._verify, transport=transport,
                                       trust_env=True, follow_redirects=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        op = self._operation(name)

        async def method(*args: Any, **kwargs: Any) -> Any:
            return await self.call(op.name, *args, **kwargs)

        method.__name__ = name
        method.__doc__ = op.summary
        return method

    async def call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        """Run the operation named ``operation`` (its ``operationId``) and answer its view."""
        request = build_request(BY_NAME[operation], args, kwargs)
        return self._answer(request, await self._send(request))

    async def _send(self, request: Request) -> httpx.Response:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.request(request.method, request.path, params=request.params,
                                                   json=request.body, headers=self._headers(request.op),
                                                   timeout=self._timeout(request))
            except httpx.TransportError as error:
                outcome = error
            delay = self._retry_delay(request, attempt, outcome)
            if delay is None:
                if isinstance(outcome, httpx.TransportError):
                    raise transport_error(outcome, self.url) from None
                return outcome
            await asyncio.sleep(delay)
            attempt += 1

    async def vm_action(self, agent_id: int, vm: str, action: str) -> Any:
        return await self.call(self._action_operation(action), agent_id, vm)

    async def vm_action_and_wait(self, agent_id: int, vm: str, action: str, wait: int,
                                 progress: Callable[[str | None, float], None] | None = None,
                                 poll_interval: float = 1.0) -> Any:
        """As ``Client.vm_action_and_wait``, the state polled by a task beside the waiting request."""
        name = self._action_operation(action)
        if progress is None:
            return await self.call(name, agent_id, vm, wait=wait)
        started = time.monotonic()

        async def poll() -> None:
            while True:
                await asyncio.sleep(poll_interval)
                try:
                    info = await self.call("get_vm", agent_id, vm)
                except (PortalError, TransportError):
                    continue
                progress(info.dominfo.state, time.monotonic() - started)

        poller = asyncio.create_task(poll())
        try:
            result = await self.call(name, agent_id, vm, wait=wait)
        finally:
            poller.cancel()
        progress(result.state, result.waited_seconds)
        return result
