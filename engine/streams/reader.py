"""Reading change topics back: a small consumer used by the demo, tests and operators.

It needs nothing but the broker and fastavro: writer schemas come from the schema topic,
found by the fingerprint in each message (Avro single-object encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from engine.runtime.kafka import client_options
from engine.streams.framing import SCHEMA_TOPIC, FingerprintResolver, decode_payload


@dataclass(frozen=True)
class ChangeMessage:
    topic: str
    partition: int
    offset: int
    key: Any
    value: Any  # None for a tombstone
    headers: tuple[tuple[str, bytes], ...]


def read_all(
    bootstrap_servers: str, topic: str
) -> list[tuple[int, int, bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]]:
    """Every message currently on ``topic``: (partition, offset, key, value, headers)."""
    consumer = KafkaConsumer(
        **client_options(), bootstrap_servers=bootstrap_servers, enable_auto_commit=False
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not assignment:
            return []
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        out = []
        # Poll until the log runs dry: end offsets are not trusted (the embedded broker
        # reports the last batch's base offset + 1).
        ends = consumer.end_offsets(assignment)  # a lower bound on the embedded broker
        idle_polls = 0
        while idle_polls < 2 or any(consumer.position(tp) < ends[tp] for tp in assignment):
            batch = consumer.poll(timeout_ms=500, max_records=10_000)
            idle_polls = 0 if batch else idle_polls + 1
            for records in batch.values():
                for record in records:
                    out.append(
                        (
                            record.partition,
                            record.offset,
                            record.key,
                            record.value,
                            tuple(record.headers or ()),
                        )
                    )
        return out
    finally:
        consumer.close()


def load_schemas(bootstrap_servers: str) -> FingerprintResolver:
    """A resolver holding every schema published on the schema topic."""
    resolver = FingerprintResolver()
    for _p, _o, _key, value, _h in read_all(bootstrap_servers, SCHEMA_TOPIC):
        if value is not None:
            resolver.add(orjson.loads(value))
    return resolver


async def read_changes(bootstrap_servers: str, topic: str) -> list[ChangeMessage]:
    """Every message on a change topic, keys and values decoded."""
    resolver = load_schemas(bootstrap_servers)
    messages = []
    for partition, offset, key, value, headers in read_all(bootstrap_servers, topic):
        decoded_key = await resolver.decode(key) if key is not None else None
        decoded_value = await resolver.decode(value) if value is not None else None
        messages.append(
            ChangeMessage(topic, partition, offset, decoded_key, decoded_value, headers)
        )
    return messages


__all__ = ["ChangeMessage", "decode_payload", "load_schemas", "read_all", "read_changes"]
