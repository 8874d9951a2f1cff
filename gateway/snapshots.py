"""Snapshot bootstrap: an "all records" entity straight from its newest snapshot file.

A user whose profile gives an entity with distribution ``all`` sees every live row, so the
compacted snapshot (``engine/snapshots``) *is* that user's view at the snapshot's watermark: the
gateway hands out the file as it is (a static download with ETag and HTTP Range, so downloads
resume), plus a delta token at the snapshot's watermark to continue with ``POST /sync``.

* ``GET /orgs/<org>/snapshots/<entity>`` — the newest snapshot's manifest, ``token`` (delta token
  for this user and entity at the snapshot's watermark) and ``url`` (the file of this snapshot).
* ``GET /orgs/<org>/snapshots/<entity>/file[?id=<snapshot id>]`` — the Avro file; ``ETag`` is
  its SHA-256, ``If-None-Match`` → 304, ``Range`` → 206 (``If-Range`` with the ETag protects a
  resumed download from a newer file); without ``id``: the newest snapshot's file.

403 unless the user's profile gives the entity with ``all``; 404 ``no_snapshot``; 409
``snapshot_stale`` when the snapshot belongs to an earlier staging epoch or its watermark is
below the entity's retention horizon (deltas could no longer continue from it).
"""

import os
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import orjson
from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from engine.config import Settings
from engine.snapshots.exceptions import SnapshotNotFound
from engine.snapshots.store import LocalFiles, Manifest, SnapshotStore, default_store
from gateway.auth import Forbidden, Principal
from gateway.metrics import METRICS
from gateway.sync import OrgContext, SyncService
from gateway.tokens import Position, SyncToken, encode

AVRO_MEDIA_TYPE = "application/avro"
ORG = r"^[a-z][a-z0-9_]{0,39}$"
ENTITY = r"^[a-z_][a-z0-9_]{0,62}$"
CHUNK = 256 * 1024


class SnapshotRefused(Exception):
    """The snapshot cannot be served (no snapshot, or it cannot continue with deltas)."""

    def __init__(self, status: int, code: str, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.reason = status, code, detail, reason

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.reason:
            body["reason"] = self.reason
        return JSONResponse(body, status_code=self.status)


class SnapshotService:
    """Authorisation (through :class:`SyncService`'s org context) and snapshot lookup."""

    def __init__(self, sync: SyncService, store: SnapshotStore) -> None:
        self.sync = sync
        self.store = store

    def resolve(
        self, org: str, who: Principal, entity: str, snapshot: str | None
    ) -> tuple[OrgContext, Manifest]:
        # the same checks as /sync: org of the token, offline role, profile
        ctx = self.sync.read(org, lambda conn: self.sync._context(conn, org, who))
        items = ctx.view.items.get(entity)
        if not items:
            raise Forbidden(f"entity {entity!r} is not in this user's offline profile")
        if not any(item.distribution == "all" for item in items):
            raise Forbidden(
                f"snapshots serve only entities the profile gives with distribution 'all';"
                f" bootstrap {entity} with /orgs/{org}/bootstrap/{entity}"
            )
        try:
            found = (
                self.store.get(org, entity, snapshot)
                if snapshot is not None
                else self.store.latest(org, entity)
            )
        except SnapshotNotFound as error:
            raise SnapshotRefused(404, "no_snapshot", str(error.args[0])) from None
        if found is None:
            raise SnapshotRefused(
                404,
                "no_snapshot",
                f"no snapshot of {entity} yet: bootstrap with /orgs/{org}/bootstrap/{entity}",
            )
        if found.epoch != ctx.epoch:
            raise SnapshotRefused(
                409,
                "snapshot_stale",
                f"snapshot {found.id} of {entity} was built from staging epoch {found.epoch};"
                f" staging is now at epoch {ctx.epoch}: bootstrap with"
                f" /orgs/{org}/bootstrap/{entity}",
                "staging_epoch_changed",
            )
        horizon = ctx.marks[entity].horizon
        if found.watermark < horizon:
            raise SnapshotRefused(
                409,
                "snapshot_stale",
                f"snapshot {found.id} of {entity} is at watermark {found.watermark}, below the"
                f" retention horizon {horizon}: the changes since are no longer all in the"
                f" change log; bootstrap with /orgs/{org}/bootstrap/{entity}",
                "below_retention_horizon",
            )
        return ctx, found

    def token(self, ctx: OrgContext, entity: str, manifest: Manifest) -> str:
        """A delta token for this user and entity at the snapshot's watermark."""
        rule = ctx.rule(entity)
        # an 'all' rule admits every row whatever the parents of other (related) rules hold;
        # their current watermarks only keep the token's shape what /sync expects
        parents = {p: ctx.marks[p].watermark for p in rule.parents if p in ctx.marks}
        token = SyncToken(
            "delta",
            ctx.org,
            ctx.view.user,
            entity,
            ctx.view.rule_hash(entity, ctx.config),
            ctx.epoch,
            Position(manifest.watermark, manifest.created_at.timestamp(), parents),
        )
        return encode(token, self.sync.secret)


def _bad_range(range_header: str, size: int) -> Response | None:
    """Starlette's verdict on a ``Range`` header as our error body (it answers in plain text)."""
    try:
        FileResponse._parse_range_header(range_header, size)
    except MalformedRangeHeader as error:
        return SnapshotRefused(400, "bad_range", f"Range: {error.content}").response()
    except RangeNotSatisfiable:
        response = SnapshotRefused(
            416, "range_not_satisfiable", f"Range: the file has {size} bytes"
        ).response()
        response.headers["content-range"] = f"bytes */{size}"
        return response
    return None


def _matches(if_none_match: str, sha256: str) -> bool:
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t == "*" or t.removeprefix("W/").strip('"') == sha256 for t in tags)


def snapshot_router(
    service: SyncService,
    settings: Settings,
    principal: Callable[..., Principal],
    store: SnapshotStore | None = None,
) -> APIRouter:
    """The snapshot endpoints; ``principal`` is the app's authentication dependency."""
    snapshots = SnapshotService(service, store or default_store(settings))
    router = APIRouter(tags=["sync"])
    Who = Annotated[Principal, Depends(principal)]
    OrgPath = Annotated[str, PathParam(pattern=ORG)]
    EntityPath = Annotated[str, PathParam(pattern=ENTITY)]

    @router.get("/orgs/{org}/snapshots/{entity}")
    async def snapshot_manifest(org: OrgPath, entity: EntityPath, who: Who) -> Response:
        """The newest snapshot's manifest, a delta token at its watermark and its file's URL."""
        try:
            ctx, manifest = await to_thread.run_sync(snapshots.resolve, org, who, entity, None)
        except SnapshotRefused as refused:
            return refused.response()
        body = {
            **manifest.to_json(),
            "token": snapshots.token(ctx, entity, manifest),
            "url": f"/orgs/{org}/snapshots/{entity}/file?id={manifest.id}",
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @router.get(
        "/orgs/{org}/snapshots/{entity}/file",
        response_class=FileResponse,
        responses={
            200: {"description": "the Avro file", "content": {AVRO_MEDIA_TYPE: {}}},
            206: {"description": "the rest of the file (Range)", "content": {AVRO_MEDIA_TYPE: {}}},
            304: {"description": "unchanged (If-None-Match)"},
            416: {"description": "range_not_satisfiable", "content": {"application/json": {}}},
        },
    )
    async def snapshot_file(
        org: OrgPath,
        entity: EntityPath,
        who: Who,
        snapshot: Annotated[
            str | None, Query(alias="id", description="this snapshot (default: the newest)")
        ] = None,
        if_none_match: Annotated[str | None, Header()] = None,
        range_header: Annotated[str | None, Header(alias="range")] = None,
    ) -> Response:
        """The Avro file: ETag = SHA-256, ``If-None-Match`` → 304, ``Range`` → 206."""
        try:
            _, manifest = await to_thread.run_sync(snapshots.resolve, org, who, entity, snapshot)
        except SnapshotRefused as refused:
            return refused.response()
        headers = {"etag": manifest.etag, "cache-control": "private, no-cache"}
        if if_none_match is not None and _matches(if_none_match, manifest.sha256):
            return Response(status_code=304, headers=headers)
        store = snapshots.store
        if isinstance(store, LocalFiles):
            path = store.local_path(manifest)
            try:
                stat = await to_thread.run_sync(os.stat, path)
            except FileNotFoundError:  # pruned since the manifest was read
                return SnapshotRefused(
                    404, "no_snapshot", f"snapshot {manifest.id} was just pruned; ask again"
                ).response()
            if range_header is None:
                METRICS.rows_served.labels("snapshot").inc(manifest.rows)
            else:
                bad = _bad_range(range_header, stat.st_size)
                if bad is not None:
                    return bad
            return FileResponse(path, media_type=AVRO_MEDIA_TYPE, headers=headers, stat_result=stat)
        # a remote store: streamed without Range support
        handle = await to_thread.run_sync(store.open, org, entity, manifest.id)

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CHUNK):
                    yield chunk

        METRICS.rows_served.labels("snapshot").inc(manifest.rows)
        return StreamingResponse(
            chunks(),
            media_type=AVRO_MEDIA_TYPE,
            headers={**headers, "content-length": str(manifest.size)},
        )

    return router


__all__ = ["AVRO_MEDIA_TYPE", "SnapshotRefused", "SnapshotService", "snapshot_router"]
