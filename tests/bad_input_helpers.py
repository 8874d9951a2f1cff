"""Change events written straight to the topics with FieldSync's own framing (Avro single-object
encoding, schemas published on ``fieldsync.schemas``), healthy or deliberately broken.

:class:`EventWriter` encodes with capture's :class:`~engine.streams.events.EventEncoder`, so a
healthy event is byte for byte what capture would produce for the same row; the broken ones
differ in exactly one way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import fastavro
import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from engine.streams.events import EntityEncoder, EventEncoder, SourcePosition
from engine.streams.framing import SCHEMA_TOPIC, SingleObjectFraming, schema_fingerprint
from engine.streams.topics import TopicAdmin

NUMERIC_8_2 = ((8 << 16) | 2) + 4  # typmod of numeric(8,2)
#: (name, type oid, typmod): integer key, text, numeric(8,2), smallint, jsonb
COLUMNS: tuple[tuple[str, int, int], ...] = (
    ("id", 23, -1),
    ("name", 25, -1),
    ("amount", 1700, NUMERIC_8_2),
    ("small", 21, -1),
    ("doc", 3802, -1),
)
ROW_COLUMNS = "id, name, amount, small, doc"


def healthy_row(key: int, version: int) -> dict[str, Any]:
    return {
        "id": key,
        "name": f"n{key}.{version}",
        "amount": Decimal(f"{(key * 7 + version) % 100000}.{version % 100:02d}"),
        "small": (key + version) % 30000,
        "doc": f'{{"k": {key}, "v": {version}}}',
    }


@dataclass
class EventWriter:
    """One org's producer: encoders per entity, a source position counter, the Kafka producer.

    Without ``bootstrap`` nothing is sent: the schemas are only kept (``schemas``), for a
    decoder of the test's own.
    """

    bootstrap: str | None
    org: str
    lsn: int = 0
    schemas: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    kafka: KafkaProducer = field(init=False)
    events: EventEncoder = field(init=False)

    def __post_init__(self) -> None:
        if self.bootstrap is not None:
            self.kafka = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=5,
                batch_size=256 * 1024,
                max_request_size=8 * 1024 * 1024,
            )
        self.events = EventEncoder(
            self.org, SingleObjectFraming(self._publish), database="src", entity_by_table={}
        )

    async def _publish(self, topic: str, key: bytes, value: bytes) -> None:
        import orjson

        self.schemas[bytes.fromhex(key.decode())] = orjson.loads(value)
        if self.bootstrap is not None:
            self.kafka.send(topic, key=key, value=value).get(timeout=30)

    def encoder(
        self, entity: str, columns: Sequence[tuple[str, int, int]] = COLUMNS
    ) -> EntityEncoder:
        """The entity's encoder for these columns; its schemas are published first."""
        return asyncio.run(
            self.events.encoder(entity, f"public.{entity}", columns, frozenset({"id"}))
        )

    def position(self) -> SourcePosition:
        self.lsn += 16
        return SourcePosition(self.lsn, self.lsn, self.lsn // 16, 1_700_000_000_000 + self.lsn)

    def change(self, encoder: EntityEncoder, op: str, row: dict[str, Any]) -> tuple[bytes, bytes]:
        """(key, value) of a c/u/d change of ``row`` (a delete carries it as ``before``)."""
        values = encoder.row_from_python([row.get(c.name) for c in encoder.schema.columns])
        key = encoder.encode_key(encoder.key_of(values))
        before, after = (values, None) if op == "d" else (None, values)
        return key, encoder.encode_envelope(op, before, after, self.position(), None)

    def send(self, topic: str, key: bytes | None, value: bytes | None) -> Any:
        return self.kafka.send(topic, key=key, value=value)

    def close(self) -> None:
        if self.bootstrap is not None:
            self.kafka.flush()
            self.kafka.close()


def publish_variant(writer: EventWriter, schema: dict[str, Any]) -> bytes:
    """Publish another writer schema on the schema topic; returns its single-object header."""
    import orjson

    fp = schema_fingerprint(schema)
    asyncio.run(writer._publish(SCHEMA_TOPIC, fp.hex().encode(), orjson.dumps(schema)))
    return b"\xc3\x01" + fp


def frame(header: bytes, schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), datum)
    return header + buffer.getvalue()


def create_topics(bootstrap: str, topics: Sequence[str], partitions: int = 2) -> None:
    admin = TopicAdmin(bootstrap, partitions=partitions, replication_factor=1)
    try:
        admin.ensure(topics, compacted=[SCHEMA_TOPIC])
    finally:
        admin.close()


def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 5.0) -> list[Any]:
    """Every record of ``topic`` (none if it does not exist), with timestamps."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not assignment:
            return []
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        ends = consumer.end_offsets(assignment)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in assignment):
            if time.monotonic() > deadline:
                break
            for part in consumer.poll(timeout_ms=200, max_records=50_000).values():
                records.extend(part)
        return records
    finally:
        consumer.close()


def counts(dsn: str, org: str | None = None) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """(org, entity) → (consumed, applied, duplicates, dead_lettered)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT org, entity, consumed, applied, duplicates, dead_lettered"
            " FROM fieldsync_control.projection_counts WHERE %s::text IS NULL OR org = %s",
            (org, org),
        ).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}


def fieldsync_env(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}
