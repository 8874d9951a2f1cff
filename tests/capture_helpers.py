"""Test-side readers that use nothing of the engine: kafka-python to fetch, fastavro to decode.

They are what a third-party consumer holding only fastavro and the published schemas does.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from kafka import KafkaConsumer, TopicPartition

from engine.config import Settings, load_settings
from engine.streams.capture import CaptureTask
from engine.streams.spec import CaptureSpec


def fetch(bootstrap: str, topic: str) -> list[Any]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not assignment:
            return []
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        ends = consumer.end_offsets(assignment)  # a lower bound on the embedded broker
        records: list[Any] = []
        idle = 0
        while idle < 2 or any(consumer.position(tp) < ends[tp] for tp in assignment):
            batch = consumer.poll(timeout_ms=500, max_records=50_000)
            idle = 0 if batch else idle + 1
            for part in batch.values():
                records.extend(part)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


class PlainDecoder:
    """Single-object decoding from the schema topic with fastavro alone."""

    def __init__(self, bootstrap: str) -> None:
        self.schemas: dict[bytes, Any] = {}
        for record in fetch(bootstrap, "fieldsync.schemas"):
            schema = json.loads(record.value)
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
            assert record.key == fp.hex().encode(), "schema topic key is the fingerprint"
            self.schemas[fp] = fastavro.parse_schema(schema)

    def decode(self, data: bytes | None) -> Any:
        if data is None:
            return None
        assert data[:2] == b"\xc3\x01", "Avro single-object marker"
        return fastavro.schemaless_reader(io.BytesIO(data[10:]), self.schemas[data[2:10]], None)


@dataclass(frozen=True)
class Event:
    partition: int
    offset: int
    key: Any
    value: Any
    headers: dict[str, bytes]


def events(bootstrap: str, topic: str) -> list[Event]:
    decoder = PlainDecoder(bootstrap)
    return [
        Event(
            r.partition,
            r.offset,
            decoder.decode(r.key),
            decoder.decode(r.value),
            dict(r.headers or []),
        )
        for r in fetch(bootstrap, topic)
    ]


def new_org() -> str:
    return f"o{uuid.uuid4().hex[:10]}"


def settings(**overrides: Any) -> Settings:
    return load_settings(
        **{"topic_partitions": 2, "capture_heartbeat_interval_s": 0.2, **overrides}
    )


def capture_once(spec: CaptureSpec, bootstrap: str, **overrides: Any) -> CaptureTask:
    """Start (snapshot if needed) and catch up, then close; returns the task for its stats."""

    async def run() -> CaptureTask:
        task = CaptureTask(spec, settings(**overrides), bootstrap)
        try:
            await task.catch_up()
        finally:
            await task.close()
        return task

    return asyncio.run(run())
