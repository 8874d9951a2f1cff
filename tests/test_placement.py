"""Org placement over two staging servers, end to end: provisioning chooses, projector, gateway,
replay and decommission route by it (two databases of the real PostgreSQL stand for two servers)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from device.client import DeviceClient
from engine.config import load_settings
from engine.exceptions import ConfigError
from engine.projections.replay import replay
from engine.provisioning.commands import command_from_document
from engine.provisioning.lifecycle import ensure_lifecycle_schema, read_lifecycle
from engine.provisioning.worker import publish
from engine.runtime.placement import StagingServers
from tests.gateway_helpers import JWT_SECRET, TOKEN_SECRET, mint, running_gateway
from tests.projector_helpers import projector_env, start_projector, start_worker, wait_until
from tests.test_provisioning import document, source_tables


def schema_exists(dsn: str, org: str) -> bool:
    with psycopg.connect(dsn) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (f"org_{org}",))
        return found.fetchone() is not None


def registered(dsn: str, org: str) -> bool:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('fieldsync_control.orgs')").fetchone() == (None,):
            return False
        return (
            conn.execute("SELECT 1 FROM fieldsync_control.orgs WHERE org = %s", (org,)).fetchone()
            is not None
        )


def jobs(dsn: str, org: str) -> int:
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(f'SELECT count(*) FROM "org_{org}".job WHERE NOT _fs_deleted')
            return int(row.fetchone()[0])  # type: ignore[index]
    except psycopg.errors.UndefinedTable:
        return -1


def test_a_server_name_must_be_an_identifier_and_an_unknown_one_is_named() -> None:
    with pytest.raises(ConfigError, match="FIELDSYNC_STAGING_SERVERS"):
        load_settings(staging_servers={"main": "postgresql://x/y"})
    with pytest.raises(ConfigError, match="FIELDSYNC_STAGING_SERVERS"):
        load_settings(staging_servers={"East-1": "postgresql://x/y"})
    servers = StagingServers("postgresql://main/db", {"east": "postgresql://east/db"})
    assert servers.dsn("east") == "postgresql://east/db"
    with pytest.raises(ConfigError, match="'west' holds orgs but is not configured"):
        servers.dsn("west")


def test_orgs_are_spread_over_staging_servers_and_every_component_routes_by_placement(
    fresh_database: str, second_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    main, east = fresh_database, second_database
    run = uuid.uuid4().hex[:6]
    orgs = [f"a{run}", f"b{run}", f"c{run}"]
    source_tables(main)
    servers_json = orjson.dumps({"east": east}).decode()
    settings = load_settings(
        data_dir=tmp_path,
        producer_idempotence=False,
        staging_servers={"east": east},
        gateway_jwt_secret=JWT_SECRET,
        gateway_token_secret=TOKEN_SECRET,
        gateway_admin_enabled=True,
    )
    entities = {"job": "public.jobs", "site": "public.sites"}
    publish(
        settings,
        fresh_broker,
        [command_from_document("provision", document(main, org, entities)) for org in orgs],
    )
    env = projector_env(
        fresh_broker,
        main,
        FIELDSYNC_DATA_DIR=str(tmp_path),
        FIELDSYNC_PROVISIONER_RECONCILE_S="0.5",
        FIELDSYNC_STAGING_SERVERS=servers_json,
    )
    log = tmp_path / "workers.log"
    provisioner = start_worker("provisioner", env, log)
    projector = start_projector(env, log)

    def states() -> dict[str, str]:
        with psycopg.connect(main, autocommit=True) as conn:
            ensure_lifecycle_schema(conn)
            return {r.org: r.state for r in read_lifecycle(conn)}

    try:
        wait_until(lambda: states() == dict.fromkeys(orgs, "active"), 120, "active", log)
        # the fewest orgs win, ties go to main (commands of several partitions: any order)
        placements = StagingServers.from_settings(settings, main).placements()
        assert sorted(placements.values()) == ["east", "main", "main"]
        first, third = (org for org in orgs if placements[org] == "main")
        (second,) = (org for org in orgs if placements[org] == "east")
        wait_until(
            lambda: (jobs(main, first), jobs(east, second), jobs(main, third)) == (50, 50, 50),
            180,
            "each org's staging filled on its server",
            log,
        )
        # everything of an org is on its server, nothing on the other
        assert registered(east, second) and not registered(main, second)
        assert registered(main, first) and not registered(east, first)
        assert not schema_exists(main, second) and not schema_exists(east, first)
        with psycopg.connect(east) as conn:
            assert conn.execute(
                "SELECT 1 FROM fieldsync_control.offline_config WHERE org = %s", (second,)
            ).fetchone()
            counted = conn.execute(
                "SELECT consumed FROM fieldsync_control.projection_counts"
                " WHERE org = %s AND entity = 'job'",
                (second,),
            ).fetchone()
        assert counted is not None and counted[0] >= 50

        with running_gateway(settings, main) as url:
            admin = {"authorization": f"Bearer {mint('*', 'ops', [], scope='fieldsync:admin')}"}
            listed = httpx.get(f"{url}/admin/orgs", headers=admin).json()
            assert set(orgs) <= set(listed)
            status = httpx.get(f"{url}/orgs/{second}/admin/status", headers=admin).json()
            assert status["staging_server"] == "east" and status["entities"]["job"]["watermark"] > 0

            device = DeviceClient(url, second, mint(second, "u1", ["tech"]), tmp_path / "d.sqlite")
            device.sync()
            owned = device.store.db.execute("SELECT count(*) FROM job").fetchone()[0]
            assert owned == 17  # ids 1..50 with id % 3 == 1 belong to u1

            # a source change reaches a long-polling device of the org on the second server
            woke: dict[str, Any] = {}

            def long_poll() -> None:
                started = time.monotonic()
                woke["report"] = device.sync(wait=30)
                woke["after"] = time.monotonic() - started

            poller = threading.Thread(target=long_poll)
            poller.start()
            time.sleep(1.0)
            with psycopg.connect(main, autocommit=True) as source:
                source.execute("UPDATE public.jobs SET title = 'moved' WHERE id = 1")
            poller.join(40)
            assert woke["report"].upserts >= 1 and woke["after"] < 29, woke
            title = device.store.db.execute("SELECT title FROM job WHERE id = 1").fetchone()
            assert title == ("moved",)

            # replay of the org on the second server: schema and epoch swap there
            report = replay(settings, fresh_broker, main, second)
            assert report.swapped and jobs(east, second) == 50
            assert not schema_exists(main, second)
            again = device.sync()
            assert "job" in again.bootstrapped  # a new staging epoch: re-bootstrap, not deltas
            device.close()

        publish(settings, fresh_broker, [command_from_document("decommission", {}, second)])
        wait_until(lambda: states().get(second) == "decommissioned", 60, "decommissioned", log)
    finally:
        for process in (provisioner, projector):
            process.send_signal(signal.SIGTERM)
        for process in (provisioner, projector):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert not schema_exists(east, second) and not registered(east, second)
    assert second not in StagingServers.from_settings(settings, main).placements()
    assert registered(main, first) and jobs(main, third) == 50  # the others untouched


def test_placement_balances_and_an_org_already_on_a_server_stays_there(
    fresh_database: str, second_database: str
) -> None:
    """Replaying the provisioning topic into an empty control schema finds each org where its
    staging is, whatever order the commands come in."""
    from engine.projections.app import register_org

    servers = StagingServers(fresh_database, {"east": second_database})
    register_org(second_database, "held")  # registered on east, not placed (control lost)
    assert servers.place("held") == "east"
    assert [servers.place(org) for org in ("n1", "n2", "n3")] == ["main", "main", "east"]
    assert servers.place("n1") == "main"  # idempotent
    assert servers.dsn_for("n3") == second_database and servers.server_of("never") == "main"
    servers.forget("n3")
    assert "n3" not in servers.placements()
