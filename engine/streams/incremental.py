"""Incremental snapshots of single entities while streaming goes on (the DBLog algorithm).

Why: an entity added to an org, or one an operator wants re-read, must be snapshotted without
stopping the stream or locking the table. DBLog (Netflix) interleaves primary-key-ordered chunks
with the log; Debezium triggers it with a row in a signal table, and so do we::

    INSERT INTO fieldsync.signal (id, type, data) VALUES
      (gen_random_uuid()::text, 'execute-snapshot',
       '{"data-collections": ["crm.accounts"], "type": "incremental"}');

Per chunk:
  1. Write a low watermark (``<chunk>-open``, ``snapshot-window-open``) to the signal table.
  2. Read the next chunk: up to N rows after the last key, in key order, into a buffer.
  3. Write a high watermark (``<chunk>-close``, ``snapshot-window-close``).
  4. While the stream is between the two watermarks, every change of a buffered key drops that
     key from the buffer: the stream's event is newer than (or as new as) the chunk's row.
  5. When the stream reaches the high watermark, the rows left are emitted as op ``r``
     (``source.snapshot = "incremental"``) at the high watermark's position, so a later change
     of the same key always has a higher position and an earlier one never overwrites it.
  6. After the broker acknowledged them, the last key is recorded: a crash resumes with the
     next chunk (a chunk in flight is read again: at-least-once, like everything else).

Entities whose rows are not on the broker for the current capture epoch (added to the org after
its initial snapshot) are queued automatically when capture starts.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql

from engine.streams.events import EntityEncoder
from engine.streams.source import SourceColumn
from engine.streams.spec import CaptureSpec

log = logging.getLogger("fieldsync.capture")

OPEN = "snapshot-window-open"
CLOSE = "snapshot-window-close"
EXECUTE = "execute-snapshot"


@dataclass
class Window:
    """One chunk between its watermarks."""

    chunk_id: str
    entity: str
    rows: dict[tuple[Any, ...], dict[str, Any]]  # key (Avro values, column order) → Avro row
    last_key: list[str] | None  # text form of the chunk's last key (None: empty chunk)
    complete: bool  # the chunk was short: the entity is done after it
    opened: bool = False  # the stream has passed the low watermark


@dataclass
class IncrementalSnapshots:
    """Queue, chunk reads and window bookkeeping of one org's incremental snapshots."""

    spec: CaptureSpec
    columns: dict[str, list[SourceColumn]]
    chunk_rows: int
    window: Window | None = None
    pending: list[str] = field(default_factory=list)
    _key_text: dict[str, list[str] | None] = field(default_factory=dict)

    # -- queue -------------------------------------------------------------------------
    async def load(self, conn: psycopg.AsyncConnection[Any], epoch: uuid.UUID) -> None:
        """Queue pending entities and entities never snapshotted in this epoch."""
        rows = await (
            await conn.execute(
                "SELECT entity, epoch, status, last_key FROM fieldsync.entity_snapshot"
                " WHERE org = %s",
                (self.spec.org,),
            )
        ).fetchall()
        known = {
            entity: (row_epoch, status, last_key) for entity, row_epoch, status, last_key in rows
        }
        for entity in self.spec.entities:
            state = known.get(entity)
            if state is None or state[0] != epoch:
                await self.request(conn, entity, epoch)
            elif state[1] == "pending" and entity not in self.pending:
                self.pending.append(entity)
                self._key_text[entity] = state[2]

    async def request(
        self, conn: psycopg.AsyncConnection[Any], entity: str, epoch: uuid.UUID
    ) -> None:
        """(Re)start the entity's incremental snapshot from its first key."""
        await conn.execute(
            """
            INSERT INTO fieldsync.entity_snapshot (org, entity, epoch, status, last_key)
            VALUES (%s, %s, %s, 'pending', NULL)
            ON CONFLICT (org, entity) DO UPDATE
            SET epoch = EXCLUDED.epoch, status = 'pending', last_key = NULL, updated_at = now()
            """,
            (self.spec.org, entity, epoch),
        )
        if entity not in self.pending:
            self.pending.append(entity)
        self._key_text[entity] = None
        log.info("org %s: incremental snapshot of %s queued", self.spec.org, entity)

    def entities_in_signal(self, data: str | None) -> list[str]:
        """Entities named by an ``execute-snapshot`` signal (``schema.table`` or entity names)."""
        try:
            payload = orjson.loads(data or "{}")
        except orjson.JSONDecodeError:
            log.warning("org %s: ignoring a signal whose data is not JSON: %r", self.spec.org, data)
            return []
        names = payload.get("data-collections") or []
        by_table = self.spec.entity_by_table
        wanted = [by_table.get(name, name) for name in names]
        unknown = [name for name in wanted if name not in self.spec.entities]
        if unknown:
            log.warning("org %s: signal names unknown data collections %s", self.spec.org, unknown)
        return [name for name in wanted if name in self.spec.entities]

    # -- chunks ------------------------------------------------------------------------
    async def open_next_chunk(
        self, conn: psycopg.AsyncConnection[Any], encoder: EntityEncoder
    ) -> None:
        """Steps 1-3: low watermark, chunk read, high watermark (each committed on its own)."""
        if self.window is not None or not self.pending:
            return
        entity = self.pending[0]
        columns = self.columns[entity]
        keys = [c for c in columns if c.is_key]
        last = self._key_text.get(entity)
        key_list = sql.SQL(", ").join(sql.Identifier(c.name) for c in keys)
        after_last = (
            sql.SQL("WHERE ({}) > ({})").format(
                key_list,
                sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(c.type_name)) for c in keys),
            )
            if last is not None
            else sql.SQL("")
        )
        query = sql.SQL(
            "SELECT {cols}, ARRAY[{key_text}] FROM {table} {after_last}"
            " ORDER BY {keys} LIMIT {limit}"
        ).format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
            key_text=sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(c.name)) for c in keys
            ),
            table=sql.Identifier(*self.spec.entities[entity].split(".", 1)),
            after_last=after_last,
            keys=key_list,
            limit=sql.Literal(self.chunk_rows),
        )
        chunk_id = uuid.uuid4().hex
        await conn.execute(
            "INSERT INTO fieldsync.signal (id, type, data) VALUES (%s, %s, %s)",
            (f"{chunk_id}-open", OPEN, entity),
        )
        rows = await (await conn.execute(query, list(last or []))).fetchall()
        await conn.execute(
            "INSERT INTO fieldsync.signal (id, type, data) VALUES (%s, %s, %s)",
            (f"{chunk_id}-close", CLOSE, entity),
        )
        records = [encoder.row_from_python(row[:-1]) for row in rows]
        self.window = Window(
            chunk_id=chunk_id,
            entity=entity,
            rows={tuple(encoder.key_of(record).values()): record for record in records},
            last_key=list(rows[-1][-1]) if rows else last,
            complete=len(rows) < self.chunk_rows,
        )

    def drop(self, entity: str, key: tuple[Any, ...]) -> None:
        """Step 4: a streamed change of a buffered key wins over the chunk's row."""
        window = self.window
        if window is not None and window.opened and window.entity == entity:
            window.rows.pop(key, None)

    async def finish(self, conn: psycopg.AsyncConnection[Any], window: Window) -> None:
        """Step 6 (after the broker acknowledged the chunk): record progress, tidy the signals."""
        status = "done" if window.complete else "pending"
        await conn.execute(
            "UPDATE fieldsync.entity_snapshot SET last_key = %s, status = %s, updated_at = now()"
            " WHERE org = %s AND entity = %s",
            (window.last_key, status, self.spec.org, window.entity),
        )
        await conn.execute(
            "DELETE FROM fieldsync.signal WHERE id IN (%s, %s)",
            (f"{window.chunk_id}-open", f"{window.chunk_id}-close"),
        )
        self._key_text[window.entity] = window.last_key
        if window.complete:
            self.pending.remove(window.entity)
            log.info("org %s: incremental snapshot of %s complete", self.spec.org, window.entity)
