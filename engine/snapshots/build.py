"""Building a snapshot: one staging entity's live rows at its watermark → Avro file + manifest.

1. Read the projector group's committed offsets on the entity's change topics. They are read
   *before* staging: the projector commits offsets only after the batch is in staging, so every
   message below them is already in what step 2 reads (replaying from them onto the snapshot
   misses nothing; what it repeats is skipped by staging's idempotence).
2. In one ``REPEATABLE READ``, read-only transaction: the staging epoch, the entity's watermark,
   horizon, key and columns, then — streamed through a server-side cursor, in key order — the
   live rows with ``_fs_version <= watermark``. Writers commit versions in order (see
   ``docs/staging.md``), so the rows are exactly the entity at that watermark, however many
   changes the projector commits meanwhile.
3. Write the Avro object container file (deflate), its SHA-256, and publish file then manifest
   in the store. A snapshot with the same watermark and epoch is never rebuilt (same content).
4. Prune: keep the newest ``keep`` snapshots of the entity.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import fastavro
import psycopg
from psycopg import sql

from engine.projections.staging import SYSTEM_COLUMNS, org_schema
from engine.snapshots.avro import RecordLayout, record_layout
from engine.snapshots.exceptions import SnapshotNotFound, UnknownEntity
from engine.snapshots.store import (
    KafkaOffsets,
    LocalDirectoryStore,
    Manifest,
    SnapshotStore,
    prune,
    snapshot_id,
)

log = logging.getLogger("fieldsync.snapshots")

CODEC = "deflate"
FETCH_ROWS = 5_000


def change_topic(org: str, entity: str) -> str:
    return f"fieldsync.{org}.{entity}"


@dataclass(frozen=True)
class Head:
    """What the snapshot's transaction reads before the rows."""

    epoch: str
    watermark: int
    horizon: int
    keys: tuple[str, ...]
    columns: dict[str, str]  # source column → staging type, table order
    read_at: datetime


@dataclass
class BuildResult:
    manifest: Manifest
    built: bool  # False: a snapshot at this watermark and epoch already existed
    pruned: list[Manifest] = field(default_factory=list)


def _read_head(conn: psycopg.Connection[Any], org: str, entity: str) -> Head:
    """Epoch, watermark, horizon, key and columns — the first reads of the snapshot."""
    row = conn.execute(
        "SELECT staging_epoch FROM fieldsync_control.orgs WHERE org = %s", (org,)
    ).fetchone()
    if row is None:
        raise UnknownEntity(f"org {org} is not registered")
    epoch = str(row[0])
    schema = org_schema(org)
    present = conn.execute("SELECT to_regclass(%s)", (f'"{schema}"._fs_entities',)).fetchone()
    marks = None
    if present is not None and present[0] is not None:
        marks = conn.execute(
            sql.SQL(
                "SELECT version, horizon_version, key_columns FROM {}._fs_entities"
                " WHERE entity = %s"
            ).format(sql.Identifier(schema)),
            (entity,),
        ).fetchone()
    if marks is None:
        raise UnknownEntity(f"{org}.{entity}: no such staging entity (nothing projected yet?)")
    watermark, horizon, keys = marks
    columns = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (f'"{schema}"."{entity}"',),
    ).fetchall()
    return Head(
        epoch,
        int(watermark),
        int(horizon),
        tuple(keys),
        {name: pg_type for name, pg_type in columns if name not in SYSTEM_COLUMNS},
        datetime.now(UTC),
    )


def _debezium_topics(conn: psycopg.Connection[Any], org: str, entity: str) -> list[str]:
    row = conn.execute(
        "SELECT debezium_topics FROM fieldsync_control.orgs WHERE org = %s", (org,)
    ).fetchone()
    mapping = (row[0] if row else None) or {}
    return sorted(topic for topic, target in mapping.items() if target == entity)


def committed_offsets(
    bootstrap_servers: str | None, group: str, topics: Sequence[str]
) -> KafkaOffsets:
    """The group's committed offsets on ``topics`` (kafka-python's admin client); an empty map
    with a note when there are none or the broker cannot be asked."""
    if bootstrap_servers is None:
        return KafkaOffsets(group, {}, "no broker configured: offsets not recorded")
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from engine.runtime.kafka import client_options

    config: dict[str, Any] = {
        **client_options(),
        "bootstrap_servers": bootstrap_servers.split(","),
        "client_id": "fieldsync-snapshot",
    }
    for name, value in (("bootstrap_timeout_ms", 10_000), ("request_timeout_ms", 10_000)):
        if name in KafkaAdminClient.DEFAULT_CONFIG:
            config[name] = value
    try:
        admin = KafkaAdminClient(**config)
    except KafkaError as error:
        log.warning("snapshot: broker %s unreachable: %s", bootstrap_servers, error)
        return KafkaOffsets(group, {}, f"broker unreachable ({error}): offsets not recorded")
    try:
        if hasattr(admin, "list_consumer_group_offsets"):  # kafka-python 2.x
            found = admin.list_consumer_group_offsets(group)
        else:  # kafka-python 3.x renamed it
            found = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError as error:
        log.warning("snapshot: offsets of group %s not readable: %s", group, error)
        return KafkaOffsets(group, {}, f"offsets not readable ({error}): not recorded")
    finally:
        admin.close()
    wanted = set(topics)
    offsets: dict[str, dict[str, int]] = {}
    for tp, committed in sorted(found.items(), key=lambda item: (item[0].topic, item[0].partition)):
        if tp.topic in wanted and committed.offset is not None and committed.offset >= 0:
            offsets.setdefault(tp.topic, {})[str(tp.partition)] = int(committed.offset)
    note = None
    if not offsets:
        note = f"group {group} has no committed offsets on {', '.join(sorted(wanted))}"
    return KafkaOffsets(group, offsets, note)


def _sync_marker(org: str, entity: str, ident: str) -> bytes:
    """Deterministic, so a file is a function of its content (same snapshot → same bytes)."""
    return hashlib.sha256(f"{org}/{entity}/{ident}".encode()).digest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _work_dir(store: SnapshotStore, work_dir: Path | None) -> Path:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return work_dir
    if isinstance(store, LocalDirectoryStore):
        return store.work_dir()
    return Path(tempfile.gettempdir())


def build_snapshot(
    dsn: str,
    org: str,
    entity: str,
    store: SnapshotStore,
    *,
    group: str,
    bootstrap_servers: str | None = None,
    keep: int | None = None,
    work_dir: Path | None = None,
) -> BuildResult:
    """Snapshot ``org``.``entity`` at its current watermark (see the module docstring)."""
    from gateway.store import ensure_schema  # owns fieldsync_control.orgs.staging_epoch

    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema(conn)
        topics = [change_topic(org, entity), *_debezium_topics(conn, org, entity)]
        kafka = committed_offsets(bootstrap_servers, group, topics)  # before staging: step 1
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            head = _read_head(conn, org, entity)
            ident = snapshot_id(head.watermark, head.epoch)
            try:
                existing = store.get(org, entity, ident)
            except SnapshotNotFound:
                existing = None
            if existing is not None:
                log.info("snapshot %s of %s.%s exists: not rebuilt", ident, org, entity)
                pruned = prune(store, org, entity, keep) if keep else []
                return BuildResult(existing, False, pruned)
            layout = record_layout(org, entity, head.columns, head.keys)
            handle, name = tempfile.mkstemp(
                prefix=f".{org}.{entity}.", suffix=".avro.tmp", dir=_work_dir(store, work_dir)
            )
            path = Path(name)
            try:
                with os.fdopen(handle, "wb") as out:
                    rows = _write_rows(conn, org, entity, head, layout, out, ident)
                manifest = Manifest(
                    org=org,
                    entity=entity,
                    watermark=head.watermark,
                    epoch=head.epoch,
                    horizon=head.horizon,
                    keys=list(head.keys),
                    columns=[{"name": c, "type": t} for c, t in head.columns.items()],
                    schema=layout.schema,
                    rows=rows,
                    size=path.stat().st_size,
                    sha256=_sha256(path),
                    codec=CODEC,
                    kafka=kafka,
                    created_at=head.read_at,
                )
                store.put(manifest, path)
            finally:
                path.unlink(missing_ok=True)
    log.info("snapshot %s of %s.%s: %d rows, %d bytes", ident, org, entity, rows, manifest.size)
    pruned = prune(store, org, entity, keep) if keep else []
    return BuildResult(manifest, True, pruned)


def _write_rows(
    conn: psycopg.Connection[Any],
    org: str,
    entity: str,
    head: Head,
    layout: RecordLayout,
    out: IO[bytes],
    ident: str,
) -> int:
    schema, table = sql.Identifier(org_schema(org)), sql.Identifier(entity)
    query = sql.SQL(
        "SELECT {select} FROM {schema}.{table} t"
        " WHERE NOT t._fs_deleted AND t._fs_version <= %(w)s ORDER BY {keys}"
    ).format(
        select=layout.select,
        schema=schema,
        table=table,
        keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in head.keys),
    )
    count = 0

    def records() -> Iterator[dict[str, Any]]:
        nonlocal count
        with conn.cursor(name=f"fs_snapshot_{entity}") as cursor:
            cursor.itersize = FETCH_ROWS
            cursor.execute(query, {"w": head.watermark})
            for row in cursor:
                count += 1
                yield dict(zip(layout.fields, row, strict=True))

    fastavro.writer(
        out,
        fastavro.parse_schema(layout.schema),
        records(),
        codec=CODEC,
        sync_marker=_sync_marker(org, entity, ident),
        metadata={
            "fieldsync.org": org,
            "fieldsync.entity": entity,
            "fieldsync.watermark": str(head.watermark),
            "fieldsync.epoch": head.epoch,
        },
    )
    return count


def staging_entities(dsn: str, org: str | None = None) -> list[tuple[str, str]]:
    """(org, entity) of every staging entity (of ``org``, or of every registered org)."""
    found: list[tuple[str, str]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('fieldsync_control.orgs')").fetchone()
        if exists is None or exists[0] is None:
            return []
        orgs = [
            name
            for (name,) in conn.execute(
                "SELECT org FROM fieldsync_control.orgs WHERE %s::text IS NULL OR org = %s"
                " ORDER BY org",
                (org, org),
            )
        ]
        for name in orgs:
            present = conn.execute(
                "SELECT to_regclass(%s)", (f'"{org_schema(name)}"._fs_entities',)
            ).fetchone()
            if present is None or present[0] is None:
                continue
            for (entity,) in conn.execute(
                sql.SQL("SELECT entity FROM {}._fs_entities ORDER BY entity").format(
                    sql.Identifier(org_schema(name))
                )
            ):
                found.append((name, entity))
    return found


__all__ = [
    "BuildResult",
    "Head",
    "build_snapshot",
    "change_topic",
    "committed_offsets",
    "staging_entities",
]
