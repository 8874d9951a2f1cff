"""``e2e``: source commit → change visible to a long-polling device, the whole pipeline.

Every process is the shipped one, configured only by ``FIELDSYNC_*`` variables and org files:
one ``fieldsync capture`` process (every org of the configuration), one or two
``fieldsync projector`` workers in one consumer group, and one ``fieldsync gateway`` (metrics
on, for its long-poll gauge). Each configuration gets a private embedded broker (projectors
consume every change topic on their broker; when the run's broker is external it is used
instead), a scratch staging database and one scratch source database per org on the run's
PostgreSQL, all removed afterwards.

Source: every org has 10 entities ``e01``…``e10`` (``id bigint`` key, ``seq``, ``written_at
timestamptz``, a status, an amount, a note), prefilled with 10,000 rows per configuration in
all (1,000 per entity for one org, 10 for 100 orgs) and captured by the initial snapshot.

Load: a writer process (``python -m bench.e2e write``, asyncio on uvloop, one connection per
org) ticks every 50 ms and gives each org its share of the rate, carrying fractions over, so
the rate holds whatever the number of orgs; an org commits once it holds 5 changes (at 1k
changes/s: 20 transactions/s of 50 changes for one org, 200/s of 5 over 10 or 100 orgs — one
writer process could not commit 1,000 single-change transactions a second here, and small
transactions are what a business application makes). An org's changes of a tick are ONE
transaction:
one prepared upsert per entity it touches, pipelined in one round trip with its BEGIN and
COMMIT (30% new keys, 70% updates of a random existing key; one key at most once per entity
and transaction), each row carrying a new global ``seq`` and ``written_at =
clock_timestamp()`` — the wall clock at the row's write, a few milliseconds at most before the
commit that follows. The upserts return the WAL insert position after each row; the last lies
before the commit record (see *stages*). The writer commits with ``synchronous_commit=on``:
the run's PostgreSQL defaults to off (fsync is off), and a slot decodes flushed WAL only, so
an asynchronous commit would first wait for the WAL writer (``wal_writer_delay``, 200 ms); a
production source commits synchronously.

Device: per org, one long-polling device in this process (its own ``httpx.AsyncClient`` on
uvloop, a JWT of a role whose profile gives all 10 entities with distribution ``all``). It
bootstraps every entity over NDJSON, then ``POST /orgs/<org>/sync`` with its 10 tokens and
``wait=20`` in a loop, following tokens (and ``has_more``). For every upsert row it reads:
latency = the response's receive time (wall clock, after the body was read) - the row's
``written_at``. Source, writer and device share the machine's clock. An entity answered
``must_bootstrap`` (a new capture epoch) is bootstrapped again, as a device does, and listed
in the details; a version first held through that bootstrap counts as delivered at its end.

Per configuration, in order: source and org files; the broker's fetch wake-up (below); capture
started; once every change topic
exists, the projector worker(s); once the snapshot is applied, the gateway; the devices
bootstrap and park (the gateway's ``fieldsync_gateway_active_long_polls``); three probe rows
per org must each reach the device (the pipeline works end to end, a second worker has joined
the group); then the writer runs for 60 s (``--quick``: 15 s) while a sampler records once a
second each slot's ``confirmed_flush_lsn`` and the projector's consumed count. After the
writer stops, the devices must converge: every source row's final ``seq`` received (deadline:
twice the window, at least 60 s).

Latency: every change whose version reached a device counts once. A version overwritten on
the source before the device read it (the device sees the newer one: deltas carry the latest
row) has no latency of its own and is counted as ``superseded``. A final version not received
by the deadline counts with its latency at the deadline, a lower bound (``censored``; the
percentiles are then lower bounds, said in the details) — nothing is dropped to look faster.

Stages (changes/s during the write window, all from this run): ``written`` (writer), and
downstream of it ``captured`` (writes whose WAL position the org's slot confirmed: capture
confirms only after the broker acknowledged), ``projected`` (messages the projector counted in
``fieldsync_control.projection_counts``) and ``delivered`` (versions devices received). Each
stage's ceiling is what the stage before it offered: at a rate the system sustains, every
stage equals ``written``; at one it cannot, the backlog of each stage at the end of the window
says which one fell behind.

The broker's fetch wake-up (context for the projector's share, in the details): a consumer
waits on an empty partition while a message is produced every 50 ms; the time from each
acknowledgement to its receipt, with ``fetch.max.wait.ms`` 1,500 (the value faust's driver
gives every worker consumer) and with 100 (``FIELDSYNC_CONSUMER_FETCH_MAX_WAIT_
MS``). The embedded broker completes such a waiting fetch only about half-way through its
maximum wait, rather than when data arrives.

Results per configuration: ``e2e_p99_ms[_<cfg>]`` (ms; p50/p95/max, per-10 s p99 and the
backlog in the details; target p99 <= 500 ms for the 1k changes/s configurations; no baseline:
a latency target needs none) with the samples (at most 5,000, an even stride over the
changes in write order) for the distribution plot; and ``delivered_per_s[_<cfg>]`` against the
same run's ``written`` rate, every stage's rate in ``details.stages_per_s``.

Configurations (``FIELDSYNC_BENCH_E2E_CONFIGS=1k,5k`` runs a subset, ``FIELDSYNC_BENCH_E2E_
SECONDS`` sets the window): ``1k`` (1 org, 1 worker, 1k changes/s: the metric ``e2e_p99_ms``),
``5k``, ``2w_1k`` and ``2w_5k`` (two workers), ``10orgs`` and ``100orgs`` (1k changes/s over
10 or 100 orgs of 10 entities, one worker; 100 orgs means 100 replication slots, 1,000 topics
and 1,000 staging tables, so its set-up is allowed 6 s more per org). The 100-org topics have
one partition each (``FIELDSYNC_TOPIC_PARTITIONS=1``): an entity changing about once a second
needs no parallelism, and one faust worker holding 3,000 partitions here spent its time in
faust's per-partition bookkeeping (commits of seconds, "stream stopped processing" checks).
``--quick`` runs 300 and 1,000 changes/s for the 1k and 5k tiers and leaves ``100orgs`` out.
A configuration that fails is recorded in the error of the benchmark after the others ran; it
yields no number.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import yaml
from psycopg import sql

from bench.gateway import GAUGE, _gauge, _post, _tls, mint
from bench.harness import Baseline, BenchContext, Result, Target, benchmark
from bench.projector import _fail, _process
from bench.services import scratch_database

BENCH = "e2e"
ENTITIES = tuple(f"e{n:02d}" for n in range(1, 11))
PREFILL_ROWS = 10_000  # per configuration, over every org's entities
INSERT_SHARE = 0.3
TICK_S = 0.05
MIN_TXN_CHANGES = 5  # an org's transaction holds at least this many changes
WAIT_S = 20.0
PROBES = 3
SAMPLE_EVERY_S = 1.0
SAMPLE_CAP = 5000
TARGET_MS = 500.0
BUCKET_S = 10.0
ROLE = "reader"
SETUP_TIMEOUT_S = 300.0
CONFIGS_ENV = "FIELDSYNC_BENCH_E2E_CONFIGS"
SECONDS_ENV = "FIELDSYNC_BENCH_E2E_SECONDS"

COLUMNS_DDL = (
    "id bigint PRIMARY KEY, seq bigint NOT NULL, written_at timestamptz NOT NULL,"
    " status integer NOT NULL, amount numeric(12,2) NOT NULL, note text NOT NULL"
)


@dataclass(frozen=True)
class Config:
    """One measured topology and load."""

    name: str
    rate: float  # changes/s over all orgs
    orgs: int
    workers: int
    judged: bool  # held against the 500 ms p99 target (the 1k changes/s tier)
    partitions: int = 3  # per change topic (FIELDSYNC_TOPIC_PARTITIONS)

    @property
    def suffix(self) -> str:
        return "" if self.name == "1k" else f"_{self.name}"

    @property
    def setup_timeout_s(self) -> float:
        """Every (org, entity) is a staging table and a transaction per batch: allow for it."""
        return SETUP_TIMEOUT_S + 6.0 * self.orgs

    @property
    def rows_per_entity(self) -> int:
        return max(10, PREFILL_ROWS // (self.orgs * len(ENTITIES)))


def configurations(quick: bool) -> list[Config]:
    low, high = (300.0, 1000.0) if quick else (1000.0, 5000.0)
    configs = [
        Config("1k", low, 1, 1, True),
        Config("5k", high, 1, 1, False),
        Config("2w_1k", low, 1, 2, True),
        Config("2w_5k", high, 1, 2, False),
        Config("10orgs", low, 10, 1, True),
        *([] if quick else [Config("100orgs", low, 100, 1, True, partitions=1)]),
    ]
    wanted = [n.strip() for n in os.environ.get(CONFIGS_ENV, "").split(",") if n.strip()]
    if wanted:
        unknown = sorted(set(wanted) - {c.name for c in configs})
        if unknown:
            raise ValueError(f"{CONFIGS_ENV}: unknown configurations {unknown}")
        configs = [c for c in configs if c.name in wanted]
    return configs


def _seconds(quick: bool) -> float:
    raw = os.environ.get(SECONDS_ENV, "").strip()
    return float(raw) if raw else (15.0 if quick else 60.0)


# -- bookkeeping (pure functions, tested) ------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..100), as the report computes it."""
    if not ordered:
        raise ValueError("no values")
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def stride_sample(values: Sequence[float], cap: int) -> list[float]:
    """At most ``cap`` values: every k-th, in order (an even stride, not the fastest ones)."""
    step = max(1, math.ceil(len(values) / cap))
    return [values[i] for i in range(0, len(values), step)]


def count_at(times: Sequence[float], counts: Sequence[float], t: float) -> float:
    """A sampled cumulative count at time ``t``, linearly interpolated (held at the ends)."""
    if not times:
        raise ValueError("no samples")
    i = bisect_left(times, t)
    if i == 0:
        return counts[0]
    if i == len(times):
        return counts[-1]
    t0, t1 = times[i - 1], times[i]
    c0, c1 = counts[i - 1], counts[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def captured_count(marks: Sequence[tuple[int, int]], confirmed_lsn: int | None) -> int:
    """Changes of an org whose transaction the slot confirmed: ``marks`` are the writer's
    (WAL position after the transaction's last row, cumulative changes) in commit order; a
    transaction is confirmed once ``confirmed_flush_lsn`` passed that position."""
    if confirmed_lsn is None or not marks:
        return 0
    i = bisect_left([lsn for lsn, _ in marks], confirmed_lsn)  # marks with lsn < confirmed
    return marks[i - 1][1] if i else 0


@dataclass
class Latencies:
    """Per delivered change version: when it was written and how long it took to be seen."""

    written: array.array[float] = field(default_factory=lambda: array.array("d"))
    latency: array.array[float] = field(default_factory=lambda: array.array("d"))
    censored: int = 0

    def add(self, written_at: float, latency_s: float) -> None:
        self.written.append(written_at)
        self.latency.append(latency_s)

    def summary(self) -> dict[str, Any]:
        """p50/p95/p99/max/mean in ms over every version counted (censored included)."""
        ordered = sorted(self.latency)
        n = len(ordered)
        return {
            "n": n,
            "p50_ms": round(percentile(ordered, 50) * 1000, 1),
            "p95_ms": round(percentile(ordered, 95) * 1000, 1),
            "p99_ms": round(percentile(ordered, 99) * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1),
            "mean_ms": round(sum(ordered) / n * 1000, 1),
            "censored": self.censored,
            "percentiles_are_lower_bounds": self.censored > 0,
        }

    def in_write_order(self) -> list[float]:
        """Latencies in ms, ordered by write time."""
        order = sorted(range(len(self.written)), key=self.written.__getitem__)
        return [self.latency[i] * 1000 for i in order]

    def p99_by_bucket(self, start: float, bucket_s: float) -> list[float | None]:
        """p99 (ms) of the versions written in each ``bucket_s`` window after ``start``."""
        buckets: dict[int, list[float]] = {}
        for written, latency in zip(self.written, self.latency, strict=True):
            buckets.setdefault(max(0, int((written - start) // bucket_s)), []).append(latency)
        if not buckets:
            return []
        return [
            round(percentile(sorted(buckets[b]), 99) * 1000, 1) if b in buckets else None
            for b in range(max(buckets) + 1)
        ]


# -- the source and the writer -------------------------------------------------------------------


def upsert_sql(entity: str) -> str:
    """Upsert ``(ids[], seqs[])`` into one entity; returns, per row, the WAL insert position
    after it (the last one lies before the transaction's commit record)."""
    return (
        f"INSERT INTO public.{entity} AS t (id, seq, written_at, status, amount, note)"
        " SELECT u.id, u.seq, clock_timestamp(), (u.seq %% 7)::int,"
        " (u.seq %% 100000) / 100.0, 'change ' || u.seq"
        " FROM unnest(%s::bigint[], %s::bigint[]) AS u(id, seq)"
        " ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq,"
        " written_at = EXCLUDED.written_at, status = EXCLUDED.status,"
        " amount = EXCLUDED.amount, note = EXCLUDED.note"
        " RETURNING (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
    )


UPSERTS = {entity: upsert_sql(entity) for entity in ENTITIES}
Changes = dict[str, tuple[list[int], list[int]]]  # entity -> (keys, seqs)


async def write_transaction(conn: psycopg.AsyncConnection[Any], changes: Changes) -> int:
    """One transaction of one prepared upsert per entity touched, pipelined (one round trip);
    returns the WAL position after its last row, before its commit record."""
    async with conn.transaction(), conn.pipeline():
        cursors = [
            await conn.execute(UPSERTS[entity], (keys, seqs), prepare=True)
            for entity, (keys, seqs) in changes.items()
        ]
    positions = [int(row[0]) for cursor in cursors for row in await cursor.fetchall()]
    return max(positions)


def create_source(dsn: str, rows_per_entity: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for entity in ENTITIES:
            table = sql.Identifier("public", entity)
            conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(COLUMNS_DDL)))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, 0, clock_timestamp(), g %% 7, g / 100.0, 'row ' || g"
                    " FROM generate_series(1, %s) AS g"
                ).format(table),
                (rows_per_entity,),
            )
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(table))


async def _source_connection(dsn: str) -> psycopg.AsyncConnection[Any]:
    """Autocommit with ``synchronous_commit=on``: the run's PostgreSQL defaults to off (fsync
    off), and a slot decodes flushed WAL only, so an asynchronous commit would wait for the WAL
    writer (up to ``wal_writer_delay``, 200 ms) before capture could see it; a source database
    in production commits synchronously."""
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, options="-c synchronous_commit=on"
    )


@dataclass
class OrgWriter:
    """One org's key space: the next new key and the keys it may update, per entity."""

    org: str
    max_id: dict[str, int]
    written: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)  # (lsn, cumulative changes)

    def plan(self, rng: random.Random, changes: int, next_seq: int) -> Changes:
        """``changes`` changes (seqs from ``next_seq``) over random entities, as keys and seqs
        per entity touched; a key appears at most once per entity (an upsert affects a row
        once)."""
        planned: Changes = {}
        for n in range(changes):
            entity = ENTITIES[rng.randrange(len(ENTITIES))]
            keys, seqs = planned.setdefault(entity, ([], []))
            key = rng.randint(1, self.max_id[entity])
            if rng.random() < INSERT_SHARE or key in keys:
                self.max_id[entity] += 1
                key = self.max_id[entity]
            keys.append(key)
            seqs.append(next_seq + n)
        return planned


async def _write(plan: dict[str, Any]) -> dict[str, Any]:
    """The writer process's work (see the module docstring); returns what it wrote when."""
    rng = random.Random(plan["seed"])
    orgs = [
        OrgWriter(o["org"], dict.fromkeys(ENTITIES, o["rows_per_entity"])) for o in plan["orgs"]
    ]
    conns = [await _source_connection(o["dsn"]) for o in plan["orgs"]]
    share = plan["rate"] * plan["tick_s"] / len(orgs)
    # orgs do not all commit on the same tick; an org commits once it has MIN_TXN_CHANGES
    minimum = min(MIN_TXN_CHANGES, max(1, int(share)))
    carry = [rng.random() * minimum for _ in orgs]
    seq = 1
    ticks = behind_ticks = txns = 0
    behind_max = 0.0

    async def write(org: OrgWriter, conn: psycopg.AsyncConnection[Any], changes: Changes) -> None:
        lsn = await write_transaction(conn, changes)
        org.marks.append((lsn, org.written))

    try:
        for conn in conns:  # prepare every upsert before the clock starts (no row changes)
            async with conn.pipeline():
                for sql_text in UPSERTS.values():
                    await conn.execute(sql_text, ([], []), prepare=True)
        delay = plan["start_at"] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started_wall, started = time.time(), time.monotonic()
        while (due := ticks * plan["tick_s"]) < plan["duration_s"]:
            late = time.monotonic() - started - due
            if late < 0:
                await asyncio.sleep(-late)
            elif late > plan["tick_s"]:
                behind_ticks += 1
                behind_max = max(behind_max, late)
            jobs = []
            for i, org in enumerate(orgs):
                carry[i] += share
                changes = int(carry[i]) if carry[i] >= minimum else 0
                if changes:
                    carry[i] -= changes
                    planned = org.plan(rng, changes, seq)
                    seq += changes
                    org.written += changes
                    jobs.append(write(org, conns[i], planned))
            await asyncio.gather(*jobs)
            txns += len(jobs)
            ticks += 1
        ended_wall = time.time()
    finally:
        for conn in conns:
            await conn.close()
    return {
        "start": started_wall,
        "end": ended_wall,
        "written": seq - 1,
        "transactions": txns,
        "ticks": ticks,
        "behind_ticks": behind_ticks,
        "behind_max_s": round(behind_max, 3),
        "marks": {org.org: org.marks for org in orgs},
    }


def _writer_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e write")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import uvloop

    plan = json.loads(args.plan.read_text())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        done = runner.run(_write(plan))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(done))
    tmp.replace(args.out)


# -- the device --------------------------------------------------------------------------------


def offline_config() -> dict[str, Any]:
    """Role ``reader``: every entity, distribution ``all``."""
    return {
        "entities": {e: {} for e in ENTITIES},
        "roles": {ROLE: {"profile": "everything"}},
        "profiles": {
            "everything": {
                "items": [{"entity": e, "distribution": "all", "priority": 1} for e in ENTITIES]
            }
        },
        "users": {},
    }


@dataclass
class Device:
    """One org's long-polling device: its tokens and the ``seq`` of every row it holds."""

    org: str
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)
    rows: dict[str, dict[int, int]] = field(default_factory=lambda: {e: {} for e in ENTITIES})
    requests: int = 0
    duplicates: int = 0
    retries: list[dict[str, Any]] = field(default_factory=list)
    rebootstraps: list[str] = field(default_factory=list)

    async def bootstrap(self) -> int:
        """Every entity over NDJSON; returns the rows received."""
        received = 0
        for entity in ENTITIES:
            received += await self.bootstrap_entity(entity, None)
        return received

    async def bootstrap_entity(self, entity: str, seen: Latencies | None) -> int:
        """One entity's rows at one watermark, swapped in at ``$done`` (as the reference client
        does); with ``seen``, a version first held through it counts as delivered then."""
        rows: dict[int, tuple[int, str]] = {}
        token = None
        async with self.http.stream("GET", f"/orgs/{self.org}/bootstrap/{entity}") as response:
            if response.status_code != 200:
                body = await response.aread()
                raise RuntimeError(
                    f"bootstrap {self.org}/{entity}: {response.status_code} {body[:300]!r}"
                )
            async for line in response.aiter_lines():
                if not line:
                    continue
                record = orjson.loads(line)
                if "$done" in record:
                    token = record["token"]
                elif "$must_bootstrap" in record:
                    raise RuntimeError(f"bootstrap {self.org}/{entity}: {record!r}")
                elif not any(k.startswith("$") for k in record):
                    rows[int(record["id"])] = (int(record["seq"]), record["written_at"])
        if token is None:
            raise RuntimeError(f"bootstrap {self.org}/{entity} ended without $done")
        received = time.time()
        held = self.rows[entity]
        if seen is not None:
            for key, (seq, written_at) in rows.items():
                if seq > 0 and held.get(key) != seq:
                    written = datetime.fromisoformat(written_at).timestamp()
                    seen.add(written, received - written)
        self.rows[entity] = {key: seq for key, (seq, _) in rows.items()}
        self.tokens[entity] = token
        return len(rows)

    async def run(self, seen: Latencies) -> None:
        """Long-poll forever, following tokens; every new version's latency goes to ``seen``.
        An entity answered ``must_bootstrap`` (e.g. a new capture epoch) is bootstrapped again,
        as a device does, and counted."""
        answered = time.perf_counter()
        while True:
            body = orjson.dumps({"tokens": self.tokens, "wait": WAIT_S})
            response = await _post(
                self.http, f"/orgs/{self.org}/sync", body, self.retries, answered
            )
            content = response.content
            received = time.time()
            answered = time.perf_counter()
            if response.status_code != 200:
                raise RuntimeError(f"sync {self.org}: {response.status_code} {content[:300]!r}")
            self.requests += 1
            for result in orjson.loads(content)["entities"]:
                entity = result["entity"]
                if result["control"] == "must_bootstrap":
                    self.rebootstraps.append(f"{entity}: {result['reason']}")
                    await self.bootstrap_entity(entity, seen)
                    continue
                if result["control"] is not None or result["removes"]:
                    raise RuntimeError(f"sync {self.org}/{entity}: unexpected {result!r:.300}")
                rows = self.rows[entity]
                for row in result["upserts"]:
                    key, seq = int(row["id"]), int(row["seq"])
                    if rows.get(key) == seq:
                        self.duplicates += 1
                        continue
                    rows[key] = seq
                    if seq > 0:  # probes (negative) and prefilled rows (0) are not measured
                        written = datetime.fromisoformat(row["written_at"]).timestamp()
                        seen.add(written, received - written)
                self.tokens[entity] = result["token"]


def _client_options(url: str, jwt: str) -> dict[str, Any]:
    return {
        "base_url": url,
        "headers": {
            "authorization": f"Bearer {jwt}",
            "accept-encoding": "identity",
            "content-type": "application/json",
        },
        "limits": httpx.Limits(max_connections=1, max_keepalive_connections=1),
        "timeout": httpx.Timeout(WAIT_S + 60, connect=30),
        "verify": _tls(),
    }


# -- one configuration ---------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # wall clock
    confirmed: dict[str, int | None]  # org -> slot's confirmed_flush_lsn
    consumed: int  # projector's counted messages, every org
    delivered: int  # versions the devices received


@dataclass
class Measured:
    """Everything one configuration measured, before it becomes Results."""

    config: Config
    seconds: float
    writer: dict[str, Any]
    seen: Latencies
    samples: list[Sample]
    devices: list[Device]
    probes_ms: list[float]
    drain_s: float | None
    undelivered: int
    phases: dict[str, float]
    load: dict[str, float]
    partitions: int
    fetch_wake: dict[str, Any] = field(default_factory=dict)


def _env(bootstrap: str, staging: str, workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env.update(
        FIELDSYNC_BOOTSTRAP_SERVERS=bootstrap,
        FIELDSYNC_STAGING_DSN=staging,
        FIELDSYNC_DATA_DIR=str(workdir),
        FIELDSYNC_PRODUCER_IDEMPOTENCE="false",
        FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S="5",
        FIELDSYNC_BROKER_SESSION_TIMEOUT_S="10",
        FIELDSYNC_BROKER_HEARTBEAT_INTERVAL_S="1",
        FIELDSYNC_CONSUMER_FETCH_MAX_WAIT_MS="100",  # the embedded broker holds a fetch the wait
        FIELDSYNC_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def _check(processes: Mapping[str, tuple[subprocess.Popen[bytes], Path]]) -> None:
    for name, (process, log) in processes.items():
        if process.poll() is not None:
            raise _fail(f"{name} exited with {process.returncode}", log)


def _wait(
    what: str,
    ready: Callable[[], tuple[bool, str]],
    processes: Mapping[str, tuple[subprocess.Popen[bytes], Path]],
    timeout_s: float = SETUP_TIMEOUT_S,
) -> float:
    """Poll ``ready()`` -> (done, progress) until done; a process that exits or the timeout
    fails the run. The progress is printed every 15 s."""
    started = time.perf_counter()
    told = started
    while True:
        done, progress = ready()
        if done:
            return time.perf_counter() - started
        _check(processes)
        now = time.perf_counter()
        if now - started > timeout_s:
            raise RuntimeError(f"{what} not reached within {timeout_s:.0f}s ({progress})")
        if now - told > 15:
            print(f"bench: e2e waiting for {what}: {progress}", file=sys.stderr, flush=True)
            told = now
        time.sleep(0.2)


@contextlib.contextmanager
def _broker(ctx: BenchContext, workdir: Path) -> Iterator[str]:
    """A private embedded broker per configuration, or the run's external one."""
    if not getattr(ctx.services, "embedded_broker", True):
        yield ctx.services.bootstrap_servers
        return
    from engine.runtime.embedded import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), workdir / "broker.log")
    try:
        yield broker.start()
    finally:
        broker.stop()


FAUST_FETCH_MAX_WAIT_MS = 1500  # faust's aiokafka driver's default


async def _fetch_wake(bootstrap: str, fetch_max_wait_ms: int, messages: int = 30) -> list[float]:
    """Seconds from a message's produce acknowledgement to a waiting consumer receiving it, one
    message every 50 ms: how long the broker holds a fetch that had no data when it arrived."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from engine.streams.topics import TopicAdmin

    topic = f"bench.e2e.fetch{fetch_max_wait_ms}.{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        fetch_max_wait_ms=fetch_max_wait_ms,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    admin = TopicAdmin(bootstrap, partitions=1, replication_factor=1)
    try:
        admin.ensure([topic])
    finally:
        admin.close()
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"-1")
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.getmany(timeout_ms=2000)
        acked: dict[int, float] = {}
        latencies: list[float] = []

        async def read() -> None:
            while len(latencies) < messages:
                batches = await consumer.getmany(timeout_ms=5000)
                now = time.perf_counter()
                for records in batches.values():
                    for record in records:
                        n = int(record.value or b"-1")
                        if n >= 0 and n in acked:
                            latencies.append(now - acked[n])

        reader = asyncio.create_task(read())
        for n in range(messages):
            await producer.send_and_wait(topic, str(n).encode())
            acked[n] = time.perf_counter()
            await asyncio.sleep(0.05)
        await asyncio.wait_for(reader, 30)
        return latencies
    finally:
        await consumer.stop()
        await producer.stop()


def broker_fetch_wake(bootstrap: str) -> dict[str, Any]:
    """p50/p99 (ms) of :func:`_fetch_wake` with faust's fetch wait and with a short one."""
    found: dict[str, Any] = {}
    for wait_ms in (FAUST_FETCH_MAX_WAIT_MS, 100):
        try:
            ordered = sorted(asyncio.run(_fetch_wake(bootstrap, wait_ms)))
        except Exception as error:  # context only: never fails the configuration
            found[f"fetch_max_wait_{wait_ms}ms"] = f"not measured: {type(error).__name__}"
            continue
        found[f"fetch_max_wait_{wait_ms}ms"] = {
            "p50_ms": round(percentile(ordered, 50) * 1000, 1),
            "p99_ms": round(percentile(ordered, 99) * 1000, 1),
        }
    return found


def run_config(ctx: BenchContext, config: Config, seconds: float, workdir: Path) -> Measured:
    from engine.projections.app import change_topics
    from engine.runtime.embedded import free_port
    from engine.streams.topics import change_topic

    run = uuid.uuid4().hex[:6]
    orgs = [f"e2e{run}_{n:03d}" for n in range(config.orgs)]
    phases: dict[str, float] = {}
    load = {"load_average_1m_start": os.getloadavg()[0]}
    jwt_secret = secrets.token_urlsafe(32)
    processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    fieldsync = str(Path(sys.executable).parent / "fieldsync")
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        bootstrap = stack.enter_context(_broker(ctx, workdir))
        staging = stack.enter_context(scratch_database(ctx.services.pg_dsn, "bench_e2e_staging"))
        sources = {
            org: stack.enter_context(scratch_database(ctx.services.pg_dsn, "bench_e2e_src"))
            for org in orgs
        }
        org_files = []
        for org, dsn in sources.items():
            create_source(dsn, config.rows_per_entity)
            path = workdir / f"{org}.yaml"
            path.write_text(
                yaml.safe_dump(
                    {
                        "org": org,
                        "source_dsn": dsn,
                        "entities": {e: f"public.{e}" for e in ENTITIES},
                        "offline": offline_config(),
                    }
                )
            )
            org_files += ["--org-file", str(path)]
        phases["sources"] = time.perf_counter() - started
        fetch_wake = broker_fetch_wake(bootstrap)

        port = free_port()
        env = _env(
            bootstrap,
            staging,
            workdir,
            FIELDSYNC_PROJECTOR_GROUP=f"bench-e2e-{run}",
            FIELDSYNC_GATEWAY_PORT=str(port),
            FIELDSYNC_GATEWAY_JWT_SECRET=jwt_secret,
            FIELDSYNC_GATEWAY_TOKEN_SECRET=secrets.token_urlsafe(32),
            FIELDSYNC_GATEWAY_METRICS_ENABLED="true",
            FIELDSYNC_GATEWAY_MAX_WAIT_S=str(2 * WAIT_S),
            FIELDSYNC_TOPIC_PARTITIONS=str(config.partitions),
        )

        def start(name: str, *args: str) -> None:
            log = workdir / f"{name}.log"
            processes[name] = (stack.enter_context(_process([fieldsync, *args], env, log)), log)

        started = time.perf_counter()
        start("capture", "capture", *org_files)
        topics = {change_topic(org, e) for org in orgs for e in ENTITIES}

        def topics_ready() -> tuple[bool, str]:
            found = len(topics & set(change_topics(bootstrap)))
            return found == len(topics), f"{found} of {len(topics)} topics"

        phases["capture_topics"] = _wait("every change topic", topics_ready, processes)
        for n in range(1, config.workers + 1):
            start(f"projector-{n}", "projector", *org_files)
        prefill = config.rows_per_entity * len(ENTITIES) * config.orgs
        consumed_sql = "SELECT coalesce(sum(consumed), 0) FROM fieldsync_control.projection_counts"

        def consumed() -> int:
            with psycopg.connect(staging, autocommit=True) as conn:
                if conn.execute(
                    "SELECT to_regclass('fieldsync_control.projection_counts')"
                ).fetchone() == (None,):
                    return 0
                row = conn.execute(consumed_sql).fetchone()
                return int(row[0]) if row else 0

        def projected() -> tuple[bool, str]:
            done = consumed()
            return done >= prefill, f"{done} of {prefill} snapshot rows projected"

        phases["snapshot_projected"] = _wait(
            "the snapshot projected", projected, processes, config.setup_timeout_s
        )
        start("gateway", "gateway", *org_files)
        url = f"http://127.0.0.1:{port}"

        def gateway_ready() -> tuple[bool, str]:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"{url}/readyz", timeout=2, verify=_tls()).status_code
                return status == 200, f"/readyz {status}"
            return False, "not listening"

        phases["gateway_ready"] = _wait(
            "gateway ready", gateway_ready, processes, config.setup_timeout_s
        )

        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            measured = runner.run(
                _measure(
                    config, seconds, orgs, sources, staging, url, jwt_secret, workdir,
                    processes, phases,
                )
            )  # fmt: skip
        load["load_average_1m_end"] = os.getloadavg()[0]
        measured.load = load
        measured.partitions = _partitions(bootstrap, topics)
        measured.fetch_wake = fetch_wake
        _check(processes)
    return measured


def _partitions(bootstrap: str, topics: set[str]) -> int:
    from kafka import KafkaAdminClient

    from engine.runtime.kafka import client_options

    admin = KafkaAdminClient(**client_options(), bootstrap_servers=bootstrap)
    try:
        described = admin.describe_topics(sorted(topics))
    finally:
        admin.close()
    return sum(len(d.get("partitions") or []) for d in described)


async def _measure(
    config: Config,
    seconds: float,
    orgs: list[str],
    sources: dict[str, str],
    staging: str,
    url: str,
    jwt_secret: str,
    workdir: Path,
    processes: Mapping[str, tuple[subprocess.Popen[bytes], Path]],
    phases: dict[str, float],
) -> Measured:
    seen = Latencies()
    samples: list[Sample] = []
    async with contextlib.AsyncExitStack() as stack:
        devices = []
        for org in orgs:
            jwt = mint(org, f"device-{org}", [ROLE], jwt_secret)
            http = await stack.enter_async_context(httpx.AsyncClient(**_client_options(url, jwt)))
            devices.append(Device(org, http))
        monitor = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=30, verify=_tls())
        )
        started = time.perf_counter()
        await asyncio.gather(*(d.bootstrap() for d in devices))
        phases["devices_bootstrap"] = time.perf_counter() - started

        tasks = [asyncio.create_task(d.run(seen), name=f"device-{d.org}") for d in devices]
        stack.push_async_callback(_cancel, tasks)

        def healthy() -> None:
            _check(processes)
            for task in tasks:
                if task.done():
                    task.result()  # raises the device's error
                    raise RuntimeError(f"{task.get_name()} stopped")

        started = time.perf_counter()
        while _gauge((await monitor.get("/metrics")).text) < len(devices):
            healthy()
            if time.perf_counter() - started > 60:
                raise RuntimeError(f"the {GAUGE} gauge never reached {len(devices)}")
            await asyncio.sleep(0.1)
        phases["devices_parked"] = time.perf_counter() - started

        conns = {
            org: await stack.enter_async_context(await _source_connection(dsn))
            for org, dsn in sources.items()
        }
        started = time.perf_counter()
        probes_ms = []
        for n in range(1, PROBES + 1):
            probe_started = time.perf_counter()
            for conn in conns.values():
                await conn.execute(
                    "INSERT INTO public.e01 VALUES (%s, %s, clock_timestamp(), 0, 0, 'probe')",
                    (-n, -n),
                )
            while not all(d.rows["e01"].get(-n) == -n for d in devices):
                healthy()
                if time.perf_counter() - probe_started > SETUP_TIMEOUT_S:
                    raise RuntimeError(f"probe {n} did not reach every device")
                await asyncio.sleep(0.01)
            probes_ms.append(round((time.perf_counter() - probe_started) * 1000, 1))
        phases["probes"] = time.perf_counter() - started

        counts = await stack.enter_async_context(
            await psycopg.AsyncConnection.connect(staging, autocommit=True)
        )
        slots = {f"fieldsync_{org}": org for org in orgs}

        async def sample() -> None:
            rows = await (
                await counts.execute(
                    "SELECT slot_name, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint"
                    " FROM pg_replication_slots WHERE slot_name = ANY(%s)",
                    (list(slots),),
                )
            ).fetchall()
            confirmed: dict[str, int | None] = dict.fromkeys(orgs)
            for slot, lsn in rows:
                confirmed[slots[slot]] = None if lsn is None else int(lsn)
            row = await (
                await counts.execute(
                    "SELECT coalesce(sum(consumed), 0) FROM fieldsync_control.projection_counts"
                )
            ).fetchone()
            consumed = int(row[0]) if row else 0
            samples.append(Sample(time.time(), confirmed, consumed, len(seen.latency)))

        async def sampler() -> None:
            while True:
                await sample()
                healthy()
                await asyncio.sleep(SAMPLE_EVERY_S)

        sampling = asyncio.create_task(sampler())
        stack.push_async_callback(_cancel, [sampling])

        plan_path, out_path = workdir / "writer-plan.json", workdir / "writer-out.json"
        plan_path.write_text(
            json.dumps(
                {
                    "orgs": [
                        {"org": o, "dsn": sources[o], "rows_per_entity": config.rows_per_entity}
                        for o in orgs
                    ],
                    "rate": config.rate,
                    "duration_s": seconds,
                    "tick_s": TICK_S,
                    "seed": 17,
                    "start_at": time.time() + 2.0,  # the process has started and connected
                }
            )
        )
        log = workdir / "writer.log"
        with log.open("wb") as out:
            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.e2e", "write", "--plan", str(plan_path),
                "--out", str(out_path), stdout=out, stderr=subprocess.STDOUT,
                cwd=Path(__file__).parents[1],
            )  # fmt: skip
        try:
            while writer.returncode is None:
                if sampling.done():
                    sampling.result()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(writer.wait(), 0.5)
        finally:
            if writer.returncode is None:
                writer.kill()
                await writer.wait()
        if writer.returncode != 0:
            raise _fail(f"the writer exited with {writer.returncode}", log)
        written = json.loads(out_path.read_text())

        # drain: every source row's final version must reach its device
        expected = await _final_versions(conns)
        deadline_s = max(60.0, 2 * seconds)
        drain_started = time.time()
        drain_s: float | None = None
        while missing := _missing(devices, expected):
            if time.time() - drain_started > deadline_s:
                break
            if sampling.done():
                sampling.result()
            await asyncio.sleep(0.2)
        else:
            drain_s = time.time() - written["end"]
        await sample()
        cut = time.time()
        for org, entity, key in missing:  # not received by the deadline: a lower bound
            seq, written_at = expected[org][entity][key]
            if seq > 0:
                seen.add(written_at, cut - written_at)
                seen.censored += 1
    return Measured(
        config=config,
        seconds=seconds,
        writer=written,
        seen=seen,
        samples=samples,
        devices=devices,
        probes_ms=probes_ms,
        drain_s=drain_s,
        undelivered=len(missing),
        phases=phases,
        load={},
        partitions=0,
    )


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


Versions = dict[str, dict[str, dict[int, tuple[int, float]]]]  # org -> entity -> key -> (seq, t)


async def _final_versions(conns: Mapping[str, psycopg.AsyncConnection[Any]]) -> Versions:
    """Every source row's final ``seq`` and ``written_at`` (epoch seconds)."""
    found: Versions = {}
    for org, conn in conns.items():
        found[org] = {}
        for entity in ENTITIES:
            cursor = await conn.execute(
                sql.SQL("SELECT id, seq, extract(epoch FROM written_at)::float8 FROM {}").format(
                    sql.Identifier("public", entity)
                )
            )
            found[org][entity] = {int(k): (int(s), float(w)) for k, s, w in await cursor.fetchall()}
    return found


def _missing(devices: Sequence[Device], expected: Versions) -> list[tuple[str, str, int]]:
    """(org, entity, key) of every source row whose final version a device does not hold."""
    missing = []
    for device in devices:
        for entity, rows in expected[device.org].items():
            held = device.rows[entity]
            missing += [(device.org, entity, k) for k, (s, _) in rows.items() if held.get(k) != s]
    return missing


# -- results -------------------------------------------------------------------------------------


def stage_counts(measured: Measured) -> dict[str, tuple[list[float], list[float]]]:
    """Per downstream stage, its cumulative count (of this window's changes) at each sample."""
    marks = {
        org: [(int(lsn), int(n)) for lsn, n in m] for org, m in measured.writer["marks"].items()
    }
    times = [s.at for s in measured.samples]
    captured = [
        float(sum(captured_count(marks[org], lsn) for org, lsn in s.confirmed.items()))
        for s in measured.samples
    ]
    start = measured.writer["start"]
    before = count_at(times, [float(s.consumed) for s in measured.samples], start)
    projected = [s.consumed - before for s in measured.samples]
    return {"captured": (times, captured), "projected": (times, projected)}


def results(measured: Measured) -> list[Result]:
    config, writer, seen = measured.config, measured.writer, measured.seen
    start, end = float(writer["start"]), float(writer["end"])
    window = end - start
    written = int(writer["written"])
    received = sorted(w + lat for w, lat in zip(seen.written, seen.latency, strict=True))
    delivered_total = len(received) - seen.censored
    at_end = {"written": float(written), "delivered": float(bisect_left(received, end + 1e-9))}
    for stage, (times, counts) in stage_counts(measured).items():
        at_end[stage] = count_at(times, counts, end)
    rates = {
        stage: round(at_end[stage] / window, 1)
        for stage in ("written", "captured", "projected", "delivered")
    }
    backlog = {
        "capture": round(at_end["written"] - at_end["captured"]),
        "projector": round(at_end["captured"] - at_end["projected"]),
        "gateway_and_device": round(at_end["projected"] - at_end["delivered"]),
    }
    summary = seen.summary()
    load = {k: round(v, 2) for k, v in measured.load.items()}
    common: dict[str, Any] = {
        "config": config.name,
        "orgs": config.orgs,
        "entities_per_org": len(ENTITIES),
        "projector_workers": config.workers,
        "rate_per_s": config.rate,
        "seconds": round(window, 2),
        "partitions": measured.partitions,
        "prefill_rows": config.rows_per_entity * len(ENTITIES) * config.orgs,
        **load,
    }
    latency_details = {
        **common,
        **summary,
        "p99_ms_by_10s_of_writes": seen.p99_by_bucket(start, BUCKET_S),
        "stages_per_s": rates,
        "backlog_at_window_end": backlog,
        "backlog_at_window_end_s": round(sum(backlog.values()) / (written / window), 1),
        "drain_s": None if measured.drain_s is None else round(measured.drain_s, 2),
        "converged": measured.drain_s is not None,
        "undelivered_at_deadline": measured.undelivered,
        "written": written,
        "delivered_versions": delivered_total,
        "superseded_before_delivery": written - delivered_total - seen.censored,
        "writer_transactions": writer["transactions"],
        "writer_behind_ticks": writer["behind_ticks"],
        "writer_behind_max_s": writer["behind_max_s"],
        "device_requests": sum(d.requests for d in measured.devices),
        "device_duplicates": sum(d.duplicates for d in measured.devices),
        "transport_retries": sum(len(d.retries) for d in measured.devices),
        "device_rebootstraps": [f"{d.org}/{r}" for d in measured.devices for r in d.rebootstraps],
        "probes_ms": measured.probes_ms,
        "broker_fetch_wake": measured.fetch_wake,
        "phases_s": {k: round(v, 2) for k, v in measured.phases.items()},
        "samples": f"every {max(1, math.ceil(summary['n'] / SAMPLE_CAP))}th change in write order",
    }
    ordered = seen.in_write_order()
    return [
        Result(
            bench=BENCH,
            metric=f"e2e_p99_ms{config.suffix}",
            unit="ms",
            value=summary["p99_ms"],
            target=Target(TARGET_MS, of="value", op="<=") if config.judged else None,
            details=latency_details,
            samples=stride_sample(ordered, SAMPLE_CAP),
        ),
        Result(
            bench=BENCH,
            metric=f"delivered_per_s{config.suffix}",
            unit="changes/s",
            value=rates["delivered"],
            baseline=Baseline("written", rates["written"]),
            details={
                **common,
                "stages_per_s": rates,
                "backlog_at_window_end": backlog,
                "drain_s": latency_details["drain_s"],
                "p99_ms": summary["p99_ms"],
            },
        ),
    ]


@benchmark(BENCH)
def e2e(ctx: BenchContext) -> Iterator[Result]:
    seconds = _seconds(ctx.quick)
    failures = []
    for config in configurations(ctx.quick):
        workdir = Path(tempfile.mkdtemp(prefix=f"fieldsync-bench-e2e-{config.name}-"))
        print(
            f"bench: e2e {config.name}: {config.rate:g} changes/s, {config.orgs} org(s),"
            f" {config.workers} projector worker(s), {seconds:g}s (logs in {workdir})",
            file=sys.stderr,
            flush=True,
        )
        try:
            measured = run_config(ctx, config, seconds, workdir)
        except Exception as error:
            failures.append(f"{config.name}: {type(error).__name__}: {error}")
            print(f"bench: e2e {config.name} FAILED (logs kept in {workdir})", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        shutil.rmtree(workdir, ignore_errors=True)
        yield from results(measured)
    if failures:
        raise RuntimeError("configurations failed: " + " | ".join(failures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        _writer_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m bench.e2e write --plan … --out … (a helper process)")
