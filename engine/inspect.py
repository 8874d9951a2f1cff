"""Operator views of the broker: topics with their counts, one topic's messages decoded."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from kafka.admin import KafkaAdminClient
from rich.console import Console
from rich.table import Table

from engine.runtime.kafka import client_options
from engine.streams.reader import read_all, read_changes


def topic_summary(bootstrap_servers: str, topics: list[str]) -> dict[str, Counter[str]]:
    """Per topic: message count by kind (op letter, ``tombstone``, or transaction status)."""
    from engine.streams.reader import load_schemas

    resolver = load_schemas(bootstrap_servers)
    summary: dict[str, Counter[str]] = {}
    import asyncio

    async def decode_all() -> None:
        for topic in topics:
            counts: Counter[str] = Counter()
            for _p, _o, _key, value, _h in read_all(bootstrap_servers, topic):
                if value is None:
                    counts["tombstone"] += 1
                    continue
                try:
                    record = await resolver.decode(value)
                except Exception:  # schema topic entries and foreign messages
                    counts["other"] += 1
                    continue
                kind = record.get("op") or record.get("status") or "other"
                counts[kind] += 1
            summary[topic] = counts

    asyncio.run(decode_all())
    return summary


def _fieldsync_topics(bootstrap_servers: str) -> list[str]:
    admin = KafkaAdminClient(**client_options(), bootstrap_servers=bootstrap_servers)
    try:
        return sorted(t for t in admin.list_topics() if t.startswith("fieldsync."))
    finally:
        admin.close()


def summary_table(summary: dict[str, Counter[str]], title: str) -> Table:
    kinds = ["r", "c", "u", "d", "t", "tombstone", "BEGIN", "END", "other"]
    present = [k for k in kinds if any(counts.get(k) for counts in summary.values())]
    table = Table(title=title)
    table.add_column("topic", no_wrap=True)
    table.add_column("messages", justify="right")
    for kind in present:
        table.add_column(kind, justify="right")
    for topic, counts in summary.items():
        table.add_row(topic, str(sum(counts.values())), *(str(counts.get(k, 0)) for k in present))
    return table


def print_topics(console: Console, bootstrap_servers: str) -> None:
    topics = [t for t in _fieldsync_topics(bootstrap_servers) if t != "fieldsync.schemas"]
    console.print(summary_table(topic_summary(bootstrap_servers, topics), "FieldSync topics"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


async def print_topic(console: Console, bootstrap_servers: str, topic: str, limit: int) -> None:
    for message in (await read_changes(bootstrap_servers, topic))[:limit]:
        console.print(f"[bold]{topic}[{message.partition}]@{message.offset}[/] key={message.key}")
        console.print_json(orjson.dumps(message.value, default=_jsonable).decode())
