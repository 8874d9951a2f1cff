"""The capture task of one organisation: snapshot, then stream, never skipping a change.

Start-up
  1. Check the source (``wal_level``, tables, primary keys, column types), create the
     publication, the signal table and the capture-state tables; create the org's topics.
  2. Re-snapshot when there is no completed snapshot for the current slot, when the slot is
     gone, or when the broker holds less than capture once produced (its log was lost).
     A snapshot creates a fresh slot exporting its starting snapshot, reads every table in that
     snapshot (op ``r``), waits for the broker's acknowledgements, then marks the epoch done.

Each streaming batch
  1. Peek whole transactions after the slot's confirmed position.
  2. Encode and send every event (a new writer schema is registered before its first use).
  3. Flush: wait until the broker acknowledged every message of the batch.
  4. Record the highest acknowledged offsets (rate-limited; they only ever grow).
  5. Advance the slot to the end of the batch's last transaction.
  A crash anywhere before 5 re-sends the batch: at-least-once, in source order per key.
  An idle source still advances the slot to the WAL position already decoded (heartbeat),
  so the server can recycle WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import OffsetOutOfRangeError
from psycopg import sql
from psycopg.types.string import TextLoader

from engine.config import Settings
from engine.runtime.kafka import client_options
from engine.streams import pgoutput
from engine.streams.events import EntityEncoder, EventEncoder, SourcePosition
from engine.streams.framing import (
    SCHEMA_TOPIC,
    ConfluentFraming,
    ConfluentRegistry,
    Framing,
    SingleObjectFraming,
    WriterSchema,
)
from engine.streams.incremental import CLOSE as WINDOW_CLOSE
from engine.streams.incremental import EXECUTE as EXECUTE_SNAPSHOT
from engine.streams.incremental import OPEN as WINDOW_OPEN
from engine.streams.incremental import IncrementalSnapshots, Window
from engine.streams.producer import ChangeProducer
from engine.streams.schemas import transaction_key_schema, transaction_value_schema
from engine.streams.source import SIGNAL_TABLE, LogicalSource, SourceColumn
from engine.streams.spec import CaptureSpec
from engine.streams.topics import TopicAdmin, change_topic, transaction_topic

log = logging.getLogger("fieldsync.capture")

EPOCH_HEADER = "fieldsync.epoch"
OFFSET_RECORD_INTERVAL_S = 5.0


@dataclass
class CaptureStats:
    """What a capture task did; consumers of these counts are the demo, tests and benchmarks."""

    events: int = 0
    tombstones: int = 0
    transactions: int = 0
    snapshot_rows: int = 0
    snapshots: int = 0
    batches: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)

    def count(self, topic: str) -> None:
        self.per_topic[topic] = self.per_topic.get(topic, 0) + 1


@dataclass
class _Transaction:
    xid: int
    commit_lsn: int
    commit_ms: int
    total: int = 0
    per_collection: dict[str, int] = field(default_factory=dict)
    begin_sent: bool = False

    @property
    def id(self) -> str:
        return f"{self.xid}:{self.commit_lsn}"


class CaptureTask:
    """Captures one org's source into its change topics (see the module docstring)."""

    def __init__(self, spec: CaptureSpec, settings: Settings, bootstrap_servers: str) -> None:
        self.spec = spec
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.source = LogicalSource(spec)
        self.stats = CaptureStats()
        self.epoch: uuid.UUID | None = None
        self._producer = ChangeProducer(
            bootstrap_servers,
            idempotent=settings.effective_idempotence,
            linger_ms=settings.producer_linger_ms,
            max_batch_bytes=settings.producer_max_batch_bytes,
            client_id=f"fieldsync-capture-{spec.org}",
        )
        self._registry: ConfluentRegistry | None = None
        self._framing: Framing
        self._encoder: EventEncoder
        self._columns: dict[str, list[SourceColumn]] = {}
        self._key_names: dict[str, frozenset[str]] = {}
        self._relations: dict[int, pgoutput.Relation] = {}
        self._relation_encoders: dict[int, tuple[pgoutput.Relation, EntityEncoder | None]] = {}
        self._partitions: dict[str, list[int]] = {}
        self._epoch_header: list[tuple[str, bytes]] = []
        self._last_marks_write = 0.0
        self._last_heartbeat = 0.0
        self._last_broker_check = 0.0
        self._started = False
        self._incremental: IncrementalSnapshots | None = None
        self._txn_writers: tuple[WriterSchema, WriterSchema] | None = None
        self._closed_windows: list[Window] = []

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start-up steps 1 and 2 (see the module docstring)."""
        if self._started:
            return
        self._columns = await self.source.prepare()
        self._key_names = {
            e: frozenset(c.name for c in cols if c.is_key) for e, cols in self._columns.items()
        }
        await asyncio.to_thread(self._ensure_topics)
        await self._producer.start()
        if self.settings.schema_registry_url:
            self._registry = ConfluentRegistry(self.settings.schema_registry_url)
            self._framing = ConfluentFraming(self._registry)
        else:
            self._framing = SingleObjectFraming(self._publish_schema)
        self._encoder = EventEncoder(
            self.spec.org,
            self._framing,
            database=self.source.database,
            entity_by_table=self.spec.entity_by_table,
        )
        self._started = True
        reason = await self._snapshot_reason()
        if reason:
            log.info("org %s: taking an initial snapshot (%s)", self.spec.org, reason)
            await self.snapshot()
        else:
            state = await self.source.load_state()
            assert state is not None
            self._set_epoch(state.epoch)
        self._incremental = IncrementalSnapshots(
            self.spec, self._columns, self.settings.snapshot_chunk_rows
        )
        assert self.epoch is not None
        await self._incremental.load(await self.source.connect(), self.epoch)
        confirmed = await self.source.confirmed_lsn()
        log.info(
            "org %s: streaming from %s (epoch %s)",
            self.spec.org,
            pgoutput.format_lsn(confirmed or 0),
            self.epoch,
        )

    async def close(self) -> None:
        await self._producer.stop()
        await self.source.close()
        if self._registry is not None:
            await self._registry.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until ``stop`` is set."""
        await self.start()
        while not stop.is_set():
            if await self.stream_once() == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.capture_poll_interval_s)

    async def catch_up(self) -> CaptureStats:
        """Stream until every change committed before this call is on the broker.

        Commits made with ``synchronous_commit=off`` become decodable only once the WAL
        writer flushed them, so the WAL position at the call is awaited as well.
        """
        await self.start()
        target, _ = await self.source.wal_positions()
        while True:
            if await self.stream_once() == 0:
                _, flushed = await self.source.wal_positions()
                if flushed >= target and await self.stream_once() == 0:
                    return self.stats
                await asyncio.sleep(0.05)

    # -- topics and schemas ------------------------------------------------------------
    def _ensure_topics(self) -> None:
        admin = TopicAdmin(
            self.bootstrap_servers,
            partitions=self.settings.topic_partitions,
            replication_factor=self.settings.topic_replication_factor,
        )
        try:
            topics = [change_topic(self.spec.org, e) for e in self.spec.entities]
            if self.spec.transaction_metadata:
                topics.append(transaction_topic(self.spec.org))
            admin.ensure(topics, compacted=[SCHEMA_TOPIC], partitions={SCHEMA_TOPIC: 1})
        finally:
            admin.close()

    async def _publish_schema(self, topic: str, key: bytes, value: bytes) -> None:
        await self._producer.send_and_wait(topic, key, value)

    async def _partitions_of(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = await self._producer.partitions(topic)
        return self._partitions[topic]

    def _set_epoch(self, epoch: uuid.UUID) -> None:
        self.epoch = epoch
        self._epoch_header = [(EPOCH_HEADER, str(epoch).encode())]

    # -- snapshot ----------------------------------------------------------------------
    async def _snapshot_reason(self) -> str | None:
        state = await self.source.load_state()
        if state is None:
            return "first start"
        if not await self.source.slot_exists():
            return "replication slot missing (new source epoch)"
        if not state.snapshot_completed:
            return "previous snapshot did not complete"
        lost = await asyncio.to_thread(self._broker_lost_log, await self.source.offset_marks())
        if lost:
            return f"broker lost its log ({lost})"
        return None

    def _broker_lost_log(self, marks: dict[tuple[str, int], int]) -> str | None:
        """Which produced data the broker no longer holds, if any.

        Each mark is an offset the broker once acknowledged; it must still be readable. The
        check fetches it rather than trusting ListOffsets (the embedded broker reports the
        last batch's base offset + 1 as the end).
        """
        # only topics of the entities captured now: an entity removed from the org had its
        # topic deleted on purpose, which is no loss
        ours = {change_topic(self.spec.org, e) for e in self.spec.entities}
        ours.add(transaction_topic(self.spec.org))
        marks = {tp: offset for tp, offset in marks.items() if tp[0] in ours}
        if not marks:
            return None
        consumer = KafkaConsumer(
            **client_options(),
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"fieldsync-capture-check-{self.spec.org}",
            enable_auto_commit=False,
            auto_offset_reset="none",
        )
        try:
            existing = consumer.topics()
            for topic, _ in marks:
                if topic not in existing:
                    return f"topic {topic} is gone"
            for (topic, partition), mark in marks.items():
                if not _offset_readable(consumer, TopicPartition(topic, partition), mark):
                    return f"{topic}[{partition}] no longer holds offset {mark}"
            return None
        finally:
            consumer.close()

    async def snapshot(self) -> None:
        """Fresh slot + consistent read of every entity as op ``r`` events (start-up step 2)."""
        await self.source.drop_slot()
        created = await asyncio.to_thread(self.source.create_slot_exporting_snapshot)
        try:
            epoch = await self.source.begin_epoch(created.consistent_lsn)
            self._set_epoch(epoch)
            reader = await psycopg.AsyncConnection.connect(self.spec.source_dsn.get_secret_value())
            for json_type in ("json", "jsonb"):
                reader.adapters.register_loader(json_type, TextLoader)
            await reader.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await reader.set_read_only(True)
            await reader.execute(
                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(created.snapshot_name))
            )
        finally:
            created.holder.close()  # the importing transaction now holds the snapshot
        try:
            await self._read_snapshot(reader, created.consistent_lsn)
            await reader.commit()
        finally:
            await reader.close()
        await self._producer.flush()
        await self.source.complete_snapshot(epoch)
        await self.source.record_offsets(self._producer.high_offsets)
        self.stats.snapshots += 1

    async def _read_snapshot(
        self, reader: psycopg.AsyncConnection[Any], consistent_lsn: int
    ) -> None:
        self._encoder.clock.tick()
        now_ms = int(time.time() * 1000)
        pending: tuple[EntityEncoder, dict[str, Any]] | None = None
        for entity, table in self.spec.entities.items():
            columns = self._columns[entity]
            encoder = await self._encoder.encoder_for_source_columns(entity, table, columns)
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
                sql.Identifier(*table.split(".", 1)),
            )
            async with reader.cursor(name=f"fieldsync_snapshot_{entity}") as cursor:
                cursor.itersize = self.settings.snapshot_chunk_rows
                await cursor.execute(query)
                async for values in cursor:
                    if pending is not None:
                        await self._send_snapshot_row(*pending, consistent_lsn, now_ms, "true")
                    pending = (encoder, encoder.row_from_python(values))
        if pending is not None:
            await self._send_snapshot_row(*pending, consistent_lsn, now_ms, "last")

    async def _send_snapshot_row(
        self,
        encoder: EntityEncoder,
        row: dict[str, Any],
        consistent_lsn: int,
        now_ms: int,
        marker: str,
    ) -> None:
        position = SourcePosition(consistent_lsn, consistent_lsn, None, now_ms, snapshot=marker)
        key = encoder.encode_key(encoder.key_of(row))
        await self._send(
            encoder.topic, key, encoder.encode_envelope("r", None, row, position, None)
        )
        self.stats.snapshot_rows += 1

    # -- streaming ---------------------------------------------------------------------
    async def stream_once(self) -> int:
        """One streaming batch (steps 1-5 of the module docstring); returns messages decoded."""
        await self._open_snapshot_chunk()
        heartbeat_lsn = await self.source.current_lsn()
        rows = await self.source.peek(self.settings.capture_batch_changes)
        if not rows:
            await self._idle(heartbeat_lsn)
            return 0
        end_lsn = await self._process(rows)
        await self._producer.flush()
        await self._finish_snapshot_chunks()
        await self._record_marks()
        if end_lsn is not None:
            await self.source.advance(end_lsn)
        self.stats.batches += 1
        return len(rows)

    # -- incremental snapshots (see engine.streams.incremental) ---------------------------
    async def _open_snapshot_chunk(self) -> None:
        incremental = self._incremental
        if incremental is None or incremental.window is not None or not incremental.pending:
            return
        entity = incremental.pending[0]
        encoder = await self._encoder.encoder_for_source_columns(
            entity, self.spec.entities[entity], self._columns[entity]
        )
        await incremental.open_next_chunk(await self.source.connect(), encoder)

    async def _finish_snapshot_chunks(self) -> None:
        assert self._incremental is not None
        conn = await self.source.connect()
        for window in self._closed_windows:
            await self._incremental.finish(conn, window)
        self._closed_windows.clear()

    async def _signal(
        self,
        message: pgoutput.Insert | pgoutput.Update | pgoutput.Delete,
        lsn: int,
        txn: _Transaction,
    ) -> None:
        """A row of the signal table: a snapshot request or one of our own watermarks."""
        if not isinstance(message, pgoutput.Insert):
            return
        relation = self._relations[message.relation_id]
        values = {
            column.name: raw.decode() if isinstance(raw, bytes) else None
            for column, raw in zip(relation.columns, message.new, strict=True)
        }
        incremental = self._incremental
        assert incremental is not None and self.epoch is not None
        kind, signal_id = values.get("type"), values.get("id") or ""
        if kind == EXECUTE_SNAPSHOT:
            for entity in incremental.entities_in_signal(values.get("data")):
                await incremental.request(await self.source.connect(), entity, self.epoch)
            return
        window = incremental.window
        if window is None or not signal_id.startswith(window.chunk_id):
            return  # a watermark of a chunk lost in a crash: its chunk will be read again
        if kind == WINDOW_OPEN:
            window.opened = True
        elif kind == WINDOW_CLOSE:
            await self._emit_chunk(window, lsn, txn)
            incremental.window = None
            self._closed_windows.append(window)

    async def _emit_chunk(self, window: Window, lsn: int, txn: _Transaction) -> None:
        """Step 5: the chunk's remaining rows, as reads at the high watermark's position."""
        encoder = await self._encoder.encoder_for_source_columns(
            window.entity, self.spec.entities[window.entity], self._columns[window.entity]
        )
        position = SourcePosition(txn.commit_lsn, lsn, None, txn.commit_ms, snapshot="incremental")
        for record in window.rows.values():
            key = encoder.encode_key(encoder.key_of(record))
            await self._send(
                encoder.topic, key, encoder.encode_envelope("r", None, record, position, None)
            )
            self.stats.snapshot_rows += 1

    def _drop_from_window(self, encoder: EntityEncoder, *rows: dict[str, Any] | None) -> None:
        incremental = self._incremental
        if incremental is None or incremental.window is None:
            return
        for row in rows:
            if row is not None:
                incremental.drop(encoder.schema.entity, tuple(encoder.key_of(row).values()))

    async def _idle(self, decoded_up_to: int) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= self.settings.capture_heartbeat_interval_s:
            # Nothing committed before decoded_up_to is left undecoded: safe to confirm.
            confirmed = await self.source.confirmed_lsn()
            if confirmed is not None and decoded_up_to > confirmed:
                await self.source.advance(decoded_up_to)
            self._last_heartbeat = now
        if now - self._last_broker_check >= max(30.0, self.settings.capture_heartbeat_interval_s):
            self._last_broker_check = now
            lost = await asyncio.to_thread(self._broker_lost_log, await self.source.offset_marks())
            if lost:
                log.warning(
                    "org %s: broker lost its log (%s); re-snapshotting", self.spec.org, lost
                )
                self._partitions.clear()
                await asyncio.to_thread(self._ensure_topics)
                await self.snapshot()

    async def _record_marks(self) -> None:
        now = time.monotonic()
        if now - self._last_marks_write >= OFFSET_RECORD_INTERVAL_S:
            await self.source.record_offsets(self._producer.high_offsets)
            self._last_marks_write = now

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        await self._producer.send(
            topic, key, value, partition=partition, headers=headers or self._epoch_header
        )
        if value is None:
            self.stats.tombstones += 1
        else:
            self.stats.events += 1
        self.stats.count(topic)

    async def _process(self, rows: Sequence[tuple[int, int, bytes]]) -> int | None:
        """Encode and send the events of whole transactions; return the last commit's end LSN."""
        end_lsn: int | None = None
        txn: _Transaction | None = None
        self._encoder.clock.tick()
        for lsn, _xid, data in rows:
            message = pgoutput.decode(data)
            if isinstance(message, pgoutput.Begin):
                txn = _Transaction(
                    message.xid, message.final_lsn, int(message.commit_time.timestamp() * 1000)
                )
            elif isinstance(message, pgoutput.Commit):
                if txn is not None and txn.total and self.spec.transaction_metadata:
                    await self._send_transaction_marker(txn, "END")
                if txn is not None and txn.total:
                    self.stats.transactions += 1
                end_lsn = message.end_lsn
                txn = None
            elif isinstance(message, pgoutput.Relation):
                self._relations[message.relation_id] = message
            elif isinstance(message, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
                assert txn is not None, "row change outside a transaction"
                await self._row_change(message, lsn, txn)
            elif isinstance(message, pgoutput.Truncate):
                assert txn is not None
                await self._truncate(message, lsn, txn)
        return end_lsn

    async def _encoder_for(self, relation_id: int) -> EntityEncoder | None:
        """The encoder of a relation, rebuilt only when a new Relation message arrived."""
        relation = self._relations[relation_id]
        cached = self._relation_encoders.get(relation_id)
        if cached is not None and cached[0] is relation:
            return cached[1]
        encoder: EntityEncoder | None = None
        entity = self._encoder.entity_of(relation.qualified_name)
        if relation.qualified_name != SIGNAL_TABLE and entity is not None:
            encoder = await self._encoder.encoder(
                entity,
                relation.qualified_name,
                [(c.name, c.type_oid, c.type_modifier) for c in relation.columns],
                self._key_names[entity],
            )
        self._relation_encoders[relation_id] = (relation, encoder)
        return encoder

    def _block(self, txn: _Transaction, encoder: EntityEncoder) -> dict[str, Any]:
        collection = encoder.data_collection
        txn.total += 1
        order = txn.per_collection[collection] = txn.per_collection.get(collection, 0) + 1
        return {"id": txn.id, "total_order": txn.total, "data_collection_order": order}

    async def _row_change(
        self,
        message: pgoutput.Insert | pgoutput.Update | pgoutput.Delete,
        lsn: int,
        txn: _Transaction,
    ) -> None:
        if self._relations[message.relation_id].qualified_name == SIGNAL_TABLE:
            await self._signal(message, lsn, txn)
            return
        encoder = await self._encoder_for(message.relation_id)
        if encoder is None:
            return
        if self.spec.transaction_metadata and not txn.begin_sent:
            await self._send_transaction_marker(txn, "BEGIN")
            txn.begin_sent = True
        position = SourcePosition(txn.commit_lsn, lsn, txn.xid, txn.commit_ms)
        topic = encoder.topic
        before: dict[str, Any] | None
        if isinstance(message, pgoutput.Insert):
            after = encoder.row_from_text(message.new)
            self._drop_from_window(encoder, after)
            value = encoder.encode_envelope("c", None, after, position, self._block(txn, encoder))
            await self._send(topic, encoder.encode_key(encoder.key_of(after)), value)
        elif isinstance(message, pgoutput.Delete):
            before = encoder.row_from_text(message.old)
            self._drop_from_window(encoder, before)
            key = encoder.encode_key(encoder.key_of(before))
            await self._send(
                topic,
                key,
                encoder.encode_envelope("d", before, None, position, self._block(txn, encoder)),
            )
            await self._send(topic, key, None)
        else:
            after = encoder.row_from_text(message.new)
            before = encoder.row_from_text(message.old) if message.old is not None else None
            self._drop_from_window(encoder, before, after)
            if before is not None and (
                message.old_is_key_only or encoder.key_changed(before, after)
            ):
                # A primary-key change is a delete of the old key and a create of the new one.
                old_key = encoder.encode_key(encoder.key_of(before))
                new_key = encoder.encode_key(encoder.key_of(after))
                delete = encoder.encode_envelope(
                    "d", before, None, position, self._block(txn, encoder)
                )
                await self._send(
                    topic,
                    old_key,
                    delete,
                    headers=[*self._epoch_header, ("__debezium.newkey", new_key)],
                )
                await self._send(topic, old_key, None)
                create = encoder.encode_envelope(
                    "c", None, after, position, self._block(txn, encoder)
                )
                await self._send(
                    topic,
                    new_key,
                    create,
                    headers=[*self._epoch_header, ("__debezium.oldkey", old_key)],
                )
                return
            if message.old_is_key_only:
                before = None
            value = encoder.encode_envelope("u", before, after, position, self._block(txn, encoder))
            await self._send(topic, encoder.encode_key(encoder.key_of(after)), value)

    async def _truncate(self, message: pgoutput.Truncate, lsn: int, txn: _Transaction) -> None:
        """A truncate goes to every partition of the topic, so each partition's readers see it in
        order."""
        position = SourcePosition(txn.commit_lsn, lsn, txn.xid, txn.commit_ms)
        for relation_id in message.relation_ids:
            encoder = await self._encoder_for(relation_id)
            if encoder is None:
                continue
            if self.spec.transaction_metadata and not txn.begin_sent:
                await self._send_transaction_marker(txn, "BEGIN")
                txn.begin_sent = True
            window = self._incremental.window if self._incremental else None
            if window is not None and window.opened and window.entity == encoder.schema.entity:
                window.rows.clear()  # the chunk's rows were truncated away
            value = encoder.encode_envelope("t", None, None, position, self._block(txn, encoder))
            for partition in await self._partitions_of(encoder.topic):
                await self._send(encoder.topic, None, value, partition=partition)

    async def _transaction_writers(self) -> tuple[WriterSchema, WriterSchema]:
        """The transaction topic's writer schemas, registered once (fingerprinting is slow)."""
        if self._txn_writers is None:
            topic = transaction_topic(self.spec.org)
            self._txn_writers = (
                await self._framing.writer_schema(f"{topic}-key", transaction_key_schema()),
                await self._framing.writer_schema(f"{topic}-value", transaction_value_schema()),
            )
        return self._txn_writers

    async def _send_transaction_marker(self, txn: _Transaction, status: str) -> None:
        key_writer, value_writer = await self._transaction_writers()
        record: dict[str, Any] = {
            "status": status,
            "id": txn.id,
            "event_count": None,
            "data_collections": None,
            "ts_ms": txn.commit_ms,
        }
        if status == "END":
            record["event_count"] = txn.total
            record["data_collections"] = [
                {"data_collection": name, "event_count": count}
                for name, count in txn.per_collection.items()
            ]
        key = key_writer.frame({"id": txn.id})
        await self._producer.send(
            transaction_topic(self.spec.org),
            key,
            value_writer.frame(record),
            headers=self._epoch_header,
        )
        self.stats.count(transaction_topic(self.spec.org))


def _offset_readable(consumer: KafkaConsumer, partition: TopicPartition, offset: int) -> bool:
    consumer.assign([partition])
    consumer.seek(partition, offset)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            records = consumer.poll(timeout_ms=500, max_records=1).get(partition, [])
        except OffsetOutOfRangeError:
            return False
        if records:
            return bool(records[0].offset == offset)
    return False
