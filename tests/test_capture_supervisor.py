"""Capture of several orgs: each failure is named and isolated; retryable ones retry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from engine.runtime.embedded import EmbeddedPostgres, free_port
from engine.streams.exceptions import SourceMisconfigured
from engine.streams.spec import CaptureSpec
from engine.streams.supervisor import OrgStatus, run_captures
from tests.capture_helpers import capture_once, events, new_org, settings


def test_one_broken_org_does_not_stop_the_others(
    fresh_database: str, bootstrap_servers: str
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE good (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE nokey (id int)")
        conn.execute("INSERT INTO good SELECT generate_series(1, 20)")
    good = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"good": "public.good"})
    broken = CaptureSpec(
        org=new_org(), source_dsn=fresh_database, entities={"nokey": "public.nokey"}
    )
    unreachable = CaptureSpec(
        org=new_org(),
        source_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
        entities={"x": "public.x"},
    )

    async def scenario() -> dict[str, OrgStatus]:
        stop = asyncio.Event()
        run = asyncio.create_task(
            run_captures([good, broken, unreachable], settings(), bootstrap_servers, stop)
        )
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            conn.execute("INSERT INTO good SELECT generate_series(21, 30)")
        for _ in range(200):
            if len(events(bootstrap_servers, f"fieldsync.{good.org}.good")) >= 30:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # let the unreachable org retry at least once
        stop.set()
        return await run

    statuses = asyncio.run(scenario())
    assert len(events(bootstrap_servers, f"fieldsync.{good.org}.good")) == 30
    assert statuses[good.org].state == "stopped" and statuses[good.org].error is None
    assert statuses[broken.org].state == "failed"
    assert (
        statuses[broken.org].error is not None
        and "[unsupported_table]" in statuses[broken.org].error
    )
    assert f"org {broken.org}, entity nokey" in statuses[broken.org].error
    assert statuses[unreachable.org].restarts >= 1
    assert (
        statuses[unreachable.org].error is not None
        and "[source_unreachable]" in statuses[unreachable.org].error
    )


def test_source_without_logical_wal_is_named(tmp_path: Path, bootstrap_servers: str) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", free_port(), fsync=False, wal_level="replica")
    server.start()
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        org = new_org()
        spec = CaptureSpec(org=org, source_dsn=server.dsn(), entities={"t": "public.t"})
        with pytest.raises(SourceMisconfigured, match=rf"org {org}: source has wal_level=replica"):
            capture_once(spec, bootstrap_servers)
    finally:
        server.stop(mode="immediate")
