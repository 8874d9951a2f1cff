"""Two projector workers share the partitions; one leaves and comes back mid-load (rebalance)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psycopg

from engine.projections.app import register_org
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import (
    assert_change_log_sound,
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)
from tests.test_capture_crash import _start_capture
from tests.test_projector_crash import KEYS, _consumed, _load


def test_two_workers_and_a_rebalance(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, seq int NOT NULL, pad text)")
        conn.execute("INSERT INTO t SELECT i, 0, 'p' FROM generate_series(0, %s) i", (KEYS - 1,))
    org = new_org()
    capture_once(
        CaptureSpec(org=org, source_dsn=fresh_database, entities={"t": "public.t"}),
        fresh_broker,
    )
    register_org(fresh_database, org)
    org_file = tmp_path / "org.yaml"
    org_file.write_text(f"org: {org}\nsource_dsn: '{fresh_database}'\nentities:\n  t: public.t\n")
    env = projector_env(
        fresh_broker,
        fresh_database,
        FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S="3",
        FIELDSYNC_BROKER_SESSION_TIMEOUT_S="6",
        FIELDSYNC_PROJECTOR_BATCH_SIZE="500",
    )
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    capture = _start_capture(org_file, fresh_broker, tmp_path / "capture.log")
    done = threading.Event()
    loader = threading.Thread(target=_load, args=(fresh_database, done, 30.0, 30_000))
    loader.start()
    workers = [start_projector(env, logs[0]), start_projector(env, logs[1])]
    try:
        wait_until(
            lambda: _consumed(fresh_database, org) > 5_000, 120, "both workers projecting", logs[0]
        )
        workers[1].send_signal(signal.SIGTERM)  # a clean leave: its partitions move to worker 1
        assert workers[1].wait(timeout=60) == 0
        time.sleep(3)
        workers[1] = start_projector(env, logs[1])  # and it joins again
        loader.join()
        capture.send_signal(signal.SIGTERM)
        capture.wait(timeout=60)
        final = _start_capture(
            org_file, fresh_broker, tmp_path / "capture.log", "--until-caught-up"
        )
        assert final.wait(timeout=300) == 0
        wait_until(
            staging_matches_source(fresh_database, org, "t", "id, seq, pad"),
            300,
            "staging = source",
            logs[0],
        )
    finally:
        for process in (*workers, capture):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        loader.join()
    assert done.is_set()
    both = [log.read_text().count("Executing _on_partitions_assigned") for log in logs]
    assert all(n >= 1 for n in both), f"each worker was assigned partitions: {both}"
    assert_change_log_sound(fresh_database, org, "t")
