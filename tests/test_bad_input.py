"""Bad input among healthy traffic: each poison message reaches the dead-letter topic within 5 s
with its reason, the reconciliation counts add up exactly, and healthy traffic keeps flowing.

The messages are written straight to the topics with FieldSync's own framing
(``tests/bad_input_helpers.py``): healthy changes byte for byte as capture writes them, and
one poison message per 10,000, each broken in exactly one way.
"""

from __future__ import annotations

import copy
import io
import os
import signal
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import psycopg

from engine.projections.app import register_org
from tests.bad_input_helpers import (
    ROW_COLUMNS,
    EventWriter,
    counts,
    create_topics,
    frame,
    healthy_row,
    publish_variant,
    read_topic,
)
from tests.capture_helpers import new_org
from tests.projector_helpers import projector_env, start_projector, wait_until

POISON_EVERY = 10_000
KINDS = (
    "bad_magic",
    "unknown_schema",
    "missing_op",
    "type_overflow",
    "oversized",
    "unknown_org",
    "missing_key",
)
TOTAL = POISON_EVERY * len(KINDS)
KEYS = 6_000  # per entity
MAX_BYTES = 65_536
QUEUE_S = 1.5  # produced, not yet consumed: at most what the projector consumes in this time
CHUNK = 250
DEAD_LETTER_WITHIN_MS = 5_000


@dataclass
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    kind: str | None = None  # the poison kind; None: healthy


def _without_op(writer: EventWriter, schema: dict[str, Any], value: bytes) -> bytes:
    """The same envelope, written with a published writer schema that has no ``op`` field."""
    variant = copy.deepcopy(schema)
    variant["fields"] = [f for f in variant["fields"] if f["name"] != "op"]
    header = publish_variant(writer, variant)
    datum = fastavro.schemaless_reader(
        io.BytesIO(value[10:]), fastavro.parse_schema(copy.deepcopy(schema)), None
    )
    assert isinstance(datum, dict)
    datum.pop("op")
    return frame(header, variant, datum)


def test_poison_messages_reach_the_dead_letter_topic_and_healthy_traffic_flows(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    org, stranger = new_org(), new_org()  # the stranger's org is never provisioned
    register_org(fresh_database, org)
    topics = {entity: f"fieldsync.{org}.{entity}" for entity in ("a", "b")}
    stranger_topic = f"fieldsync.{stranger}.a"
    create_topics(fresh_broker, [*topics.values(), stranger_topic])
    writer, outsider = EventWriter(fresh_broker, org), EventWriter(fresh_broker, stranger)
    encoders = {entity: writer.encoder(entity) for entity in topics}
    stranger_encoder = outsider.encoder("a")

    # healthy changes (inserts, updates, deletes, re-inserts) and the oracle of staging
    oracle: dict[str, dict[int, dict[str, Any] | None]] = {e: {} for e in topics}
    outgoing: list[Outgoing] = []
    healthy = 0
    for i in range(TOTAL):
        if i % POISON_EVERY == POISON_EVERY // 2:
            outgoing.append(Outgoing("", None, b"", KINDS[i // POISON_EVERY]))
            continue
        entity = "ab"[i % 2]
        key = (i // 2 * 7919) % KEYS
        previous = oracle[entity].get(key)
        if previous is not None and i % 17 == 0:
            op, row = "d", previous
            oracle[entity][key] = None
        else:
            op, row = ("c" if previous is None else "u"), healthy_row(key, i)
            oracle[entity][key] = row
        message_key, value = writer.change(encoders[entity], op, row)
        outgoing.append(Outgoing(topics[entity], message_key, value))
        healthy += 1

    # one poison message per kind, at one per 10,000; keys outside the healthy ones
    def poison(kind: str, key: int) -> Outgoing:
        row = healthy_row(key, 1)
        message_key, value = writer.change(encoders["a"], "c", row)
        if kind == "bad_magic":
            return Outgoing(topics["a"], message_key, b"\x07" + value[1:], kind)
        if kind == "unknown_schema":  # a fingerprint nobody published
            return Outgoing(topics["a"], message_key, value[:2] + os.urandom(8) + value[10:], kind)
        if kind == "missing_op":
            schema = encoders["a"].schema.envelope_schema
            return Outgoing(topics["a"], message_key, _without_op(writer, schema, value), kind)
        if kind == "type_overflow":  # staging's amount is numeric(8,2)
            big = {**row, "amount": Decimal("123456789.50")}
            return Outgoing(topics["b"], *writer.change(encoders["b"], "c", big), kind)
        if kind == "oversized":
            huge = {**row, "name": "x" * (MAX_BYTES + 1_000)}
            return Outgoing(topics["b"], *writer.change(encoders["b"], "c", huge), kind)
        if kind == "unknown_org":
            return Outgoing(stranger_topic, *outsider.change(stranger_encoder, "c", row), kind)
        assert kind == "missing_key"
        return Outgoing(topics["b"], None, writer.change(encoders["b"], "c", row)[1], kind)

    for index, message in enumerate(outgoing):
        if message.kind is not None:
            outgoing[index] = poison(message.kind, 1_000_000 + index)
    outsider.close()

    log = tmp_path / "projector.log"
    env = projector_env(
        fresh_broker, fresh_database, FIELDSYNC_PROJECTOR_MAX_MESSAGE_BYTES=str(MAX_BYTES)
    )
    worker = start_projector(env, log)
    sent_at: dict[tuple[str, int, int], tuple[str, int]] = {}  # (topic, partition, offset)
    try:
        futures = []
        started = time.monotonic()
        progress = [(started, 0)]  # (when, consumed): the projector's recent rate paces us
        for start in range(0, TOTAL, CHUNK):
            while True:
                now, consumed = progress[-1]
                then, before = next(p for p in progress if p[0] >= now - 3 or p is progress[-1])
                rate = (consumed - before) / (now - then) if now > then else 0.0
                if start - consumed <= min(2_500, max(CHUNK, rate * QUEUE_S)):
                    break
                time.sleep(0.05)
                progress.append(
                    (time.monotonic(), sum(c[0] for c in counts(fresh_database).values()))
                )
                assert worker.poll() is None, log.read_text()[-3000:]
            for message in outgoing[start : start + CHUNK]:
                future = writer.send(message.topic, message.key, message.value)
                if message.kind is not None:
                    futures.append((message.kind, future))
            writer.kafka.flush()
        produced_s = time.monotonic() - started
        for kind, future in futures:
            meta = future.get(timeout=30)
            sent_at[(meta.topic, meta.partition, meta.offset)] = (kind, meta.timestamp)
        wait_until(
            lambda: sum(c[0] for c in counts(fresh_database).values()) >= TOTAL,
            60,
            "every message consumed",
            log,
        )
        projected_s = time.monotonic() - started
    finally:
        writer.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    # each poison message in its dead-letter topic, unchanged, with its reason, within 5 s
    letters = [
        *read_topic(fresh_broker, f"fieldsync.{org}.dlq"),
        *read_topic(fresh_broker, "fieldsync.dlq"),
    ]
    seen: dict[str, int] = {}
    originals = {(m.topic, m.key, m.value): m.kind for m in outgoing if m.kind is not None}
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        source = (
            headers["fieldsync.dlq.topic"],
            int(headers["fieldsync.dlq.partition"]),
            int(headers["fieldsync.dlq.offset"]),
        )
        kind, produced_ms = sent_at[source]
        assert headers["fieldsync.dlq.reason"] == kind, headers
        assert originals[(source[0], letter.key, letter.value)] == kind  # unchanged
        expected_topic = "fieldsync.dlq" if kind == "unknown_org" else f"fieldsync.{org}.dlq"
        assert letter.topic == expected_topic
        seen[kind] = letter.timestamp - produced_ms
    assert sorted(seen) == sorted(KINDS), seen
    assert len(letters) == len(KINDS)
    assert max(seen.values()) <= DEAD_LETTER_WITHIN_MS, seen

    # reconciliation: consumed = applied + duplicates + dead letters = what was produced
    final = counts(fresh_database)
    assert set(final) == {(org, "a"), (org, "b"), (stranger, "a")}
    for consumed_, applied, duplicates, dead in final.values():
        assert consumed_ == applied + duplicates + dead
    assert sum(c[0] for c in final.values()) == TOTAL
    assert sum(c[3] for c in final.values()) == len(KINDS)
    assert sum(c[1] + c[2] for c in final.values()) == healthy

    # healthy traffic kept flowing: staging holds exactly the oracle's rows
    with psycopg.connect(fresh_database) as conn:
        for entity, rows in oracle.items():
            staged = {
                row[0]: row
                for row in conn.execute(
                    f"SELECT {ROW_COLUMNS} FROM org_{org}.{entity} WHERE NOT _fs_deleted"
                )
            }
            expected = {
                key: (key, r["name"], r["amount"], r["small"], _json(r["doc"]))
                for key, r in rows.items()
                if r is not None
            }
            assert staged == expected, entity
            deleted = conn.execute(
                f"SELECT count(*) FROM org_{org}.{entity} WHERE _fs_deleted"
            ).fetchone()
            assert deleted == (sum(1 for r in rows.values() if r is None),)
    print(
        f"\n{TOTAL} messages ({len(KINDS)} poison) produced in {produced_s:.1f}s, all consumed "
        f"after {projected_s:.1f}s; dead-letter latency ms {seen}; counts {final}"
    )


def _json(text: str) -> Any:
    import orjson

    return orjson.loads(text)
