"""Provisioning lifecycle against a real broker and PostgreSQL (source and staging)."""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka.admin import KafkaAdminClient

from engine.config import load_settings
from engine.projections.lag import projector_lag
from engine.provisioning.commands import (
    PROVISIONING_TOPIC,
    Command,
    CommandError,
    command_from_document,
)
from engine.provisioning.lifecycle import Provisioner, ensure_lifecycle_schema, read_lifecycle
from engine.provisioning.worker import publish
from engine.snapshots.build import build_snapshot
from engine.snapshots.store import default_store
from engine.streams.reader import read_all
from tests.projector_helpers import projector_env, start_projector, start_worker, wait_until

OFFLINE = {
    "entities": {"job": {"owner_column": "owner_id"}, "site": {}},
    "roles": {"tech": {"profile": "field"}},
    "profiles": {
        "field": {
            "items": [
                {"entity": "job", "distribution": "owner", "priority": 1},
                {"entity": "site", "distribution": "all", "priority": 2},
            ]
        }
    },
}


def source_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.jobs (id int PRIMARY KEY, owner_id text, title text);"
            "CREATE TABLE public.sites (id int PRIMARY KEY, name text);"
            "CREATE TABLE public.notes (id int PRIMARY KEY, body text);"
            "INSERT INTO public.jobs SELECT g, 'u' || (g % 3), 'job ' || g"
            " FROM generate_series(1, 50) g;"
            "INSERT INTO public.sites SELECT g, 'site ' || g FROM generate_series(1, 5) g;"
            "INSERT INTO public.notes SELECT g, 'note ' || g FROM generate_series(1, 7) g;"
        )


def document(dsn: str, org: str, entities: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"org": org, "source_dsn": dsn, "entities": entities, "offline": OFFLINE, **extra}


def topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def control_state(dsn: str) -> dict[str, Any]:
    """Everything provisioning decides, without timestamps and command ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_lifecycle_schema(conn)
        lifecycle = [(r.org, r.state, r.reason, r.spec) for r in read_lifecycle(conn)]
        orgs = conn.execute(
            "SELECT org, retention_days, debezium_topics FROM fieldsync_control.orgs ORDER BY org"
        ).fetchall()
        offline = conn.execute(
            "SELECT org, config FROM fieldsync_control.offline_config ORDER BY org"
        ).fetchall()
    return {"lifecycle": lifecycle, "orgs": orgs, "offline": offline}


# -- commands -------------------------------------------------------------------------------------


def test_commands_are_validated_and_never_carry_a_password() -> None:
    good = {"org": "acme", "source_dsn": "postgresql://app@db/crm", "entities": {"job": "a.jobs"}}
    command = command_from_document("provision", good)
    assert Command.from_bytes(command.to_bytes()) == command
    cases = {
        "password in the DSN": (
            {**good, "source_dsn": "postgresql://app:s3cret@db/crm"},
            "contains a password",
        ),
        "no source": ({"org": "acme", "entities": {"job": "a.jobs"}}, "exactly one of"),
        "both sources": ({**good, "source_dsn_secret": "env:CRM"}, "exactly one of"),
        "bad secret reference": (
            {"org": "acme", "source_dsn_secret": "vault:x", "entities": {"job": "a.jobs"}},
            "source_dsn_secret",
        ),
        "bad entity": ({**good, "entities": {"Job": "a.jobs"}}, "lowercase identifier"),
        "bad table": ({**good, "entities": {"job": "jobs"}}, "'schema.table'"),
        "bad org": ({**good, "org": "Acme!"}, "org"),
        "unknown field": ({**good, "colour": "red"}, "colour"),
    }
    for name, (doc, message) in cases.items():
        with pytest.raises(CommandError) as refused:
            command_from_document("provision", doc)
        assert message in str(refused.value), (name, str(refused.value))
    with pytest.raises(CommandError):
        Command.from_bytes(b'{"kind": "provision", "org": "acme"}')


# -- the lifecycle, step by step -----------------------------------------------------------------


def test_provision_update_decommission_and_nothing_left(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    """Provision → capture + projection → add/remove entities → decommission: nothing left."""
    org = f"p{uuid.uuid4().hex[:8]}"
    source_tables(fresh_database)
    settings = load_settings(data_dir=tmp_path, producer_idempotence=False)
    env = projector_env(
        fresh_broker,
        fresh_database,
        FIELDSYNC_DATA_DIR=str(tmp_path),
        FIELDSYNC_PROVISIONER_RECONCILE_S="0.5",
    )
    entities = {"job": "public.jobs", "site": "public.sites"}
    publish(
        settings,
        fresh_broker,
        [command_from_document("provision", document(fresh_database, org, entities))],
    )
    log = tmp_path / "workers.log"
    provisioner = start_worker("provisioner", env, log)
    projector = start_projector(env, log)
    schema = f"org_{org}"

    def count(entity: str) -> int:
        try:
            with psycopg.connect(fresh_database) as conn:
                row = conn.execute(
                    f'SELECT count(*) FROM "{schema}"."{entity}" WHERE NOT _fs_deleted'
                ).fetchone()
                return int(row[0]) if row else -1
        except psycopg.errors.UndefinedTable:
            return -1

    def state() -> str | None:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            ensure_lifecycle_schema(conn)
            rows = read_lifecycle(conn, org)
        return rows[0].state if rows else None

    try:
        wait_until(lambda: state() == "active", 60, "org active", log)
        wait_until(lambda: count("job") == 50 and count("site") == 5, 90, "staging filled", log)
        change_topics = [f"fieldsync.{org}.job", f"fieldsync.{org}.site"]
        wait_until(  # the admin status reports this lag; the projector commits after applying
            lambda: (
                projector_lag(fresh_broker, "fieldsync-projector", change_topics)
                == dict.fromkeys(change_topics, 0)
            ),
            30,
            "projector lag 0",
            log,
        )
        with psycopg.connect(fresh_database) as conn:
            site_watermark = conn.execute(
                f"SELECT version FROM \"{schema}\"._fs_entities WHERE entity = 'site'"
            ).fetchone()
        # add notes, remove job: only those two change
        publish(
            settings,
            fresh_broker,
            [
                command_from_document(
                    "update",
                    document(
                        fresh_database, org, {"site": "public.sites", "notes": "public.notes"}
                    ),
                )
            ],
        )
        wait_until(lambda: count("notes") == 7, 90, "new entity snapshotted", log)
        wait_until(lambda: count("job") == -1, 30, "removed entity dropped", log)
        assert f"fieldsync.{org}.job" not in topics(fresh_broker)
        with psycopg.connect(fresh_database) as conn:
            assert (
                conn.execute(
                    f"SELECT version FROM \"{schema}\"._fs_entities WHERE entity = 'site'"
                ).fetchone()
                == site_watermark
            )  # the other entity was not touched (no re-snapshot)
            config = conn.execute(
                "SELECT config FROM fieldsync_control.offline_config WHERE org = %s", (org,)
            ).fetchone()
        assert config is not None and "job" not in config[0]["entities"]  # devices drop it
        assert all(i["entity"] != "job" for p in config[0]["profiles"].values() for i in p["items"])
        # a snapshot file, which decommission must remove as well
        store = default_store(settings)
        build_snapshot(fresh_database, org, "site", store, group="fieldsync-projector")
        assert store.list(org, "site")
        # decommission: nothing left anywhere
        publish(settings, fresh_broker, [command_from_document("decommission", {}, org)])
        wait_until(lambda: state() == "decommissioned", 60, "decommissioned", log)
    finally:
        for process in (provisioner, projector):
            process.send_signal(signal.SIGTERM)
        for process in (provisioner, projector):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert not {t for t in topics(fresh_broker) if t.startswith(f"fieldsync.{org}.")}
    with psycopg.connect(fresh_database) as conn:
        assert (
            conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
            is None
        )
        slot = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (f"fieldsync_{org}",)
        ).fetchone()
        publication = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (f"fieldsync_{org}",)
        ).fetchone()
        registered = conn.execute(
            "SELECT 1 FROM fieldsync_control.orgs WHERE org = %s", (org,)
        ).fetchone()
        capture_rows = conn.execute(
            "SELECT count(*) FROM fieldsync.capture_state WHERE org = %s", (org,)
        ).fetchone()
    assert slot is None and publication is None and registered is None
    assert capture_rows == (0,)
    assert not [e for o, e in default_store(settings).entities() if o == org]


def test_a_crash_between_steps_completes_when_the_command_is_applied_again(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    settings = load_settings(data_dir=tmp_path, producer_idempotence=False)
    provisioner = Provisioner(settings, fresh_broker, fresh_database)
    for crash_at in ("topics", "remove_entities", "staging", "offline"):
        org = f"c{uuid.uuid4().hex[:8]}"
        command = command_from_document(
            "provision", document(fresh_database, org, {"job": "public.jobs", "site": "x.sites"})
        )

        def crash(step: str, at: str = crash_at) -> None:
            if step == at:
                raise RuntimeError(f"crash before {step}")

        with pytest.raises(RuntimeError):
            provisioner.apply(command, 0, crash)
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            assert read_lifecycle(conn, org)[0].state == "provisioning"  # visibly half done
        assert provisioner.apply(command, 0) == "active"  # redelivery completes it
        assert provisioner.apply(command, 0) == "active"  # and again changes nothing
        with psycopg.connect(fresh_database) as conn:
            assert conn.execute(
                "SELECT 1 FROM fieldsync_control.orgs WHERE org = %s", (org,)
            ).fetchone()
            assert conn.execute(
                "SELECT 1 FROM fieldsync_control.offline_config WHERE org = %s", (org,)
            ).fetchone()
        assert {f"fieldsync.{org}.job", f"fieldsync.{org}.site"} <= topics(fresh_broker)


def test_replaying_the_provisioning_topic_reproduces_the_control_state(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    settings = load_settings(data_dir=tmp_path, producer_idempotence=False)
    prefix = f"r{uuid.uuid4().hex[:6]}"
    a, b, c = (prefix + n for n in "abc")
    entities = {"job": "public.jobs", "site": "public.sites"}
    commands = [
        command_from_document("provision", document(fresh_database, a, entities)),
        command_from_document("provision", document(fresh_database, b, entities)),
        command_from_document(
            "update", document(fresh_database, a, {"job": "public.jobs"}, retention_days=7)
        ),
        command_from_document("provision", document(fresh_database, c, {"site": "public.sites"})),
        command_from_document("decommission", {}, b),
    ]
    publish(settings, fresh_broker, commands)
    provisioner = Provisioner(settings, fresh_broker, fresh_database)

    def apply_topic() -> None:  # what the provisioner agent does, message by message
        for partition, _, _, value, _ in read_all(fresh_broker, PROVISIONING_TOPIC):
            assert value is not None
            provisioner.apply(Command.from_bytes(value), partition)

    apply_topic()
    before = control_state(fresh_database)
    assert [(o, s) for o, s, _, _ in before["lifecycle"]] == [
        (a, "active"),
        (b, "decommissioned"),
        (c, "active"),
    ]
    with psycopg.connect(fresh_database, autocommit=True) as conn:  # an empty control schema
        conn.execute("DROP SCHEMA fieldsync_control CASCADE")
    apply_topic()
    assert control_state(fresh_database) == before
