"""``projector``: change topic → staging holding the final state, events/s of one worker.

200k change events (20k with ``--quick``) of a 10-column table over 20k keys (2k), mixed 70%
updates, 20% inserts, 10% deletes, are made on a real source table in transactions of 1000 and
captured by a real :class:`CaptureTask` into ``fieldsync.<org>.<entity>`` (3 partitions). Every
delete also puts a tombstone on the topic, so the topic holds ~110% of the events as messages;
every rate below is *messages on the topic / seconds*, so all figures divide the same work.

Then, each in the same run:

* ``projector``: ONE ``fieldsync projector`` worker process, timed from its first counted batch
  (``fieldsync_control.projection_counts.consumed`` > 0, so start-up and the group's rebalance
  are not counted) until it consumed every message; staging must then equal the source.
* ``faust_noop`` baseline: a faust app (own consumer group, same topic, same App and
  ``stream.take_events(batch, within)`` settings) whose agent only counts: the framework's
  floor, timed from its first batch to its last.
* ``naive_upsert`` baseline: the same events' values, in order, one autocommitted
  ``INSERT … ON CONFLICT DO UPDATE`` each (a delete upserts the row as deleted), no decoding.
  At ~2k statements/s all 200k would take longer than the rest of the benchmark, so the full
  run applies the first 50k (a per-statement rate does not depend on how many are run);
  ``FIELDSYNC_BENCH_PROJECTOR_NAIVE_EVENTS=all`` (or a number) changes that.
* ``raw_copy`` baseline: one binary COPY of the final rows: how fast the end state alone can be
  written, as messages / COPY seconds. Reported as a ratio, with no target.

Baselines run after the projector, one thing at a time: client, servers and load share the
machine's cores, so anything concurrent would be measured too. The run uses a private embedded
broker when the run's broker is embedded: the projector subscribes to *every* change topic on
its broker, so topics other benchmarks left (e.g. ``capture``'s 200k messages of an
unregistered org, which it would dead-letter) would be measured too.

Tuning knobs: ``FIELDSYNC_BENCH_PROJECTOR_BATCHES`` (e.g. ``2000/0.2,5000/1``: batch size /
seconds) measures the projector with each and reports the best, against a faust baseline with
the same settings; ``FIELDSYNC_BENCH_PROJECTOR_UVLOOP=0`` runs the worker and the faust
baseline on asyncio's own loop instead of uvloop (the shipped default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import SecretStr

from bench.harness import Baseline, BenchContext, Result, Target, benchmark
from bench.services import scratch_database

BENCH = "projector"
ENTITY = "visit"
TABLE = "field_visit"
TXN_SIZE = 1000
PARTITIONS = 3
BATCHINGS_ENV = "FIELDSYNC_BENCH_PROJECTOR_BATCHES"
NAIVE_EVENTS_ENV = "FIELDSYNC_BENCH_PROJECTOR_NAIVE_EVENTS"
NAIVE_EVENTS_FULL = 50_000
UVLOOP_ENV = "FIELDSYNC_BENCH_PROJECTOR_UVLOOP"
POLL_S = 0.05  # progress polls: cheap against batches of >= 0.2 s

# (name, SQL type, binary COPY type) of the 9 value columns after the bigint key: a
# field-service table's mix.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("c01", "integer", "int4"),
    ("c02", "bigint", "int8"),
    ("c03", "text", "text"),
    ("c04", "numeric(12,2)", "numeric"),
    ("c05", "timestamptz", "timestamptz"),
    ("c06", "boolean", "bool"),
    ("c07", "double precision", "float8"),
    ("c08", "varchar(64)", "text"),
    ("c09", "date", "date"),
)
VALUE_NAMES = [name for name, _, _ in COLUMNS]
VALUE_COPY_TYPES = [copy_type for _, _, copy_type in COLUMNS]
_T0 = datetime(2024, 1, 1, tzinfo=UTC)
_D0 = date(2020, 1, 1)

Row = tuple[Any, ...]  # the 9 value columns


def _values(v: int) -> Row:
    """The value columns of version ``v`` (deterministic, so a run can be reproduced)."""
    return (
        v % 2_000_000_000,
        v * 1000,
        "note " + hashlib.md5(str(v).encode(), usedforsecurity=False).hexdigest(),
        Decimal(v % 10_000_000).scaleb(-2),
        _T0 + timedelta(seconds=v),
        v % 2 == 0,
        v * 0.25,
        f"code-{v}",
        _D0 + timedelta(days=v % 3650),
    )


@dataclass(frozen=True)
class Change:
    """One source change: op ``c``/``u``/``d``, key, and the row's values after (before, for d)."""

    op: str
    key: int
    row: Row


@dataclass
class Workload:
    """The changes in source order and the final live rows they lead to."""

    changes: list[Change]
    final: dict[int, Row]
    ops: dict[str, int] = field(default_factory=dict)


def make_changes(events: int, keys: int, *, seed: int = 7) -> Workload:
    """``events`` changes over keys 1..``keys``: 70% updates, 20% inserts, 10% deletes.

    The table starts empty; an op that cannot apply (an update or delete with no live key, an
    insert with every key live) becomes one that can, so the actual mix is in the details.
    """
    rng = random.Random(seed)
    live: list[int] = []
    dead = list(range(keys, 0, -1))
    rows: dict[int, Row] = {}
    changes: list[Change] = []
    ops = {"c": 0, "u": 0, "d": 0}

    def take(pool: list[int], index: int) -> int:  # O(1): the last key fills the gap
        last = pool.pop()
        if index < len(pool):
            key, pool[index] = pool[index], last
            return key
        return last

    for n in range(events):
        draw = rng.random()
        op = "u" if draw < 0.7 else "c" if draw < 0.9 else "d"
        if op != "c" and not live:
            op = "c"
        elif op == "c" and not dead:
            op = "u"
        version = keys + n + 1
        if op == "c":
            key = take(dead, rng.randrange(len(dead)))
            live.append(key)
            rows[key] = _values(version)
        elif op == "u":
            key = live[rng.randrange(len(live))]
            rows[key] = _values(version)
        else:
            key = take(live, rng.randrange(len(live)))
            dead.append(key)
        changes.append(Change(op, key, rows.pop(key) if op == "d" else rows[key]))
        ops[op] += 1
    return Workload(changes, rows, ops)


def _ident_list(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def create_table(conn: psycopg.Connection[Any], table: str, *, deleted: bool = False) -> None:
    """``table`` (bigint PK + the 9 value columns, optionally a ``deleted`` flag)."""
    columns: list[sql.Composable] = [sql.SQL("id bigint PRIMARY KEY")]
    columns += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t, _ in COLUMNS]
    if deleted:
        columns.append(sql.SQL("deleted boolean NOT NULL DEFAULT false"))
    conn.execute(
        sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(table), sql.SQL(", ").join(columns))
    )


_APPLY_PROCEDURE = """
CREATE PROCEDURE bench_apply_changes(txn_size integer) LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN SELECT * FROM bench_changes ORDER BY seq LOOP
        IF r.op = 'c' THEN
            INSERT INTO {table} (id, {names}) VALUES (r.id, {values});
        ELSIF r.op = 'u' THEN
            UPDATE {table} SET {sets} WHERE id = r.id;
        ELSE
            DELETE FROM {table} WHERE id = r.id;
        END IF;
        n := n + 1;
        IF n % txn_size = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
END $$
"""


def apply_to_source(dsn: str, changes: Sequence[Change], txn_size: int = TXN_SIZE) -> None:
    """The changes as single-row statements in order, ``txn_size`` per transaction.

    A PL/pgSQL procedure runs them from an UNLOGGED table (no WAL, so nothing to decode): the
    source sees exactly the same row changes and commits as from a client, ~10x faster than
    sending 200k statements, which keeps the whole benchmark within its time budget.
    """
    table = sql.Identifier(TABLE)
    procedure = sql.SQL(_APPLY_PROCEDURE).format(
        table=table,
        names=_ident_list(VALUE_NAMES),
        values=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(n)) for n in VALUE_NAMES),
        sets=sql.SQL(", ").join(
            sql.SQL("{0} = r.{0}").format(sql.Identifier(n)) for n in VALUE_NAMES
        ),
    )
    columns: list[sql.Composable] = [
        sql.SQL("seq integer PRIMARY KEY, op text NOT NULL, id bigint NOT NULL")
    ]
    columns += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t, _ in COLUMNS]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE UNLOGGED TABLE bench_changes ({})").format(sql.SQL(", ").join(columns))
        )
        conn.execute(procedure)
        with (
            conn.cursor() as cur,
            cur.copy("COPY bench_changes FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "text", "int8", *VALUE_COPY_TYPES])
            for seq, change in enumerate(changes):
                copy.write_row((seq, change.op, change.key, *change.row))
        conn.execute("SET synchronous_commit = on")  # a slot decodes flushed WAL only
        conn.execute("CALL bench_apply_changes(%s)", (txn_size,))
        conn.execute("DROP PROCEDURE bench_apply_changes(integer)")
        conn.execute("DROP TABLE bench_changes")
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table))


def capture_changes(
    dsn: str, bootstrap: str, org: str, changes: Sequence[Change]
) -> tuple[int, float]:
    """Apply the changes to the source and capture them; (messages on the topic, capture s)."""
    from engine.config import load_settings
    from engine.streams.capture import CaptureTask
    from engine.streams.spec import CaptureSpec
    from engine.streams.topics import change_topic

    settings = load_settings(topic_partitions=PARTITIONS, producer_idempotence=False)
    spec = CaptureSpec(org=org, source_dsn=SecretStr(dsn), entities={ENTITY: f"public.{TABLE}"})
    with asyncio.Runner() as runner:
        task = CaptureTask(spec, settings, bootstrap)
        try:
            runner.run(task.start())  # slot + snapshot of the still empty table
            apply_to_source(dsn, changes)
            started = time.perf_counter()
            runner.run(task.catch_up())
            elapsed = time.perf_counter() - started
        finally:
            runner.run(task.close())
    stats = task.stats
    messages = stats.per_topic.get(change_topic(org, ENTITY), 0)
    if stats.events != len(changes) or messages != stats.events + stats.tombstones:
        raise RuntimeError(
            f"capture produced {stats.events} events and {stats.tombstones} tombstones "
            f"({messages} on the topic) for {len(changes)} changes"
        )
    return messages, elapsed


# -- the projector --------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """Messages counted between a first and a last observation of a consumer's progress."""

    messages: int
    first: int  # already counted at the first observation (not part of the rate)
    elapsed_s: float
    startup_s: float  # process start to the first observation
    batches: int  # batches seen after the first observation

    @property
    def rate(self) -> float:
        return (self.messages - self.first) / self.elapsed_s

    @property
    def mean_batch(self) -> float:
        return (self.messages - self.first) / max(1, self.batches)


@dataclass(frozen=True)
class Batching:
    """``stream.take_events(size, within_s)``: at most ``size`` events or ``within_s`` seconds."""

    size: int = 2000
    within_s: float = 0.2

    @property
    def label(self) -> str:
        return f"{self.size}/{self.within_s:g}"

    @classmethod
    def parse(cls, text: str) -> Batching:
        """``"5000"`` or ``"5000/1.0"`` (size / within seconds)."""
        size, _, within = text.strip().partition("/")
        return cls(int(size), float(within) if within else cls.within_s)


def worker_env(bootstrap: str, staging_dsn: str, group: str, batching: Batching) -> dict[str, str]:
    """The projector worker's environment: short rebalance settings for the embedded broker."""
    return {
        **os.environ,
        "FIELDSYNC_BOOTSTRAP_SERVERS": bootstrap,
        "FIELDSYNC_STAGING_DSN": staging_dsn,
        "FIELDSYNC_PRODUCER_IDEMPOTENCE": "false",
        "FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S": "5",
        "FIELDSYNC_BROKER_SESSION_TIMEOUT_S": "10",
        "FIELDSYNC_BROKER_HEARTBEAT_INTERVAL_S": "1",
        "FIELDSYNC_PROJECTOR_GROUP": group,
        "FIELDSYNC_PROJECTOR_BATCH_SIZE": str(batching.size),
        "FIELDSYNC_PROJECTOR_BATCH_WITHIN_S": str(batching.within_s),
        "FIELDSYNC_LOG_LEVEL": "WARNING",
    }


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped with SIGTERM (then SIGKILL) on exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _fail(what: str, log: Path) -> RuntimeError:
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    return RuntimeError(f"{what}; log tail:\n{tail}")


def run_projector(
    dsn: str,
    bootstrap: str,
    org: str,
    messages: int,
    batching: Batching,
    workdir: Path,
    *,
    uvloop: bool = False,
    startup_s: float = 120,
    stall_s: float = 60,
) -> Timed:
    """One ``fieldsync projector`` worker from an empty staging to every message consumed."""
    group = f"bench-projector-{uuid.uuid4().hex[:8]}"
    log = workdir / f"{group}.log"
    env = worker_env(bootstrap, dsn, group, batching)
    env["FIELDSYNC_PROJECTOR_UVLOOP"] = "true" if uvloop else "false"
    cmd = [str(Path(sys.executable).parent / "fieldsync"), "projector"]
    query = (
        "SELECT coalesce(sum(consumed), 0) FROM fieldsync_control.projection_counts WHERE org = %s"
    )
    with psycopg.connect(dsn, autocommit=True) as conn, _process(cmd, env, log) as worker:
        started = time.perf_counter()
        first: tuple[int, float] | None = None
        progress = (0, started)  # last change of the count: a crashed agent stalls it
        batches = 0  # changes of the count after the first: one per batch (>= 0.2 s apart)
        while True:
            now = time.perf_counter()
            row = conn.execute(query, (org,)).fetchone()
            consumed = int(row[0]) if row else 0
            if consumed and first is None:
                first = (consumed, now)
            if consumed != progress[0]:
                if progress[0]:
                    batches += 1
                progress = (consumed, now)
            if consumed >= messages:
                break
            if worker.poll() is not None:
                raise _fail(f"projector worker exited with {worker.returncode}", log)
            if now - progress[1] > (stall_s if first else startup_s):
                raise _fail(f"projector stalled at {consumed} of {messages} messages", log)
            time.sleep(POLL_S)
    assert first is not None
    if consumed != messages:
        raise RuntimeError(f"projector consumed {consumed} messages, the topic holds {messages}")
    return Timed(messages, first[0], now - first[1], first[1] - started, batches)


def reset_staging(dsn: str, org: str) -> None:
    """Forget what a previous projector run wrote for ``org`` (its schema and counts)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"org_{org}"))
        )
        conn.execute("DELETE FROM fieldsync_control.projection_counts WHERE org = %s", (org,))


def staging_differences(dsn: str, org: str) -> int:
    """Rows that differ between the source table and the org's live staging rows."""
    columns = _ident_list(["id", *VALUE_NAMES])
    source = sql.SQL("SELECT {} FROM public.{}").format(columns, sql.Identifier(TABLE))
    staging = sql.SQL("SELECT {} FROM {}.{} WHERE NOT _fs_deleted").format(
        columns, sql.Identifier(f"org_{org}"), sql.Identifier(ENTITY)
    )
    query = sql.SQL(
        "SELECT count(*) FROM (({0} EXCEPT ALL {1}) UNION ALL ({1} EXCEPT ALL {0})) d"
    ).format(source, staging)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


# -- faust_noop ---------------------------------------------------------------------------


def run_faust_noop(
    bootstrap: str,
    topic: str,
    messages: int,
    batching: Batching,
    workdir: Path,
    *,
    uvloop: bool = False,
    timeout_s: float = 300,
) -> Timed:
    """The counting faust app (see :func:`_noop_main`) in its own process and consumer group."""
    group = f"bench-noop-{uuid.uuid4().hex[:8]}"
    log = workdir / f"{group}.log"
    out = workdir / f"{group}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.projector",
        "noop",
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--group",
        group,
        "--batch",
        str(batching.size),
        "--within",
        str(batching.within_s),
        "--expect",
        str(messages),
        "--out",
        str(out),
        *(["--uvloop"] if uvloop else []),
    ]
    started = time.perf_counter()
    with _process(cmd, dict(os.environ), log) as process:
        deadline = started + timeout_s
        while not out.exists():
            if process.poll() is not None:
                raise _fail(f"faust_noop exited with {process.returncode}", log)
            if time.perf_counter() > deadline:
                raise _fail("faust_noop did not count every message in time", log)
            time.sleep(POLL_S)
        counted = json.loads(out.read_text())
    if counted["count"] != messages:
        raise RuntimeError(f"faust_noop counted {counted['count']} messages of {messages}")
    return Timed(
        messages, counted["first"], counted["elapsed_s"], counted["startup_s"], counted["batches"]
    )


def _noop_main(argv: Sequence[str]) -> None:
    """Count the topic's messages in batches, as the projector's agent takes them; write timing.

    The App settings mirror ``engine.projections.app.build_app`` so that only the agent's body
    differs. The result is written once every expected message was counted.
    """
    import faust

    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "topic", "group", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--within", type=float, required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.install()
    launched = time.perf_counter()
    app = faust.App(
        args.group,
        broker=";".join(f"kafka://{server}" for server in args.bootstrap.split(",")),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_rebalance_timeout=5.0,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_every=args.batch,
        broker_max_poll_records=max(500, args.batch),
        stream_buffer_maxsize=max(4096, args.batch * 2),
    )
    channel = app.topic(args.topic, key_serializer="raw", value_serializer="raw")
    out = Path(args.out)

    @app.agent(channel, concurrency=1)
    async def count(stream: Any) -> None:
        counted = batches = first = 0
        since = 0.0
        async for events in stream.take_events(args.batch, within=args.within):
            counted += len(events)
            batches += 1
            if not first:
                first, since = counted, time.perf_counter()
            if counted >= args.expect:
                done = {
                    "count": counted,
                    "first": first,
                    "elapsed_s": time.perf_counter() - since,
                    "startup_s": since - launched,
                    "batches": batches - 1,
                }
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(done))
                tmp.replace(out)

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


# -- naive_upsert and raw_copy --------------------------------------------------------------


def run_naive_upsert(dsn: str, changes: Sequence[Change], table: str = "naive_visit") -> float:
    """Seconds to apply every change as one autocommitted upsert (a delete marks the row)."""
    names = ["id", *VALUE_NAMES, "deleted"]
    upsert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}").format(
        sql.Identifier(table),
        _ident_list(names),
        sql.SQL(", ").join(sql.Placeholder() * len(names)),
        sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names[1:]
        ),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_table(conn, table, deleted=True)
        with conn.cursor() as cur:
            started = time.perf_counter()
            for change in changes:
                cur.execute(upsert, (change.key, *change.row, change.op == "d"), prepare=True)
            return time.perf_counter() - started


def expected_rows(changes: Sequence[Change]) -> dict[int, Row]:
    """The live rows the changes leave behind, replayed in Python."""
    rows: dict[int, Row] = {}
    for change in changes:
        if change.op == "d":
            rows.pop(change.key, None)
        else:
            rows[change.key] = change.row
    return rows


def naive_differences(dsn: str, expected: dict[int, Row], table: str = "naive_visit") -> int:
    """Keys whose live row in the naive table is not the expected one (or is missing/extra)."""
    query = sql.SQL("SELECT id, {} FROM {} WHERE NOT deleted").format(
        _ident_list(VALUE_NAMES), sql.Identifier(table)
    )
    with psycopg.connect(dsn) as conn:
        found = {row[0]: tuple(row[1:]) for row in conn.execute(query)}
    keys = found.keys() | expected.keys()
    return sum(found.get(key) != expected.get(key) for key in keys)


def run_raw_copy(
    dsn: str, final: dict[int, Row], runs: int = 3, table: str = "copy_visit"
) -> float:
    """Median seconds of one binary COPY of the final rows into an empty keyed table."""
    names = ["id", *VALUE_NAMES, "deleted"]
    copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), _ident_list(names)
    )
    rows = [(key, *row, False) for key, row in sorted(final.items())]
    times = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_table(conn, table, deleted=True)
        for _ in range(runs):
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
            started = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy) as writer:
                writer.set_types(["int8", *VALUE_COPY_TYPES, "bool"])
                for row in rows:
                    writer.write_row(row)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- the benchmark --------------------------------------------------------------------------


def _batchings() -> list[Batching]:
    raw = os.environ.get(BATCHINGS_ENV, "").strip()
    return [Batching.parse(b) for b in raw.split(",") if b.strip()] if raw else [Batching()]


def _naive_events(quick: bool, events: int) -> int:
    raw = os.environ.get(NAIVE_EVENTS_ENV, "").strip()
    if raw:
        return events if raw == "all" else min(events, int(raw))
    return events if quick else min(events, NAIVE_EVENTS_FULL)


@contextlib.contextmanager
def _broker(ctx: BenchContext, workdir: Path) -> Iterator[tuple[str, bool]]:
    """A private embedded broker (see the module docstring), or the run's external one."""
    if not getattr(ctx.services, "embedded_broker", True):
        yield ctx.services.bootstrap_servers, False
        return
    from engine.runtime.embedded import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), workdir / "broker.log")
    try:
        yield broker.start(), True
    finally:
        broker.stop()


@benchmark(BENCH)
def projector(ctx: BenchContext) -> Iterator[Result]:
    from engine.projections.app import register_org
    from engine.streams.topics import change_topic

    events, keys = (20_000, 2_000) if ctx.quick else (200_000, 20_000)
    naive_events = _naive_events(ctx.quick, events)
    uvloop = os.environ.get(UVLOOP_ENV, "1") not in ("", "0", "false")
    org = f"bench{uuid.uuid4().hex[:8]}"
    topic = change_topic(org, ENTITY)
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-bench-projector-"))
    phases: dict[str, float] = {}
    runs: dict[Batching, Timed] = {}
    try:
        with (
            _broker(ctx, workdir) as (bootstrap, private_broker),
            scratch_database(ctx.services.pg_dsn, "bench_projector") as dsn,
        ):
            started = time.perf_counter()
            workload = make_changes(events, keys)
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_table(conn, TABLE)
            messages, capture_s = capture_changes(dsn, bootstrap, org, workload.changes)
            phases["produce"] = time.perf_counter() - started
            register_org(dsn, org)

            for batching in _batchings():
                if runs:
                    reset_staging(dsn, org)
                started = time.perf_counter()
                runs[batching] = run_projector(
                    dsn, bootstrap, org, messages, batching, workdir, uvloop=uvloop
                )
                phases[f"projector {batching.label}"] = time.perf_counter() - started
                differences = staging_differences(dsn, org)
                if differences:
                    raise RuntimeError(f"staging differs from the source in {differences} rows")
            batching, best = max(runs.items(), key=lambda item: item[1].rate)

            started = time.perf_counter()
            noop = run_faust_noop(bootstrap, topic, messages, batching, workdir, uvloop=uvloop)
            phases["faust_noop"] = time.perf_counter() - started

            naive = workload.changes[:naive_events]
            naive_s = run_naive_upsert(dsn, naive)
            naive_messages = naive_events + sum(c.op == "d" for c in naive)  # + tombstones
            if naive_differences(dsn, expected_rows(naive)):
                raise RuntimeError("the naive upsert baseline did not reach the expected rows")
            phases["naive_upsert"] = naive_s
            copy_s = run_raw_copy(dsn, workload.final)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    value = best.rate
    details: dict[str, Any] = {
        "events": events,
        "messages": messages,
        "tombstones": messages - events,
        "keys": keys,
        "ops": workload.ops,
        "final_rows": len(workload.final),
        "columns": 1 + len(COLUMNS),
        "partitions": PARTITIONS,
        "txn_size": TXN_SIZE,
        "workers": 1,
        "batch_size": batching.size,
        "batch_within_s": batching.within_s,
        "uvloop": uvloop,
        "private_broker": private_broker,
        "projector_elapsed_s": round(best.elapsed_s, 3),
        "projector_startup_s": round(best.startup_s, 3),
        "projector_timed_from": best.first,
        "projector_batches": best.batches,
        "projector_mean_batch": round(best.mean_batch, 1),
        "events_per_s_by_batching": {b.label: round(t.rate, 1) for b, t in runs.items()},
        "capture_s": round(capture_s, 3),
        "staging_matches_source": True,
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "load_average_1m": os.getloadavg()[0],
    }
    yield Result(
        bench=BENCH,
        metric="events_per_s_vs_faust_noop",
        unit="events/s",
        value=value,
        baseline=Baseline("faust_noop", noop.rate),
        target=Target(0.6),
        details={
            **details,
            "faust_noop_elapsed_s": round(noop.elapsed_s, 3),
            "faust_noop_timed_from": noop.first,
            "faust_noop_mean_batch": round(noop.mean_batch, 1),
        },
    )
    yield Result(
        bench=BENCH,
        metric="events_per_s_vs_naive_upsert",
        unit="events/s",
        value=value,
        baseline=Baseline("naive_upsert", naive_messages / naive_s),
        target=Target(2.0),
        details={
            **details,
            "naive_upsert_events": naive_events,
            "naive_upsert_s": round(naive_s, 3),
            "naive_upsert_statements_per_s": round(naive_events / naive_s, 1),
        },
    )
    yield Result(
        bench=BENCH,
        metric="events_per_s_vs_raw_copy",
        unit="events/s",
        value=value,
        baseline=Baseline("raw_copy", messages / copy_s),
        details={
            **details,
            "raw_copy_s": round(copy_s, 4),
            "raw_copy_rows_per_s": round(len(workload.final) / copy_s, 1),
        },
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["noop"]:
        _noop_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m bench.projector noop --bootstrap … (a helper process)")
