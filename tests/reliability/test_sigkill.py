"""Fault 1: SIGKILL capture, projector and gateway at random moments under load.

Kills come 0.1-30 s apart (the quick variant: 0.1-4 s), a third of them in bursts of two to
four kills 0.1-1 s apart, on a random process each. The killed process starts again at once;
devices keep syncing through it all. After the last round the load stops and the oracle
checks: staging's digest equals the source's, every change was applied once, no watermark
ever went back, and every device holds exactly its user's view.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from tests.capture_helpers import new_org
from tests.reliability.harness import Device, Load, Pipeline, chaos_rounds, create_source
from tests.reliability.harness import devices_converge as converge_all
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record, summary

ACCOUNTS, JOBS = 300, 3_000


def _ready_check(pipeline: Pipeline, name: str) -> tuple[object, ...]:
    """What to compare against to tell that a restarted process works again."""
    process = pipeline.by_name(name)
    if name == "capture":
        return (process.log.read_text(errors="replace").count("streaming from"),)
    if name.startswith("projector"):
        return (pipeline.consumed(),)
    return ()


def _ready(pipeline: Pipeline, name: str, before: tuple[object, ...]) -> bool:
    if name == "capture":
        return pipeline.capture.log.read_text(errors="replace").count("streaming from") > int(
            before[0]  # type: ignore[call-overload]
        )
    if name.startswith("projector"):
        return pipeline.consumed() > int(before[0])  # type: ignore[call-overload]
    return pipeline.gateway_ready()


def run_sigkill(
    database: str,
    broker: str,
    tmp: Path,
    *,
    rounds: int,
    gap: tuple[float, float],
    rate: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    pipeline = Pipeline(tmp, source_dsn=database, staging_dsn=database, bootstrap=broker, org=org)
    devices: list[Device] = []
    load = Load(database, rate, base, ACCOUNTS, JOBS)
    recoveries: dict[str, list[float]] = {"capture": [], "projector": [], "gateway": []}
    kills: dict[str, int] = {"capture": 0, "projector": 0, "gateway": 0}
    monitors: list[threading.Thread] = []
    started = time.monotonic()
    try:
        pipeline.start()
        pipeline.wait_converged(180)  # the initial snapshot is in staging
        devices = [Device(pipeline.url, org, u, tmp).start_loop() for u in ("u1", "u2", "d1")]
        with WatermarkSampler(database, org) as sampler, pipeline.supervisor():
            load.start()
            time.sleep(2)
            for _ in range(rounds):
                time.sleep(rng.uniform(*gap))
                burst = rng.randint(2, 4) if rng.random() < 1 / 3 else 1
                for shot in range(burst):
                    if shot:
                        time.sleep(rng.uniform(0.1, 1.0))
                    name = rng.choice(["capture", "projector-0", "gateway"])
                    before = _ready_check(pipeline, name)
                    pipeline.restart(pipeline.by_name(name))
                    kind = name.split("-")[0]
                    kills[kind] += 1
                    restarted_at = time.monotonic()
                    starts = pipeline.by_name(name).starts

                    def watch(
                        name: str = name,
                        kind: str = kind,
                        before: tuple[object, ...] = before,
                        at: float = restarted_at,
                        starts: int = starts,
                    ) -> None:
                        process = pipeline.by_name(name)
                        while time.monotonic() - at < 180 and process.starts == starts:
                            if _ready(pipeline, name, before):
                                recoveries[kind].append(time.monotonic() - at)
                                return
                            time.sleep(0.1)

                    monitor = threading.Thread(target=watch, daemon=True)
                    monitor.start()
                    monitors.append(monitor)
            time.sleep(3)
            load.stop()
            for monitor in monitors:
                monitor.join(200)
            # the pipeline drains: capture catches up, the projector applies the rest
            converged = pipeline.wait_converged(300)
            for device in devices:
                device.stop_loop()
            device_seconds = converge_all(devices, database, 120)
        sampler.assert_never_back()
        watermarks = pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        for device in devices:
            device.close()
        pipeline.stop()
    unexpected = {p.name: p.exits for p in pipeline.processes if p.exits}
    for kind in ("capture", "projector", "gateway"):
        assert kills[kind] == 0 or recoveries[kind], f"{kind} never recovered after a kill"
    record(
        "sigkill",
        rounds=rounds,
        kills=kills,
        changes=load.changes,
        watermarks=watermarks,
        recovery={k: summary(v) for k, v in recoveries.items()},
        staging_converged_s=round(converged, 2),
        devices_converged_s={u: round(s, 2) for u, s in device_seconds.items()},
        device_sync_failures={d.user: d.failures for d in devices},
        exits_not_caused_by_a_kill=unexpected,
        watermark_samples=sampler.samples,
        duration_s=round(time.monotonic() - started, 1),
    )


def test_sigkill_under_load_quick(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    run_sigkill(
        fresh_database,
        fresh_broker,
        tmp_path,
        rounds=3,
        gap=(0.1, 4.0),
        rate=150,
        seed=11,
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_sigkill_under_load(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    run_sigkill(
        fresh_database,
        fresh_broker,
        tmp_path,
        rounds=chaos_rounds(20),
        gap=(0.1, 30.0),
        rate=300,
        seed=12,
    )
