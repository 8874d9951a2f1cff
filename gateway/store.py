"""The gateway's control state in ``fieldsync_control``: offline configuration and staging epochs.

``offline_config`` holds one validated :class:`~gateway.access.OfflineConfig` per org with a
revision; ``orgs.staging_epoch`` names the current generation of an org's staging (a replay that
rebuilds staging bumps it, and every token of the old generation then gets ``must_bootstrap``).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
import psycopg

from engine.projections.projector import COUNTS_DDL
from gateway.access import OfflineConfig, parse_config, validate_config
from gateway.views import load_catalog

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
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('fieldsync_control.gateway'))")
        conn.execute(COUNTS_DDL)
        conn.execute(GATEWAY_DDL)


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


__all__ = ["GATEWAY_DDL", "UnknownOrg", "bump_epoch", "ensure_schema", "org_state", "put_config"]
