"""A worker whose consumer stops fetching (as faust's sometimes does, silently) notices it and
restarts itself; the changes that were waiting reach staging (engine/projections/watchdog.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg

from engine.projections.app import register_org
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import (
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)

STALL = "the consumer stops fetching"
NOTICED = "yet the worker has fetched nothing"


def test_a_worker_whose_consumer_stops_fetching_restarts_itself_and_catches_up(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO t SELECT i, 'n' || i FROM generate_series(1, 200) i")
    org = new_org()
    spec = CaptureSpec(org=org, source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, fresh_broker)
    register_org(fresh_database, org)
    log = tmp_path / "projector.log"
    worker = start_projector(
        projector_env(
            fresh_broker,
            fresh_database,
            FIELDSYNC_FAULT_POINT="fetching:1",
            FIELDSYNC_PROJECTOR_STALL_TIMEOUT_S="6",
        ),
        log,
    )
    try:
        wait_until(lambda: STALL in log.read_text(), 90, "the consumer to stop fetching", log)
        with psycopg.connect(fresh_database, autocommit=True) as conn:  # changes it must fetch
            conn.execute("UPDATE t SET name = 'changed' WHERE id % 3 = 0")
            conn.execute("DELETE FROM t WHERE id % 10 = 0")
            conn.execute("INSERT INTO t SELECT i, 'late' FROM generate_series(201, 250) i")
        capture_once(spec, fresh_broker)
        wait_until(
            staging_matches_source(fresh_database, org, "t", "id, name"),
            120,
            "the waiting changes in staging",
            log,
        )
        text = log.read_text()
        # noticed and restarted (the same process, re-executed), and the fault did not return
        assert NOTICED in text and "restarting the worker" in text
        assert text.count(STALL) == 1
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
