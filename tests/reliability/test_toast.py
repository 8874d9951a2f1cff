"""Fault 11: unchanged TOASTed values.

With ``REPLICA IDENTITY DEFAULT`` PostgreSQL does not send a large column an update left
untouched; capture sends Debezium's ``__debezium_unavailable_value`` placeholder instead, and
Debezium itself does the same. Staging must keep the real value: under churn that updates small
columns of rows with large ones (several updates of a key in one batch, updates across batches,
large values changed in between, deletes and re-inserts), with the projector SIGKILLed on the
way (redelivered placeholders), staging equals the source and the placeholder is in no staging
row and no change-log image. The same for Debezium's JSON on a mapped topic.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from engine.projections.app import register_org
from tests.capture_helpers import events, new_org
from tests.projector_helpers import live_rows, wait_until
from tests.reliability.harness import Pipeline, chaos_rounds
from tests.reliability.report import record

PLACEHOLDER = "__debezium_unavailable_value"


def _big(rng: random.Random) -> str:
    """Incompressible enough to be stored out of line (TOAST)."""
    return rng.randbytes(4_000).hex()


def _churn(dsn: str, seconds: float, stop: threading.Event, counts: dict[str, int]) -> None:
    rng = random.Random(5)
    next_id = 41
    with psycopg.connect(dsn) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            with conn.transaction(), conn.cursor() as cur:
                for _ in range(rng.randint(1, 8)):
                    key, roll = rng.randint(1, next_id - 1), rng.random()
                    if roll < 0.7:  # the large columns untouched: placeholders
                        cur.execute(
                            "UPDATE src.doc SET title = %s WHERE id = %s", (f"t{rng.random()}", key)
                        )
                    elif roll < 0.8:
                        cur.execute("UPDATE src.doc SET body = %s WHERE id = %s", (_big(rng), key))
                    elif roll < 0.88:
                        cur.execute(
                            "UPDATE src.doc SET blob = %s WHERE id = %s",
                            (_big(rng).encode(), key),
                        )
                    elif roll < 0.94:
                        cur.execute("DELETE FROM src.doc WHERE id = %s", (key,))
                        cur.execute(
                            "INSERT INTO src.doc VALUES (%s, 'again', %s, %s)",
                            (key, _big(rng), _big(rng).encode()),
                        )
                    else:
                        cur.execute(
                            "INSERT INTO src.doc VALUES (%s, 'new', %s, %s)",
                            (next_id, _big(rng), _big(rng).encode()),
                        )
                        next_id += 1
                    counts["changes"] += 1
            time.sleep(rng.uniform(0.0, 0.05))


def _placeholders(dsn: str, org: str, entity: str) -> int:
    """Staging rows or change-log images that hold the placeholder."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT (SELECT count(*) FROM org_{org}.{entity} t"
            f"         WHERE strpos(to_jsonb(t)::text, %(p)s) > 0)"
            f"     + (SELECT count(*) FROM org_{org}.{entity}__log l"
            f"         WHERE strpos(coalesce(l.after::text, '') || coalesce(l.before::text, ''),"
            f"                      %(p)s) > 0)",
            {"p": PLACEHOLDER},
        ).fetchone()
    assert row is not None
    return int(row[0])


def _blob_placeholders(dsn: str, org: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM org_{org}.doc WHERE position(%s::bytea IN blob) > 0",
            (PLACEHOLDER.encode(),),
        ).fetchone()
    assert row is not None
    return int(row[0])


def run_toast(database: str, broker: str, tmp: Path, *, seconds: float, kills: int) -> None:
    rng = random.Random(4)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA src")
        conn.execute("CREATE TABLE src.doc (id int PRIMARY KEY, title text, body text, blob bytea)")
        with conn.cursor() as cur:
            for key in range(1, 41):
                cur.execute(
                    "INSERT INTO src.doc VALUES (%s, 'first', %s, %s)",
                    (key, _big(rng), _big(rng).encode()),
                )
        identity = conn.execute(
            "SELECT relreplident FROM pg_class WHERE oid = 'src.doc'::regclass"
        ).fetchone()
        assert identity == ("d",), "REPLICA IDENTITY DEFAULT"
    org = new_org()
    pipeline = Pipeline(
        tmp,
        source_dsn=database,
        staging_dsn=database,
        bootstrap=broker,
        org=org,
        tables={"doc": "src.doc"},
        gateway=False,
        projector_env_extra={"FIELDSYNC_PROJECTOR_BATCH_SIZE": "200"},
    )
    counts = {"changes": 0}
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(database, seconds, stop, counts))
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        churn.start()
        for _ in range(kills):
            time.sleep(seconds / (kills + 1))
            pipeline.restart(pipeline.projectors[0])
        churn.join()
        converged = pipeline.wait_converged(240)
        pipeline.oracle.assert_applied_once()
    finally:
        stop.set()
        if churn.is_alive():
            churn.join()
        pipeline.stop()
    assert _placeholders(database, org, "doc") == 0 and _blob_placeholders(database, org) == 0
    sent = sum(  # the churn really made capture send placeholders
        1
        for e in events(broker, f"fieldsync.{org}.doc")
        if e.value and e.value["op"] == "u" and (e.value["after"] or {}).get("body") == PLACEHOLDER
    )
    assert sent > 0, "no update carried the placeholder"
    record(
        "unchanged_toast",
        changes=counts["changes"],
        projector_kills=kills,
        placeholder_events=sent,
        staging_converged_s=round(converged, 2),
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_unchanged_toast_values_under_projector_kills(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    run_toast(fresh_database, fresh_broker, tmp_path, seconds=90, kills=chaos_rounds(20) // 2)


def test_debezium_placeholder_keeps_the_real_value(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    from tests.projector_helpers import projector_env, start_projector

    org = new_org()
    topic = f"pg{org}.public.doc"
    admin = KafkaAdminClient(bootstrap_servers=fresh_broker)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    register_org(fresh_database, org, debezium_topics={topic: "doc"})
    rng = random.Random(6)
    lsn = [1000]
    truth: dict[int, dict[str, str]] = {}

    def change(op: str, key: int, after: dict[str, str] | None) -> bytes:
        lsn[0] += 10
        source = {"connector": "postgresql", "name": f"pg{org}", "ts_ms": 1_790_000_000_000,
                  "snapshot": "false", "db": "app", "schema": "public", "table": "doc",
                  "sequence": json.dumps([str(lsn[0]), str(lsn[0])]), "lsn": lsn[0]}  # fmt: skip
        return json.dumps(
            {"before": None, "after": after, "source": source, "op": op, "ts_ms": 1}
        ).encode()

    producer = KafkaProducer(bootstrap_servers=fresh_broker, acks="all")
    messages: list[tuple[int, bytes]] = []
    for key in range(1, 21):
        truth[key] = {"id": key, "title": "first", "body": _big(rng)}  # type: ignore[dict-item]
        messages.append((key, change("c", key, dict(truth[key]))))
    for _ in range(300):
        key = rng.randint(1, 20)
        if rng.random() < 0.85:  # body untouched: Debezium sends the placeholder
            truth[key]["title"] = f"t{rng.random()}"
            after = {**truth[key], "body": PLACEHOLDER}
        else:
            truth[key]["body"] = _big(rng)
            after = dict(truth[key])
        messages.append((key, change("u", key, after)))
    log = tmp_path / "projector.log"
    worker = start_projector(
        projector_env(fresh_broker, fresh_database, FIELDSYNC_PROJECTOR_BATCH_SIZE="25"), log
    )
    try:
        for index, (key, value) in enumerate(messages):
            producer.send(topic, key=json.dumps({"id": key}).encode(), value=value)
            if index % 40 == 39:  # some updates of a key in one batch, others across batches
                producer.flush()
                time.sleep(0.2)
        producer.flush()
        expected = {k: (r["title"], r["body"]) for k, r in truth.items()}
        wait_until(
            lambda: (
                live_rows(fresh_database, f"SELECT id::int, title, body FROM org_{org}.doc")
                == expected
            ),
            120,
            "staging = the Debezium source's rows",
            log,
        )
    finally:
        producer.close()
        worker.terminate()
        worker.wait(60)
    assert _placeholders(fresh_database, org, "doc") == 0
    record("unchanged_toast_debezium", changes=len(messages))
