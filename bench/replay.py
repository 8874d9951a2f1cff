"""``replay``: ``fieldsync replay`` — an org's staging rebuilt from its change topic, events/s.

Workload: ``bench.projector``'s — change events of a 10-column table over events/10 keys, 70%
updates, 20% inserts, 10% deletes, made on a real source table in transactions of 1000 and
captured by a real :class:`CaptureTask` into ``fieldsync.<org>.visit`` (3 partitions); every
delete adds a tombstone, so rates are *messages on the topic / seconds*. 1M events by default
(100k with ``--quick``; ``FIELDSYNC_BENCH_REPLAY_EVENTS`` sets another number).

Measured in this order, one at a time (client, servers and load share the machine), on a
private embedded broker (when the run's broker is embedded) and a scratch database:

* ``live_projector`` baseline: ONE ``fieldsync projector`` worker (``bench.projector``'s
  settings) on the same topic, timed from its first counted batch for ``WINDOW_S`` seconds and
  then stopped: it would need as many seconds as the topic has messages / its rate to finish,
  and its rate does not depend on how far it got (a window keeps the benchmark in its budget).
  Its staging then holds a prefix of the topic and its group has committed offsets.
* ``snapshot + tail``: a snapshot of that staging (``engine.snapshots``: rows at the watermark
  plus the group's offsets), then ``replay --from-snapshot --no-swap``: the snapshot's rows and
  the rest of the topic into the shadow schema, which must equal the source.
* ``replay``: the whole topic from the beginning into the shadow, swapped in (the partial
  staging of the projector goes); the new staging must equal the source. Wall time is the whole
  command (set-up, build, catch-up, swap); events/s divides the topic's messages by it.
* ``provision``: ``Provisioner.apply`` of a new org with 10 entities (topics, control state),
  against creating the same topics with ``TopicAdmin.ensure`` alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.harness import Baseline, BenchContext, Result, Target, benchmark
from bench.projector import (
    COLUMNS,
    ENTITY,
    POLL_S,
    TABLE,
    VALUE_NAMES,
    Batching,
    Timed,
    _fail,
    _process,
    capture_changes,
    create_table,
    make_changes,
    worker_env,
)
from bench.services import scratch_database

BENCH = "replay"
EVENTS_ENV = "FIELDSYNC_BENCH_REPLAY_EVENTS"
WINDOW_S = 45.0
QUICK_WINDOW_S = 20.0
PROVISION_ENTITIES = 10


def _events(quick: bool) -> int:
    raw = os.environ.get(EVENTS_ENV, "").strip()
    if raw:
        return int(raw)
    return 100_000 if quick else 1_000_000


@contextlib.contextmanager
def _broker(ctx: BenchContext, workdir: Path) -> Iterator[tuple[str, bool]]:
    """A private embedded broker (projectors subscribe to every change topic on theirs), or the
    run's external one."""
    if not getattr(ctx.services, "embedded_broker", True):
        yield ctx.services.bootstrap_servers, False
        return
    from engine.runtime.embedded import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), workdir / "broker.log")
    try:
        yield broker.start(), True
    finally:
        broker.stop()


def run_projector_window(
    dsn: str,
    bootstrap: str,
    org: str,
    messages: int,
    workdir: Path,
    window_s: float,
    *,
    batching: Batching | None = None,
    startup_s: float = 120,
    stall_s: float = 60,
) -> tuple[Timed, str]:
    """One ``fieldsync projector`` worker (uvloop, the shipped default) for ``window_s`` seconds
    after its first counted batch (or until it consumed everything); (timing, its group)."""
    group = f"bench-replay-projector-{uuid.uuid4().hex[:8]}"
    log = workdir / f"{group}.log"
    env = worker_env(bootstrap, dsn, group, batching or Batching())
    env["FIELDSYNC_PROJECTOR_UVLOOP"] = "true"
    cmd = [str(Path(sys.executable).parent / "fieldsync"), "projector"]
    query = (
        "SELECT coalesce(sum(consumed), 0) FROM fieldsync_control.projection_counts WHERE org = %s"
    )
    with psycopg.connect(dsn, autocommit=True) as conn, _process(cmd, env, log) as worker:
        started = time.perf_counter()
        first: tuple[int, float] | None = None
        progress = (0, started)
        batches = 0
        while True:
            now = time.perf_counter()
            row = conn.execute(query, (org,)).fetchone()
            consumed = int(row[0]) if row else 0
            if consumed and first is None:
                first = (consumed, now)
            if consumed != progress[0]:
                batches += 1 if progress[0] else 0
                progress = (consumed, now)
            if first is not None and (now - first[1] >= window_s or consumed >= messages):
                break
            if worker.poll() is not None:
                raise _fail(f"projector worker exited with {worker.returncode}", log)
            if now - progress[1] > (stall_s if first else startup_s):
                raise _fail(f"projector stalled at {consumed} of {messages} messages", log)
            time.sleep(POLL_S)
    if first is None or consumed == first[0]:
        raise RuntimeError("the projector counted no batch after its first one")
    return Timed(consumed, first[0], progress[1] - first[1], first[1] - started, batches), group


def differences(dsn: str, schema: str) -> int:
    """Rows that differ between the source table and the live rows of ``schema``'s entity."""
    columns = sql.SQL(", ").join(map(sql.Identifier, ["id", *VALUE_NAMES]))
    source = sql.SQL("SELECT {} FROM public.{}").format(columns, sql.Identifier(TABLE))
    staging = sql.SQL("SELECT {} FROM {}.{} WHERE NOT _fs_deleted").format(
        columns, sql.Identifier(schema), sql.Identifier(ENTITY)
    )
    query = sql.SQL(
        "SELECT count(*) FROM (({0} EXCEPT ALL {1}) UNION ALL ({1} EXCEPT ALL {0})) d"
    ).format(source, staging)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


def provision_times(dsn: str, bootstrap: str, entities: int) -> tuple[float, float]:
    """Seconds of ``Provisioner.apply`` for a new org with ``entities`` entities, and of
    ``TopicAdmin.ensure`` creating the same number of topics for another org."""
    from engine.config import load_settings
    from engine.provisioning.commands import command_from_document
    from engine.provisioning.lifecycle import Provisioner
    from engine.streams.topics import TopicAdmin, change_topic, dead_letter_topic, transaction_topic

    settings = load_settings(topic_partitions=3, producer_idempotence=False)
    names = [f"e{i:02d}" for i in range(entities)]
    org = f"prov{uuid.uuid4().hex[:8]}"
    document = {
        "org": org,
        "source_dsn": dsn,
        "entities": {name: f"public.t_{name}" for name in names},
    }
    command = command_from_document("provision", document)
    started = time.perf_counter()
    state = Provisioner(settings, bootstrap, dsn).apply(command)
    provision_s = time.perf_counter() - started
    if state != "active":
        raise RuntimeError(f"provisioning ended {state}")
    other = f"topics{uuid.uuid4().hex[:8]}"
    topics = [change_topic(other, n) for n in names]
    topics += [transaction_topic(other), dead_letter_topic(other)]
    started = time.perf_counter()
    admin = TopicAdmin(bootstrap, partitions=3, replication_factor=1)
    try:
        admin.ensure(topics)
    finally:
        admin.close()
    return provision_s, time.perf_counter() - started


@benchmark(BENCH)
def replay_bench(ctx: BenchContext) -> Iterator[Result]:
    from engine.config import load_settings
    from engine.projections.app import register_org
    from engine.projections.replay import replay, shadow_schema
    from engine.snapshots.build import build_snapshot
    from engine.snapshots.store import LocalDirectoryStore

    events = _events(ctx.quick)
    keys = max(1, events // 10)
    window_s = QUICK_WINDOW_S if ctx.quick else WINDOW_S
    org = f"bench{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="fieldsync-bench-replay-"))
    phases: dict[str, float] = {}
    settings = load_settings(producer_idempotence=False)
    try:
        with (
            _broker(ctx, workdir) as (bootstrap, private_broker),
            scratch_database(ctx.services.pg_dsn, "bench_replay") as dsn,
        ):
            started = time.perf_counter()
            workload = make_changes(events, keys)
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_table(conn, TABLE)
            messages, capture_s = capture_changes(dsn, bootstrap, org, workload.changes)
            phases["produce"] = time.perf_counter() - started
            register_org(dsn, org)

            started = time.perf_counter()
            live, group = run_projector_window(dsn, bootstrap, org, messages, workdir, window_s)
            phases["live_projector"] = time.perf_counter() - started

            started = time.perf_counter()
            store = LocalDirectoryStore(workdir / "snapshots")
            built = build_snapshot(
                dsn, org, ENTITY, store, group=group, bootstrap_servers=bootstrap
            )
            snapshot_build_s = time.perf_counter() - started
            phases["snapshot_build"] = snapshot_build_s
            if not built.manifest.kafka.offsets:
                raise RuntimeError(f"the snapshot has no offsets: {built.manifest.kafka.note}")
            started = time.perf_counter()
            seeded = replay(
                settings, bootstrap, dsn, org, swap=False, from_snapshot=True, snapshots=store
            )
            seeded_s = time.perf_counter() - started
            phases["replay_from_snapshot"] = seeded_s
            if differences(dsn, shadow_schema(org)):
                raise RuntimeError("the replay from the snapshot differs from the source")

            started = time.perf_counter()
            full = replay(settings, bootstrap, dsn, org)
            full_s = time.perf_counter() - started
            phases["replay"] = full_s
            if full.messages < messages:
                raise RuntimeError(f"the replay read {full.messages} of {messages} messages")
            if differences(dsn, f"org_{org}"):
                raise RuntimeError("the replayed staging differs from the source")

            provision_s, topics_s = provision_times(dsn, bootstrap, PROVISION_ENTITIES)
            phases["provision"] = provision_s + topics_s
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rate = messages / full_s
    details: dict[str, Any] = {
        "events": events,
        "messages": messages,
        "keys": keys,
        "ops": workload.ops,
        "final_rows": len(workload.final),
        "columns": 1 + len(COLUMNS),
        "partitions": 3,
        "batch_events": 50_000,
        "private_broker": private_broker,
        "replay_wall_s": round(full_s, 3),
        "replay_build_s": round(full.build_s, 3),
        "replay_build_events_per_s": round(full.rate, 1),
        "replay_catch_up_s": round(full.catch_up_s, 3),
        "replay_writers_held_s": round(full.locked_s, 4),
        "replay_applied": full.applied,
        "replay_skipped": full.skipped,
        "live_projector_window_s": round(live.elapsed_s, 3),
        "live_projector_messages_timed": live.messages - live.first,
        "live_projector_startup_s": round(live.startup_s, 3),
        "live_projector_mean_batch": round(live.mean_batch, 1),
        "capture_s": round(capture_s, 3),
        "staging_matches_source": True,
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "load_average_1m": os.getloadavg()[0],
    }
    yield Result(
        bench=BENCH,
        metric="events_per_s_vs_live_projector",
        unit="events/s",
        value=rate,
        baseline=Baseline("live_projector", live.rate),
        target=Target(2.0),
        details=details,
    )
    yield Result(
        bench=BENCH,
        metric="wall_s_vs_live_projector",
        unit="s",
        value=full_s,
        baseline=Baseline("live_projector_whole_topic", messages / live.rate),
        target=Target(0.5, op="<="),
        details={
            **details,
            "baseline_is": "the topic's messages / the live projector's rate in its window",
        },
    )
    yield Result(
        bench=BENCH,
        metric="from_snapshot_wall_s_vs_replay",
        unit="s",
        value=seeded_s,
        baseline=Baseline("replay_from_the_beginning", full_s),
        details={
            **details,
            "snapshot_rows": seeded.snapshot_rows,
            "snapshot_watermark": built.manifest.watermark,
            "tail_messages": seeded.messages,
            "snapshot_build_s": round(snapshot_build_s, 3),
            "from_snapshot_events_per_s": round(
                (seeded.snapshot_rows + seeded.messages) / seeded_s, 1
            ),
            "staging_matches_source": True,
        },
    )
    yield Result(
        bench=BENCH,
        metric="provision_10_entities_s_vs_topic_create",
        unit="s",
        value=provision_s,
        baseline=Baseline("topic_admin_ensure", topics_s),
        details={
            "entities": PROVISION_ENTITIES,
            "topics": PROVISION_ENTITIES + 2,
            "measures": "Provisioner.apply: topics, control state (no capture or projector)",
        },
    )
