"""The gateway's control state in ``fieldsync_control``: offline configuration and staging epochs.

``offline_config`` holds one validated :class:`~gateway.access.OfflineConfig` per org with a
revision; ``orgs.staging_epoch`` names the current generation of an org's staging (a replay that
rebuilds staging bumps it, and every token of the old generation then gets ``must_bootstrap``).
Both live on the org's staging server (:mod:`engine.runtime.placement`), reached through
:class:`StagingPools`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import orjson
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from engine.control import run_control_ddl
from engine.logs import current
from engine.projections.projector import COUNTS_DDL
from engine.runtime.placement import MAIN, PLACEMENT_DDL, StagingServers
from gateway.access import OfflineConfig, parse_config, validate_config
from gateway.views import load_catalog

T = TypeVar("T")

GATEWAY_DDL = """
ALTER TABLE fieldsync_control.orgs
    ADD COLUMN IF NOT EXISTS staging_epoch text NOT NULL DEFAULT md5(random()::text);
CREATE TABLE IF NOT EXISTS fieldsync_control.offline_config (
    org text PRIMARY KEY REFERENCES fieldsync_control.orgs (org) ON DELETE CASCADE,
    config jsonb NOT NULL,
    revision bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


class UnknownOrg(LookupError):
    pass


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    run_control_ddl(conn, COUNTS_DDL, GATEWAY_DDL)


def org_state(conn: psycopg.Connection[Any], org: str) -> tuple[str, OfflineConfig, int]:
    """(staging epoch, offline configuration, its revision); an org without one gets an empty
    configuration (nobody may go offline)."""
    row = conn.execute(
        """
        SELECT o.staging_epoch, c.config, coalesce(c.revision, 0)
        FROM fieldsync_control.orgs o
        LEFT JOIN fieldsync_control.offline_config c USING (org)
        WHERE o.org = %s
        """,
        (org,),
    ).fetchone()
    if row is None:
        raise UnknownOrg(org)
    epoch, config, revision = row
    return epoch, parse_config(config or {}), revision


def put_config(
    conn: psycopg.Connection[Any], org: str, data: Any, *, pending: bool = False
) -> tuple[OfflineConfig, int]:
    """Validate ``data`` against the org's staging and store it; raises AccessError/UnknownOrg.
    ``pending`` (provisioning): entities not in staging yet are checked when they arrive."""
    config = parse_config(data)
    with conn.transaction():
        if (
            conn.execute("SELECT 1 FROM fieldsync_control.orgs WHERE org = %s", (org,)).fetchone()
            is None
        ):
            raise UnknownOrg(org)
        catalog = {e: m.columns for e, m in load_catalog(conn, org).items()}
        validate_config(config, catalog, pending=pending)
        row = conn.execute(
            """
            INSERT INTO fieldsync_control.offline_config (org, config) VALUES (%s, %s)
            ON CONFLICT (org) DO UPDATE SET config = EXCLUDED.config,
                revision = offline_config.revision + 1, updated_at = now()
            RETURNING revision
            """,
            (org, orjson.dumps(config.model_dump(mode="json")).decode()),
        ).fetchone()
    assert row is not None
    return config, int(row[0])


def bump_epoch(conn: psycopg.Connection[Any], org: str) -> str:
    """A new staging generation: every device re-bootstraps (replay uses this)."""
    epoch = secrets.token_hex(8)
    conn.execute(
        "UPDATE fieldsync_control.orgs SET staging_epoch = %s WHERE org = %s", (epoch, org)
    )
    return epoch


class RequestTaggedCursor(psycopg.Cursor[Any]):
    """Statements run while serving a request start with ``/* request_id=… */``, so the
    PostgreSQL log and ``pg_stat_activity`` name the request (ids are checked by the
    middleware to be ``[A-Za-z0-9._:-]``)."""

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        request_id = current("request_id")
        if request_id is not None:
            comment = sql.SQL(f"/* request_id={request_id} */ ")
            body = sql.SQL(query) if isinstance(query, str) else query
            query = sql.Composed([comment, body]) if not isinstance(query, bytes) else query
        return super().execute(query, params, prepare=prepare, binary=binary)


class StagingPools:
    """One connection pool per staging server; an org's reads go to the server it is placed on.

    Placements are cached: one never changes while its org exists. A cached placement that
    names the wrong server (the org was decommissioned and provisioned again elsewhere) shows
    as :class:`UnknownOrg` there, and :meth:`run` then looks it up again once.
    """

    def __init__(self, servers: StagingServers, *, max_size: int = 16) -> None:
        self.servers = servers
        self.pools: dict[str, ConnectionPool[Any]] = {
            name: ConnectionPool(
                dsn,
                min_size=1,
                max_size=max_size,
                open=False,
                kwargs={"autocommit": True, "cursor_factory": RequestTaggedCursor},
            )
            for name, dsn in servers.servers.items()
        }
        self._placement: dict[str, str] = {}
        self._lock = threading.Lock()

    def open(self) -> None:
        for name, pool in self.pools.items():
            pool.open()
            with pool.connection() as conn:
                ensure_schema(conn)
                if name == MAIN:
                    run_control_ddl(conn, PLACEMENT_DDL)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def main(self) -> Any:
        """A connection to the main server (lifecycle, placements)."""
        return self.pools[MAIN].connection()

    def server_of(self, org: str) -> str:
        with self._lock:
            server = self._placement.get(org)
        if server is None:
            with self.main() as conn:
                row = conn.execute(
                    "SELECT server FROM fieldsync_control.placements WHERE org = %s", (org,)
                ).fetchone()
            server = str(row[0]) if row else MAIN
            self.servers.dsn(server)  # a server that is not configured: ConfigError
            with self._lock:
                self._placement[org] = server
        return server

    @contextmanager
    def connection(self, org: str) -> Iterator[psycopg.Connection[Any]]:
        with self.pools[self.server_of(org)].connection() as conn:
            yield conn

    def run(self, org: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn`` on a connection to the org's server (looked up again once if the org is not
        there)."""
        try:
            with self.connection(org) as conn:
                return fn(conn)
        except UnknownOrg:
            with self._lock:
                cached = self._placement.pop(org, None)
            if cached is None or self.server_of(org) == cached:
                raise
            with self.connection(org) as conn:
                return fn(conn)

    def each(self, fn: Callable[[str, psycopg.Connection[Any]], T]) -> dict[str, T]:
        """``fn`` on every server, by server name."""
        results = {}
        for name, pool in self.pools.items():
            with pool.connection() as conn:
                results[name] = fn(name, conn)
        return results


__all__ = [
    "GATEWAY_DDL",
    "StagingPools",
    "UnknownOrg",
    "bump_epoch",
    "ensure_schema",
    "org_state",
    "put_config",
]
