"""Builds Debezium change events (key + envelope) for one org and encodes them with a framing.

An :class:`EntityEncoder` is one schema version of one entity: it turns decoded column values
into Avro records and framed bytes. :class:`EventEncoder` keeps the encoders of an org, makes a
new version when a table's columns change (a new nullable column gives a new, backward
compatible schema) and registers every writer schema before its first use.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fastavro

import engine
from engine.streams.framing import Framing, WriterSchema
from engine.streams.pgoutput import Unchanged
from engine.streams.pgtypes import column_type, unavailable_placeholder
from engine.streams.schemas import TOPIC_PREFIX, CapturedColumn, EntitySchema, signature_of
from engine.streams.source import SourceColumn
from engine.streams.topics import change_topic

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
    ) -> None:
        self.schema = schema
        self.topic = change_topic(schema.org, schema.entity)
        self._key_writer = key_writer
        self._value_writer = value_writer
        self._columns = schema.columns
        self._key_indexes = [i for i, c in enumerate(schema.columns) if c.is_key]
        self._key_names = [schema.columns[i].name for i in self._key_indexes]
        self._from_text = [c.type.from_text for c in schema.columns]
        self._to_avro = [c.type.to_avro for c in schema.columns]
        self._placeholders = [unavailable_placeholder(c.type) for c in schema.columns]
        self._names = [c.name for c in schema.columns]
        self._source_base = {
            "version": VERSION,
            "connector": "postgresql",
            "name": TOPIC_PREFIX,
            "db": database,
            "schema": source_schema,
            "table": source_table,
            "xmin": None,
        }
        self._buffer = io.BytesIO()

    @property
    def data_collection(self) -> str:
        return f"{self._source_base['schema']}.{self._source_base['table']}"

    # -- values ------------------------------------------------------------------------
    def row_from_text(self, values: Sequence[bytes | None | Unchanged]) -> dict[str, Any]:
        """A record from pgoutput text values (unchanged TOAST → Debezium's placeholder)."""
        row: dict[str, Any] = {}
        for i, raw in enumerate(values):
            if raw is None:
                row[self._names[i]] = None
            elif isinstance(raw, Unchanged):
                row[self._names[i]] = self._placeholders[i]
            else:
                row[self._names[i]] = self._to_avro[i](self._from_text[i](raw))
        return row

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
    def _frame(self, writer: WriterSchema, record: dict[str, Any]) -> bytes:
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        buffer.write(writer.header)
        fastavro.schemaless_writer(buffer, writer.parsed, record)
        return buffer.getvalue()

    def encode_key(self, key: dict[str, Any]) -> bytes:
        return self._frame(self._key_writer, key)

    def encode_envelope(
        self,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        position: SourcePosition,
        transaction: dict[str, Any] | None,
    ) -> bytes:
        now_ns = time.time_ns()
        source = dict(self._source_base)
        source["ts_ms"] = position.commit_ms
        source["ts_us"] = position.commit_ms * 1000
        source["ts_ns"] = position.commit_ms * 1_000_000
        source["snapshot"] = position.snapshot
        source["sequence"] = position.sequence
        source["txId"] = position.xid
        source["lsn"] = position.lsn
        envelope = {
            "before": before,
            "after": after,
            "source": source,
            "transaction": transaction,
            "op": op,
            "ts_ms": now_ns // 1_000_000,
            "ts_us": now_ns // 1000,
            "ts_ns": now_ns,
        }
        return self._frame(self._value_writer, envelope)


class EventEncoder:
    """The encoders of one org, one per entity and schema version."""

    def __init__(self, org: str, framing: Framing, *, database: str, entity_by_table: dict[str, str]) -> None:
        self.org = org
        self._framing = framing
        self._database = database
        self._entity_by_table = entity_by_table
        self._current: dict[str, EntityEncoder] = {}

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
        """The encoder for these columns (name, type oid, typmod), registering a new version if they changed."""
        where = f"org {self.org}, entity {entity}"
        captured = tuple(
            CapturedColumn(name, column_type(oid, modifier, where=f"{where}, column {name}"), name in key_names)
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
            schema, key_writer, value_writer,
            database=self._database, source_schema=source_schema, source_table=source_table,
        )
        self._current[entity] = encoder
        return encoder

    async def encoder_for_source_columns(self, entity: str, qualified_table: str, columns: Sequence[SourceColumn]) -> EntityEncoder:
        return await self.encoder(
            entity,
            qualified_table,
            [(c.name, c.type_oid, c.type_modifier) for c in columns],
            frozenset(c.name for c in columns if c.is_key),
        )
