"""SIGKILL the projector mid-batch 20 times under load: staging equals the source, every change
applied once, and the change log reads as one gap-free sequence of versions."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

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

KEYS = 2_000
CHANGES = 100_000
KILLS = 20


def _load(dsn: str, done: threading.Event, seconds: float, changes: int = CHANGES) -> None:
    """Updates (seq + 1), inserts and deletes in transactions of 1-100, paced over ``seconds``."""
    rng = random.Random(33)
    next_key = KEYS
    with psycopg.connect(dsn) as conn:
        made, started = 0, time.monotonic()
        while made < changes:
            size = min(rng.randint(1, 100), changes - made)
            with conn.cursor() as cur:
                for _ in range(size):
                    roll = rng.random()
                    if roll < 0.8:
                        cur.execute(
                            "UPDATE t SET seq = seq + 1 WHERE id = %s", (rng.randrange(next_key),)
                        )
                    elif roll < 0.9:
                        cur.execute("INSERT INTO t VALUES (%s, 0, 'new')", (next_key,))
                        next_key += 1
                    else:
                        cur.execute("DELETE FROM t WHERE id = %s", (rng.randrange(next_key),))
            conn.commit()
            made += size
            ahead = made / (changes / seconds) - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    done.set()


def _consumed(dsn: str, org: str) -> int:
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(consumed), 0)"
                " FROM fieldsync_control.projection_counts WHERE org = %s",
                (org,),
            ).fetchone()
            return int(row[0]) if row else 0
    except psycopg.errors.UndefinedTable:
        return 0


# 20 kills under load: make chaos (make test kills each component in reliability/test_sigkill)
@pytest.mark.chaos
def test_sigkill_projector_mid_batch(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, seq int NOT NULL, pad text)")
        conn.execute(
            "INSERT INTO t SELECT i, 0, repeat('p', 50) FROM generate_series(0, %s) i", (KEYS - 1,)
        )
    org = new_org()
    spec = CaptureSpec(org=org, source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, fresh_broker)
    register_org(fresh_database, org)
    org_file = tmp_path / "org.yaml"
    org_file.write_text(f"org: {org}\nsource_dsn: '{fresh_database}'\nentities:\n  t: public.t\n")
    capture_log, projector_log = tmp_path / "capture.log", tmp_path / "projector.log"
    env = projector_env(
        fresh_broker,
        fresh_database,
        FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S="3",
        FIELDSYNC_BROKER_SESSION_TIMEOUT_S="6",
        FIELDSYNC_PROJECTOR_BATCH_SIZE="1000",
    )

    capture = _start_capture(org_file, fresh_broker, capture_log)
    done = threading.Event()
    loader = threading.Thread(target=_load, args=(fresh_database, done, 100.0))
    loader.start()
    worker = start_projector(env, projector_log)
    kills = 0
    rng = random.Random(7)
    try:
        while kills < KILLS:
            before = _consumed(fresh_database, org)
            wait_until(
                lambda before=before: _consumed(fresh_database, org) > before,
                120,
                "the projector to apply a batch",
                projector_log,
            )
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the next batches
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            kills += 1
            worker = start_projector(env, projector_log)
        loader.join()
        capture.send_signal(signal.SIGTERM)
        capture.wait(timeout=60)
        final_capture = _start_capture(org_file, fresh_broker, capture_log, "--until-caught-up")
        assert final_capture.wait(timeout=300) == 0
        wait_until(
            staging_matches_source(fresh_database, org, "t", "id, seq, pad"),
            300,
            "staging = source",
            projector_log,
        )
    finally:
        for process in (worker, capture):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
        loader.join()
    assert done.is_set() and kills == KILLS

    watermark = assert_change_log_sound(fresh_database, org, "t")
    with psycopg.connect(fresh_database) as conn:
        consumed, applied, skipped, dead = conn.execute(
            "SELECT consumed, applied, duplicates, dead_lettered"
            " FROM fieldsync_control.projection_counts WHERE org = %s",
            (org,),
        ).fetchone()
    assert consumed == applied + skipped + dead and dead == 0
    assert skipped > 0, "redelivery after the kills was skipped as duplicates"
    print(
        f"kills={kills} consumed={consumed} applied={applied} skipped={skipped}"
        f" watermark={watermark}"
    )
