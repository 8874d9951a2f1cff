"""Org placement: which staging PostgreSQL server holds an org.

As the original system created a database per organisation, each org's staging lives on one of
several staging servers: the main one (``FIELDSYNC_STAGING_DSN`` or the embedded PostgreSQL,
named ``main``) and those of ``FIELDSYNC_STAGING_SERVERS``. Everything of one org is on its
server — the ``org_<org>`` schema and its rows in ``fieldsync_control`` (``orgs`` with the
staging epoch, the offline configuration, projection counts) — so a sync reads one consistent
snapshot and a replay swaps schema and epoch in one transaction. The main server also holds
what spans orgs: the provisioning lifecycle and ``fieldsync_control.placements``.

Provisioning chooses the server with the fewest orgs (ties: ``main``, then by name) and records
it; a placement never moves while the org exists, and decommissioning forgets it. A server that
already holds the org's registration keeps it, so replaying the provisioning topic into an empty
control schema finds every org where its staging is. Staging scales out by adding a server to
the setting: new orgs land there first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from engine.config import Settings
from engine.control import run_control_ddl
from engine.exceptions import ConfigError

MAIN = "main"

PLACEMENT_DDL = """
CREATE SCHEMA IF NOT EXISTS fieldsync_control;
CREATE TABLE IF NOT EXISTS fieldsync_control.placements (
    org text PRIMARY KEY,
    server text NOT NULL,
    placed_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class StagingServers:
    """The configured staging servers by name, and the org → server placement on ``main``."""

    main_dsn: str
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, main_dsn: str) -> StagingServers:
        return cls(
            main_dsn,
            {name: dsn.get_secret_value() for name, dsn in settings.staging_servers.items()},
        )

    @property
    def servers(self) -> dict[str, str]:
        """Every server's DSN by name, ``main`` first."""
        return {MAIN: self.main_dsn, **self.extra}

    def dsn(self, server: str) -> str:
        try:
            return self.servers[server]
        except KeyError:
            raise ConfigError(
                f"FIELDSYNC_STAGING_SERVERS: staging server {server!r} holds orgs but is not "
                f"configured (configured: {', '.join(self.servers)})"
            ) from None

    def _main(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.main_dsn, autocommit=True)
        run_control_ddl(conn, PLACEMENT_DDL)
        return conn

    def placements(self) -> dict[str, str]:
        """Org → server for every placed org."""
        with self._main() as conn:
            return dict(conn.execute("SELECT org, server FROM fieldsync_control.placements"))

    def server_of(self, org: str) -> str:
        """The org's server; an org never placed (registered directly) is on ``main``."""
        with self._main() as conn:
            row = conn.execute(
                "SELECT server FROM fieldsync_control.placements WHERE org = %s", (org,)
            ).fetchone()
        return str(row[0]) if row else MAIN

    def dsn_for(self, org: str) -> str:
        return self.dsn(self.server_of(org))

    def place(self, org: str) -> str:
        """The org's server, choosing and recording one if it has none (idempotent)."""
        with self._main() as conn, conn.transaction():
            conn.execute("LOCK TABLE fieldsync_control.placements IN EXCLUSIVE MODE")
            row = conn.execute(
                "SELECT server FROM fieldsync_control.placements WHERE org = %s", (org,)
            ).fetchone()
            if row is not None:
                return str(row[0])
            chosen = self._holding(org) or self._least_loaded(conn)
            conn.execute(
                "INSERT INTO fieldsync_control.placements (org, server) VALUES (%s, %s)",
                (org, chosen),
            )
            return chosen

    def _holding(self, org: str) -> str | None:
        """The server already registering the org (control state rebuilt from the topic)."""
        for server, dsn in self.servers.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT to_regclass('fieldsync_control.orgs') IS NOT NULL"
                ).fetchone()
                if found and found[0]:
                    held = conn.execute(
                        "SELECT 1 FROM fieldsync_control.orgs WHERE org = %s", (org,)
                    ).fetchone()
                    if held:
                        return server
        return None

    def _least_loaded(self, conn: psycopg.Connection[Any]) -> str:
        load = dict.fromkeys(self.servers, 0)
        for server, count in conn.execute(
            "SELECT server, count(*) FROM fieldsync_control.placements GROUP BY server"
        ):
            if server in load:
                load[server] = count
        return min(load, key=lambda s: (load[s], s != MAIN, s))

    def forget(self, org: str) -> None:
        """Decommissioned: the org holds nothing on any server any more."""
        with self._main() as conn:
            conn.execute("DELETE FROM fieldsync_control.placements WHERE org = %s", (org,))


__all__ = ["MAIN", "PLACEMENT_DDL", "StagingServers"]
