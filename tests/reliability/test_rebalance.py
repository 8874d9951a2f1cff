"""Fault 8: rebalances and a zombie projector.

Under load the projector group grows from one worker to three and shrinks back to one. In each
cycle one of the two new workers is a zombie: it stops itself (``SIGSTOP``, fault action
``before_db_commit:<n>:stop``) with a batch written to staging but not committed, and stays
stopped for longer than the session timeout. The group gives its partitions to the others;
PostgreSQL ends its idle transaction (``FIELDSYNC_PROJECTOR_IDLE_TRANSACTION_TIMEOUT_S``), which
releases the entities it had locked, so staging keeps advancing while it is stopped. Resumed
(``SIGCONT``), the zombie's commit fails and its retry finds every change of its batch already
stored: staging applies a change only above the position its key holds.

Asserted: staging advances while the zombie is stopped; the zombie's late commit was refused
(its log); staging equals the source, every change applied once, watermarks never went back,
and in every key's change log the source positions only increase with the version (no older
change overwrote a newer one).
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.capture_helpers import new_org
from tests.reliability.harness import Load, Pipeline, Proc, chaos_rounds, create_source
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record

ACCOUNTS, JOBS = 200, 2_000
SESSION_TIMEOUT_S = 6  # the harness's FIELDSYNC_BROKER_SESSION_TIMEOUT_S
IDLE_TRANSACTION_TIMEOUT_S = 3


def stopped(process: Proc) -> bool:
    assert process.popen is not None
    try:
        return psutil.Process(process.popen.pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def staging_total(pipeline: Pipeline) -> int:
    """Sum of the entities' watermarks: it grows whenever staging commits a change."""
    with psycopg.connect(pipeline.staging_dsn) as conn:
        row = conn.execute(
            f"SELECT coalesce(sum(version), 0) FROM org_{pipeline.org}._fs_entities"
        ).fetchone()
    return int(row[0]) if row else 0


def run_rebalance(database: str, broker: str, tmp: Path, cycles: int, seed: int) -> None:
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
        projector_env_extra={
            "FIELDSYNC_PROJECTOR_BATCH_SIZE": "200",
            "FIELDSYNC_PROJECTOR_IDLE_TRANSACTION_TIMEOUT_S": str(IDLE_TRANSACTION_TIMEOUT_S),
        },
    )
    load = Load(database, 200, base, ACCOUNTS, JOBS)
    paused: list[float] = []
    advanced: list[int] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        with WatermarkSampler(database, org) as sampler, pipeline.supervisor():
            load.start()
            for _ in range(cycles):
                fault = f"before_db_commit:{rng.randint(3, 10)}:stop"
                extra = [
                    pipeline.add_projector(),
                    pipeline.add_projector({"FIELDSYNC_FAULT_POINT": fault}),
                ]  # 1 → 3
                zombie = extra[1]
                deadline = time.monotonic() + 120
                while not stopped(zombie):
                    assert time.monotonic() < deadline, f"zombie never stopped\n{zombie.tail()}"
                    time.sleep(0.1)
                before = staging_total(pipeline)
                pause = SESSION_TIMEOUT_S + rng.uniform(3, 10)
                time.sleep(pause)
                advanced.append(staging_total(pipeline) - before)
                assert advanced[-1] > 0, "staging stood still while the zombie was stopped"
                zombie.signal(signal.SIGCONT)
                paused.append(pause)
                time.sleep(10)
                with pipeline.lock:  # 3 → 1 (the supervisor leaves them stopped)
                    pipeline.projectors = [pipeline.projectors[0]]
                for process in extra:
                    process.stop(30)
                log = zombie.log.read_text(errors="replace")
                assert re.search(r"batch not applied \(.*(idle|closed|terminat)", log), (
                    f"the zombie's late commit was not refused\n{zombie.tail()}"
                )
                time.sleep(5)
            load.stop()
            converged = pipeline.wait_converged(300)
        sampler.assert_never_back()
        watermarks = pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        pipeline.stop()
    record(
        "rebalance_zombie",
        cycles=cycles,
        paused_s=[round(p, 1) for p in paused],
        staging_versions_while_stopped=advanced,
        changes=load.changes,
        staging_converged_s=round(converged, 2),
        watermarks=watermarks,
        exits_restarted={p.name: p.exits for p in pipeline.processes},
    )


@pytest.mark.timeout(600)
def test_scale_1_3_1_with_a_stopped_zombie_quick(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    run_rebalance(fresh_database, fresh_broker, tmp_path, cycles=1, seed=80)


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_scale_1_3_1_with_a_stopped_zombie(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    run_rebalance(fresh_database, fresh_broker, tmp_path, cycles=chaos_rounds(20) // 5, seed=81)
