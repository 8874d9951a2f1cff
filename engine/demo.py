"""``fieldsync demo``: the pipeline's first stage end to end on the embedded runtime.

Creates a sample CRM source, captures it (snapshot, then streaming while the source keeps
changing), prints what landed on which topic, and checks that replaying the topics reproduces
the source tables exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from engine.config import Settings
from engine.demo_device import run_device
from engine.inspect import summary_table, topic_summary
from engine.orgfile import SAMPLE_ENTITIES
from engine.projections.app import register_org
from engine.projections.staging import org_schema
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
    await asyncio.to_thread(_project, settings, console, endpoints, spec, source, source_dsn)
    console.print(
        "Inspect further with [bold]fieldsync topics[/] and "
        f"[bold]fieldsync topics {change_topic(spec.org, 'account')}[/] (while `make up` runs)."
    )


def _staging_counts(staging_dsn: str, spec: CaptureSpec) -> dict[str, tuple[int, int, int]]:
    """Per entity: live rows, deleted rows, watermark (zeros while not projected yet)."""
    counts = {}
    with psycopg.connect(staging_dsn, autocommit=True) as conn:
        for entity in spec.entities:
            try:
                live, deleted = conn.execute(  # type: ignore[misc]
                    sql.SQL(
                        "SELECT count(*) FILTER (WHERE NOT _fs_deleted),"
                        " count(*) FILTER (WHERE _fs_deleted) FROM {}.{}"
                    ).format(sql.Identifier(org_schema(spec.org)), sql.Identifier(entity))
                ).fetchone()
                (watermark,) = conn.execute(  # type: ignore[misc]
                    sql.SQL("SELECT version FROM {}._fs_entities WHERE entity = %s").format(
                        sql.Identifier(org_schema(spec.org))
                    ),
                    (entity,),
                ).fetchone()
            except (psycopg.errors.UndefinedTable, TypeError):
                live, deleted, watermark = 0, 0, 0
            counts[entity] = (live, deleted, watermark)
    return counts


def _project(
    settings: Settings,
    console: Console,
    endpoints: Endpoints,
    spec: CaptureSpec,
    source: dict[str, int],
    source_dsn: str,
) -> None:
    """Run a projector worker until staging holds exactly the source's rows."""
    with psycopg.connect(endpoints.staging_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(org_schema(spec.org)))
        )
    register_org(endpoints.staging_dsn, spec.org)
    env = {
        **os.environ,
        "FIELDSYNC_BOOTSTRAP_SERVERS": endpoints.bootstrap_servers,
        "FIELDSYNC_STAGING_DSN": endpoints.staging_dsn,
        "FIELDSYNC_PROJECTOR_GROUP": f"fieldsync-demo-{uuid.uuid4().hex[:8]}",
        "FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S": "5",
        "FIELDSYNC_BROKER_SESSION_TIMEOUT_S": "10",
        "FIELDSYNC_BROKER_HEARTBEAT_INTERVAL_S": "1",
        "FIELDSYNC_PRODUCER_IDEMPOTENCE": "false",
    }
    console.print(
        f"Starting a projector worker (faust) into staging schema [bold]{org_schema(spec.org)}[/]…"
    )
    started = time.perf_counter()
    log_path = Path(tempfile.gettempdir()) / f"fieldsync-demo-projector-{os.getpid()}.log"
    with log_path.open("wb") as log_file:  # a file, not a pipe: nobody drains a pipe while we wait
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine", "projector"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            counts = _staging_counts(endpoints.staging_dsn, spec)
            if {e: c[0] for e, c in counts.items()} == source:
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"projector did not converge: {counts}\n{tail}")
            time.sleep(0.5)
        _print_staging(console, spec, counts, source, started)
        run_device(
            settings, console, spec, source_dsn, endpoints.staging_dsn, endpoints.bootstrap_servers
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def _print_staging(
    console: Console,
    spec: CaptureSpec,
    counts: dict[str, tuple[int, int, int]],
    source: dict[str, int],
    started: float,
) -> None:
    table = Table(
        title=f"Staging {org_schema(spec.org)}"
        f" ({time.perf_counter() - started:.1f}s incl. worker start)"
    )
    for column in ("entity", "rows", "deleted (kept until the horizon)", "watermark"):
        table.add_column(column, justify="left" if column == "entity" else "right")
    for entity, (live, deleted, watermark) in counts.items():
        table.add_row(entity, str(live), str(deleted), str(watermark))
    console.print(table)
    console.print(
        f"[green]✓[/] staging equals the source: {sum(source.values())} rows"
        f" in {len(source)} entities"
    )
