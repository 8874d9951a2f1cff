"""Snapshots: Avro files of staging entities at a watermark, their store, and the gateway's
snapshot bootstrap — against real PostgreSQL staging (written by ``Staging.apply``) and a real
gateway."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import httpx
import psycopg
import pytest
from typer.testing import CliRunner

import engine.snapshots.build as build_module
from device.client import DeviceClient
from engine.cli import app as cli
from engine.config import Settings, get_settings
from engine.projections.model import ChangeEvent, ColumnSpec, EntityShape, Origin, Position
from engine.projections.staging import Staging
from engine.snapshots.build import build_snapshot, committed_offsets
from engine.snapshots.schedule import run_schedule
from engine.snapshots.store import LocalDirectoryStore, default_store, prune
from gateway.store import bump_epoch
from tests.gateway_helpers import T0, World, configure, job, mint, running_gateway, settings_for

GROUP = "fieldsync-projector"


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


@pytest.fixture()
def store(settings: Settings) -> LocalDirectoryStore:
    return default_store(settings)


@pytest.fixture()
def world(fresh_database: str) -> Iterator[World]:
    world = World(fresh_database, f"o{uuid.uuid4().hex[:8]}")
    world.now = T0.timestamp()
    for key in range(1, 8):
        world.upsert("account", key, owner_id=f"u{key % 3}", name=f"account {key}")
    for key in range(1, 12):
        world.upsert("job", key, **job("team-a" if key % 2 else "u1", due_days=-key))
    world.delete("account", 4)
    world.delete("job", 3)
    world.upsert("job", 5, status="closed")
    configure(fresh_database, world.org)
    yield world
    world.close()


def build(world: World, store: LocalDirectoryStore, entity: str, **options: Any) -> Any:
    return build_snapshot(world.dsn, world.org, entity, store, group=GROUP, **options)


def read_avro(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    reader = fastavro.reader(io.BytesIO(data))
    return reader.writer_schema, list(reader), reader.metadata  # type: ignore[return-value]


def as_avro(entity: str, row: dict[str, Any]) -> dict[str, Any]:
    """An oracle row as the snapshot file decodes (numeric → exact text, timestamps in UTC)."""
    out = {}
    for column, value in row.items():
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.astimezone(UTC)
        out[column] = value
    return out


def staging_versions(dsn: str, org: str, entity: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute(
                f'SELECT id, _fs_version FROM "org_{org}".{entity} WHERE NOT _fs_deleted'
            ).fetchall()
        )


# -- building ----------------------------------------------------------------------------------


def test_build_writes_the_live_rows_at_the_watermark(
    world: World, store: LocalDirectoryStore
) -> None:
    result = build(world, store, "job", keep=3)
    manifest = result.manifest
    assert result.built
    data = store.local_path(manifest).read_bytes()
    schema, records, metadata = read_avro(data)
    versions = staging_versions(world.dsn, world.org, "job")
    expected = [as_avro("job", world.rows["job"][k]) for k in sorted(world.rows["job"])]
    assert [{k: v for k, v in r.items() if k != "_fs_version"} for r in records] == expected
    assert {r["id"]: r["_fs_version"] for r in records} == versions
    with psycopg.connect(world.dsn) as conn:
        watermark, horizon = conn.execute(
            f"SELECT version, horizon_version FROM org_{world.org}._fs_entities"
            " WHERE entity = 'job'"
        ).fetchone()  # type: ignore[misc]
        (epoch,) = conn.execute(
            "SELECT staging_epoch FROM fieldsync_control.orgs WHERE org = %s", (world.org,)
        ).fetchone()  # type: ignore[misc]
    assert (manifest.watermark, manifest.horizon, manifest.epoch) == (watermark, horizon, epoch)
    assert manifest.rows == len(records) == 10
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.size == len(data)
    assert manifest.codec == "deflate" and metadata["avro.codec"] == "deflate"
    assert metadata["fieldsync.watermark"] == str(watermark)
    assert manifest.schema["fields"] == schema["fields"]
    assert manifest.keys == ["id"]
    assert {"name": "amount", "type": "numeric(10,2)"} in manifest.columns
    assert manifest.kafka.offsets == {} and "no broker" in (manifest.kafka.note or "")
    # layout and the manifest on disk
    folder = store.root / world.org / "job"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{watermark}-{epoch}.avro",
        f"{watermark}-{epoch}.manifest.json",
    ]
    on_disk = json.loads((folder / f"{watermark}-{epoch}.manifest.json").read_text())
    assert on_disk["sha256"] == manifest.sha256 and on_disk["rows"] == 10
    assert on_disk["kafka"]["offsets"] == {} and on_disk["kafka"]["note"]
    assert on_disk["created_at"] == manifest.created_at.isoformat()
    # the same watermark and epoch again: nothing rebuilt
    again = build(world, store, "job")
    assert not again.built and again.manifest == manifest


def test_build_reads_rows_and_watermark_in_one_snapshot(
    world: World, store: LocalDirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes committed after the watermark was read — updates, deletes, inserts, each bumping
    versions above it — are not in the file: it is the entity exactly at its watermark."""
    at_watermark = copy.deepcopy(world.rows["job"])
    original = build_module._read_head

    def read_head_then_change(conn: Any, org: str, entity: str) -> Any:
        head = original(conn, org, entity)
        world.upsert("job", 1, status="late", amount=Decimal("99.99"))
        world.upsert("job", 2, owner_id="u2")
        world.delete("job", 4)
        world.upsert("job", 40, **job("u1"))
        return head

    monkeypatch.setattr(build_module, "_read_head", read_head_then_change)
    manifest = build(world, store, "job").manifest
    monkeypatch.setattr(build_module, "_read_head", original)
    _, records, _ = read_avro(store.local_path(manifest).read_bytes())
    assert [{k: v for k, v in r.items() if k != "_fs_version"} for r in records] == [
        as_avro("job", at_watermark[k]) for k in sorted(at_watermark)
    ]
    assert max(r["_fs_version"] for r in records) <= manifest.watermark
    later = build(world, store, "job").manifest
    assert later.watermark == manifest.watermark + 4
    _, records, _ = read_avro(store.local_path(later).read_bytes())
    assert {r["id"] for r in records} == set(world.rows["job"])


GADGET = EntityShape(
    (
        ColumnSpec("id", "integer", True),
        ColumnSpec("flag", "boolean", False),
        ColumnSpec("small", "smallint", False),
        ColumnSpec("big", "bigint", False),
        ColumnSpec("ratio", "real", False),
        ColumnSpec("score", "double precision", False),
        ColumnSpec("label", "character varying(20)", False),
        ColumnSpec("price", "numeric(30,10)", False),
        ColumnSpec("at", "timestamp with time zone", False),
        ColumnSpec("wall", "timestamp without time zone", False),
        ColumnSpec("day", "date", False),
        ColumnSpec("tod", "time without time zone", False),
        ColumnSpec("uid", "uuid", False),
        ColumnSpec("doc", "jsonb", False),
        ColumnSpec("tags", "text[]", False),
        ColumnSpec("nums", "integer[]", False),
        ColumnSpec("blob", "bytea", False),
    )
)


def test_avro_types_follow_the_staging_column_types(
    world: World, store: LocalDirectoryStore
) -> None:
    full = {
        "flag": True,
        "small": -7,
        "big": 9_007_199_254_740_993,  # beyond a double's integers
        "ratio": 1.5,
        "score": 2.25,
        "label": "ünïcode",
        "price": Decimal("12345678901234567890.0123456789"),
        "at": datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC),
        "wall": datetime(2026, 3, 1, 8, 0, 0, 1),  # noqa: DTZ001 - wall clock
        "day": date(1969, 12, 31),
        "tod": time(23, 59, 59, 999999),
        "uid": "6f1c2b8e-3a2d-4c55-9a7e-1d2f3a4b5c6d",
        "doc": '{"b": [1, 2], "a": {"x": null}}',
        "tags": ["x", "y z"],
        "nums": [3, 1],
        "blob": b"\x00\xffbytes",
    }
    with psycopg.connect(world.dsn) as conn:
        staging = Staging(conn)
        for position, (key, values) in enumerate([(1, full), (2, {})], start=1):
            image = {"id": key, **values}
            staging.apply(
                world.org,
                "gadget",
                [
                    ChangeEvent(world.org, "gadget", "c", {"id": key}, None, image,
                                Position(position, position), GADGET, 1_700_000_000_000,
                                Origin("t", 0, position))
                ],
            )  # fmt: skip
    manifest = build(world, store, "gadget").manifest
    schema, records, _ = read_avro(store.local_path(manifest).read_bytes())
    types = {f["name"]: f["type"] for f in schema["fields"]}
    assert types["id"] == "int" and types["_fs_version"] == "long"
    assert types["big"] == ["null", "long"] and types["price"] == ["null", "string"]
    assert types["ratio"] == ["null", "float"] and types["blob"] == ["null", "bytes"]
    assert types["at"][1] == {"type": "long", "logicalType": "timestamp-micros"}
    assert types["wall"][1] == {"type": "long", "logicalType": "local-timestamp-micros"}
    assert types["day"][1] == {"type": "int", "logicalType": "date"}
    assert types["tod"][1] == {"type": "long", "logicalType": "time-micros"}
    assert types["uid"] == types["doc"] == types["tags"] == ["null", "string"]
    first, empty = records
    assert {k: v for k, v in first.items() if k not in ("doc", "tags", "nums")} == {
        "id": 1,
        "_fs_version": 1,
        **{k: v for k, v in full.items() if k not in ("doc", "tags", "nums")},
        "price": "12345678901234567890.0123456789",  # exact
    }
    assert json.loads(first["doc"]) == {"a": {"x": None}, "b": [1, 2]}
    assert json.loads(first["tags"]) == ["x", "y z"] and json.loads(first["nums"]) == [3, 1]
    assert empty == {"id": 2, "_fs_version": 2, **dict.fromkeys(full)}


def test_prune_keeps_the_newest(world: World, store: LocalDirectoryStore) -> None:
    built = []
    for round_ in range(4):
        world.upsert("account", 1, name=f"round {round_}")
        built.append(build(world, store, "account", keep=2))
    assert [len(r.pruned) for r in built] == [0, 0, 1, 1]
    kept = store.list(world.org, "account")
    assert [m.id for m in kept] == [built[3].manifest.id, built[2].manifest.id]
    assert store.latest(world.org, "account") == built[3].manifest
    folder = store.root / world.org / "account"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        name for m in kept for name in (m.file_name, m.manifest_name)
    )
    assert prune(store, world.org, "account", 1) == [built[2].manifest]
    assert not list((store.root / ".incoming").iterdir())  # no temporary files left behind


def test_manifest_records_the_projector_groups_committed_offsets(
    world: World, store: LocalDirectoryStore, bootstrap_servers: str
) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.structs import OffsetAndMetadata

    topic = f"fieldsync.{world.org}.account"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers)
    for index in range(5):
        producer.send(topic, b"x", partition=index % 2)
    producer.flush()
    producer.close()
    group = f"projector-{uuid.uuid4().hex[:8]}"
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    consumer.commit(
        {
            TopicPartition(topic, 0): OffsetAndMetadata(3, "", -1),
            TopicPartition(topic, 1): OffsetAndMetadata(2, "", -1),
        }
    )
    consumer.close()
    manifest = build_snapshot(
        world.dsn, world.org, "account", store, group=group, bootstrap_servers=bootstrap_servers
    ).manifest
    assert manifest.kafka.group == group
    assert manifest.kafka.offsets == {topic: {"0": 3, "1": 2}} and manifest.kafka.note is None
    none = committed_offsets(bootstrap_servers, "nobody", [topic])
    assert none.offsets == {} and "has no committed offsets" in (none.note or "")


def test_schedule_round_builds_what_changed_and_the_cli_builds_lists_prunes(
    world: World,
    store: LocalDirectoryStore,
    tmp_path: Path,
    bootstrap_servers: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    request.addfinalizer(get_settings.cache_clear)  # the CLI reads the environment below
    assert run_schedule([world.dsn], store, 0.01, group=GROUP, keep=2, rounds=2) == 2  # once each
    world.upsert("job", 1, status="late")
    assert run_schedule([world.dsn], store, 0.01, group=GROUP, keep=2, rounds=1) == 1
    assert len(store.list(world.org, "job")) == 2 and len(store.list(world.org, "account")) == 1
    for name, value in {
        "FIELDSYNC_STAGING_DSN": world.dsn,
        "FIELDSYNC_BOOTSTRAP_SERVERS": bootstrap_servers,
        "FIELDSYNC_DATA_DIR": str(store.root.parent),
        "FIELDSYNC_SNAPSHOT_KEEP": "3",
        "COLUMNS": "200",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    monkeypatch.chdir(tmp_path)  # no .env of the working tree

    def fieldsync(*args: str) -> str:
        done = CliRunner().invoke(cli, ["snapshot", *args])
        assert done.exit_code == 0, done.output
        return done.output

    world.upsert("job", 2, status="late")
    out = fieldsync("build", "--org", world.org)
    assert "built" in out and "unchanged" in out  # job moved, account did not
    assert "has no committed offsets" in out
    assert len(store.list(world.org, "job")) == 3
    assert world.org in fieldsync("list", "--org", world.org)
    assert "pruned 2 snapshots" in fieldsync("prune", "--keep", "1")
    assert len(store.list(world.org, "job")) == len(store.list(world.org, "account")) == 1


# -- the gateway: snapshot bootstrap -------------------------------------------------------------


def dispatcher_view(world: World) -> dict[str, dict[int, dict[str, Any]]]:
    """What d1 (dispatcher, team-a) sees: jobs of team-a, every account — as SQLite stores it."""

    def local_value(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.astimezone(UTC).isoformat()
        if isinstance(value, Decimal):
            return str(value)
        return value

    return {
        "job": {
            k: {c: local_value(v) for c, v in r.items()}
            for k, r in world.rows["job"].items()
            if r["owner_id"] == "team-a"
        },
        "account": {k: dict(r) for k, r in world.rows["account"].items()},
    }


def test_device_bootstraps_from_the_snapshot_file_then_continues_with_deltas(
    world: World, store: LocalDirectoryStore, settings: Settings, tmp_path: Path
) -> None:
    manifest = build(world, store, "account").manifest
    # changes after the snapshot: they must arrive as deltas
    world.upsert("account", 2, name="renamed")
    world.delete("account", 3)
    world.upsert("account", 9, owner_id="u9", name="new")
    world.upsert("job", 1, owner_id="team-b")
    token = mint(world.org, "d1", ["dispatcher"], teams=["team-a"])
    auth = {"authorization": f"Bearer {token}"}
    with running_gateway(settings, world.dsn, world.clock) as url:
        base = f"{url}/orgs/{world.org}/snapshots/account"
        answer = httpx.get(base, headers=auth)
        assert answer.status_code == 200, answer.text
        described = answer.json()
        assert described["sha256"] == manifest.sha256 and described["id"] == manifest.id
        assert described["watermark"] == manifest.watermark and described["rows"] == 6
        assert described["url"] == f"/orgs/{world.org}/snapshots/account/file?id={manifest.id}"
        etag = f'"{manifest.sha256}"'
        # the whole file: static, checksum as ETag, not re-compressed
        whole = httpx.get(f"{url}{described['url']}", headers=auth)
        assert whole.status_code == 200 and whole.headers["etag"] == etag
        assert whole.headers["accept-ranges"] == "bytes"
        assert "content-encoding" not in whole.headers
        assert whole.headers["content-type"] == "application/avro"
        assert int(whole.headers["content-length"]) == manifest.size
        # a download cut after n bytes resumes with a Range request (If-Range: same file only)
        n = manifest.size // 3
        with httpx.stream("GET", f"{url}{described['url']}", headers=auth) as cut:
            first = b""
            for chunk in cut.iter_raw(64):
                first += chunk
                if len(first) >= n:
                    break
        first = first[:n]
        rest = httpx.get(
            f"{url}{described['url']}",
            headers={**auth, "range": f"bytes={n}-", "if-range": etag},
        )
        assert rest.status_code == 206, rest.text
        assert rest.headers["content-range"] == f"bytes {n}-{manifest.size - 1}/{manifest.size}"
        data = first + rest.content
        assert data == whole.content == store.local_path(manifest).read_bytes()
        assert hashlib.sha256(data).hexdigest() == described["sha256"]
        # unchanged: 304
        cached = httpx.get(f"{url}{described['url']}", headers={**auth, "if-none-match": etag})
        assert cached.status_code == 304 and cached.headers["etag"] == etag
        assert cached.content == b""
        other = httpx.get(f"{url}{described['url']}", headers={**auth, "if-none-match": '"x"'})
        assert other.status_code == 200
        # the device loads the file, then syncs: account continues with deltas from the
        # snapshot's watermark, job (no snapshot for a team rule) bootstraps as usual
        _, records, _ = read_avro(data)
        rows = [{k: v for k, v in r.items() if k != "_fs_version"} for r in records]
        client = DeviceClient(url, world.org, token, tmp_path / "device.sqlite")
        client.refresh_metadata()
        client.store.begin_bootstrap("account")
        client.store.finish_bootstrap("account", rows, described["token"], described["watermark"])
        report = client.sync()
        assert report.bootstrapped == ["job"]
        assert (report.upserts, report.removes) == (2, 1)  # accounts 2 and 9; 3 removed
        stored = {e: {r["id"]: r for r in client.store.rows(e)} for e in ("job", "account")}
        assert stored == dispatcher_view(world)
        # and on: a later change arrives as a delta
        world.upsert("account", 5, name="later")
        report = client.sync()
        assert (report.upserts, report.bootstrapped) == (1, [])
        assert client.store.rows("account") == list(dispatcher_view(world)["account"].values())
        client.close()


def test_snapshot_endpoints_refuse(
    world: World, store: LocalDirectoryStore, settings: Settings
) -> None:
    def headers(user: str, roles: list[str], teams: list[str] | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {mint(world.org, user, roles, teams=teams)}"}

    dispatcher = headers("d1", ["dispatcher"], ["team-a"])
    with running_gateway(settings, world.dsn, world.clock) as url:
        base = f"{url}/orgs/{world.org}/snapshots"
        missing = httpx.get(f"{base}/account", headers=dispatcher)
        assert missing.status_code == 404 and missing.json()["error"] == "no_snapshot"
        build(world, store, "account")
        build(world, store, "job")
        assert httpx.get(f"{base}/account", headers=dispatcher).status_code == 200
        cases = {
            # technicians get accounts only through their jobs (related): no snapshot
            "related rule": (headers("u1", ["technician"]), "account"),
            "team rule": (dispatcher, "job"),
            "no offline role": (headers("u9", ["auditor"]), "account"),
            "other org": (
                {"authorization": f"Bearer {mint('elsewhere', 'd1', ['dispatcher'])}"},
                "account",
            ),
            "no token": ({}, "account"),
        }
        for name, (auth, entity) in cases.items():
            for suffix in ("", "/file"):
                response = httpx.get(f"{base}/{entity}{suffix}", headers=auth)
                expected = 401 if name == "no token" else 403
                assert response.status_code == expected, (name, suffix, response.text)
                assert "Traceback" not in response.text
        related = httpx.get(f"{base}/account", headers=headers("u1", ["technician"]))
        assert "distribution 'all'" in related.json()["detail"]
        bogus = httpx.get(f"{base}/account/file", params={"id": "../../x"}, headers=dispatcher)
        assert bogus.status_code == 404
        # below the retention horizon: deltas cannot continue from the snapshot
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            world.upsert("account", 1, name="moved on")
            conn.execute(
                f"UPDATE org_{world.org}._fs_entities SET horizon_version = version"
                " WHERE entity = 'account'"
            )
        for suffix in ("", "/file"):
            stale = httpx.get(f"{base}/account{suffix}", headers=dispatcher)
            assert stale.status_code == 409, stale.text
            assert stale.json()["reason"] == "below_retention_horizon"
            assert "retention horizon" in stale.json()["detail"]
        # a new staging epoch: every earlier snapshot is stale
        with psycopg.connect(world.dsn, autocommit=True) as conn:
            conn.execute(
                f"UPDATE org_{world.org}._fs_entities SET horizon_version = 0"
                " WHERE entity = 'account'"
            )
            bump_epoch(conn, world.org)
        stale = httpx.get(f"{base}/account", headers=dispatcher)
        assert stale.status_code == 409 and stale.json()["reason"] == "staging_epoch_changed"
        assert "epoch" in stale.json()["detail"]
        build(world, store, "account")  # a snapshot of the new epoch is served again
        assert httpx.get(f"{base}/account", headers=dispatcher).status_code == 200
