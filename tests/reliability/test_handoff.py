"""Fault 9: snapshot → delta hand-off. A device bootstraps a large view while the source changes
at a high rate, then follows deltas: it ends equal to its view, with nothing missing or doubled.

The bootstrap stream is recorded: no key may come twice in it. 50k rows under ~1k row changes/s:
a chaos scenario only (make chaos).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.capture_helpers import new_org
from tests.reliability.harness import Device, Load, Pipeline, create_source, devices_converge
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record


class BootstrapRecorder:
    """Keys a device's bootstrap streams delivered, per entity, and the watermark each ended at."""

    def __init__(self, device: Device) -> None:
        store = device.client.store
        self.keys: dict[str, list[Any]] = {}
        self.finished: dict[str, int] = {}
        begin, page, finish = (
            store.begin_bootstrap,
            store.add_bootstrap_page,
            store.finish_bootstrap,
        )

        def on_begin(entity: str) -> None:
            self.keys[entity] = []
            begin(entity)

        def on_page(entity: str, rows: Any, cursor: str) -> None:
            self.keys.setdefault(entity, []).extend(r["id"] for r in rows)
            page(entity, rows, cursor)

        def on_finish(entity: str, rows: Any, token: str, watermark: int) -> None:
            self.keys.setdefault(entity, []).extend(r["id"] for r in rows)
            self.finished[entity] = watermark
            finish(entity, rows, token, watermark)

        store.begin_bootstrap = on_begin  # type: ignore[method-assign]
        store.add_bootstrap_page = on_page  # type: ignore[method-assign]
        store.finish_bootstrap = on_finish  # type: ignore[method-assign]

    def assert_nothing_doubled(self) -> None:
        for entity, keys in self.keys.items():
            doubled = len(keys) - len(set(keys))
            assert doubled == 0, f"{entity}: {doubled} keys came twice in one bootstrap"


def _watermark(dsn: str, org: str, entity: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT version FROM org_{org}._fs_entities WHERE entity = %s", (entity,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def run_handoff(database: str, broker: str, tmp: Path, *, rows: int, rate: float) -> None:
    org = new_org()
    accounts = 500
    base = create_source(database, accounts, rows + rows // 5)
    with psycopg.connect(database, autocommit=True) as conn:  # d1's team owns `rows` jobs
        conn.execute("UPDATE src.job SET owner_id = 'team-a' WHERE id <= %s", (rows,))
        conn.execute("UPDATE src.job SET owner_id = 'team-b' WHERE id > %s", (rows,))
    pipeline = Pipeline(
        tmp, source_dsn=database, staging_dsn=database, bootstrap=broker, org=org, page_rows=1000
    )
    load = Load(database, rate, base, accounts, rows + rows // 5, spread=10)
    devices: list[Device] = []
    try:
        pipeline.start()
        pipeline.wait_converged(600)
        devices = [Device(pipeline.url, org, u, tmp) for u in ("d1", "u1")]
        recorders = [BootstrapRecorder(d) for d in devices]
        with WatermarkSampler(database, org) as sampler:
            load.start()
            time.sleep(2)
            before = _watermark(database, org, "job")
            changes_before = load.changes
            started = time.monotonic()
            devices[0].sync()  # bootstrap, then deltas until caught up with the moving source
            bootstrap_s = time.monotonic() - started
            changes_during = load.changes - changes_before
            during = _watermark(database, org, "job") - before
            for device in devices[1:]:
                device.sync()
            for device in devices:
                device.start_loop(wait=1.0, pause=0.2)  # then follow deltas under load
            time.sleep(8)
            load.stop()
            stopped = time.monotonic()
            pipeline.wait_converged(300)
            for device in devices:
                device.stop_loop()
            seconds = devices_converge(devices, database, 180)
            converged = time.monotonic() - stopped
        sampler.assert_never_back()
        pipeline.oracle.assert_applied_once()
    finally:
        load.stop()
        for device in devices:
            device.close()
        pipeline.stop()
    for recorder in recorders:
        recorder.assert_nothing_doubled()
    bootstrapped = len(recorders[0].keys.get("job", []))
    assert bootstrapped >= rows * 0.9, bootstrapped  # the big view really was bootstrapped
    assert during > 0, "the source changed while the device bootstrapped"
    record(
        "snapshot_delta_handoff",
        rows_bootstrapped=bootstrapped,
        bootstrap_and_catch_up_s=round(bootstrap_s, 2),
        source_changes_during_bootstrap=changes_during,
        job_versions_during_bootstrap=during,
        write_rate=round(load.changes / max(stopped - started + 2, 1), 1),
        devices_converged_after_load_s=round(converged, 2),
        devices_s=seconds,
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_bootstrap_50k_under_1k_writes_per_second(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    run_handoff(fresh_database, fresh_broker, tmp_path, rows=50_000, rate=1000)
