"""What protects the pages: security headers on every answer, the session cookie, and the checks
against cross-site requests (CSRF) on every state change.

The session cookie is read here and nowhere else: the JSON API's authentication
(``entrypoints.http.middleware.Authentication``) only reads ``Authorization: Bearer``, so a browser
session can never drive the API, and an API key never lands in a cookie.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

import attrs
import falcon
import falcon.asgi

from core.errors import BodyTooLarge, CsrfRefused, SessionEnded
from core.model import Caller, User
from core.portal import Portal

COOKIE = "playr_session"
MAX_FORM_FIELDS = 100

# No inline script or style anywhere; scripts, styles, images and the console's WebSocket come from
# this origin only (CSP 3 lets 'self' match ws:/wss: of the same host); nothing may frame the pages.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")


def policy_with_style_nonce(nonce: str) -> str:
    """The policy for a page whose library adds ``<style>`` elements at run time (xterm.js): those
    must carry this response's nonce (console.js sets it); still no inline script at all."""
    return CONTENT_SECURITY_POLICY.replace("style-src 'self'", f"style-src 'self' 'nonce-{nonce}'")


class SecurityHeaders:
    """Headers every answer carries, pages and API alike (a JSON body is never framed either)."""

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, req_succeeded: bool) -> None:
        if resp.get_header("Content-Security-Policy") is None:  # the console page sets its own
            resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        resp.set_header("X-Frame-Options", "DENY")
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "same-origin")
        resp.set_header("Cross-Origin-Opener-Policy", "same-origin")


@attrs.frozen
class SignedInUser:
    """The user behind a page request, with the session's token (for the form token)."""

    user: User
    token: str
    form_token: str
    caller: Caller


def own_origin(req: falcon.asgi.Request) -> str:
    """This request's own origin as a browser names it (scheme from the trusted proxy, Host as sent)."""
    return f"{req.scheme}://{req.netloc}".lower()


def check_same_origin(req: falcon.asgi.Request) -> None:
    """Refuse a state change that a browser says came from another site (Fetch Metadata), or whose
    ``Origin`` is not this portal's. A request with neither header is not from a browser page."""
    site = req.get_header("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        raise CsrfRefused(f"this form was sent from another site ({site[:20]}); use the portal's own pages")
    sent_from = req.get_header("Origin")
    if sent_from is not None and sent_from.lower() != own_origin(req):
        raise CsrfRefused("this form was sent from another origin; use the portal's own pages")


async def read_form(req: falcon.asgi.Request) -> dict[str, str]:
    """The URL-encoded form of a POST (the first value of each field), bounded like JSON bodies."""
    limit: int = req.context.max_body_bytes
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    raw = await req.stream.read(limit + 1)
    if len(raw) > limit:
        raise BodyTooLarge(f"the form is over the limit of {limit} bytes")
    if media_type != "application/x-www-form-urlencoded":
        return {}
    fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    return {name: values[0] for name, values in fields.items()}


async def signed_in(portal: Portal, req: falcon.asgi.Request) -> SignedInUser:
    """The signed-in user of a page request (``SessionEnded`` when there is none)."""
    token = req.get_cookie_values(COOKIE)
    if not token or not token[0] or len(token[0]) > 200:
        raise SessionEnded("sign in to use the portal")
    user, _session, key = await asyncio.to_thread(portal.sessions.resolve_with_key, token[0])
    req.context.user = user
    return SignedInUser(user=user, token=token[0], form_token=portal.sessions.form_token(token[0]),
                        caller=Caller(user=user, request_id=req.context.request_id,
                                      client_address=req.context.client_address, key=key))


def check_form_token(portal: Portal, who: SignedInUser, form: dict[str, Any]) -> None:
    """Every state change through the pages carries the session's form token."""
    given = form.get("csrf")
    if not isinstance(given, str) or not portal.sessions.form_token_matches(who.token, given):
        raise CsrfRefused("this form is stale or was not made by the portal (reload the page and try again)")


def set_session_cookie(req: falcon.asgi.Request, resp: falcon.asgi.Response, token: str, max_age: int) -> None:
    # Secure whenever the browser came over TLS (directly, or per the trusted proxy's X-Forwarded-Proto)
    resp.set_cookie(COOKIE, token, max_age=max_age, path="/", secure=req.scheme == "https", http_only=True,
                    same_site="Strict")


def clear_session_cookie(req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
    resp.unset_cookie(COOKIE, path="/", same_site="Strict")
