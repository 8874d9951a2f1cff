"""Builds Debezium change events (key + envelope) for one org and encodes them with a framing.

An :class:`EntityEncoder` is one schema version of one entity: it turns decoded column values
into Avro records and framed bytes. :class:`EventEncoder` keeps the encoders of an org, makes a
new version when a table's columns change (a new nullable column gives a new, backward
compatible schema) and registers every writer schema before its first use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import engine
from engine.streams.avro_writer import compile_writer, write_long, write_string
from engine.streams.framing import Framing, WriterSchema
from engine.streams.pgoutput import Unchanged
from engine.streams.pgtypes import column_type, unavailable_placeholder
from engine.streams.schemas import (
    SOURCE_FIELD_ORDER,
    SOURCE_SCHEMA,
    TOPIC_PREFIX,
    TRANSACTION_BLOCK_SCHEMA,
    CapturedColumn,
    EntitySchema,
    signature_of,
)
from engine.streams.source import SourceColumn
from engine.streams.topics import change_topic

# encode_envelope writes the source block by hand, in this order
assert tuple(f["name"] for f in SOURCE_SCHEMA["fields"]) == SOURCE_FIELD_ORDER

VERSION = f"fieldsync-{engine.__version__}"


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where a change sits in the source's history; (commit_lsn, lsn) orders all changes."""

    commit_lsn: int
    lsn: int
    xid: int | None
    commit_ms: int
    snapshot: str = "false"

    @property
    def sequence(self) -> str:
        return f'["{self.commit_lsn}","{self.lsn}"]'


class BatchClock:
    """The processing time the events of one batch share.

    It becomes the envelope's ``ts_ms``/``ts_us``/``ts_ns``.
    """

    def __init__(self) -> None:
        self.now_ns: int | None = None

    def tick(self) -> None:
        self.now_ns = time.time_ns()


class EntityEncoder:
    """One schema version of one entity; encodes its keys and envelopes."""

    def __init__(
        self,
        schema: EntitySchema,
        key_writer: WriterSchema,
        value_writer: WriterSchema,
        *,
        database: str,
        source_schema: str,
        source_table: str,
        clock: BatchClock | None = None,
    ) -> None:
        self.schema = schema
        self.topic = change_topic(schema.org, schema.entity)
        self._key_writer = key_writer
        self._value_writer = value_writer
        self._columns = schema.columns
        self._key_indexes = [i for i, c in enumerate(schema.columns) if c.is_key]
        self._key_names = [schema.columns[i].name for i in self._key_indexes]
        self._to_avro = [c.type.to_avro for c in schema.columns]
        self._text_to_avro = [c.type.text_to_avro for c in schema.columns]
        self._placeholders = [unavailable_placeholder(c.type) for c in schema.columns]
        self._names = [c.name for c in schema.columns]
        self._write_value = compile_writer(schema.value_schema)
        self._write_block = compile_writer(TRANSACTION_BLOCK_SCHEMA)
        self._source_key: tuple[int, str, int | None] | None = None
        self._source_head = self._source_mid = b""
        self._ts_key: int | None = None
        self._ts_tail = b""
        self.clock = clock or BatchClock()
        # the source block's constant string fields (xmin is always null: written inline)
        self._source_base: dict[str, str] = {
            "version": VERSION,
            "connector": "postgresql",
            "name": TOPIC_PREFIX,
            "db": database,
            "schema": source_schema,
            "table": source_table,
        }

    @property
    def data_collection(self) -> str:
        return f"{self._source_base['schema']}.{self._source_base['table']}"

    # -- values ------------------------------------------------------------------------
    def row_from_text(self, values: Sequence[bytes | Unchanged | None]) -> dict[str, Any]:
        """A record from pgoutput text values (unchanged TOAST → Debezium's placeholder)."""
        return {
            name: convert(raw) if raw.__class__ is bytes else (None if raw is None else placeholder)
            for name, convert, placeholder, raw in zip(
                self._names, self._text_to_avro, self._placeholders, values, strict=True
            )
        }

    def row_from_python(self, values: Sequence[Any]) -> dict[str, Any]:
        """A record from values psycopg loaded (the snapshot path)."""
        return {
            name: None if value is None else convert(value)
            for name, convert, value in zip(self._names, self._to_avro, values, strict=True)
        }

    def key_of(self, row: dict[str, Any]) -> dict[str, Any]:
        return {name: row[name] for name in self._key_names}

    def key_changed(self, old: dict[str, Any], new: dict[str, Any]) -> bool:
        return any(old[name] != new[name] for name in self._key_names)

    # -- encoding ----------------------------------------------------------------------
    def encode_key(self, key: dict[str, Any]) -> bytes:
        return self._key_writer.frame(key)

    def encode_envelope(
        self,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        position: SourcePosition,
        transaction: dict[str, Any] | None,
    ) -> bytes:
        """Header + the envelope's Avro encoding, composed from parts that change at different
        rates: the source block's constant and per-transaction fields are encoded once per
        transaction, the processing timestamps once per batch (fields in
        :data:`~engine.streams.schemas.SOURCE_SCHEMA` order; tests check it against fastavro)."""
        buffer = bytearray(self._value_writer.header)
        append = buffer.append
        for image in (before, after):
            if image is None:
                append(0)
            else:
                append(2)
                self._write_value(buffer, image)
        key = (position.commit_ms, position.snapshot, position.xid)
        if key != self._source_key:
            self._encode_source_parts(position)
            self._source_key = key
        buffer += self._source_head
        append(2)
        write_string(buffer, position.sequence)
        buffer += self._source_mid
        append(2)
        write_long(buffer, position.lsn)
        append(0)  # xmin
        if transaction is None:
            append(0)
        else:
            append(2)
            self._write_block(buffer, transaction)
        write_string(buffer, op)
        now_ns = self.clock.now_ns or time.time_ns()
        if now_ns != self._ts_key:
            tail = bytearray()
            for value in (now_ns // 1_000_000, now_ns // 1000, now_ns):
                tail.append(2)
                write_long(tail, value)
            self._ts_tail, self._ts_key = bytes(tail), now_ns
        buffer += self._ts_tail
        return bytes(buffer)

    def _encode_source_parts(self, position: SourcePosition) -> None:
        base = self._source_base
        head = bytearray()
        for text in (base["version"], base["connector"], base["name"]):
            write_string(head, text)
        write_long(head, position.commit_ms)
        head.append(0)  # snapshot: branch 0 (string) of [string, null]
        write_string(head, position.snapshot)
        write_string(head, base["db"])
        mid = bytearray()
        for value in (position.commit_ms * 1000, position.commit_ms * 1_000_000):
            mid.append(2)
            write_long(mid, value)
        write_string(mid, base["schema"])
        write_string(mid, base["table"])
        if position.xid is None:
            mid.append(0)
        else:
            mid.append(2)
            write_long(mid, position.xid)
        self._source_head, self._source_mid = bytes(head), bytes(mid)


class EventEncoder:
    """The encoders of one org, one per entity and schema version."""

    def __init__(
        self, org: str, framing: Framing, *, database: str, entity_by_table: dict[str, str]
    ) -> None:
        self.org = org
        self._framing = framing
        self._database = database
        self._entity_by_table = entity_by_table
        self._current: dict[str, EntityEncoder] = {}
        self.clock = BatchClock()

    def entity_of(self, qualified_table: str) -> str | None:
        return self._entity_by_table.get(qualified_table)

    def current(self, entity: str) -> EntityEncoder | None:
        return self._current.get(entity)

    async def encoder(
        self,
        entity: str,
        qualified_table: str,
        columns: Sequence[tuple[str, int, int]],
        key_names: frozenset[str],
    ) -> EntityEncoder:
        """The encoder for these columns (name, type oid, typmod).

        A new schema version is registered if they changed.
        """
        where = f"org {self.org}, entity {entity}"
        captured = tuple(
            CapturedColumn(
                name, column_type(oid, modifier, where=f"{where}, column {name}"), name in key_names
            )
            for name, oid, modifier in columns
        )
        existing = self._current.get(entity)
        if existing is not None and existing.schema.signature() == signature_of(captured):
            return existing
        schema = EntitySchema(self.org, entity, captured)
        topic = change_topic(self.org, entity)
        key_writer = await self._framing.writer_schema(f"{topic}-key", schema.key_schema)
        value_writer = await self._framing.writer_schema(f"{topic}-value", schema.envelope_schema)
        source_schema, source_table = qualified_table.split(".", 1)
        encoder = EntityEncoder(
            schema,
            key_writer,
            value_writer,
            database=self._database,
            source_schema=source_schema,
            source_table=source_table,
            clock=self.clock,
        )
        self._current[entity] = encoder
        return encoder

    async def encoder_for_source_columns(
        self, entity: str, qualified_table: str, columns: Sequence[SourceColumn]
    ) -> EntityEncoder:
        return await self.encoder(
            entity,
            qualified_table,
            [(c.name, c.type_oid, c.type_modifier) for c in columns],
            frozenset(c.name for c in columns if c.is_key),
        )
