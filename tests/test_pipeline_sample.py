"""The sample CRM source through capture and the projector: staging equals the source, row by row,
for every entity (uuid, composite and identity keys; numeric, jsonb, arrays, bytea, timestamps)."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
from psycopg import sql

from engine.orgfile import SAMPLE_ENTITIES
from engine.projections.app import register_org
from engine.sample.generator import churn, create_source, fill
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import projector_env, start_projector, wait_until


def _source_columns(conn: psycopg.Connection, table: str) -> list[str]:
    schema, name = table.split(".")
    return [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (schema, name),
        )
    ]


def _identical(dsn: str, org: str) -> bool:
    with psycopg.connect(dsn) as conn:
        for entity, table in SAMPLE_ENTITIES.items():
            columns = _source_columns(conn, table)
            select = sql.SQL(", ").join(map(sql.Identifier, columns))
            source = conn.execute(
                sql.SQL("SELECT {} FROM {} ORDER BY 1, 2").format(
                    select, sql.Identifier(*table.split("."))
                )
            ).fetchall()
            try:
                staging = conn.execute(
                    sql.SQL("SELECT {} FROM {}.{} WHERE NOT _fs_deleted ORDER BY 1, 2").format(
                        select, sql.Identifier(f"org_{org}"), sql.Identifier(entity)
                    )
                ).fetchall()
            except psycopg.errors.UndefinedTable:
                return False
            if source != staging:
                return False
    return True


def test_sample_source_reaches_staging_exactly(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    create_source(fresh_database)
    fill(fresh_database, accounts=60, seed=3)
    org = new_org()
    spec = CaptureSpec(org=org, source_dsn=fresh_database, entities=SAMPLE_ENTITIES)
    capture_once(spec, fresh_broker)
    churn(fresh_database, rate_per_s=float("inf"), max_changes=400, seed=5, changes_per_tx=3)
    capture_once(spec, fresh_broker)
    register_org(fresh_database, org)
    log = tmp_path / "projector.log"
    worker = start_projector(projector_env(fresh_broker, fresh_database), log)
    try:
        wait_until(
            lambda: _identical(fresh_database, org), 120, "staging identical to the source", log
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert "Traceback" not in log.read_text()
