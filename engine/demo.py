"""``fieldsync demo``: the pipeline's first stage end to end on the embedded runtime.

Creates a sample CRM source, captures it (snapshot, then streaming while the source keeps
changing), prints what landed on which topic, and checks that replaying the topics reproduces
the source tables exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
from pydantic import SecretStr
from rich.console import Console

from engine.config import Settings
from engine.inspect import summary_table, topic_summary
from engine.orgfile import SAMPLE_ENTITIES
from engine.runtime.embedded import EmbeddedRuntime, RuntimeInfo
from engine.runtime.endpoints import Endpoints, resolve_endpoints
from engine.sample.generator import churn, create_source, fill
from engine.streams.capture import CaptureTask
from engine.streams.reader import read_changes
from engine.streams.spec import CaptureSpec
from engine.streams.topics import TopicAdmin, change_topic, transaction_topic

DEMO_ORG = "demo"
DEMO_DATABASE = "crm_demo"


@contextlib.contextmanager
def _runtime(settings: Settings, console: Console) -> Iterator[Endpoints]:
    """The running ``fieldsync up`` if any, otherwise embedded services for the demo's duration."""
    if not (settings.uses_embedded_broker or settings.uses_embedded_postgres) or RuntimeInfo.read(
        settings.data_dir.resolve()
    ):
        yield resolve_endpoints(settings)
        return
    console.print("Starting embedded PostgreSQL and broker…")
    with EmbeddedRuntime(
        settings.data_dir,
        pg_port=settings.embedded_pg_port,
        broker_port=settings.embedded_broker_port,
    ):
        yield resolve_endpoints(settings)


def _fresh_source(admin_dsn: str) -> str:
    """An empty ``crm_demo`` database (an earlier demo's slot and data removed first)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (DEMO_DATABASE,),
        )
        conn.execute(f"DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    info["dbname"] = DEMO_DATABASE
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


async def _source_rows(dsn: str, spec: CaptureSpec) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        counts = {}
        for entity, table in spec.entities.items():
            (count,) = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()  # type: ignore[misc]
            counts[entity] = count
        return counts


async def _topic_rows(bootstrap: str, spec: CaptureSpec) -> dict[str, int]:
    """Rows alive after replaying each change topic: last event per key, tombstones remove."""
    counts = {}
    for entity in spec.entities:
        alive: dict[str, bool] = {}
        for message in await read_changes(bootstrap, change_topic(spec.org, entity)):
            if message.key is None:  # truncate: everything before it is gone
                if message.value and message.value["op"] == "t":
                    alive.clear()
                continue
            key = repr(sorted(message.key.items()))
            alive[key] = message.value is not None and message.value["op"] != "d"
        counts[entity] = sum(alive.values())
    return counts


def run_demo(
    settings: Settings, console: Console, *, accounts: int, churn_seconds: float, rate: float
) -> None:
    with _runtime(settings, console) as endpoints:
        source_dsn = _fresh_source(endpoints.staging_dsn)
        spec = CaptureSpec(org=DEMO_ORG, source_dsn=SecretStr(source_dsn), entities=SAMPLE_ENTITIES)
        admin = TopicAdmin(
            endpoints.bootstrap_servers, partitions=settings.topic_partitions, replication_factor=1
        )
        admin.delete(
            [*(change_topic(DEMO_ORG, e) for e in spec.entities), transaction_topic(DEMO_ORG)]
        )
        admin.close()

        started = time.perf_counter()
        create_source(source_dsn)
        counts = fill(source_dsn, accounts=accounts, seed=7)
        console.print(
            f"Sample CRM source [bold]{DEMO_DATABASE}[/]: {counts.total} rows"
            f" in {len(spec.entities)} tables ({time.perf_counter() - started:.1f}s)"
        )
        asyncio.run(_capture(settings, console, endpoints, spec, source_dsn, churn_seconds, rate))


async def _capture(
    settings: Settings,
    console: Console,
    endpoints: Endpoints,
    spec: CaptureSpec,
    source_dsn: str,
    churn_seconds: float,
    rate: float,
) -> None:
    task = CaptureTask(spec, settings, endpoints.bootstrap_servers)
    try:
        started = time.perf_counter()
        await task.start()
        console.print(
            f"Initial snapshot: {task.stats.snapshot_rows} rows as op 'r' "
            f"({time.perf_counter() - started:.1f}s)"
        )
        stop = asyncio.Event()
        stop_churn = threading.Event()
        streaming = asyncio.create_task(task.run(stop))
        console.print(
            f"Changing the source at {rate:.0f} changes/s for {churn_seconds:.0f}s"
            " while capture streams…"
        )
        stats = await asyncio.to_thread(
            churn, source_dsn, rate_per_s=rate, duration_s=churn_seconds, seed=11, stop=stop_churn
        )
        stop.set()
        await streaming
        await task.catch_up()
        console.print(
            f"Source changes made: {stats.changes} in {stats.transactions} transactions;"
            f" change events captured: {task.stats.events - task.stats.snapshot_rows}"
            f" ({task.stats.transactions} transactions)"
        )
    finally:
        await task.close()

    topics = [*(change_topic(spec.org, e) for e in spec.entities), transaction_topic(spec.org)]
    summary = await asyncio.to_thread(topic_summary, endpoints.bootstrap_servers, topics)
    console.print(
        summary_table(summary, f"What landed on which topic (broker {endpoints.bootstrap_servers})")
    )

    source = await _source_rows(source_dsn, spec)
    replayed = await _topic_rows(endpoints.bootstrap_servers, spec)
    if source == replayed:
        console.print(
            f"[green]✓[/] replaying the topics reproduces the source: {sum(source.values())} rows "
            f"in {len(source)} tables"
        )
    else:
        diff = {e: (source[e], replayed.get(e)) for e in source if source[e] != replayed.get(e)}
        console.print(f"[red]✗ topics and source differ (source, topics): {diff}[/]")
        raise SystemExit(1)
    console.print(
        "Inspect further with [bold]fieldsync topics[/] and "
        f"[bold]fieldsync topics {change_topic(spec.org, 'account')}[/] (while `make up` runs)."
    )
