"""The source PostgreSQL as capture sees it: publication, slot, decoding calls, capture state.

Decoding goes through the SQL slot functions: ``pg_logical_slot_peek_binary_changes`` reads
whole transactions from the slot's confirmed position without consuming them, and
``pg_replication_slot_advance`` confirms them once the broker acknowledged every message. The
slot is created on a ``replication=database`` connection with ``EXPORT_SNAPSHOT``, so the
initial snapshot reads exactly the state at the slot's start.

Capture keeps a little state next to the slot, in schema ``fieldsync`` of the source database
(so a source restored from a backup brings back state and slot together): which slot epoch
finished its initial snapshot, and the highest offsets produced per topic partition (a broker
whose log is below them has lost data and capture re-snapshots).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader

from engine.streams.exceptions import (
    SlotMissing,
    SourceMisconfigured,
    SourceUnreachable,
    UnsupportedTable,
)
from engine.streams.pgoutput import format_lsn, parse_lsn
from engine.streams.spec import CaptureSpec

STATE_DDL = """
CREATE SCHEMA IF NOT EXISTS fieldsync;
CREATE TABLE IF NOT EXISTS fieldsync.capture_state (
    org text PRIMARY KEY,
    slot_name text NOT NULL,
    epoch uuid NOT NULL,
    consistent_lsn pg_lsn NOT NULL,
    snapshot_completed boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS fieldsync.capture_offsets (
    org text NOT NULL,
    topic text NOT NULL,
    partition int NOT NULL,
    high_offset bigint NOT NULL,
    PRIMARY KEY (org, topic, partition)
);
CREATE TABLE IF NOT EXISTS fieldsync.entity_snapshot (
    org text NOT NULL,
    entity text NOT NULL,
    epoch uuid NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'done')),
    last_key text[],
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org, entity)
);
CREATE TABLE IF NOT EXISTS fieldsync.signal (
    id text PRIMARY KEY,
    type text NOT NULL,
    data text
);
"""

SIGNAL_TABLE = "fieldsync.signal"


@dataclass(frozen=True)
class SlotState:
    epoch: uuid.UUID
    consistent_lsn: int
    snapshot_completed: bool


@dataclass(frozen=True)
class SourceColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool
    not_null: bool
    type_name: str  # format_type(): what a text value casts back to


@dataclass(frozen=True)
class CreatedSlot:
    """A slot just created, the exported snapshot and the connection keeping it valid."""

    consistent_lsn: int
    snapshot_name: str
    holder: psycopg.Connection[Any]


class LogicalSource:
    """One org's source database: checks, publication, slot, decoding and capture state."""

    def __init__(self, spec: CaptureSpec, *, app_name: str = "fieldsync-capture") -> None:
        self.spec = spec
        self._dsn = spec.source_dsn.get_secret_value()
        self._app_name = app_name
        self._conn: psycopg.AsyncConnection[Any] | None = None

    # -- connections -------------------------------------------------------------------
    async def connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name=self._app_name
                )
            except psycopg.OperationalError as error:
                raise SourceUnreachable(
                    f"org {self.spec.org}: source unreachable: {error}"
                ) from None
            for json_type in ("json", "jsonb"):  # JSON travels as its text
                self._conn.adapters.register_loader(json_type, TextLoader)
            await self._conn.execute(
                "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET synchronous_commit = on;"
                " SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 3"
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def database(self) -> str:
        return str(psycopg.conninfo.conninfo_to_dict(self._dsn).get("dbname") or "postgres")

    # -- preparation -------------------------------------------------------------------
    async def prepare(self) -> dict[str, list[SourceColumn]]:
        """Check the source can be captured; create state, signal table and publication.

        Returns each entity's columns in table order. Raises a clear error naming the org,
        entity and column for anything that cannot work.
        """
        conn = await self.connect()
        org = self.spec.org
        (wal_level,) = await (await conn.execute("SHOW wal_level")).fetchone()  # type: ignore[misc]
        if wal_level != "logical":
            raise SourceMisconfigured(
                f"org {org}: source has wal_level={wal_level};"
                " logical decoding needs wal_level=logical"
            )
        async with conn.transaction():
            # orgs sharing a source create the state schema concurrently: serialise them
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fieldsync.capture_state'))")
            await conn.execute(STATE_DDL)
        columns: dict[str, list[SourceColumn]] = {}
        for entity, table in self.spec.entities.items():
            columns[entity] = await self._columns(conn, entity, table)
        await self._ensure_publication(conn)
        return columns

    async def _columns(
        self, conn: psycopg.AsyncConnection[Any], entity: str, table: str
    ) -> list[SourceColumn]:
        org = self.spec.org
        rows = await (
            await conn.execute(
                """
                SELECT a.attname, a.atttypid::int, a.atttypmod, a.attnotnull,
                       coalesce(a.attnum = ANY(i.indkey), false) AS is_key,
                       format_type(a.atttypid, a.atttypmod)
                FROM pg_attribute a
                JOIN pg_class c ON c.oid = a.attrelid
                LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
                WHERE c.oid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum
                """,
                (table,),
            )
        ).fetchall()
        if not rows:
            raise UnsupportedTable(
                f"org {org}, entity {entity}: source table {table} does not exist"
            )
        result = [
            SourceColumn(name, oid, mod, key, not_null, type_name)
            for name, oid, mod, not_null, key, type_name in rows
        ]
        if not any(c.is_key for c in result):
            raise UnsupportedTable(
                f"org {org}, entity {entity}: table {table} has no primary key; "
                "capture needs one to key change events"
            )
        return result

    async def _ensure_publication(self, conn: psycopg.AsyncConnection[Any]) -> None:
        tables = [*self.spec.entities.values(), SIGNAL_TABLE]
        identifiers = sql.SQL(", ").join(sql.Identifier(*table.split(".", 1)) for table in tables)
        exists = await (
            await conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.spec.publication,)
            )
        ).fetchone()
        verb = (
            "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
        )
        await conn.execute(sql.SQL(verb).format(sql.Identifier(self.spec.publication), identifiers))

    # -- slot --------------------------------------------------------------------------
    async def slot_exists(self) -> bool:
        conn = await self.connect()
        row = await (
            await conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.spec.slot_name,)
            )
        ).fetchone()
        return row is not None

    async def drop_slot(self) -> None:
        conn = await self.connect()
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (self.spec.slot_name,),
        )

    def create_slot_exporting_snapshot(self) -> CreatedSlot:
        """Create the slot on a replication connection and export its starting snapshot.

        The returned connection must stay open until the snapshot has been imported.
        """
        try:
            holder = psycopg.connect(self._dsn, replication="database", autocommit=True)
        except psycopg.OperationalError as error:
            raise SourceUnreachable(
                f"org {self.spec.org}: replication connection refused: {error}"
            ) from None
        try:
            cursor = holder.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
                    sql.Identifier(self.spec.slot_name)
                )
            )
            row = cursor.fetchone()
        except psycopg.Error as error:
            holder.close()
            raise SourceMisconfigured(
                f"org {self.spec.org}: cannot create replication slot: {error}"
            ) from None
        assert row is not None
        return CreatedSlot(consistent_lsn=parse_lsn(row[1]), snapshot_name=row[2], holder=holder)

    async def peek(
        self, max_changes: int, upto_lsn: int | None = None
    ) -> list[tuple[int, int, bytes]]:
        """Whole transactions after the slot's confirmed position: (lsn, xid, pgoutput bytes)."""
        conn = await self.connect()
        try:
            cursor = await conn.execute(
                """
                SELECT lsn::text, xid::text::bigint, data
                FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s,
                     'proto_version', '1', 'publication_names', %s)
                """,  # binary results: bytea as raw bytes, not hex text
                (
                    self.spec.slot_name,
                    format_lsn(upto_lsn) if upto_lsn is not None else None,
                    max_changes,
                    self.spec.publication,
                ),
                binary=True,
            )
        except psycopg.errors.UndefinedObject:
            raise SlotMissing(
                f"org {self.spec.org}: replication slot {self.spec.slot_name} disappeared"
            ) from None
        except psycopg.OperationalError as error:
            raise SourceUnreachable(f"org {self.spec.org}: decoding failed: {error}") from None
        return [(parse_lsn(lsn), xid, data) for lsn, xid, data in await cursor.fetchall()]

    async def current_lsn(self) -> int:
        conn = await self.connect()
        (lsn,) = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()  # type: ignore[misc]
        return parse_lsn(lsn)

    async def wal_positions(self) -> tuple[int, int]:
        """(insert, flush) positions of the source's WAL: decoding sees only flushed WAL."""
        conn = await self.connect()
        row = await (
            await conn.execute(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
            )
        ).fetchone()
        assert row is not None
        return parse_lsn(row[0]), parse_lsn(row[1])

    async def advance(self, lsn: int) -> None:
        """Confirm everything before ``lsn``: the server may recycle that WAL now."""
        conn = await self.connect()
        await conn.execute(
            "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
            (self.spec.slot_name, format_lsn(lsn)),
        )

    async def confirmed_lsn(self) -> int | None:
        conn = await self.connect()
        row = await (
            await conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (self.spec.slot_name,),
            )
        ).fetchone()
        return parse_lsn(row[0]) if row and row[0] else None

    # -- capture state -----------------------------------------------------------------
    async def load_state(self) -> SlotState | None:
        conn = await self.connect()
        row = await (
            await conn.execute(
                "SELECT epoch, consistent_lsn::text, snapshot_completed"
                " FROM fieldsync.capture_state WHERE org = %s",
                (self.spec.org,),
            )
        ).fetchone()
        return SlotState(row[0], parse_lsn(row[1]), row[2]) if row else None

    async def begin_epoch(self, consistent_lsn: int) -> uuid.UUID:
        """Record a new slot epoch (a fresh slot + snapshot); forget old offset marks."""
        epoch = uuid.uuid4()
        conn = await self.connect()
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO fieldsync.capture_state (org, slot_name, epoch, consistent_lsn)
                VALUES (%s, %s, %s, %s::pg_lsn)
                ON CONFLICT (org) DO UPDATE SET slot_name = EXCLUDED.slot_name,
                    epoch = EXCLUDED.epoch, consistent_lsn = EXCLUDED.consistent_lsn,
                    snapshot_completed = false, updated_at = now()
                """,
                (self.spec.org, self.spec.slot_name, epoch, format_lsn(consistent_lsn)),
            )
            await conn.execute(
                "DELETE FROM fieldsync.capture_offsets WHERE org = %s", (self.spec.org,)
            )
        return epoch

    async def complete_snapshot(self, epoch: uuid.UUID) -> None:
        """The epoch's initial snapshot is on the broker: every entity is done for it."""
        conn = await self.connect()
        async with conn.transaction():
            await conn.execute(
                "UPDATE fieldsync.capture_state SET snapshot_completed = true, updated_at = now()"
                " WHERE org = %s AND epoch = %s",
                (self.spec.org, epoch),
            )
            await conn.execute(
                "DELETE FROM fieldsync.entity_snapshot WHERE org = %s", (self.spec.org,)
            )
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO fieldsync.entity_snapshot (org, entity, epoch, status)"
                    " VALUES (%s, %s, %s, 'done')",
                    [(self.spec.org, entity, epoch) for entity in self.spec.entities],
                )

    async def record_offsets(self, marks: dict[tuple[str, int], int]) -> None:
        if not marks:
            return
        conn = await self.connect()
        async with conn.cursor() as cursor:
            await cursor.executemany(
                """
                INSERT INTO fieldsync.capture_offsets (org, topic, partition, high_offset)
                VALUES (%s, %s, %s, %s)
                ON CONFLICT (org, topic, partition)
                DO UPDATE SET high_offset = greatest(
                    fieldsync.capture_offsets.high_offset, EXCLUDED.high_offset
                )
                """,
                [
                    (self.spec.org, topic, partition, offset)
                    for (topic, partition), offset in marks.items()
                ],
            )

    async def offset_marks(self) -> dict[tuple[str, int], int]:
        conn = await self.connect()
        rows = await (
            await conn.execute(
                "SELECT topic, partition, high_offset FROM fieldsync.capture_offsets"
                " WHERE org = %s",
                (self.spec.org,),
            )
        ).fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}
