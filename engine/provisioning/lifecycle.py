"""Applying provisioning commands: idempotent steps and the org's recorded state.

``fieldsync_control.org_lifecycle`` holds per org its state (``provisioning → active``,
``decommissioning → decommissioned``, or ``failed`` with the reason), the desired spec (secret
*references* only), the provisioning-topic partition that owns it (capture workers serve the orgs
of their partitions) and the last command applied.

Every step creates-if-missing or deletes-if-present, so a command applied again — after a crash
between steps, or when the topic is replayed — completes what is missing and changes nothing
else. The state goes to ``active``/``decommissioned`` only after the last step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from engine.config import Settings
from engine.control import run_control_ddl
from engine.projections.app import register_org
from engine.projections.projector import COUNTS_DDL
from engine.projections.staging import org_schema
from engine.provisioning.commands import Command, OrgSpec
from engine.runtime.placement import StagingServers
from engine.streams.topics import TopicAdmin, change_topic, dead_letter_topic, transaction_topic

log = logging.getLogger("fieldsync.provisioning")

LIFECYCLE_DDL = """
CREATE TABLE IF NOT EXISTS fieldsync_control.org_lifecycle (
    org text PRIMARY KEY,
    state text NOT NULL
        CHECK (state IN ('provisioning', 'active', 'decommissioning', 'decommissioned', 'failed')),
    reason text,
    spec jsonb,
    partition int,
    command_id text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

Step = Callable[[str], None]  # called before each step (tests inject crashes here)


@dataclass(frozen=True)
class OrgLifecycle:
    org: str
    state: str
    reason: str | None
    spec: OrgSpec | None
    partition: int | None
    command_id: str | None


def ensure_lifecycle_schema(conn: psycopg.Connection[Any]) -> None:
    run_control_ddl(conn, COUNTS_DDL, LIFECYCLE_DDL)


def read_lifecycle(conn: psycopg.Connection[Any], org: str | None = None) -> list[OrgLifecycle]:
    rows = conn.execute(
        "SELECT org, state, reason, spec, partition, command_id"
        " FROM fieldsync_control.org_lifecycle WHERE %(org)s::text IS NULL OR org = %(org)s"
        " ORDER BY org",
        {"org": org},
    ).fetchall()
    return [
        OrgLifecycle(o, s, r, OrgSpec.model_validate(spec) if spec else None, p, c)
        for o, s, r, spec, p, c in rows
    ]


def record_state(
    conn: psycopg.Connection[Any],
    command: Command,
    state: str,
    *,
    partition: int | None,
    reason: str | None = None,
    keep_spec: bool = True,
) -> None:
    spec = command.spec.model_dump(mode="json") if command.spec and keep_spec else None
    conn.execute(
        """
        INSERT INTO fieldsync_control.org_lifecycle
            (org, state, reason, spec, partition, command_id, updated_at)
        VALUES (%s, %s, %s, %s, %s, %s, now())
        ON CONFLICT (org) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,
            spec = EXCLUDED.spec, partition = coalesce(EXCLUDED.partition, org_lifecycle.partition),
            command_id = EXCLUDED.command_id, updated_at = now()
        """,
        (
            command.org,
            state,
            reason,
            orjson.dumps(spec).decode() if spec is not None else None,
            partition,
            command.id,
        ),
    )


class Provisioner:
    """Applies commands against the broker, the staging database and the org's source."""

    def __init__(self, settings: Settings, bootstrap_servers: str, staging_dsn: str) -> None:
        """``staging_dsn``: the main staging server (lifecycle and placements live there)."""
        self.settings = settings
        self.bootstrap = bootstrap_servers
        self.dsn = staging_dsn
        self.servers = StagingServers.from_settings(settings, staging_dsn)

    def _admin(self) -> TopicAdmin:
        return TopicAdmin(
            self.bootstrap,
            partitions=self.settings.topic_partitions,
            replication_factor=self.settings.topic_replication_factor,
        )

    def apply(
        self, command: Command, partition: int | None = None, step: Step | None = None
    ) -> str:
        """Bring the org to the command's desired state; returns the resulting state."""
        mark: Step = step or (lambda _: None)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            ensure_lifecycle_schema(conn)
            previous = next(iter(read_lifecycle(conn, command.org)), None)
            if command.kind == "decommission":
                if previous is None or previous.state == "decommissioned":
                    record_state(
                        conn, command, "decommissioned", partition=partition, keep_spec=False
                    )
                    return "decommissioned"
                record_state(conn, command, "decommissioning", partition=partition, keep_spec=False)
                try:
                    self._decommission(command.org, previous.spec, mark)
                except Exception as error:
                    reason = f"decommission incomplete: {error}"
                    record_state(
                        conn, command, "failed", partition=partition, reason=reason, keep_spec=False
                    )
                    raise
                record_state(conn, command, "decommissioned", partition=partition, keep_spec=False)
                return "decommissioned"
            assert command.spec is not None
            record_state(conn, command, "provisioning", partition=partition)
            removed = (
                set(previous.spec.entities) - set(command.spec.entities)
                if previous is not None and previous.spec is not None
                else set()
            )
            self._provision(command.org, command.spec, removed, mark)
            record_state(conn, command, "active", partition=partition)
            return "active"

    # -- steps ---------------------------------------------------------------------------------
    def _provision(self, org: str, spec: OrgSpec, removed: set[str], mark: Step) -> None:
        mark("topics")
        admin = self._admin()
        try:
            admin.ensure(
                [
                    *(change_topic(org, e) for e in spec.entities),
                    transaction_topic(org),
                    dead_letter_topic(org),
                ]
            )
            mark("remove_entities")
            admin.delete(change_topic(org, e) for e in removed)
        finally:
            admin.close()
        mark("placement")
        dsn = self.servers.dsn(self.servers.place(org))
        with psycopg.connect(dsn, autocommit=True) as conn:
            for entity in sorted(removed):
                self._drop_entity(conn, org, entity)
            mark("staging")
            register_org(
                dsn, org, retention_days=spec.retention_days, debezium_topics=spec.debezium_topics
            )
            mark("offline")
            self._offline(conn, org, spec, removed)

    def _drop_entity(self, conn: psycopg.Connection[Any], org: str, entity: str) -> None:
        schema = sql.Identifier(org_schema(org))
        with conn.transaction():
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}.{}, {}.{}").format(
                    schema,
                    sql.Identifier(entity),
                    schema,
                    sql.Identifier(f"{entity}__log"),
                )
            )
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f'"{org_schema(org)}"._fs_entities',)
            ).fetchone()
            if exists and exists[0]:
                conn.execute(
                    sql.SQL("DELETE FROM {}._fs_entities WHERE entity = %s").format(schema),
                    (entity,),
                )
            conn.execute(
                "DELETE FROM fieldsync_control.projection_counts WHERE org = %s AND entity = %s",
                (org, entity),
            )
            conn.execute(COUNTS_DDL)  # the control tables of an older version lack `stopped`
            conn.execute(
                "DELETE FROM fieldsync_control.stopped WHERE org = %s AND entity = %s",
                (org, entity),
            )
            conn.execute(
                "DELETE FROM fieldsync_control.accepted_types WHERE org = %s AND entity = %s",
                (org, entity),
            )

    def _offline(
        self, conn: psycopg.Connection[Any], org: str, spec: OrgSpec, removed: set[str]
    ) -> None:
        """Store the offline section (validated as far as staging allows yet); entities that
        left the org leave every profile, so devices receive their removal."""
        from gateway.store import ensure_schema, org_state, put_config

        ensure_schema(conn)
        if spec.offline is not None:
            document = dict(spec.offline)
        else:
            _, current, _ = org_state(conn, org)
            document = current.model_dump(mode="json")
        if removed or spec.offline is not None:
            document = _without_entities(document, removed | _not_in(document, spec))
            put_config(conn, org, document, pending=True)

    def _decommission(self, org: str, spec: OrgSpec | None, mark: Step) -> None:
        mark("source")
        if spec is not None:
            self._drop_source(org, spec)
        mark("topics")
        admin = self._admin()
        try:
            prefix = f"fieldsync.{org}."
            admin.delete(t for t in admin.existing() if t.startswith(prefix))
        finally:
            admin.close()
        mark("staging")
        with (
            psycopg.connect(self.servers.dsn_for(org), autocommit=True) as conn,
            conn.transaction(),
        ):
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(org_schema(org)))
            )
            conn.execute("DELETE FROM fieldsync_control.projection_counts WHERE org = %s", (org,))
            conn.execute(COUNTS_DDL)  # the control tables of an older version lack `stopped`
            conn.execute("DELETE FROM fieldsync_control.stopped WHERE org = %s", (org,))
            conn.execute("DELETE FROM fieldsync_control.accepted_types WHERE org = %s", (org,))
            conn.execute("DELETE FROM fieldsync_control.breaker_pauses WHERE org = %s", (org,))
            conn.execute("DELETE FROM fieldsync_control.orgs WHERE org = %s", (org,))
        mark("snapshots")
        _delete_snapshots(self.settings, org)
        mark("placement")
        self.servers.forget(org)

    def _drop_source(self, org: str, spec: OrgSpec) -> None:
        """Slot, publication and capture state on the source (the slot may be busy for a
        moment while a capture worker stops: retried)."""
        capture = spec.capture_spec(org)
        with psycopg.connect(capture.source_dsn.get_secret_value(), autocommit=True) as source:
            for attempt in range(50):
                try:
                    source.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        (capture.slot_name,),
                    )
                    break
                except psycopg.errors.ObjectInUse:
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
            source.execute(
                sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(capture.publication))
            )
            has_state = source.execute("SELECT to_regclass('fieldsync.capture_state') IS NOT NULL")
            row = has_state.fetchone()
            if row and row[0]:
                for table in ("capture_state", "capture_offsets", "entity_snapshot"):
                    source.execute(
                        sql.SQL("DELETE FROM fieldsync.{} WHERE org = %s").format(
                            sql.Identifier(table)
                        ),
                        (org,),
                    )


def _not_in(document: dict[str, Any], spec: OrgSpec) -> set[str]:
    return {e for e in document.get("entities", {}) if e not in spec.entities}


def _without_entities(document: dict[str, Any], entities: set[str]) -> dict[str, Any]:
    if not entities:
        return document
    result = dict(document)
    result["entities"] = {
        k: v for k, v in document.get("entities", {}).items() if k not in entities
    }
    profiles = {}
    for name, profile in document.get("profiles", {}).items():
        items = [
            i
            for i in profile.get("items", [])
            if i.get("entity") not in entities
            and (i.get("related") or {}).get("entity") not in entities
        ]
        profiles[name] = {**profile, "items": items}
    result["profiles"] = profiles
    return result


def _delete_snapshots(settings: Settings, org: str) -> None:
    """Every snapshot file and manifest of the org in the snapshot store."""
    from engine.snapshots.store import default_store

    store = default_store(settings)
    for owner, entity in store.entities():
        if owner == org:
            for manifest in store.list(org, entity):
                store.delete(org, entity, manifest.id)


__all__ = [
    "OrgLifecycle",
    "Provisioner",
    "ensure_lifecycle_schema",
    "read_lifecycle",
    "record_state",
]
