"""Dead letters: what the projector could not apply, kept with the reason, for an operator.

``fieldsync dlq list`` shows them; ``fieldsync dlq replay`` re-produces each one, unchanged, to
the topic it came from (after the cause was fixed: an org provisioned, a schema corrected), so
the projector applies it like any other message. Replay remembers how far it got in the
consumer group ``fieldsync-dlq-replay``: running it twice does not send a letter twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from engine.runtime.kafka import client_options
from engine.streams.reader import read_all

DLQ_HEADER_PREFIX = "fieldsync.dlq."
REPLAY_GROUP = "fieldsync-dlq-replay"


@dataclass(frozen=True)
class DeadLetterView:
    partition: int
    offset: int
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int


def _headers(raw: tuple[tuple[str, bytes], ...]) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in raw}


def list_dead_letters(bootstrap_servers: str, topic: str) -> list[DeadLetterView]:
    letters = []
    for partition, offset, _key, _value, raw_headers in read_all(bootstrap_servers, topic):
        headers = _headers(raw_headers)
        letters.append(
            DeadLetterView(
                partition,
                offset,
                headers.get("fieldsync.dlq.reason", "?"),
                headers.get("fieldsync.dlq.detail", ""),
                headers.get("fieldsync.dlq.topic", "?"),
                int(headers.get("fieldsync.dlq.partition", "-1")),
                int(headers.get("fieldsync.dlq.offset", "-1")),
            )
        )
    return letters


def replay(bootstrap_servers: str, topic: str, *, timeout_s: float = 5.0) -> int:
    """Send every dead letter not replayed before back to its source topic; returns the count.

    Steps: read from the replay group's committed offsets; re-produce each letter (key, value,
    original headers) to its source partition; flush; then commit the offsets. A crash between
    the flush and the commit replays those letters again: the projector skips them as duplicates.
    """
    consumer = KafkaConsumer(
        **client_options(),
        bootstrap_servers=bootstrap_servers,
        group_id=REPLAY_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = KafkaProducer(**client_options(), bootstrap_servers=bootstrap_servers, acks="all")
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return 0
        consumer.assign(partitions)
        sent = 0
        idle = 0
        while idle < 2:
            batch = consumer.poll(timeout_ms=int(timeout_s * 100), max_records=5_000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for record in records:
                    headers = [
                        (k, v)
                        for k, v in (record.headers or [])
                        if not k.startswith(DLQ_HEADER_PREFIX)
                    ]
                    meta = _headers(tuple(record.headers or ()))
                    producer.send(
                        meta["fieldsync.dlq.topic"],
                        key=record.key,
                        value=record.value,
                        partition=int(meta["fieldsync.dlq.partition"]),
                        headers=headers,
                    )
                    sent += 1
            producer.flush()
            if batch:
                consumer.commit()
        return sent
    finally:
        producer.close()
        consumer.close()
