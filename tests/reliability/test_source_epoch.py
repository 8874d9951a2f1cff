"""Fault 7: the source's replication slot is lost, or the source is restored from a backup.

Either way capture finds no slot, starts a new capture epoch and re-snapshots; staging replaces
the org's rows with the new epoch's (``engine/projections/capture_epochs.py``) and bumps the
staging epoch, so every device's next sync answers ``must_bootstrap`` — never a delta that spans
the change. A restore also moves the source's WAL positions *back* behind positions staging
already holds: the new epoch must win anyway.

Devices record every delta page they apply; the staging epoch of the token they sent and of the
token they got back must agree (a page of a delta that spans two epochs would not).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.runtime.embedded import EmbeddedPostgres, free_port
from gateway.tokens import decode
from tests.capture_helpers import new_org
from tests.gateway_helpers import TOKEN_SECRET
from tests.reliability.harness import Device, Load, Pipeline, create_source, devices_converge
from tests.reliability.oracle import WatermarkSampler
from tests.reliability.report import record

ACCOUNTS, JOBS = 200, 2_000


class EpochWitness:
    """Wraps a device's store: the staging epoch of every delta page's request and answer
    token, and the epoch of every bootstrap the device finished."""

    def __init__(self, device: Device) -> None:
        store = device.client.store
        self.deltas: list[tuple[str, str, str]] = []  # entity, epoch sent, epoch received
        self.bootstraps: list[tuple[str, str]] = []
        apply_delta, finish = store.apply_delta, store.finish_bootstrap

        def epoch(token: str) -> str:
            return decode(token, TOKEN_SECRET).epoch

        def checked_delta(entity: str, upserts: Any, removes: Any, token: str, mark: Any) -> None:
            sent = store.tokens()[entity]
            assert sent is not None
            self.deltas.append((entity, epoch(sent), epoch(token)))
            apply_delta(entity, upserts, removes, token, mark)

        def checked_finish(entity: str, rows: Any, token: str, mark: int) -> None:
            self.bootstraps.append((entity, epoch(token)))
            finish(entity, rows, token, mark)

        store.apply_delta = checked_delta  # type: ignore[method-assign]
        store.finish_bootstrap = checked_finish  # type: ignore[method-assign]

    def assert_no_delta_spans_epochs(self) -> None:
        spanning = [d for d in self.deltas if d[1] != d[2]]
        assert not spanning, f"delta pages across staging epochs: {spanning[:5]}"


def _staging_epoch(dsn: str, org: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT staging_epoch FROM fieldsync_control.orgs WHERE org = %s", (org,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def _capture_epochs(source_dsn: str, staging_dsn: str, org: str) -> tuple[str, set[str]]:
    """(capture's epoch at the source, the epochs staging's entities record)."""
    with psycopg.connect(source_dsn) as conn:
        row = conn.execute(
            "SELECT epoch::text FROM fieldsync.capture_state WHERE org = %s", (org,)
        ).fetchone()
    assert row is not None
    with psycopg.connect(staging_dsn) as conn:
        staged = {
            r[0]
            for r in conn.execute(f"SELECT capture_epoch FROM org_{org}._fs_entities").fetchall()
        }
    return str(row[0]), staged


def _change_source(dsn: str) -> None:
    """Deletes, updates and inserts the old epoch will never deliver."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM src.job WHERE id % 17 = 3")
        conn.execute("DELETE FROM src.account WHERE id % 13 = 5")
        conn.execute("UPDATE src.job SET status = 'closed' WHERE id % 11 = 2")
        conn.execute("UPDATE src.job SET owner_id = 'u1' WHERE id % 19 = 4")
        conn.execute(
            "INSERT INTO src.job SELECT 100000 + i, 'team-a', 'open',"
            " date_trunc('second', now()), 1.5, 1 FROM generate_series(1, 50) i"
        )


def _wait_devices(devices: list[Device], source_dsn: str) -> dict[str, float]:
    for device in devices:
        device.stop_loop()
    return devices_converge(devices, source_dsn, 120)


def test_slot_lost_devices_rebootstrap(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    org = new_org()
    base = create_source(fresh_database, ACCOUNTS, JOBS)
    pipeline = Pipeline(
        tmp_path, source_dsn=fresh_database, staging_dsn=fresh_database, bootstrap=fresh_broker,
        org=org,
    )  # fmt: skip
    devices: list[Device] = []
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        devices = [Device(pipeline.url, org, u, tmp_path) for u in ("u1", "d1")]
        devices_converge(devices, fresh_database, 60)
        witnesses = [EpochWitness(d) for d in devices]
        old_capture, _ = _capture_epochs(fresh_database, fresh_database, org)
        old_staging = _staging_epoch(fresh_database, org)
        with WatermarkSampler(fresh_database, org) as sampler:
            for device in devices:
                device.controls.clear()
                device.start_loop()
            load = Load(fresh_database, 50, base, ACCOUNTS, JOBS).start()
            time.sleep(3)
            load.stop()
            pipeline.capture.stop()
            with psycopg.connect(fresh_database, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (f"fieldsync_{org}",))
            _change_source(fresh_database)
            time.sleep(2)  # devices keep syncing: nothing new reaches them meanwhile
            pipeline.capture.start()
            started = time.monotonic()
            converged = pipeline.wait_converged(180)
            device_seconds = _wait_devices(devices, fresh_database)
            recovered = time.monotonic() - started
        sampler.assert_never_back()
        pipeline.oracle.assert_applied_once()
    finally:
        for device in devices:
            device.close()
        pipeline.stop()
    assert "replication slot missing" in pipeline.capture.log.read_text()
    new_capture, staged = _capture_epochs(fresh_database, fresh_database, org)
    assert new_capture != old_capture and staged == {new_capture}
    assert _staging_epoch(fresh_database, org) != old_staging
    for device, witness in zip(devices, witnesses, strict=True):
        witness.assert_no_delta_spans_epochs()
        rebootstrapped = {e for e, _ in device.controls}
        assert rebootstrapped == {"job", "account"}, (device.user, device.controls)
    record(
        "source_slot_lost",
        rounds=1,
        staging_converged_s=round(converged, 2),
        devices_converged_s=device_seconds,
        recovered_s=round(recovered, 2),
        delta_pages_checked=sum(len(w.deltas) for w in witnesses),
    )


def _copy_tree(source: Path, target: Path) -> None:
    """``cp -a``: ownership kept (the server runs as its own user)."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def _max_staged_lsn(staging_dsn: str, org: str) -> int:
    with psycopg.connect(staging_dsn) as conn:
        row = conn.execute(
            f"SELECT max(m) FROM (SELECT max(_fs_commit_lsn) m FROM org_{org}.job"
            f" UNION ALL SELECT max(_fs_commit_lsn) FROM org_{org}.account) x"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_source_restored_from_backup(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    server = EmbeddedPostgres(tmp_path / "source-pg", free_port(), fsync=False)
    server.start()
    source = server.dsn()
    org = new_org()
    devices: list[Device] = []
    pipeline = Pipeline(
        tmp_path, source_dsn=source, staging_dsn=fresh_database, bootstrap=fresh_broker, org=org
    )
    try:
        create_source(source, ACCOUNTS, JOBS)
        pipeline.start()
        pipeline.wait_converged(180)
        devices = [Device(pipeline.url, org, u, tmp_path) for u in ("u2", "d1")]
        witnesses = [EpochWitness(d) for d in devices]
        devices_converge(devices, source, 60)

        # a base backup: the data directory without replication slots (pg_basebackup omits
        # pg_replslot), taken while the server is down
        pipeline.capture.stop()
        server.stop()
        backup = tmp_path / "backup"
        _copy_tree(server.pgdata, backup)
        for slot in (backup / "pg_replslot").iterdir():
            shutil.rmtree(slot)
        server.start()
        pipeline.capture.start()

        # life goes on after the backup: changes reach staging and the devices
        _change_source(source)
        with psycopg.connect(source, autocommit=True) as conn:
            for _ in range(5):  # WAL the restored server will not have: positions go back
                conn.execute("UPDATE src.job SET amount = amount + 1")
        pipeline.wait_converged(180)
        _wait_devices(devices, source)
        staged_lsn = _max_staged_lsn(fresh_database, org)
        old_capture, _ = _capture_epochs(source, fresh_database, org)

        # the source is restored from the backup; new writes land on it
        pipeline.capture.stop()
        server.stop()
        _copy_tree(backup, server.pgdata)
        server.start()
        assert _current_lsn(source) < staged_lsn, "the restore should move WAL positions back"
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("UPDATE src.job SET status = 'open', owner_id = 'u2' WHERE id <= 40")
            conn.execute("DELETE FROM src.account WHERE id > 190")
        for device in devices:
            device.controls.clear()
            device.start_loop()
        with WatermarkSampler(fresh_database, org) as sampler:
            pipeline.capture.start()
            started = time.monotonic()
            converged = pipeline.wait_converged(180)
            device_seconds = _wait_devices(devices, source)
            recovered = time.monotonic() - started
        sampler.assert_never_back()
        pipeline.oracle.assert_applied_once()
        new_capture, staged = _capture_epochs(source, fresh_database, org)
    finally:
        for device in devices:
            device.close()
        pipeline.stop()
        server.stop(mode="immediate")
    assert "replication slot missing" in pipeline.capture.log.read_text()
    assert new_capture != old_capture and staged == {new_capture}
    for device, witness in zip(devices, witnesses, strict=True):
        witness.assert_no_delta_spans_epochs()
        assert {e for e, _ in device.controls} == {"job", "account"}, device.controls
    record(
        "source_restored_from_backup",
        rounds=1,
        staging_converged_s=round(converged, 2),
        devices_converged_s=device_seconds,
        recovered_s=round(recovered, 2),
        delta_pages_checked=sum(len(w.deltas) for w in witnesses),
    )
