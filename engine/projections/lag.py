"""How far the projector group is behind on change topics: end offset minus committed offset."""

from __future__ import annotations

from collections.abc import Sequence

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from engine.runtime.kafka import client_options
from engine.snapshots.build import committed_offsets


def projector_lag(bootstrap_servers: str, group: str, topics: Sequence[str]) -> dict[str, int]:
    """Messages not yet consumed by ``group`` per topic (a topic the group never read counts in
    full); empty when the broker cannot be asked."""
    committed = committed_offsets(bootstrap_servers, group, topics).offsets
    try:
        consumer = KafkaConsumer(
            **client_options(),
            bootstrap_servers=bootstrap_servers.split(","),
            enable_auto_commit=False,
        )
    except KafkaError:
        return {}
    try:
        lag: dict[str, int] = {}
        for topic in topics:
            partitions = consumer.partitions_for_topic(topic) or set()
            ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
            lag[topic] = sum(
                max(0, end - committed.get(topic, {}).get(str(tp.partition), 0))
                for tp, end in ends.items()
            )
        return lag
    except KafkaError:
        return {}
    finally:
        consumer.close()


__all__ = ["projector_lag"]
