"""Fault 6: PostgreSQL out of reach, and PostgreSQL restarted.

Capture, projector and gateway reach PostgreSQL (source and staging) through a TCP proxy that
cuts every connection and refuses new ones for 5-30 s (the quick variant: once, 5 s), while the
application keeps writing to the source directly. After each cut, measured from the moment the
link is back: capture streams again, the projector applies again, the gateway is ready again, a
source change reaches staging — each within 10 s. While the database is out of reach the
projector's committed offsets do not move (no offset is committed past a database commit), and
at the end the oracle holds. The restart variant stops and starts a PostgreSQL of the test's own
under the running pipeline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka import KafkaAdminClient

from engine.runtime.embedded import EmbeddedPostgres, free_port
from tests.capture_helpers import new_org
from tests.reliability.harness import Device, Load, Pipeline, create_source, devices_converge
from tests.reliability.oracle import Oracle, WatermarkSampler
from tests.reliability.report import record, summary
from tests.reliability.tcp_proxy import CuttableProxy

ACCOUNTS, JOBS = 200, 2_000
PROBE = 9_999_999  # an account the load never touches
BOUND_S = 10.0  # "everything reconnects within 10 s of recovery"


def _via(dsn: str, port: int) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["port"] = str(port)
    info["connect_timeout"] = "5"
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def _committed(bootstrap: str) -> dict[tuple[str, int], int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets("fieldsync-projector")["fieldsync-projector"]
    finally:
        admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def _probe(dsn: str, org: str, key: int) -> Callable[[], bool]:
    """Write a marker into the source; the returned check tells when staging has it."""
    marker = f"probe {time.time()}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO src.account VALUES (%s, 'u2', %s)"
            " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
            (key, marker),
        )

    def arrived() -> bool:
        try:
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                row = conn.execute(
                    f"SELECT name FROM org_{org}.account WHERE id = %s", (key,)
                ).fetchone()
            return row is not None and row[0] == marker
        except psycopg.Error:
            return False

    return arrived


def _until(check: Callable[[], bool], timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _recovery(
    pipeline: Pipeline, direct: str, streams_before: int, consumed: int
) -> dict[str, Any]:
    """Seconds from now until each part works again (None: not within 60 s)."""
    started = time.monotonic()
    probe = _probe(direct, pipeline.org, PROBE)
    capture = _until(
        lambda: (
            pipeline.capture.log.read_text(errors="replace").count("streaming from")
            > streams_before
        ),
        60,
    )
    times: dict[str, Any] = {"capture": capture}
    times["projector"] = _remaining(started, lambda: pipeline.consumed() > consumed)
    times["gateway"] = _remaining(started, pipeline.gateway_ready)
    times["source_to_staging"] = _remaining(started, probe)
    return times


def _remaining(started: float, check: Callable[[], bool]) -> float | None:
    waited = _until(check, 60)
    return None if waited is None else time.monotonic() - started


def run_cuts(database: str, broker: str, tmp: Path, durations: list[float]) -> None:
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    info = psycopg.conninfo.conninfo_to_dict(database)
    proxy = CuttableProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
    via = _via(database, proxy.port)
    pipeline = Pipeline(tmp, source_dsn=via, staging_dsn=via, bootstrap=broker, org=org)
    pipeline.staging_dsn = database  # the test's own reads go around the proxy
    pipeline.oracle = Oracle(database, database, org, pipeline.tables)
    load = Load(database, 100, base, ACCOUNTS, JOBS)
    devices: list[Device] = []
    recoveries: list[dict[str, Any]] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        devices = [Device(pipeline.url, org, u, tmp).start_loop() for u in ("u1", "d1")]
        with WatermarkSampler(database, org) as sampler, pipeline.supervisor():
            load.start()
            for seconds in durations:
                time.sleep(3)
                streams = pipeline.capture.log.read_text(errors="replace").count("streaming from")
                proxy.cut()
                time.sleep(min(5.0, seconds))
                frozen = _committed(broker)  # in-flight commits are done by now
                time.sleep(max(0.0, seconds - 5.0))
                consumed = pipeline.consumed()
                assert _committed(broker) == frozen, "offsets committed while staging was cut off"
                proxy.restore()
                recoveries.append(_recovery(pipeline, database, streams, consumed))
            load.stop()
            converged = pipeline.wait_converged(300)
            for device in devices:
                device.stop_loop()
            devices_converge(devices, database, 120)
        sampler.assert_never_back()
        pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        for device in devices:
            device.close()
        pipeline.stop()
        proxy.close()
    _assert_bounds(recoveries)
    record(
        "postgres_cut",
        cuts=len(durations),
        cut_seconds=[round(d, 1) for d in durations],
        recovery={k: summary([r[k] for r in recoveries]) for k in recoveries[0]},
        staging_converged_s=round(converged, 2),
        refused_connections=proxy.refused,
        process_exits={p.name: p.exits for p in pipeline.processes},
    )


def _assert_bounds(recoveries: list[dict[str, Any]]) -> None:
    for index, times in enumerate(recoveries):
        for part, seconds in times.items():
            assert seconds is not None, f"outage {index}: {part} did not recover in 60 s"
            assert seconds <= BOUND_S, f"outage {index}: {part} took {seconds:.1f}s: {times}"


def test_postgres_cut_off_once(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    run_cuts(fresh_database, fresh_broker, tmp_path, [5.0])


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_postgres_cut_off_10_times(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    rng = random.Random(61)
    run_cuts(fresh_database, fresh_broker, tmp_path, [rng.uniform(5, 30) for _ in range(10)])


def run_restarts(broker: str, tmp: Path, restarts: int, down: float) -> None:
    server = EmbeddedPostgres(tmp / "pg", free_port(), fsync=False)
    server.start()
    database = server.dsn()
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    pipeline = Pipeline(tmp, source_dsn=database, staging_dsn=database, bootstrap=broker, org=org)
    load = Load(database, 100, base, ACCOUNTS, JOBS)
    recoveries: list[dict[str, Any]] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        with WatermarkSampler(database, org) as sampler, pipeline.supervisor():
            load.start()
            for _ in range(restarts):
                time.sleep(3)
                streams = pipeline.capture.log.read_text(errors="replace").count("streaming from")
                server.stop(mode="fast")
                time.sleep(down)
                consumed = pipeline.consumed()
                server.start()
                recoveries.append(_recovery(pipeline, database, streams, max(consumed, 0)))
            load.stop()
            converged = pipeline.wait_converged(300)
        sampler.assert_never_back()
        pipeline.oracle.assert_applied_once()
        pipeline.oracle.assert_no_stale_overwrite()
    finally:
        load.stop()
        pipeline.stop()
        server.stop(mode="immediate")
    _assert_bounds(recoveries)
    record(
        "postgres_restart",
        restarts=restarts,
        down_s=down,
        recovery={k: summary([r[k] for r in recoveries]) for k in recoveries[0]},
        staging_converged_s=round(converged, 2),
        process_exits={p.name: p.exits for p in pipeline.processes},
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_postgres_restarts(fresh_broker: str, tmp_path: Path) -> None:
    run_restarts(fresh_broker, tmp_path, restarts=5, down=5.0)
