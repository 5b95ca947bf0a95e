"""The Falcon ASGI application: routes, middleware and error mapping around one ``Portal``."""

from __future__ import annotations

import falcon
import falcon.asgi

from core.virsh import VmAction
from entrypoints.bootstrap import Runtime
from entrypoints.http import errors, openapi
from entrypoints.http.cache import UntilChanged
from entrypoints.http.middleware import Authentication, BodyLimit, FailureLimiter, Lifespan, RequestContext
from entrypoints.http.resources import (
    AgentHostResource,
    AgentResource,
    AgentsResource,
    CurrentUserResource,
    FleetResource,
    HealthResource,
    OpenApiResource,
    SnapshotsResource,
    UsersResource,
    VmResource,
    VmsResource,
)

AGENT_ID = "{agent_id:int(min=1, max=2147483647)}"


def create_app(runtime: Runtime) -> falcon.asgi.App:
    settings = runtime.settings
    portal = runtime.portal
    # SQLite's data version, when the storage has one: reads are kept until the database changes.
    data_version = getattr(runtime.storage, "data_version", None)
    app = falcon.asgi.App(
        middleware=[
            RequestContext(),
            BodyLimit(settings.max_body_bytes),
            Authentication(portal, FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window),
                           UntilChanged(data_version)),
            Lifespan(runtime),
        ],
    )
    app.req_options.strip_url_path_trailing_slash = True
    errors.register(app)

    app.add_route("/health", HealthResource())
    app.add_route("/openapi.json", OpenApiResource(openapi.document()))
    app.add_route("/users", UsersResource(portal))
    me = CurrentUserResource(portal)
    app.add_route("/users/me", me)
    app.add_route("/users/me/api-key/rotate", me, suffix="rotate")
    app.add_route("/users/me/audit", me, suffix="audit")
    app.add_route("/agents", AgentsResource(portal, UntilChanged(data_version, max_entries=1_000)))
    agent = AgentResource(portal)
    app.add_route(f"/agents/{AGENT_ID}", agent)
    app.add_route(f"/agents/{AGENT_ID}/credentials", agent, suffix="credentials")
    app.add_route(f"/agents/{AGENT_ID}/public-key", agent, suffix="public_key")
    app.add_route(f"/agents/{AGENT_ID}/rotate-key", agent, suffix="rotate_key")
    app.add_route(f"/agents/{AGENT_ID}/vms", VmsResource(portal))
    vm = VmResource(portal)
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}", vm)
    for action in VmAction:
        app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/{action.value}", vm, suffix=action.value.replace("-", "_"))
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/autostart", vm, suffix="autostart")
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/stats", vm, suffix="stats")
    snapshots = SnapshotsResource(portal)
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/snapshots", snapshots)
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/snapshots/{{snapshot}}", snapshots, suffix="one")
    app.add_route(f"/agents/{AGENT_ID}/vms/{{vm}}/snapshots/{{snapshot}}/revert", snapshots, suffix="revert")
    app.add_route("/vms", FleetResource(portal))
    host = AgentHostResource(portal)
    app.add_route(f"/agents/{AGENT_ID}/host", host)
    app.add_route(f"/agents/{AGENT_ID}/check", host, suffix="check")
    return app
