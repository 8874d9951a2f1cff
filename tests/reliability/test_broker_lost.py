"""Fault 5: the broker restarts having lost its log (every topic, message and committed offset),
on the same port, while the source keeps changing.

Nobody intervenes: capture notices the loss and re-snapshots under a new capture epoch, the
projector follows the recreated topics from their start, staging drops what the source deleted
meanwhile, and devices re-bootstrap and converge.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from engine.runtime.embedded import EmbeddedBroker, free_port
from tests.capture_helpers import new_org
from tests.reliability.harness import (
    Device,
    Load,
    Pipeline,
    chaos_rounds,
    create_source,
    devices_converge,
)
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record, summary

ACCOUNTS, JOBS = 200, 2_000


def run_broker_lost(database: str, tmp: Path, rounds: int) -> None:
    broker = EmbeddedBroker(
        free_port(), Path(tempfile.mkdtemp(prefix="fieldsync-lost-")) / "broker.log"
    )
    broker.start()
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    pipeline = Pipeline(
        tmp,
        source_dsn=database,
        staging_dsn=database,
        bootstrap=broker.bootstrap_servers,
        org=org,
    )
    load = Load(database, 100, base, ACCOUNTS, JOBS)
    devices: list[Device] = []
    recoveries: list[float] = []
    device_recoveries: list[float] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        devices = [Device(pipeline.url, org, u, tmp) for u in ("u1", "d1")]
        devices_converge(devices, database, 60)
        with WatermarkSampler(database, org) as sampler, pipeline.supervisor():
            for _ in range(rounds):
                for device in devices:
                    device.controls.clear()
                    device.start_loop()
                load.start()
                time.sleep(3)
                broker.restart()  # memory storage: it comes back empty
                back = time.monotonic()
                time.sleep(4)  # the source keeps changing (deletes included) meanwhile
                load.stop()
                load = Load(database, 100, base, load.accounts, load.jobs, seed=load.seed + 1)
                pipeline.wait_converged(300)
                recoveries.append(time.monotonic() - back)
                for device in devices:
                    device.stop_loop()
                devices_converge(devices, database, 120)
                device_recoveries.append(time.monotonic() - back)
                for device in devices:  # every entity re-bootstrapped: the epoch changed
                    assert {e for e, _ in device.controls} == {"job", "account"}, device.controls
        sampler.assert_never_back()
        watermarks = pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        for device in devices:
            device.close()
        pipeline.stop()
        broker.stop()
    snapshots = pipeline.capture.log.read_text(errors="replace").count("taking an initial snapshot")
    lost = pipeline.capture.log.read_text(errors="replace").count("broker lost its log")
    assert snapshots == rounds + 1 and lost >= rounds, (snapshots, lost)
    record(
        "broker_lost_log",
        rounds=rounds,
        staging_converged=summary(recoveries),
        devices_converged=summary(device_recoveries),
        watermarks=watermarks,
        process_exits={p.name: p.exits for p in pipeline.processes},
    )


def test_broker_loses_its_log(fresh_database: str, tmp_path: Path) -> None:
    run_broker_lost(fresh_database, tmp_path, rounds=1)


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_broker_loses_its_log_repeatedly(fresh_database: str, tmp_path: Path) -> None:
    run_broker_lost(fresh_database, tmp_path, rounds=chaos_rounds(5))
