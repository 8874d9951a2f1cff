"""The FastAPI application: sync endpoint for devices, admin endpoint, health and metrics.

The organisation comes from the path (``/orgs/<org>/…``) or, with ``FIELDSYNC_GATEWAY_DOMAIN``
set, from the host name ``<org>.<domain>`` (DNS routing by org), which is rewritten to the path
form. Gateways keep no state of their own: run as many as needed behind an L4 balancer.
"""

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import psycopg
from anyio import to_thread
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

from engine.config import Settings
from engine.exceptions import FieldSyncError
from engine.logs import logging_config
from engine.projections.staging import org_schema
from engine.projections.stops import Stop, read_stops
from engine.runtime.placement import StagingServers
from gateway.access import AccessError, StagingMismatch
from gateway.auth import Authenticator, Forbidden, KeysUnavailable, Principal, Unauthorized
from gateway.live import LiveHub, wait_for
from gateway.metrics import METRICS
from gateway.middleware import RequestContext
from gateway.snapshots import AVRO_MEDIA_TYPE, snapshot_router
from gateway.store import StagingPools, UnknownOrg, org_state, put_config
from gateway.sync import SyncService
from gateway.tokens import BadToken

log = logging.getLogger("fieldsync.gateway")

ORG = r"^[a-z][a-z0-9_]{0,39}$"
ENTITY = r"^[a-z_][a-z0-9_]{0,62}$"
NDJSON = "application/x-ndjson"
Section = Literal["entities", "roles", "profiles", "users"]
EntityName = Annotated[str, StringConstraints(pattern=ENTITY)]
SyncTokenText = Annotated[str, StringConstraints(max_length=16_384)]


class SyncRequest(BaseModel):
    """Tokens per entity (``null``: the device has nothing yet); entities of the profile that are
    missing get ``must_bootstrap``, entities no longer in it get ``removed``."""

    tokens: dict[EntityName, SyncTokenText | None] = Field(default_factory=dict, max_length=1000)
    wait: float = Field(default=0, ge=0, description="long-poll: seconds to wait for a change")
    limit: int | None = Field(default=None, ge=1, description="rows per entity and page")


class ErrorBody(BaseModel):
    """Every error: a stable code and a message naming the problem."""

    error: str = Field(description="stable error code, e.g. token_expired, forbidden")
    detail: str = Field(description="what is wrong, for people")


def _problems(exc: RequestValidationError, limit: int = 10) -> str:
    """``path.to.field: message`` for the first ``limit`` problems."""
    errors = list(exc.errors())
    text = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg', 'invalid')}"
        for e in errors[:limit]
    )
    return text + (f"; and {len(errors) - limit} more" if len(errors) > limit else "")


AUTHENTICATED_ERRORS = {
    "400": "bad_sync_token: a sync token or cursor this deployment did not issue for this "
    "user, org and entity",
    "401": "no acceptable bearer token (missing_token, malformed_token, bad_signature, "
    "bad_algorithm, unknown_key, token_expired, token_not_yet_valid, bad_audience, bad_issuer, "
    "missing_claim, bad_claim, lifetime_too_long)",
    "403": "forbidden: the token does not grant this (another org, no offline role, entity "
    "outside the profile, no admin scope)",
    "404": "unknown_org, no_snapshot",
    "409": "snapshot_stale",
    "503": "staging_unavailable, jwks_unavailable, offline_config_mismatch: retry later",
}


def _document(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as the gateway answers: bearer authentication instead of an
    ``authorization`` header parameter, the error body and codes of every operation."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    if "HTTPValidationError" in schemas:  # FastAPI's 422 body: ours is ErrorBody too
        schemas["HTTPValidationError"] = ErrorBody.model_json_schema()
        schemas.pop("ValidationError", None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            parameters = operation.get("parameters", [])
            kept = [p for p in parameters if (p["in"], p["name"]) != ("header", "authorization")]
            if len(kept) == len(parameters):
                continue
            operation["parameters"] = kept
            operation["security"] = [{"bearer": []}]
            for status, description in AUTHENTICATED_ERRORS.items():
                operation["responses"].setdefault(
                    status, {"description": description, "content": body}
                )
    return schema


def data_dir_secret(settings: Settings, name: str) -> str:
    """A random secret kept (0600) in the data directory, created on first use."""
    path = settings.data_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError), path.open("x") as out:
        path.chmod(0o600)
        out.write(secrets.token_urlsafe(48))
    return Path(path).read_text().strip()


def token_secret(settings: Settings) -> str:
    """The configured sync-token secret, or one kept in the data directory."""
    if settings.gateway_token_secret is not None:
        return settings.gateway_token_secret.get_secret_value()
    return data_dir_secret(settings, "gateway_token_secret")


def dev_jwt_secret(settings: Settings) -> str:
    """The embedded runtime's HS256 secret for device JWTs (``fieldsync token`` mints with it);
    deployments set FIELDSYNC_GATEWAY_JWT_SECRET or FIELDSYNC_GATEWAY_JWKS instead."""
    return data_dir_secret(settings, "gateway_jwt_secret")


def create_app(
    settings: Settings,
    staging_dsn: str,
    *,
    clock: Callable[[], float] = time.time,
    embedded: bool = False,
    bootstrap_servers: str | None = None,
) -> FastAPI:
    """The app; ``embedded`` (the ``fieldsync up`` runtime) allows the data-dir JWT secret."""
    authenticator = Authenticator(
        settings, dev_secret=dev_jwt_secret(settings) if embedded else None
    )
    servers = StagingServers.from_settings(settings, staging_dsn)
    pools = StagingPools(servers)
    service = SyncService(pools, token_secret(settings), settings.gateway_page_rows, clock)
    live = LiveHub(servers.servers)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(pools.open)
        live.start()
        yield
        await live.stop()
        await to_thread.run_sync(pools.close)

    app = FastAPI(
        title="FieldSync gateway",
        version="1",
        summary="Sync endpoint for offline devices and admin endpoint (see docs/protocol.md).",
        lifespan=lifespan,
    )
    # snapshot files are deflate-compressed already, and served with byte ranges
    gzip_skips = (*DEFAULT_EXCLUDED_CONTENT_TYPES, AVRO_MEDIA_TYPE)
    app.add_middleware(GZipMiddleware, minimum_size=2048, exclude_content_types=gzip_skips)

    # -- cross-cutting: org from host, errors, metrics --------------------------------------
    domain = settings.gateway_domain
    host_org = (
        re.compile(rf"^([a-z][a-z0-9_]{{0,39}})\.{re.escape(domain)}(:\d+)?$") if domain else None
    )

    app.add_middleware(RequestContext, host_org=host_org)

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": code, "detail": message}, status_code=status)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        response = error(401, exc.code, exc.detail)
        challenge = "Bearer" if exc.code == "missing_token" else 'Bearer error="invalid_token"'
        response.headers["www-authenticate"] = challenge
        return response

    @app.exception_handler(KeysUnavailable)
    async def _no_keys(_: Request, exc: KeysUnavailable) -> JSONResponse:
        return error(503, "jwks_unavailable", str(exc))

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return error(403, "forbidden", str(exc))

    @app.exception_handler(BadToken)
    async def _bad_token(_: Request, exc: BadToken) -> JSONResponse:
        return error(400, "bad_sync_token", str(exc))

    @app.exception_handler(AccessError)
    async def _bad_config(_: Request, exc: AccessError) -> JSONResponse:
        return error(422, "invalid_offline_config", str(exc))

    @app.exception_handler(StagingMismatch)
    async def _mismatch(_: Request, exc: StagingMismatch) -> JSONResponse:
        return error(503, "offline_config_mismatch", str(exc))

    @app.exception_handler(FieldSyncError)
    async def _bad_request(_: Request, exc: FieldSyncError) -> JSONResponse:
        return error(422, exc.code, str(exc.args[0]))

    @app.exception_handler(UnknownOrg)
    async def _unknown_org(_: Request, exc: UnknownOrg) -> JSONResponse:
        return error(404, "unknown_org", f"organisation {exc} is not provisioned")

    @app.exception_handler(psycopg.OperationalError)
    async def _database_down(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.warning("request %s: staging unavailable: %s", request.state.request_id, exc)
        return error(503, "staging_unavailable", "staging database unavailable; retry later")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return error(500, "internal", f"internal error (request {request.state.request_id})")

    # -- auth -------------------------------------------------------------------------------
    def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        return authenticator.verify(authorization)

    def admin(org: str, who: Principal) -> None:
        if not who.admin:
            raise Forbidden("the admin API needs a token with scope fieldsync:admin")
        if not who.may_use(org):
            raise Forbidden(f"token is for org {who.org!r}, not {org!r}")

    Who = Annotated[Principal, Depends(principal)]
    OrgPath = Annotated[str, PathParam(pattern=ORG)]
    app.include_router(snapshot_router(service, settings, principal))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad parameter — after authentication: a caller without a valid
        token learns nothing about its request but the 401."""
        route = request.scope.get("route")
        if isinstance(route, APIRoute) and any(
            d.call is principal for d in route.dependant.dependencies
        ):
            try:
                await to_thread.run_sync(principal, request.headers.get("authorization"))
            except Unauthorized as refused:
                return await _unauthorized(request, refused)
            except KeysUnavailable as unavailable:
                return await _no_keys(request, unavailable)
        return error(422, "invalid_request", _problems(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    # -- health and metrics -----------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> JSONResponse:
        """503 when this gateway cannot serve (a staging server or its LISTEN down); an org or
        entity the projector stopped is an operator matter: 200, listed under ``degraded``
        (its devices are served what staging had when it stopped)."""

        def probe(name: str, pool: ConnectionPool[Any]) -> list[Stop]:
            with pool.connection(timeout=2) as conn:
                return read_stops(conn)

        problems = []
        degraded = []
        for name, pool in pools.pools.items():
            try:
                degraded += [s.describe() for s in await to_thread.run_sync(probe, name, pool)]
            except Exception as exc:
                problems.append(f"staging server {name}: {type(exc).__name__}")
        problems += [f"live updates from {name}: not listening" for name in live.disconnected]
        if problems:
            return JSONResponse(
                {"status": "unavailable", "problems": problems, "degraded": degraded},
                status_code=503,
            )
        if degraded:
            return JSONResponse({"status": "degraded", "degraded": degraded})
        return JSONResponse({"status": "ready"})

    if settings.gateway_metrics_enabled:

        @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
        async def metrics() -> Response:
            return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)

    # -- sync endpoint ----------------------------------------------------------------------
    @app.get("/orgs/{org}/metadata", tags=["sync"])
    async def metadata(org: OrgPath, who: Who) -> dict[str, Any]:
        """The device's client model: entities of its profile, columns, keys, relationships."""
        return await to_thread.run_sync(service.metadata, org, who)

    @app.post("/orgs/{org}/sync", tags=["sync"])
    async def sync(org: OrgPath, who: Who, body: SyncRequest) -> Response:
        """Deltas for every entity of the profile, in priority order; ``wait`` long-polls."""
        wait = min(body.wait, settings.gateway_max_wait_s)
        deadline = time.monotonic() + wait
        key = (org, who, tuple(sorted(body.tokens.items())), body.limit)
        while True:
            # taken before reading: a change committed while we read still wakes us
            changed = live.event(org)
            results = await shared(key, org, who, body.tokens, body.limit)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not all(r.empty for r in results):
                break
            METRICS.long_polls.inc()
            try:
                if not await wait_for(changed, remaining):
                    break
            finally:
                METRICS.long_polls.dec()
        content = orjson.dumps({"org": org, "entities": [r.to_json() for r in results]})
        return Response(content, media_type="application/json")

    in_flight: dict[Any, asyncio.Future[Any]] = {}

    async def shared(
        key: Any, org: str, who: Principal, tokens: dict[str, str | None], limit: int | None
    ) -> Any:
        """One computation for identical concurrent requests (devices woken by the same
        change with the same tokens): a page is a pure function of its tokens."""
        running = in_flight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        in_flight[key] = future
        try:
            results = await to_thread.run_sync(service.sync, org, who, tokens, limit)
            future.set_result(results)
            return results
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved here; the waiters re-raise it
            raise
        finally:
            del in_flight[key]

    @app.get(
        "/orgs/{org}/bootstrap/{entity}",
        tags=["sync"],
        response_class=StreamingResponse,
        responses={200: {"description": "NDJSON lines", "content": {NDJSON: {}}}},
    )
    async def bootstrap(
        org: OrgPath,
        entity: Annotated[str, PathParam(pattern=ENTITY)],
        who: Who,
        cursor: Annotated[str | None, Query(description="resume after a cut connection")] = None,
    ) -> StreamingResponse:
        """NDJSON: header, rows, ``$cursor`` after each page, ``$done`` with the delta token."""
        lines = await to_thread.run_sync(service.bootstrap, org, who, entity, cursor)

        async def stream() -> AsyncIterator[bytes]:
            iterator = iter(lines)
            while True:
                chunk = await to_thread.run_sync(next, iterator, None)
                if chunk is None:
                    return
                yield chunk

        return StreamingResponse(stream(), media_type=NDJSON)

    # -- admin endpoint (served only with FIELDSYNC_GATEWAY_ADMIN_ENABLED) -------------------
    admin_api = APIRouter(tags=["admin"])

    def _org_db(org: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> Awaitable[Any]:
        """``fn`` on the org's staging server."""
        return to_thread.run_sync(pools.run, org, fn)

    def _main_db(fn: Callable[[psycopg.Connection[Any]], Any]) -> Awaitable[Any]:
        """``fn`` on the main server (lifecycle, placements)."""

        def run() -> Any:
            with pools.main() as conn:
                return fn(conn)

        return to_thread.run_sync(run)

    @admin_api.get("/admin/orgs")
    async def list_orgs(who: Who) -> list[str]:
        if not who.admin:
            raise Forbidden("the admin API needs a token with scope fieldsync:admin")
        by_server = await to_thread.run_sync(
            pools.each,
            lambda _, c: c.execute("SELECT org FROM fieldsync_control.orgs").fetchall(),
        )
        orgs = sorted(org for rows in by_server.values() for (org,) in rows)
        return [org for org in orgs if who.may_use(org)]

    @admin_api.get("/orgs/{org}/admin/status")
    async def status(org: OrgPath, who: Who) -> dict[str, Any]:
        """Per entity: watermark, retention horizon, counts (consumed, applied, dead letters)
        and, when the gateway knows the broker, the projector group's lag; ``stopped``: the
        org's stops (``entity`` null: the whole org), see docs/staging.md."""
        admin(org, who)

        def read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            epoch, _, revision = org_state(conn, org)
            entities: dict[str, Any] = {}
            if conn.execute(
                "SELECT to_regclass(%s)", (f'"{org_schema(org)}"._fs_entities',)
            ).fetchone()[0]:  # type: ignore[index]
                from psycopg import sql

                for entity, version, horizon, horizon_at, updated in conn.execute(
                    sql.SQL(
                        "SELECT entity, version, horizon_version, horizon_at, updated_at"
                        " FROM {}._fs_entities ORDER BY entity"
                    ).format(sql.Identifier(org_schema(org)))
                ):
                    entities[entity] = {
                        "watermark": version,
                        "horizon": horizon,
                        "horizon_at": horizon_at.isoformat() if horizon_at else None,
                        "updated_at": updated.isoformat(),
                    }
            for entity, consumed, applied, duplicates, dead in conn.execute(
                "SELECT entity, consumed, applied, duplicates, dead_lettered"
                " FROM fieldsync_control.projection_counts WHERE org = %s",
                (org,),
            ):
                entities.setdefault(entity, {}).update(
                    consumed=consumed, applied=applied, duplicates=duplicates, dead_lettered=dead
                )
            return {"org": org, "staging_epoch": epoch, "config_revision": revision,
                    "staging_server": pools.server_of(org), "entities": entities,
                    "stopped": [s.as_json() for s in read_stops(conn, org)]}  # fmt: skip

        result: dict[str, Any] = await _org_db(org, read)
        if bootstrap_servers is not None and result["entities"]:
            from engine.projections.lag import projector_lag
            from engine.streams.topics import change_topic

            topics = {change_topic(org, e): e for e in result["entities"]}
            lag = await to_thread.run_sync(
                projector_lag, bootstrap_servers, settings.projector_group, list(topics)
            )
            for topic, behind in lag.items():
                result["entities"][topics[topic]]["lag"] = behind
        return result

    if bootstrap_servers is not None:  # served only where commands can be published
        brokers = bootstrap_servers

        @admin_api.post("/orgs/{org}/admin/lifecycle/{kind}", status_code=202)
        async def lifecycle_command(
            org: OrgPath,
            kind: Literal["provision", "update", "decommission"],
            who: Who,
            document: Annotated[dict[str, Any] | None, Body()] = None,
        ) -> dict[str, Any]:
            """Publish a provisioning command (the org file as JSON for provision/update); a
            provisioner applies it — follow it with ``GET …/admin/lifecycle``."""
            admin(org, who)
            from engine.provisioning.commands import command_from_document
            from engine.provisioning.worker import publish

            command = command_from_document(kind, document or {}, org)
            await to_thread.run_sync(publish, settings, brokers, [command])
            return {"org": org, "kind": kind, "command": command.id}

    @admin_api.get("/orgs/{org}/admin/lifecycle")
    async def lifecycle_state(org: OrgPath, who: Who) -> dict[str, Any]:
        """The org's lifecycle: state, reason, entities, last command applied."""
        admin(org, who)
        from engine.provisioning.lifecycle import ensure_lifecycle_schema, read_lifecycle

        def read(conn: psycopg.Connection[Any]) -> Any:
            ensure_lifecycle_schema(conn)
            return next(iter(read_lifecycle(conn, org)), None)

        state = await _main_db(read)
        if state is None:
            raise UnknownOrg(org)
        return {
            "org": org,
            "state": state.state,
            "reason": state.reason,
            "entities": sorted(state.spec.entities) if state.spec else [],
            "partition": state.partition,
            "command": state.command_id,
        }

    @admin_api.get("/orgs/{org}/admin/offline")
    async def get_offline(org: OrgPath, who: Who) -> dict[str, Any]:
        admin(org, who)
        _, config, revision = await _org_db(org, lambda c: org_state(c, org))
        return {"revision": revision, "config": config.model_dump(mode="json")}

    @admin_api.put("/orgs/{org}/admin/offline")
    async def put_offline(
        org: OrgPath, who: Who, document: Annotated[dict[str, Any], Body()]
    ) -> dict[str, Any]:
        """Replace the whole offline configuration (validated against staging)."""
        admin(org, who)
        config, revision = await _org_db(org, lambda c: put_config(c, org, document))
        return {"revision": revision, "config": config.model_dump(mode="json")}

    @admin_api.put("/orgs/{org}/admin/offline/{section}/{name}")
    async def put_item(
        org: OrgPath,
        section: Section,
        name: Annotated[str, PathParam(min_length=1, max_length=200)],
        who: Who,
        item: Annotated[dict[str, Any], Body()],
    ) -> dict[str, Any]:
        """Add or replace one entity, role, profile or user."""
        admin(org, who)

        def update(conn: psycopg.Connection[Any]) -> Any:
            _, config, _ = org_state(conn, org)
            document = config.model_dump(mode="json")
            document[section][name] = item
            return put_config(conn, org, document)

        config, revision = await _org_db(org, update)
        return {
            "revision": revision,
            section: {name: config.model_dump(mode="json")[section][name]},
        }

    @admin_api.delete("/orgs/{org}/admin/offline/{section}/{name}")
    async def delete_item(org: OrgPath, section: Section, name: str, who: Who) -> dict[str, Any]:
        """Remove one entity, role, profile or user (refused while something refers to it)."""
        admin(org, who)

        def update(conn: psycopg.Connection[Any]) -> Any:
            _, config, _ = org_state(conn, org)
            document = config.model_dump(mode="json")
            if name not in document[section]:
                raise StarletteHTTPException(404, f"{section}.{name}: not configured")
            del document[section][name]
            return put_config(conn, org, document)

        _, revision = await _org_db(org, update)
        return {"revision": revision}

    if settings.gateway_admin_enabled:
        app.include_router(admin_api)
    app.openapi_schema = _document(app.openapi())
    return app


def run_gateway(
    settings: Settings,
    staging_dsn: str,
    *,
    embedded: bool = False,
    bootstrap_servers: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (TLS when a certificate and key are configured)."""
    import uvicorn

    app = create_app(settings, staging_dsn, embedded=embedded, bootstrap_servers=bootstrap_servers)
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_level=settings.log_level.lower(),
        ssl_certfile=str(settings.gateway_tls_cert) if settings.gateway_tls_cert else None,
        ssl_keyfile=str(settings.gateway_tls_key) if settings.gateway_tls_key else None,
        loop="uvloop",
        access_log=False,
        log_config=logging_config(settings, "gateway", stream="stdout"),
        timeout_graceful_shutdown=5,
        # a long page may reach a slow client after uvicorn's 5 s default started counting
        timeout_keep_alive=75,
    )


__all__ = ["SyncRequest", "create_app", "dev_jwt_secret", "run_gateway", "token_secret"]
