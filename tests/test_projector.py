"""The faust projector against the real broker and PostgreSQL: staging converges on the source."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import psycopg

from engine.projections.app import register_org
from engine.runtime.embedded import free_port
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import (
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)

COLUMNS = "id, name, amount, tags, seen"


def test_changes_reach_staging(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t"
            " (id int PRIMARY KEY, name text, amount numeric(8,2), tags text[], seen timestamptz)"
        )
        conn.execute(
            "INSERT INTO t SELECT i, 'n' || i, i / 4.0, ARRAY['a', i::text], now()"
            " FROM generate_series(1, 500) i"
        )
    org = new_org()
    spec = CaptureSpec(org=org, source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, fresh_broker)
    register_org(fresh_database, org)
    log = tmp_path / "projector.log"
    metrics_port = free_port()
    worker = start_projector(
        projector_env(
            fresh_broker, fresh_database, FIELDSYNC_PROJECTOR_METRICS_PORT=str(metrics_port)
        ),
        log,
    )
    try:
        wait_until(
            staging_matches_source(fresh_database, org, "t", COLUMNS),
            90,
            "snapshot in staging",
            log,
        )
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("UPDATE t SET name = 'changed' WHERE id % 7 = 0")
            conn.execute("DELETE FROM t WHERE id % 11 = 0")
            conn.execute("UPDATE t SET id = id + 1000 WHERE id BETWEEN 100 AND 110")
            conn.execute("INSERT INTO t (id, name) VALUES (5000, 'new')")
        capture_once(spec, fresh_broker)
        wait_until(
            staging_matches_source(fresh_database, org, "t", COLUMNS), 60, "changes in staging", log
        )
        with psycopg.connect(fresh_database) as conn:
            watermark = conn.execute(
                f"SELECT version FROM org_{org}._fs_entities WHERE entity = 't'"
            ).fetchone()[0]
            versions = [
                v for (v,) in conn.execute(f"SELECT version FROM org_{org}.t__log ORDER BY version")
            ]
            counts = conn.execute(
                "SELECT consumed, applied, duplicates, dead_lettered"
                " FROM fieldsync_control.projection_counts WHERE org = %s",
                (org,),
            ).fetchone()
        assert versions == list(range(1, watermark + 1))
        consumed, applied, duplicates, dead = counts
        assert consumed == applied + duplicates + dead and dead == 0
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert f'fieldsync_projector_watermark{{entity="t",org="{org}"}} {watermark}.0' in metrics
        assert "fieldsync_projector_events_total" in metrics
        assert "fieldsync_projector_batch_size_bucket" in metrics
        assert "fieldsync_projector_lag{" in metrics
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
