"""Incremental snapshots (DBLog) while the source keeps changing: the topic converges on the
table."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import psycopg

from engine.streams.capture import CaptureTask
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, events, new_org, settings


def _final_state(bootstrap: str, topic: str) -> tuple[dict[int, Any], int]:
    """Row per key after replaying the topic (last event wins), and the count of incremental
    reads."""
    state: dict[int, Any] = {}
    incremental = 0
    for event in events(bootstrap, topic):
        if event.value is None:
            continue
        key = event.key["id"]
        if event.value["op"] == "d":
            state.pop(key, None)
        else:
            state[key] = event.value["after"]["v"]
        if event.value["source"]["snapshot"] == "incremental":
            incremental += 1
    return state, incremental


def _writer(dsn: str, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    made = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            key = rng.randrange(1, 2500)
            action = rng.random()
            if action < 0.6:
                conn.execute("UPDATE b SET v = v + 1 WHERE id = %s", (key,))
            elif action < 0.8:
                conn.execute("DELETE FROM b WHERE id = %s", (key,))
            else:
                conn.execute(
                    "INSERT INTO b VALUES (%s, 0) ON CONFLICT (id) DO UPDATE SET v = b.v + 100",
                    (key,),
                )
            made += 1
            time.sleep(0.002)  # a busy source, not a CPU-bound one: the test runs anywhere
    return made


def _run_until_snapshots_done(
    spec: CaptureSpec, bootstrap: str, during: threading.Event
) -> CaptureTask:
    async def run() -> CaptureTask:
        task = CaptureTask(spec, settings(snapshot_chunk_rows=97), bootstrap)
        try:
            await task.start()
            while task._incremental is not None and (
                task._incremental.pending or task._incremental.window
            ):
                await task.stream_once()
            during.set()
            await task.catch_up()
        finally:
            await task.close()
        return task

    return asyncio.run(run())


def test_entity_added_later_is_snapshotted_while_it_changes(
    fresh_database: str, bootstrap_servers: str
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO a SELECT i, 0 FROM generate_series(1, 10) i")
        conn.execute("INSERT INTO b SELECT i, 0 FROM generate_series(1, 2000) i")
    org = new_org()
    capture_once(
        CaptureSpec(org=org, source_dsn=fresh_database, entities={"a": "public.a"}),
        bootstrap_servers,
    )

    stop = threading.Event()
    made: list[int] = []
    writer = threading.Thread(target=lambda: made.append(_writer(fresh_database, stop, 3)))
    writer.start()
    try:
        spec = CaptureSpec(
            org=org, source_dsn=fresh_database, entities={"a": "public.a", "b": "public.b"}
        )
        task = _run_until_snapshots_done(spec, bootstrap_servers, stop)
    finally:
        stop.set()
        writer.join()
    capture_once(spec, bootstrap_servers)  # everything the writer committed last

    with psycopg.connect(fresh_database) as conn:
        expected = dict(conn.execute("SELECT id, v FROM b").fetchall())
        leftovers = conn.execute("SELECT count(*) FROM fieldsync.signal").fetchone()[0]
        status = conn.execute(
            "SELECT status FROM fieldsync.entity_snapshot WHERE entity = 'b'"
        ).fetchone()[0]
    state, incremental = _final_state(bootstrap_servers, f"fieldsync.{org}.b")
    assert made[0] > 100, "the source changed during the snapshot"
    assert task.stats.snapshots == 0, "adding an entity does not re-snapshot the others"
    assert incremental > 0
    assert state == expected
    assert leftovers == 0 and status == "done"
    a_events = events(bootstrap_servers, f"fieldsync.{org}.a")
    assert len(a_events) == 10, "entity a untouched by b's snapshot"


def test_signal_row_triggers_a_snapshot(fresh_database: str, bootstrap_servers: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE b (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO b SELECT i, i FROM generate_series(1, 300) i")
    spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"b": "public.b"})
    capture_once(spec, bootstrap_servers)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO fieldsync.signal (id, type, data) VALUES ('s1', 'execute-snapshot', "
            '\'{"data-collections": ["public.b"], "type": "incremental"}\')'
        )
    _run_until_snapshots_done(spec, bootstrap_servers, threading.Event())
    reads = [
        e
        for e in events(bootstrap_servers, f"fieldsync.{spec.org}.b")
        if e.value["source"]["snapshot"] == "incremental"
    ]
    assert sorted(e.key["id"] for e in reads) == list(range(1, 301))
    assert {e.value["op"] for e in reads} == {"r"}
