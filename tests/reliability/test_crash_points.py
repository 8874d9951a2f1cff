"""Fault 2: the projector's crash-point matrix.

The worker exits abruptly (``FIELDSYNC_FAULT_POINT``, ``engine/projections/faults.py``) at one of
three points of a batch, on a random batch, while the source changes:

* ``before_db_commit`` — rows written, the staging transaction not committed;
* ``before_offset_commit`` — staging committed, the batch's offsets not acknowledged;
* ``after_offset_commit`` — offsets committed to the broker.

After each crash it starts again (armed at another random batch); after the runs of every point
it runs unarmed. Staging then equals the source, every change was applied once (the change log
is gap-free and holds no change twice, consumed = applied + duplicates) and no watermark ever
went back. 10 runs per point (FIELDSYNC_CHAOS_RUNS), in make chaos only.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from engine.projections.faults import EXIT_CODE, POINTS
from tests.capture_helpers import new_org
from tests.reliability.harness import Load, Pipeline, create_source, env_int
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record, summary

ACCOUNTS, JOBS = 200, 2_000


def run_crash_points(database: str, broker: str, tmp: Path, runs: int, seed: int) -> None:
    rng = random.Random(seed)
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    pipeline = Pipeline(
        tmp,
        source_dsn=database,
        staging_dsn=database,
        bootstrap=broker,
        org=org,
        gateway=False,
        projector_env_extra={"FIELDSYNC_PROJECTOR_BATCH_SIZE": "200"},
    )
    worker = pipeline.projectors[0]
    load = Load(database, 150, base, ACCOUNTS, JOBS)
    crashes: dict[str, int] = dict.fromkeys(POINTS, 0)
    restarts: list[float] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        with WatermarkSampler(database, org) as sampler:
            load.start()
            for point in POINTS:
                for _ in range(runs):
                    worker.kill()
                    worker.env["FIELDSYNC_FAULT_POINT"] = f"{point}:{rng.randint(2, 8)}"
                    worker.start()
                    started = time.monotonic()
                    assert worker.popen is not None
                    code = worker.popen.wait(300)
                    assert code == EXIT_CODE, f"{point}: exit {code}\n{worker.tail()}"
                    restarts.append(time.monotonic() - started)
                    crashes[point] += 1
            worker.env.pop("FIELDSYNC_FAULT_POINT")
            worker.start()
            time.sleep(2)
            load.stop()
            converged = pipeline.wait_converged(300)
        sampler.assert_never_back()
        watermarks = pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        pipeline.stop()
    log = worker.log.read_text(errors="replace")
    for point in POINTS:
        assert log.count(f"fault point {point} reached") == crashes[point] == runs
    record(
        "crash_point_matrix",
        runs_per_point=runs,
        crashes=crashes,
        changes=load.changes,
        start_to_crash=summary(restarts),
        staging_converged_s=round(converged, 2),
        watermarks=watermarks,
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_projector_crash_points_10_runs_each(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    run_crash_points(
        fresh_database, fresh_broker, tmp_path, runs=env_int("FIELDSYNC_CHAOS_RUNS", 10), seed=32
    )
