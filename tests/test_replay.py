"""Replay: staging rebuilt from the change topics in a shadow schema and swapped in while the
projector keeps writing — against the real broker, PostgreSQL, projector, gateway and device."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from device.client import DeviceClient
from engine.config import get_settings, load_settings
from engine.projections.app import register_org
from engine.projections.model import ChangeEvent, ColumnSpec, EntityShape, Origin, Position
from engine.projections.replay import lock_writers, replay, shadow_schema, switch
from engine.projections.staging import Staging
from engine.snapshots.build import build_snapshot
from engine.snapshots.store import LocalDirectoryStore
from engine.streams.spec import CaptureSpec
from gateway.store import ensure_schema, org_state, put_config
from tests.capture_helpers import capture_once, events, new_org
from tests.gateway_helpers import mint, running_gateway, settings_for
from tests.projector_helpers import (
    assert_change_log_sound,
    live_rows,
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)

COLUMNS = "id, name, amount, tags, seen"
GROUP = "fieldsync-projector"  # the projector workers' consumer group (the default)
OFFLINE = {
    "entities": {"t": {}},
    "roles": {"tech": {"profile": "all_of_t"}},
    "profiles": {"all_of_t": {"items": [{"entity": "t", "distribution": "all"}]}},
}


def create_source(dsn: str, *tables: str, rows: int = 300) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in tables:
            conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric(8,2),"
                " tags text[], seen timestamptz)"
            )
            conn.execute(
                f"INSERT INTO {table} SELECT i, 'n' || i, i / 4.0, ARRAY['a', i::text], now()"
                f" FROM generate_series(1, {rows}) i"
            )


def churn(dsn: str, rng: random.Random, table: str = "t", changes: int = 15) -> None:
    """Updates, deletes and inserts on the source table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(changes):
            key = rng.randrange(1, 600)
            draw = rng.random()
            if draw < 0.6:
                conn.execute(
                    f"UPDATE {table} SET name = %s, amount = amount + 1 WHERE id = %s",
                    (f"u{rng.randrange(10**6)}", key),
                )
            elif draw < 0.8:
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (key,))
            else:
                conn.execute(
                    f"INSERT INTO {table} (id, name, tags) VALUES (%s, %s, ARRAY['x'])"
                    " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
                    (key, f"i{key}"),
                )


def staged(dsn: str, schema: str, table: str) -> dict[Any, tuple[Any, ...]]:
    """key → (values…, deleted, commit LSN, LSN, version) of every row, deleted ones too."""
    return live_rows(
        dsn,
        f"SELECT {COLUMNS}, _fs_deleted, _fs_commit_lsn, _fs_lsn, _fs_version"
        f" FROM {schema}.{table}",
    )


def assert_same_staging(
    live: dict[Any, tuple[Any, ...]],
    replayed: dict[Any, tuple[Any, ...]],
    partition_of: dict[Any, int],
) -> None:
    """Same rows, deleted flags and positions, same values of the rows not deleted (a deleted
    row keeps what staging held when the delete came: that depends on the batch); within each
    partition both order their versions as the source positions (so alike, up to changes at one
    position: a snapshot)."""

    def comparable(rows: dict[Any, tuple[Any, ...]]) -> dict[Any, tuple[Any, ...]]:
        return {k: v[-4:-1] if v[-4] else v[:-1] for k, v in rows.items()}

    assert comparable(live) == comparable(replayed)
    for partition in set(partition_of.values()):
        orders = []
        for rows in (live, replayed):
            keys = sorted(
                (k for k in rows if partition_of[k] == partition), key=lambda k: rows[k][-1]
            )
            orders.append([rows[k][-3:-1] for k in keys])  # positions in version order
        assert orders[0] == sorted(orders[0]), "live versions out of position order"
        assert orders[0] == orders[1], "the replay orders a partition's rows differently"


def partitions(bootstrap: str, topic: str) -> dict[Any, int]:
    return {e.key["id"]: e.partition for e in events(bootstrap, topic) if e.key is not None}


def schemas(dsn: str, org: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {
            name
            for (name,) in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"org_{org}%",)
            )
        }


def test_replay_swaps_in_while_the_projector_writes(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    dsn, broker, org = fresh_database, fresh_broker, new_org()
    create_source(dsn, "t")
    spec = CaptureSpec(org=org, source_dsn=SecretStr(dsn), entities={"t": "public.t"})
    rng = random.Random(7)
    capture_once(spec, broker)
    churn(dsn, rng, changes=60)
    capture_once(spec, broker)
    register_org(dsn, org)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema(conn)
    log = tmp_path / "projector.log"
    worker = start_projector(projector_env(broker, dsn), log)
    stop = threading.Event()
    rounds: list[int] = []

    def load() -> None:  # source changes captured continuously while the replay runs
        while not stop.is_set():
            churn(dsn, rng)
            capture_once(spec, broker)
            rounds.append(1)

    loader = threading.Thread(target=load, daemon=True)
    try:
        wait_until(staging_matches_source(dsn, org, "t", COLUMNS), 90, "staging", log)
        with psycopg.connect(dsn, autocommit=True) as conn:
            put_config(conn, org, OFFLINE)
            epoch_before = org_state(conn, org)[0]
        with running_gateway(settings_for(tmp_path), dsn) as url:
            token = mint(org, "u1", ["tech"])
            device = DeviceClient(url, org, token, tmp_path / "device.sqlite")
            assert device.sync().bootstrapped == ["t"]
            tokens = device.store.tokens()

            loader.start()
            wait_until(lambda: len(rounds) >= 1, 60, "the load")
            before = len(rounds)
            report = replay(load_settings(), broker, dsn, org, batch_events=200)
            during = len(rounds) - before
            wait_until(lambda: len(rounds) >= before + during + 1, 60, "more load")
            stop.set()
            loader.join(60)
            capture_once(spec, broker)
            wait_until(staging_matches_source(dsn, org, "t", COLUMNS), 60, "the tail", log)

            assert report.swapped and report.old_schema == f"org_{org}__old_1"
            assert report.messages > 300 and not report.refused
            assert schemas(dsn, org) == {f"org_{org}"}  # shadow swapped in, old one dropped
            with psycopg.connect(dsn) as conn:
                assert org_state(conn, org)[0] == report.epoch != epoch_before
            assert_change_log_sound(dsn, org, "t")  # the projector continued the new log
            # the staging the projector kept writing equals a replay of the same topic
            view = replay(load_settings(), broker, dsn, org, swap=False)
            assert not view.swapped
            assert_same_staging(
                staged(dsn, f"org_{org}", "t"),
                staged(dsn, shadow_schema(org), "t"),
                partitions(broker, f"fieldsync.{org}.t"),
            )
            # a device of the old generation must re-bootstrap, and converges
            answer = httpx.post(
                f"{url}/orgs/{org}/sync",
                json={"tokens": tokens},
                headers={"authorization": f"Bearer {token}"},
            ).json()
            assert [(r["control"], r["reason"]) for r in answer["entities"]] == [
                ("must_bootstrap", "staging_epoch_changed")
            ]
            assert device.sync().bootstrapped == ["t"]
            churn(dsn, rng)
            capture_once(spec, broker)
            wait_until(staging_matches_source(dsn, org, "t", COLUMNS), 60, "a change", log)
            assert device.sync().bootstrapped == []
            source = live_rows(dsn, "SELECT id, name FROM public.t")
            assert {r["id"]: (r["name"],) for r in device.store.rows("t")} == source
            device.close()
        # from a snapshot of the new generation and the projector's offsets recorded with it
        store = LocalDirectoryStore(tmp_path / "snapshots")
        built = build_snapshot(dsn, org, "t", store, group=GROUP, bootstrap_servers=broker)
        assert built.manifest.kafka.offsets, built.manifest.kafka.note
        churn(dsn, rng, changes=30)  # a tail after the snapshot's offsets
        capture_once(spec, broker)
        wait_until(staging_matches_source(dsn, org, "t", COLUMNS), 60, "the last tail", log)
        seeded = replay(
            load_settings(), broker, dsn, org, swap=False, from_snapshot=True, snapshots=store
        )
        assert seeded.snapshots == {"t": built.manifest.id}
        assert seeded.snapshot_rows == built.manifest.rows
        assert seeded.messages < view.messages // 2  # the tail, not the whole topic
        live_now = f"SELECT {COLUMNS} FROM org_{org}.t WHERE NOT _fs_deleted"
        assert live_rows(dsn, live_now) == live_rows(
            dsn, live_now.replace(f"org_{org}.", f"{shadow_schema(org)}.")
        )
    finally:
        stop.set()
        worker.terminate()
        worker.wait(60)
    print(f"replay: {report}; load rounds during the replay: {during}")


@pytest.fixture()
def cli_env(
    fresh_database: str, fresh_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    monkeypatch.setenv("FIELDSYNC_STAGING_DSN", fresh_database)
    monkeypatch.setenv("FIELDSYNC_BOOTSTRAP_SERVERS", fresh_broker)
    monkeypatch.setenv("FIELDSYNC_PRODUCER_IDEMPOTENCE", "false")  # the embedded broker's
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no .env of the working tree
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_replay_of_one_entity_through_the_cli(
    fresh_database: str, fresh_broker: str, cli_env: None
) -> None:
    from engine.cli import app

    dsn, broker, org = fresh_database, fresh_broker, new_org()
    create_source(dsn, "t", "u", rows=200)
    entities = {"t": "public.t", "u": "public.u"}
    spec = CaptureSpec(org=org, source_dsn=SecretStr(dsn), entities=entities)
    capture_once(spec, broker)
    register_org(dsn, org)
    first = replay(load_settings(), broker, dsn, org)  # builds staging: nothing live yet
    assert first.swapped and first.old_schema is None
    churn(dsn, random.Random(3), "u", changes=40)
    capture_once(spec, broker)

    def relation(table: str) -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT %s::regclass::oid", (f"org_{org}.{table}",)).fetchone()
        assert row is not None
        return int(row[0])

    t_before, u_before = relation("t"), relation("u")
    t_rows = staged(dsn, f"org_{org}", "t")
    done = CliRunner().invoke(app, ["replay", "--org", org, "--entity", "u"])
    assert done.exit_code == 0, done.output
    assert "staging epoch" in done.output and "re-bootstrap" in done.output
    assert relation("t") == t_before and staged(dsn, f"org_{org}", "t") == t_rows  # untouched
    assert relation("u") != u_before  # rebuilt, including the changes after the first replay
    assert staging_matches_source(dsn, org, "u", COLUMNS)()
    assert_change_log_sound(dsn, org, "u")
    assert schemas(dsn, org) == {f"org_{org}"}
    with psycopg.connect(dsn) as conn:
        assert org_state(conn, org)[0] != first.epoch
    refused = CliRunner().invoke(app, ["replay", "--org", org, "--from-snapshot"])
    assert refused.exit_code == 2 and "no snapshot" in refused.output
    unknown = CliRunner().invoke(app, ["replay", "--org", "nosuchorg"])
    assert unknown.exit_code == 2 and "not registered" in unknown.output
    with psycopg.connect(dsn, autocommit=True) as other:  # a replay of the org is running
        other.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"fieldsync.replay.{org}",))
        busy = CliRunner().invoke(app, ["replay", "--org", org])
    assert busy.exit_code == 2 and "another replay" in busy.output


# -- the swap's steps and the projector's cache, deterministically --------------------------------

SHAPE = EntityShape((ColumnSpec("id", "integer", True), ColumnSpec("name", "text", False)))
WIDER = EntityShape((*SHAPE.columns, ColumnSpec("extra", "text", False)))


def change(
    org: str, key: int, pos: int, shape: EntityShape = SHAPE, entity: str = "thing"
) -> ChangeEvent:
    row = {c.name: (key if c.is_key else f"{c.name}-{pos}") for c in shape.columns}
    return ChangeEvent(
        org=org,
        entity=entity,
        op="u",
        key={"id": key},
        before=None,
        after=row,
        position=Position(pos, pos),
        shape=shape,
        source_ts_ms=1_700_000_000_000 + pos,
        origin=Origin(f"fieldsync.{org}.{entity}", 0, pos),
    )


def test_a_writer_held_by_the_swap_writes_only_the_new_schema(fresh_database: str) -> None:
    """The projector's batch that waits for the swap's lock lands entirely in the new schema,
    with the new schema's next version: nothing of it in the old one, no version mixed up."""
    dsn, org = fresh_database, f"o{uuid.uuid4().hex[:8]}"
    register_org(dsn, org)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema(conn)
    with (
        psycopg.connect(dsn) as live_conn,
        psycopg.connect(dsn) as shadow_conn,
        psycopg.connect(dsn) as swap_conn,
    ):
        live = Staging(live_conn)  # the projector
        shadow = Staging(shadow_conn, schema_for=shadow_schema, notify=False)
        live.apply(org, "thing", [change(org, k, k) for k in range(1, 4)])  # watermark 3
        for k in range(1, 6):  # the replay: same changes in other batches, and two more
            shadow.apply(org, "thing", [change(org, k, k)])  # watermark 5
        lock_writers(swap_conn, org, ["thing"])
        result: list[Any] = []
        writer = threading.Thread(
            target=lambda: result.append(live.apply(org, "thing", [change(org, 9, 9)]))
        )
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "the swap's lock must hold the writer"
        swapped = switch(swap_conn, org, shadow_schema(org))
        writer.join(30)
        assert result and result[0].watermark == 6  # the new schema's next version
        assert staged_versions(dsn, f"org_{org}") == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 9: 6}
        assert swapped.old_schema is not None
        assert 9 not in staged_versions(dsn, swapped.old_schema)
        assert_change_log_sound(dsn, org, "thing")


def staged_versions(dsn: str, schema: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(f"SELECT id, _fs_version FROM {schema}.thing").fetchall())


def test_the_projector_cache_recovers_from_a_swapped_schema(fresh_database: str) -> None:
    """A cached column the swapped-in schema does not have: cache re-read, batch applied."""
    dsn, org = fresh_database, f"o{uuid.uuid4().hex[:8]}"
    register_org(dsn, org)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema(conn)
    with psycopg.connect(dsn) as live_conn, psycopg.connect(dsn) as other_conn:
        live = Staging(live_conn)
        live.apply(org, "thing", [change(org, 1, 1, WIDER)])  # caches thing with "extra"
        other = Staging(other_conn, schema_for=shadow_schema, notify=False)
        other.apply(org, "thing", [change(org, 1, 1)])  # built without "extra"
        switch(other_conn, org, shadow_schema(org))
        assert live.apply(org, "thing", [change(org, 2, 2, WIDER)]).applied == 1
        rows = live_conn.execute(f"SELECT id, extra FROM org_{org}.thing ORDER BY id").fetchall()
        live_conn.commit()
        assert rows == [(1, None), (2, "extra-2")]
