"""``capture``: source commit → broker-acknowledged Debezium-Avro message, changes/s.

200k single-row UPDATEs of a 10-column table (20k with ``--quick``), captured by a real
:class:`CaptureTask` into the embedded broker. Baseline ``raw_decode``: the rate at which
``pg_logical_slot_peek_binary_changes`` returns the same changes, measured on the same slot in
the same run (peek does not consume, so both read identical WAL).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

from pydantic import SecretStr

from bench.harness import Baseline, BenchContext, Result, Target, benchmark
from bench.raw_decode import make_update_workload, measure_raw_decode_runs
from bench.services import scratch_database
from engine.config import load_settings
from engine.streams.capture import CaptureTask
from engine.streams.spec import CaptureSpec

TABLE = "field_visit"


@benchmark("capture")
def capture(ctx: BenchContext) -> Iterator[Result]:
    updates = 20_000 if ctx.quick else 200_000
    rows = updates // 2
    org = f"bench{uuid.uuid4().hex[:8]}"
    settings = load_settings(topic_partitions=3)
    with scratch_database(ctx.services.pg_dsn, "bench_capture") as dsn, asyncio.Runner() as runner:
        spec = CaptureSpec(
            org=org, source_dsn=SecretStr(dsn), entities={"visit": f"public.{TABLE}"}
        )
        task = CaptureTask(spec, settings, ctx.services.bootstrap_servers)

        def start_capture() -> None:  # slot + snapshot of the filled table, before the updates
            runner.run(task.start())

        try:
            make_update_workload(
                dsn, TABLE, rows=rows, updates=updates, before_updates=start_capture
            )
            baseline = measure_raw_decode_runs(dsn, spec.slot_name, spec.publication, updates)
            events_before = task.stats.events
            started = time.perf_counter()
            runner.run(task.catch_up())
            elapsed = time.perf_counter() - started
        finally:
            runner.run(task.close())
    captured = task.stats.events - events_before
    if captured != updates:
        raise RuntimeError(f"capture produced {captured} events for {updates} updates")
    yield Result(
        bench="capture",
        metric="changes_per_s",
        unit="changes/s",
        value=updates / elapsed,
        baseline=Baseline("raw_decode", baseline.median),
        target=Target(0.06),
        details={
            "updates": updates,
            "rows": rows,
            "columns": 10,
            "partitions": 3,
            "elapsed_s": round(elapsed, 3),
            "batches": task.stats.batches,
            "raw_decode_runs": [round(r, 1) for r in baseline.rates],
        },
    )
