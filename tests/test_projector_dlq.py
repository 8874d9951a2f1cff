"""Bad input loses nothing: dead letters with their reason, and replay after the fix applies them.
New orgs' topics are picked up by a running projector."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
from kafka import KafkaProducer

from engine.projections.app import register_org
from engine.projections.dlq import list_dead_letters
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import (
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)


def _letters(bootstrap: str, topic: str) -> list:
    try:
        return list_dead_letters(bootstrap, topic)
    except Exception:  # the topic does not exist yet
        return []


def test_dead_letters_and_replay_after_fix(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE u (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT i, 'x' FROM generate_series(1, 10) i")
        conn.execute("INSERT INTO u SELECT i, 'y' FROM generate_series(1, 7) i")
    known, late = new_org(), new_org()
    capture_once(
        CaptureSpec(org=known, source_dsn=fresh_database, entities={"t": "public.t"}),
        fresh_broker,
    )
    register_org(fresh_database, known)
    log = tmp_path / "projector.log"
    env = projector_env(fresh_broker, fresh_database)
    worker = start_projector(env, log)
    try:
        wait_until(
            staging_matches_source(fresh_database, known, "t", "id, v"),
            90,
            "org snapshot in staging",
            log,
        )

        producer = KafkaProducer(bootstrap_servers=fresh_broker, acks="all")
        producer.send(f"fieldsync.{known}.t", key=b"k1", value=b"\x07not avro at all", partition=0)
        producer.send(
            f"fieldsync.{known}.t",
            key=b"k2",
            value=b"\xc3\x01" + b"\xee" * 8 + b"\x02",
            partition=0,
        )
        producer.flush()
        producer.close()
        dlq = f"fieldsync.{known}.dlq"
        wait_until(lambda: len(_letters(fresh_broker, dlq)) == 2, 30, "two dead letters", log)
        reasons = sorted(letter.reason for letter in _letters(fresh_broker, dlq))
        assert reasons == ["bad_magic", "unknown_schema"]
        assert all(
            letter.source_topic == f"fieldsync.{known}.t" and letter.source_offset >= 0
            for letter in _letters(fresh_broker, dlq)
        )

        # a new org's topics appear while the projector runs; the org is not provisioned yet
        late_spec = CaptureSpec(org=late, source_dsn=fresh_database, entities={"u": "public.u"})
        capture_once(late_spec, fresh_broker)

        def late_letters() -> int:  # fieldsync.dlq is shared with other tests' unknown orgs
            return sum(
                1
                for letter in _letters(fresh_broker, "fieldsync.dlq")
                if letter.source_topic == f"fieldsync.{late}.u"
            )

        wait_until(lambda: late_letters() >= 7, 60, "unknown-org dead letters of the new org", log)
        assert {
            letter.reason
            for letter in _letters(fresh_broker, "fieldsync.dlq")
            if letter.source_topic == f"fieldsync.{late}.u"
        } == {"unknown_org"}

        register_org(fresh_database, late)  # the fix
        fieldsync = str(Path(sys.executable).parent / "fieldsync")
        replayed = subprocess.run(
            [fieldsync, "dlq", "replay"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        wait_until(
            staging_matches_source(fresh_database, late, "u", "id, v"),
            60,
            "replayed org in staging",
            log,
        )
        again = subprocess.run(
            [fieldsync, "dlq", "replay"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "replayed 0 dead letters" in again.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    with psycopg.connect(fresh_database) as conn:
        for org in (known, late):
            consumed, applied, skipped, dead = conn.execute(
                "SELECT sum(consumed), sum(applied), sum(duplicates), sum(dead_lettered)"
                " FROM fieldsync_control.projection_counts WHERE org = %s",
                (org,),
            ).fetchone()
            assert consumed == applied + skipped + dead
    assert "restarting the worker" in log.read_text()  # it subscribed to the new topics
