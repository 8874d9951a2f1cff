"""Replay: rebuild an org's staging from its change topics in a shadow schema, then swap it in.

``fieldsync replay --org X [--entity Y]`` (see ``docs/staging.md``, "Replay"):

1. **Build.** A consumer without a group reads the org's change topics (every entity, or only
   ``Y``'s) from the beginning, decodes each message with the projector's :class:`EventDecoder`
   and applies the changes with the projector's :meth:`Staging.apply` — into the shadow schema
   ``org_<org>__replay`` instead of ``org_<org>`` (``Staging(schema_for=shadow_schema)``), in
   batches of ``batch_events`` (one batch is written while the next is decoded). A message the
   projector would dead-letter (undecodable, a refused schema change) is counted and skipped,
   as the live projector skipped it: it is already on the dead-letter topic.
   With ``--from-snapshot`` each entity starts from its latest snapshot (``engine/snapshots``,
   through a :class:`SnapshotStore`, the local directory by default): the file's rows are
   applied as ``r`` changes at :data:`SNAPSHOT_POSITION` — before every change on the topics —
   and the entity's topics are read from the projector group's offsets recorded with it
   (everything below them is in the snapshot). Snapshot files carry no source positions, so: a
   truncate after those offsets stops the replay (it cannot tell which snapshot rows it
   removes), and a *stale* change after them (older than the row's last change, which live
   staging skipped: e.g. an incremental-snapshot read re-sent late) would override the row. An
   entity without a snapshot with offsets is read from the beginning.
2. **Catch up** with rounds of "read to the end" until a round brings little.
3. **Swap**, in one transaction on a connection of its own:

   a. the projector's DDL advisory locks of the org and of each swapped entity, then
      ``LOCK TABLE org_<org>._fs_entities IN EXCLUSIVE MODE``: every staging writer of the org
      takes a row lock there first (step 1 of :meth:`Staging.apply`), so from now on the live
      schema has no writer; the lock waits for a batch being written to commit. Readers
      (``ACCESS SHARE``: the gateway) are not blocked.
   b. with the lock held, read every topic (including any that appeared since the build) to its
      end *as of now* and apply that tail to the shadow;
   c. rename ``org_<org>`` → ``org_<org>__old_<n>`` and the shadow → ``org_<org>`` (with
      ``--entity``: move the entity's table and log instead, and replace its ``_fs_entities``
      row), bump the staging epoch (:func:`gateway.store.bump_epoch`), notify every entity's
      long-polls, commit;
   d. drop the old schema.

   A deadlock (a projector altering a table, or the retention purge, holding that table while
   it waits for ``_fs_entities``) aborts one side; an aborted swap is retried after another
   catch-up round.

Reading "to the end"
--------------------
The embedded broker answers ListOffsets with the last record batch's base offset + 1, not the
end of the log. Fetch responses carry the partition's true high watermark, so each "read to the
end" assigns the partitions afresh (aiokafka then forgets every high watermark it knew and drops
fetches in flight), seeks to where the shadow is, takes per partition the *first* high watermark
a fetch reports — a fetch sent after the call began, so at least the end of the log at that
moment — and reads until its position reaches it. Records past it are applied too (harmless:
staging is idempotent); a partition that keeps growing cannot keep the tail going forever.

Why no change is lost across the swap
-------------------------------------
* Every projector transaction that writes the live schema starts with
  ``SELECT … FROM org_<org>._fs_entities … FOR UPDATE``, whose ``ROW SHARE`` lock conflicts with
  the swap's ``EXCLUSIVE`` lock. A writer that got it before the swap commits before the swap
  can start (a); one that asks after waits, and because PostgreSQL resolves a table name again
  when the lock it waited for comes with catalog changes, it then locks the *new*
  ``_fs_entities``, and every later statement of its transaction names the new tables too. So
  each projector transaction writes entirely to the old schema or entirely to the new one.
  (Locking the ``_fs_entities`` rows ``FOR UPDATE`` would block the writers too, but a writer
  that waited for a *row* lock has already resolved the old table: it would wake up holding the
  old schema's watermark and write its rows, versions and watermark into the new tables:
  ``tests/test_replay.py::test_a_writer_held_by_the_swap_writes_only_the_new_schema`` fails
  that way with row locks.)
* A change in the old schema was applied by a batch committed before (a), so its message was
  on the broker before the swap's tail read began; (b) reads every partition at least to the
  end it had then: the shadow holds the change as well.
* A change the projector applies after the swap goes into the new schema by the rules of
  staging: skipped if the shadow already holds its position, applied with the next version
  otherwise. The projector commits offsets only after applying, so nothing it has not applied
  is skipped by its consumer; nothing of the projector's own state has to move.
* The projector's cached state (:class:`Staging`): ``_orgs`` only records that the schema
  exists (it still does, under the same name); temporary input tables live in ``pg_temp``; the
  per-entity column cache describes tables built from the same messages (the shadow holds
  every change the live tables hold, so it has at least their columns). Cached statement plans
  are re-planned by PostgreSQL after a rename. What a full replay can still remove — an entity
  the topics no longer hold — is refused before the swap; and any other mismatch (a table or
  column the cache names but the new schema lacks) makes :meth:`Staging.apply` forget the org's
  cache and apply the batch again.

What a replay gives, and what it does not
-----------------------------------------
The replayed staging holds the same rows, with the same values, deleted flags and source
positions, as the live staging fed from the same messages (tested). Two things depend on how
changes were batched, in the projector as in a replay: a deleted row keeps the values staging
held when the delete was applied (none when one batch held the key's insert and its delete),
and an unchanged TOASTed value (``__debezium_unavailable_value``) keeps the value stored
*before* the batch, so a batch holding a change of that column followed by a change without it
keeps the older value — larger batches make that likelier. Versions are assigned per
apply batch, in source-position order within the batch, and a replay's batches are much larger
than the projector's: within one partition (all changes of a key are in one partition) rows
keep the same relative order of versions, but the absolute versions differ, changes of
different partitions interleave differently, and the change log holds one net change per key
and (larger) batch, so fewer entries. That is why the swap bumps the staging epoch: a device's
watermark means nothing in the new generation, so every device re-bootstraps (its next sync
answers ``must_bootstrap``, reason ``staging_epoch_changed``) instead of receiving deltas
computed against the wrong versions. Tombstones the retention purge had removed come back as
deleted rows (their log entries count as recorded at replay time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
import typer
from psycopg import sql

from engine.config import Settings
from engine.exceptions import FieldSyncError
from engine.projections.exceptions import DecodeError, ProjectionError
from engine.projections.model import (
    ChangeEvent,
    ColumnSpec,
    EntityShape,
    Origin,
    Position,
    Tombstone,
)
from engine.projections.staging import CHANGES_CHANNEL, ApplyResult, Staging, org_schema
from engine.runtime.kafka import client_options
from engine.runtime.placement import StagingServers

if TYPE_CHECKING:  # the command's module is imported by every fieldsync invocation: stay light
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import ConsumerRecord, TopicPartition
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from engine.projections.decoding import EventDecoder
    from engine.snapshots.store import Manifest, SnapshotStore

log = logging.getLogger("fieldsync.replay")

REPLAY_SUFFIX = "__replay"
OLD_SUFFIX = "__old_"
DEFAULT_BATCH_EVENTS = 50_000
#: A catch-up round reading fewer messages than this ends the catch-up: the swap's tail is short.
CATCH_UP_ENOUGH = 5_000
CATCH_UP_ROUNDS = 5
SWAP_ATTEMPTS = 5
FETCH_RECORDS = 10_000


def shadow_schema(org: str) -> str:
    """The schema a replay builds: ``org_<org>__replay``."""
    return org_schema(org) + REPLAY_SUFFIX


class ReplayError(FieldSyncError):
    """A replay that cannot start or cannot be swapped in (the message says why)."""

    code = "replay_failed"


@dataclass
class ReplayReport:
    """What a replay read, applied, skipped and swapped."""

    org: str
    entity: str | None
    shadow: str
    topics: list[str] = field(default_factory=list)
    messages: int = 0  # read from the topics
    applied: int = 0  # changes newer than the shadow held
    skipped: int = 0  # duplicates (same position twice on the topic) and tombstones
    refused: Counter[str] = field(default_factory=Counter)  # reason → messages not applied
    watermarks: dict[str, int] = field(default_factory=dict)  # of the (new) staging
    snapshots: dict[str, str] = field(default_factory=dict)  # entity → snapshot it started from
    snapshot_rows: int = 0
    build_messages: int = 0
    build_s: float = 0.0
    catch_up_s: float = 0.0
    tail_messages: int = 0
    locked_s: float = 0.0  # how long the projector's writers were held
    swap_attempts: int = 0
    elapsed_s: float = 0.0
    swapped: bool = False
    epoch: str | None = None
    old_schema: str | None = None

    @property
    def rate(self) -> float:
        """Changes per second of the build (snapshot rows and messages read, decoded, applied)."""
        done = self.build_messages + self.snapshot_rows
        return done / self.build_s if self.build_s else 0.0


# -- reading --------------------------------------------------------------------------------


class TopicReader:
    """A consumer without a group that reads partitions from where it is to their end.

    Positions start at the beginning of each partition (or at ``start`` offsets) and are kept
    here, so every :meth:`read_to_end` assigns afresh (see the module docstring).
    """

    def __init__(self, bootstrap_servers: str, *, max_records: int = FETCH_RECORDS) -> None:
        self._bootstrap = bootstrap_servers
        self._max_records = max_records
        self._consumer: AIOKafkaConsumer | None = None
        self.positions: dict[TopicPartition, int | None] = {}  # None: the partition's beginning

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            **client_options(),
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="fieldsync-replay",
            fetch_max_wait_ms=20,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "start() the reader first"
        return self._consumer

    async def add_topics(
        self, topics: Sequence[str], start: dict[TopicPartition, int] | None = None
    ) -> list[str]:
        """Read these topics too (from ``start`` or their beginning); returns the new ones."""
        from aiokafka.structs import TopicPartition

        known = {tp.topic for tp in self.positions}
        wanted = [t for t in topics if t not in known]
        if not wanted:
            return []
        await self.consumer.topics()  # refreshes the metadata
        added = []
        for topic in wanted:
            partitions = self.consumer.partitions_for_topic(topic) or set()
            for partition in sorted(partitions):
                tp = TopicPartition(topic, partition)
                self.positions[tp] = (start or {}).get(tp)
            if partitions:
                added.append(topic)
        return added

    async def deleted(self) -> list[str]:
        """Partitions whose start lies before their first offset still held: changes the
        broker deleted (time retention), which a replay from there would miss."""
        parts = list(self.positions)
        if not parts:
            return []
        beginnings = await self.consumer.beginning_offsets(parts)
        return [
            f"{tp.topic}[{tp.partition}] holds offsets from {beginnings[tp]}, not {pos or 0}"
            for tp, pos in self.positions.items()
            if beginnings[tp] > (pos or 0)
        ]

    async def remaining(self) -> int:
        """About how many messages lie between the positions and the ends (a lower bound on the
        embedded broker, which answers ListOffsets low)."""
        parts = list(self.positions)
        if not parts:
            return 0
        ends = await self.consumer.end_offsets(parts)
        beginnings = await self.consumer.beginning_offsets(parts)
        return sum(
            max(0, ends[tp] - (beginnings[tp] if pos is None else pos))
            for tp, pos in self.positions.items()
        )

    async def read_to_end(
        self, handle: Callable[[Sequence[ConsumerRecord[Any, Any]]], Awaitable[None]]
    ) -> int:
        """Hand every message up to each partition's end (as of this call) to ``handle``, in
        order per partition; returns how many."""
        parts = list(self.positions)
        if not parts:
            return 0
        consumer = self.consumer
        consumer.assign(parts)  # a fresh assignment: no high watermark known yet
        for tp, position in self.positions.items():
            if position is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, position)
        targets: dict[TopicPartition, int] = {}
        count = 0
        while True:
            behind = False
            for tp in parts:
                position = await consumer.position(tp)
                self.positions[tp] = position
                if tp not in targets:
                    highwater = consumer.highwater(tp)
                    if highwater is None:  # no fetch answered for this assignment yet
                        behind = True
                        continue
                    targets[tp] = highwater
                behind = behind or position < targets[tp]
            if not behind:
                return count
            batch = await consumer.getmany(timeout_ms=20, max_records=self._max_records)
            for records in batch.values():
                count += len(records)
                await handle(records)


# -- applying -------------------------------------------------------------------------------


class _Applier:
    """Decoded changes collected per entity and applied in large batches, one batch being
    written (in a worker thread) while the next one is decoded."""

    def __init__(self, staging: Staging, org: str, batch_events: int) -> None:
        self._staging = staging
        self._org = org
        self._batch_events = batch_events
        self._pending: dict[str, list[ChangeEvent]] = defaultdict(list)
        self._count = 0
        self._writing: asyncio.Future[list[tuple[str, int, ApplyResult | ProjectionError]]] | None
        self._writing = None
        self.applied = 0
        self.skipped = 0
        self.refused: Counter[str] = Counter()
        self.watermarks: dict[str, int] = {}

    def add(self, event: ChangeEvent) -> None:
        self._pending[event.entity].append(event)
        self._count += 1

    async def maybe_flush(self) -> None:
        if self._count >= self._batch_events:
            await self.flush()

    async def flush(self) -> None:
        """Start writing what is pending (after the batch being written is done)."""
        await self.wait()
        if not self._count:
            return
        groups, self._pending, self._count = self._pending, defaultdict(list), 0
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, groups))

    async def wait(self) -> None:
        """Wait until the batch being written is committed, and count its results."""
        if self._writing is None:
            return
        writing, self._writing = self._writing, None
        for entity, events, outcome in await writing:
            if isinstance(outcome, ProjectionError):
                self.refused[outcome.code] += events
                continue
            self.applied += outcome.applied
            self.skipped += outcome.duplicates
            self.watermarks[entity] = max(self.watermarks.get(entity, 0), outcome.watermark)

    async def drain(self) -> None:
        await self.flush()
        await self.wait()

    def _write(
        self, groups: dict[str, list[ChangeEvent]]
    ) -> list[tuple[str, int, ApplyResult | ProjectionError]]:
        outcomes: list[tuple[str, int, ApplyResult | ProjectionError]] = []
        for entity, events in groups.items():
            try:
                outcome: ApplyResult | ProjectionError = self._staging.apply(
                    self._org, entity, events
                )
            except ProjectionError as error:  # the live projector dead-lettered these too
                log.warning("org %s, entity %s: %s; %d events not applied", self._org, entity,
                            error, len(events))  # fmt: skip
                outcome = error
            outcomes.append((entity, len(events), outcome))
        return outcomes


# -- progress -------------------------------------------------------------------------------


class _Bar:
    """A rich progress bar (messages, events/s, ETA), or nothing without a console."""

    def __init__(self, console: Console | None) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if console is None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            Task,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} events/s" if speed else "- events/s")

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._progress.start()

    def phase(self, description: str, total: int) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.stop_task(self._task)
        self._task = self._progress.add_task(description, total=max(total, 1))

    def advance(self, count: int) -> None:
        if self._progress is None or self._task is None:
            return
        task = self._progress.tasks[-1]
        if task.total is not None and task.completed + count > task.total:
            self._progress.update(self._task, total=task.completed + count)
        self._progress.advance(self._task, count)

    def done(self) -> None:
        if self._progress is not None:
            if self._task is not None:
                task = self._progress.tasks[-1]
                self._progress.update(self._task, total=task.completed)
            self._progress.stop()


# -- the replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Org:
    """What the control schema says about the org."""

    debezium_topics: dict[str, tuple[str, str]]  # every org's mapping (the router needs it)


class Replay:
    """One replay of one org (see the module docstring); :meth:`run` does it all."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        staging_dsn: str,
        org: str,
        *,
        entity: str | None = None,
        swap: bool = True,
        batch_events: int = DEFAULT_BATCH_EVENTS,
        from_snapshot: bool = False,
        snapshots: SnapshotStore | None = None,
        console: Console | None = None,
    ) -> None:
        self.settings = settings
        self.from_snapshot = from_snapshot
        self._store = snapshots
        self._seeded: set[str] = set()
        self.bootstrap = bootstrap_servers
        # everything happens on the org's staging server (schema and epoch swap in one commit)
        self.dsn = StagingServers.from_settings(settings, staging_dsn).dsn_for(org)
        self.org = org
        self.entity = entity
        self.swap = swap
        self.batch_events = batch_events
        self.shadow = shadow_schema(org)
        self.live = org_schema(org)
        self.report = ReplayReport(org, entity, self.shadow)
        self._bar = _Bar(console)

    # -- set-up ---------------------------------------------------------------------------
    def _exclusive(self) -> psycopg.Connection[Any]:
        """A connection holding the org's replay lock: one replay of an org at a time (they
        would drop each other's shadow schema)."""
        guard = psycopg.connect(self.dsn, autocommit=True, application_name="fieldsync-replay")
        row = guard.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))", (f"fieldsync.replay.{self.org}",)
        ).fetchone()
        if not (row and row[0]):
            guard.close()
            raise ReplayError(f"another replay of org {self.org} is running")
        return guard

    def _control(self) -> _Org:
        from engine.projections.app import OrgRegistry
        from gateway.store import ensure_schema  # the staging epoch lives with the gateway

        registry = OrgRegistry(StagingServers(self.dsn))
        registry.refresh()
        if self.org not in registry.orgs:
            raise ReplayError(
                f"org {self.org} is not registered (fieldsync_control.orgs): nothing to replay"
            )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            ensure_schema(conn)
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.shadow))
            )  # a previous replay that did not finish
        return _Org(registry.debezium_topics)

    async def _topics(self, control: _Org, reader: TopicReader) -> list[str]:
        """The org's (the entity's) change topics on the broker now, routed as the projector
        routes them (one metadata request: this runs with the projector's writers held)."""
        from engine.projections.app import CHANGE_TOPIC, NOT_ENTITIES
        from engine.projections.decoding import TopicRouter

        existing = await reader.consumer.topics()
        router = TopicRouter(control.debezium_topics)
        topics = []
        for topic in sorted(existing):
            match = CHANGE_TOPIC.match(topic)
            if match is not None and match.group(2) in NOT_ENTITIES:
                continue
            route = router.route(topic) if match or topic in control.debezium_topics else None
            if route is None or route[0] != self.org:
                continue
            if self.entity is None or route[1] == self.entity:
                topics.append(topic)
        return topics

    def _decoder(self, control: _Org) -> EventDecoder:
        """The projector's decoder, built as the projector worker builds it, except that the
        schema topic is read with a :class:`TopicReader` (to its end as of the call, so a
        schema topic being written meanwhile cannot keep it reading)."""
        from engine.projections.decoding import EventDecoder, TopicRouter
        from engine.streams.framing import (
            ConfluentRegistry,
            ConfluentResolver,
            FingerprintResolver,
        )

        confluent = (
            ConfluentResolver(ConfluentRegistry(self.settings.schema_registry_url))
            if self.settings.schema_registry_url
            else None
        )
        return EventDecoder(
            TopicRouter(control.debezium_topics),
            single_object=FingerprintResolver(fetch_missing=self._published_schemas),
            confluent=confluent,
            max_message_bytes=self.settings.projector_max_message_bytes,
        )

    async def _published_schemas(self) -> dict[bytes, dict[str, Any]]:
        """Every schema on the schema topic (small once compacted: read whole; each distinct
        schema is fingerprinted once, however often it was published)."""
        import orjson

        from engine.streams.framing import SCHEMA_TOPIC, schema_fingerprint

        published: set[bytes] = set()

        async def collect(records: Sequence[ConsumerRecord[Any, Any]]) -> None:
            published.update(r.value for r in records if r.value is not None)

        reader = TopicReader(self.bootstrap)
        await reader.start()
        try:
            await reader.add_topics([SCHEMA_TOPIC])
            await reader.read_to_end(collect)
        finally:
            await reader.stop()
        found: dict[bytes, dict[str, Any]] = {}
        for value in published:
            schema = orjson.loads(value)
            found[schema_fingerprint(schema)] = schema
        return found

    # -- run --------------------------------------------------------------------------------
    async def run(self) -> ReplayReport:
        guard = await asyncio.to_thread(self._exclusive)
        try:
            return await self._run()
        finally:
            guard.close()

    async def _run(self) -> ReplayReport:
        started = time.perf_counter()
        control = await asyncio.to_thread(self._control)
        decoder = self._decoder(control)
        reader = TopicReader(self.bootstrap)
        apply_conn = psycopg.connect(self.dsn, application_name="fieldsync-replay")
        # the shadow is rebuilt if the database crashes; the swap's commit is synchronous
        apply_conn.execute("SET synchronous_commit = off")
        apply_conn.commit()
        staging = Staging(apply_conn, schema_for=lambda _org: self.shadow, notify=False)
        applier = _Applier(staging, self.org, self.batch_events)
        try:
            await reader.start()
            topics = await self._topics(control, reader)
            if not topics:
                what = f"entity {self.entity} of org {self.org}" if self.entity else self.org
                raise ReplayError(f"no change topic of {what} on the broker")
            phase = time.perf_counter()
            start: dict[TopicPartition, int] = {}
            if self.from_snapshot:  # 0. seed from snapshots; their offsets start the topics
                start = await self._seed(control, topics, applier)
            self.report.topics = await reader.add_topics(topics, start)
            deleted = await reader.deleted()
            if deleted:
                raise ReplayError(
                    "the broker no longer holds every change to replay: "
                    + "; ".join(deleted)
                    + " (replay from a snapshot whose offsets are at or after them)"
                )

            async def handle(records: Sequence[ConsumerRecord[Any, Any]]) -> None:
                await self._handle(decoder, applier, records)

            # 1. build
            self._bar.phase(f"replay {self.org} → {self.shadow}", await reader.remaining())
            self.report.build_messages = await reader.read_to_end(handle)
            await applier.drain()
            self.report.build_s = time.perf_counter() - phase
            log.info(
                "org %s: %d messages replayed into %s in %.1fs",
                self.org,
                self.report.build_messages,
                self.shadow,
                self.report.build_s,
            )
            if self.swap:
                await self._catch_up_and_swap(control, reader, handle, applier, staging)
        finally:
            self._bar.done()
            await reader.stop()
            apply_conn.close()
            self._collect(applier)
            self.report.elapsed_s = time.perf_counter() - started
        return self.report

    def _collect(self, applier: _Applier) -> None:
        self.report.applied = applier.applied
        self.report.skipped += applier.skipped
        self.report.refused.update(applier.refused)
        self.report.watermarks = dict(sorted(applier.watermarks.items()))

    # -- snapshots ------------------------------------------------------------------------
    async def _seed(
        self, control: _Org, topics: Sequence[str], applier: _Applier
    ) -> dict[TopicPartition, int]:
        """Apply the latest snapshot of each entity to the shadow; returns where each snapshot's
        topics continue (the projector group's offsets it recorded)."""
        from aiokafka.structs import TopicPartition

        from engine.projections.decoding import TopicRouter
        from engine.snapshots.store import default_store

        store = self._store or default_store(self.settings)
        router = TopicRouter(control.debezium_topics)
        by_entity: dict[str, list[str]] = defaultdict(list)
        for topic in topics:
            route = router.route(topic)
            if route is not None:
                by_entity[route[1]].append(topic)
        start: dict[TopicPartition, int] = {}
        for entity in sorted(by_entity):
            manifest = await asyncio.to_thread(store.latest, self.org, entity)
            if manifest is None:
                log.warning("org %s, entity %s: no snapshot; replayed from the beginning",
                            self.org, entity)  # fmt: skip
                continue
            offsets = {
                TopicPartition(topic, int(partition)): offset
                for topic, partitions in manifest.kafka.offsets.items()
                if topic in by_entity[entity]
                for partition, offset in partitions.items()
            }
            if not offsets:
                log.warning("org %s, entity %s: snapshot %s has no Kafka offsets (%s); replayed "
                            "from the beginning", self.org, entity, manifest.id,
                            manifest.kafka.note)  # fmt: skip
                continue
            self._bar.phase(f"snapshot {entity} {manifest.id}", manifest.rows)
            rows = 0
            chunks, none = _snapshot_events(store, manifest), list[ChangeEvent]()
            while chunk := await asyncio.to_thread(next, chunks, none):  # file read off the loop
                for event in chunk:
                    applier.add(event)
                rows += len(chunk)
                self._bar.advance(len(chunk))
                await applier.maybe_flush()
            await applier.drain()
            self._seeded.add(entity)
            start.update(offsets)
            self.report.snapshots[entity] = manifest.id
            self.report.snapshot_rows += rows
        if not self._seeded:
            raise ReplayError(
                f"--from-snapshot: no snapshot with Kafka offsets of any entity of {self.org} in "
                f"{store!r} (build them with fieldsync snapshot build)"
            )
        return start

    async def _handle(
        self,
        decoder: EventDecoder,
        applier: _Applier,
        records: Sequence[ConsumerRecord[Any, Any]],
    ) -> None:
        for record in records:
            try:
                decoded = await decoder.decode(
                    record.topic,
                    record.partition,
                    record.offset,
                    record.key,
                    record.value,
                    tuple(record.headers or ()),
                )
            except DecodeError as error:
                self.report.refused[error.reason] += 1
                continue
            if isinstance(decoded, Tombstone):
                self.report.skipped += 1
            elif decoded.op == "t" and decoded.entity in self._seeded:
                raise ReplayError(
                    f"a truncate of {decoded.entity} follows its snapshot's offsets: the "
                    "snapshot's rows carry no source positions to compare with it; replay "
                    "without --from-snapshot"
                )
            elif decoded.org != self.org or (self.entity and decoded.entity != self.entity):
                self.report.refused["unknown_org"] += 1  # a mapping that routes elsewhere
            else:
                applier.add(decoded)
        self.report.messages += len(records)
        self._bar.advance(len(records))
        await applier.maybe_flush()

    async def _catch_up_and_swap(
        self,
        control: _Org,
        reader: TopicReader,
        handle: Callable[[Sequence[ConsumerRecord[Any, Any]]], Awaitable[None]],
        applier: _Applier,
        staging: Staging,
    ) -> None:
        from psycopg.errors import DeadlockDetected, LockNotAvailable

        # 2. catch up
        phase = time.perf_counter()
        for _ in range(CATCH_UP_ROUNDS):
            self.report.topics += await reader.add_topics(await self._topics(control, reader))
            self._bar.phase("catch up", await reader.remaining())
            read = await reader.read_to_end(handle)
            await applier.drain()
            if read < CATCH_UP_ENOUGH:
                break
        self.report.catch_up_s = time.perf_counter() - phase
        # 3. swap
        conn = psycopg.connect(self.dsn, application_name="fieldsync-replay-swap")
        try:
            for attempt in range(1, SWAP_ATTEMPTS + 1):
                self.report.swap_attempts = attempt
                try:
                    await self._swap(control, reader, handle, applier, conn)
                    break
                except (DeadlockDetected, LockNotAvailable) as error:
                    await asyncio.to_thread(conn.rollback)
                    staging.forget(self.org)
                    if attempt == SWAP_ATTEMPTS:
                        raise ReplayError(f"swap failed {attempt} times: {error}") from error
                    log.warning("swap attempt %d: %s; catching up and trying again", attempt,
                                error)  # fmt: skip
                    await reader.read_to_end(handle)
                    await applier.drain()
                except BaseException:
                    await asyncio.to_thread(conn.rollback)
                    raise
            if self.report.old_schema is not None:
                await asyncio.to_thread(self._drop, conn, self.report.old_schema)
            if self.entity is not None:
                await asyncio.to_thread(self._drop, conn, self.shadow)
        finally:
            conn.close()

    async def _swap(
        self,
        control: _Org,
        reader: TopicReader,
        handle: Callable[[Sequence[ConsumerRecord[Any, Any]]], Awaitable[None]],
        applier: _Applier,
        conn: psycopg.Connection[Any],
    ) -> None:
        await asyncio.to_thread(self._lock, conn)  # (a)
        locked = time.perf_counter()
        # (b) every topic that exists now, to its end as of now
        self.report.topics += await reader.add_topics(await self._topics(control, reader))
        self._bar.phase("swap: tail under lock", 0)  # no ListOffsets while writers wait
        self.report.tail_messages += await reader.read_to_end(handle)
        await applier.drain()
        # (c)
        swapped = await asyncio.to_thread(switch, conn, self.org, self.shadow, self.entity)
        self.report.locked_s = time.perf_counter() - locked
        self.report.swapped, self.report.epoch = True, swapped.epoch
        self.report.old_schema = swapped.old_schema
        applier.watermarks.update(swapped.watermarks)
        log.info(
            "org %s: %s swapped in (writers held %.2fs), staging epoch %s",
            self.org,
            self.shadow,
            self.report.locked_s,
            swapped.epoch,
        )

    def _lock(self, conn: psycopg.Connection[Any]) -> None:
        lock_writers(conn, self.org, swapped_entities(conn, self.shadow, self.entity))

    def _drop(self, conn: psycopg.Connection[Any], schema: str) -> None:
        """(d), once the projector's last transaction on the old tables has ended."""
        try:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.commit()
        except psycopg.Error as error:
            conn.rollback()
            log.warning("could not drop %s (%s): drop it by hand", schema, error)


# -- snapshot rows as changes -----------------------------------------------------------------

#: Where a snapshot's rows stand: before every change on the topics (their real positions are
#: not in the file), after "nothing purged" (0, 0), so the topics' changes replace them.
SNAPSHOT_POSITION = Position(0, 1)


def _snapshot_value(pg_type: str) -> Callable[[Any], Any] | None:
    """How a snapshot file's value becomes the value staging writes (see docs/snapshots.md);
    None: as fastavro reads it (numbers, text, bytes, dates, times, timestamps)."""
    kind = pg_type.strip().lower()
    if kind.endswith("[]"):  # JSON text; exact decimals
        return lambda v: None if v is None else json.loads(v, parse_float=Decimal)
    if kind.startswith(("numeric", "decimal")):  # PostgreSQL's exact text
        return lambda v: None if v is None else Decimal(v)
    return None


def _snapshot_events(
    store: SnapshotStore, manifest: Manifest, chunk: int = 10_000
) -> Iterator[list[ChangeEvent]]:
    """The snapshot's rows as ``r`` changes at :data:`SNAPSHOT_POSITION`, ``chunk`` at a time."""
    import fastavro

    keys = set(manifest.keys)
    columns = [(c["name"], c["type"]) for c in manifest.columns]
    shape = EntityShape(tuple(ColumnSpec(name, kind, name in keys) for name, kind in columns))
    converters = [(name, _snapshot_value(kind)) for name, kind in columns]
    changed_ms = int(manifest.created_at.timestamp() * 1000)
    origin = f"snapshot {manifest.org}.{manifest.entity} {manifest.id}"
    count = 0
    events: list[ChangeEvent] = []
    with store.open(manifest.org, manifest.entity, manifest.id) as file:
        for record in fastavro.reader(file):
            assert isinstance(record, dict)
            row = {
                name: record.get(name) if convert is None else convert(record.get(name))
                for name, convert in converters
            }
            events.append(
                ChangeEvent(
                    org=manifest.org,
                    entity=manifest.entity,
                    op="r",
                    key={k: row[k] for k in manifest.keys},
                    before=None,
                    after=row,
                    position=SNAPSHOT_POSITION,
                    shape=shape,
                    source_ts_ms=changed_ms,
                    origin=Origin(origin, 0, count),
                )
            )
            count += 1
            if len(events) == chunk:
                yield events
                events = []
    if count != manifest.rows:
        raise ReplayError(f"{origin}: {count} rows in the file, {manifest.rows} announced")
    if events:
        yield events


# -- the swap's steps (module level: tests drive them one by one) ----------------------------


@dataclass(frozen=True)
class Swapped:
    old_schema: str | None  # what was live (dropped afterwards); None when nothing was
    epoch: str  # the new staging epoch
    watermarks: dict[str, int]  # of the swapped entities


def swapped_entities(conn: psycopg.Connection[Any], shadow: str, entity: str | None) -> list[str]:
    """The entities a swap moves: ``entity``, or every entity of the shadow."""
    if entity is not None:
        return [entity]
    if not _exists(conn, f'"{shadow}"._fs_entities'):
        return []
    return sorted(_entities(conn, shadow))


def lock_writers(conn: psycopg.Connection[Any], org: str, entities: Sequence[str]) -> None:
    """Swap step (a), in ``conn``'s transaction: the projector's DDL advisory locks (the org's,
    then each entity's: its own order), then ``EXCLUSIVE`` on ``_fs_entities``, which every
    staging writer of the org needs next (see the module docstring)."""
    live = org_schema(org)
    lock = "SELECT pg_advisory_xact_lock(hashtext(%s))"
    conn.execute(lock, (f"fieldsync.staging.{live}",))
    for entity in sorted(entities):
        conn.execute(lock, (f"fieldsync.staging.{live}.{entity}",))
    if _exists(conn, f'"{live}"._fs_entities'):
        conn.execute(
            sql.SQL("LOCK TABLE {}._fs_entities IN EXCLUSIVE MODE").format(sql.Identifier(live))
        )


def switch(
    conn: psycopg.Connection[Any], org: str, shadow: str, entity: str | None = None
) -> Swapped:
    """Swap step (c), with :func:`lock_writers` held: the shadow (or its ``entity``) becomes
    ``org_<org>``, what was live moves to ``org_<org>__old_<n>``, the staging epoch is bumped
    and every swapped entity's long-polls are woken; commits."""
    from gateway.store import bump_epoch

    live_name = org_schema(org)
    live, source = sql.Identifier(live_name), sql.Identifier(shadow)
    if not _exists(conn, f'"{shadow}"._fs_entities'):
        raise ReplayError(f"the replay applied nothing: {shadow} is empty, not swapped")
    moved = set(swapped_entities(conn, shadow, entity))
    live_exists = _exists(conn, f'"{live_name}"._fs_entities')
    old: str | None = None
    if entity is None or not live_exists:
        if live_exists:
            gone = sorted(_entities(conn, live_name) - moved)
            if gone:
                raise ReplayError(
                    f"{live_name} has entities the replay did not rebuild (no topic, or nothing "
                    f"applicable on it): {', '.join(gone)}; replay entities one by one with "
                    "--entity instead"
                )
            old = _old_name(conn, live_name)
            conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(live, sql.Identifier(old)))
        conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(source, live))
    else:
        if entity not in _entities(conn, shadow):
            raise ReplayError(f"the replay found no change of entity {entity}: not swapped")
        old = _old_name(conn, live_name)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(old)))
        for table in (entity, f"{entity}__log"):
            if _exists(conn, f'"{live_name}"."{table}"'):
                conn.execute(
                    sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                        live, sql.Identifier(table), sql.Identifier(old)
                    )
                )
            conn.execute(
                sql.SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(
                    source, sql.Identifier(table), live
                )
            )
        columns = sql.SQL(", ").join(map(sql.Identifier, _ENTITY_COLUMNS))
        conn.execute(
            sql.SQL("DELETE FROM {}._fs_entities WHERE entity = %s").format(live), (entity,)
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {live}._fs_entities ({columns})"
                " SELECT {columns} FROM {shadow}._fs_entities WHERE entity = %s"
            ).format(live=live, shadow=source, columns=columns),
            (entity,),
        )
    epoch = bump_epoch(conn, org)
    watermarks = {
        name: int(version)
        for name, version in conn.execute(
            sql.SQL("SELECT entity, version FROM {}._fs_entities").format(live)
        ).fetchall()
        if name in moved
    }
    for name in sorted(watermarks):  # wakes the long-polls: they find the new epoch
        conn.execute(
            "SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, f"{org}.{name}:{watermarks[name]}")
        )
    conn.commit()
    return Swapped(old, epoch, watermarks)


def _old_name(conn: psycopg.Connection[Any], live: str) -> str:
    n = 1
    while conn.execute(
        "SELECT 1 FROM pg_namespace WHERE nspname = %s", (f"{live}{OLD_SUFFIX}{n}",)
    ).fetchone():
        n += 1
    return f"{live}{OLD_SUFFIX}{n}"


_ENTITY_COLUMNS = (
    "entity",
    "version",
    "truncated_commit_lsn",
    "truncated_lsn",
    "horizon_version",
    "purged_commit_lsn",
    "purged_lsn",
    "horizon_at",
    "key_columns",
    "updated_at",
)


def _exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _entities(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = conn.execute(
        sql.SQL("SELECT entity FROM {}._fs_entities").format(sql.Identifier(schema))
    ).fetchall()
    return {entity for (entity,) in rows}


def replay(
    settings: Settings,
    bootstrap_servers: str,
    staging_dsn: str,
    org: str,
    *,
    entity: str | None = None,
    swap: bool = True,
    batch_events: int = DEFAULT_BATCH_EVENTS,
    from_snapshot: bool = False,
    snapshots: SnapshotStore | None = None,
    console: Console | None = None,
) -> ReplayReport:
    """Replay ``org`` (``entity``) into the shadow schema and, with ``swap``, swap it in;
    ``from_snapshot``: each entity starts from its latest snapshot in ``snapshots`` (default:
    the local snapshot directory) and the offsets recorded with it."""
    job = Replay(
        settings,
        bootstrap_servers,
        staging_dsn,
        org,
        entity=entity,
        swap=swap,
        batch_events=batch_events,
        from_snapshot=from_snapshot,
        snapshots=snapshots,
        console=console,
    )
    return asyncio.run(job.run())


# -- the command ----------------------------------------------------------------------------


def replay_command(
    org: Annotated[str, typer.Option("--org", help="The organisation to rebuild.")],
    entity: Annotated[
        str | None, typer.Option("--entity", help="Rebuild only this entity.")
    ] = None,
    from_snapshot: Annotated[
        bool,
        typer.Option(
            "--from-snapshot", help="Start from the latest snapshot's rows and Kafka offsets."
        ),
    ] = False,
    swap: Annotated[
        bool,
        typer.Option(
            "--swap/--no-swap", help="Swap the rebuilt schema in (--no-swap keeps it aside)."
        ),
    ] = True,
    batch: Annotated[
        int, typer.Option(help="Changes per staging batch.", min=1)
    ] = DEFAULT_BATCH_EVENTS,
) -> None:
    """Rebuild an org's staging from its change topics, then swap it in: devices re-bootstrap."""
    from rich.table import Table

    from engine.cli import _fail, _settings, console
    from engine.logs import configure_logging
    from engine.runtime.endpoints import resolve_endpoints

    try:
        settings = _settings()
        configure_logging(settings)
        endpoints = resolve_endpoints(settings)
        report = replay(
            settings,
            endpoints.bootstrap_servers,
            endpoints.staging_dsn,
            org,
            entity=entity,
            swap=swap,
            batch_events=batch,
            from_snapshot=from_snapshot,
            console=console,
        )
    except FieldSyncError as error:
        raise _fail(error) from None
    table = Table(title=f"Replay of {org}" + (f", entity {entity}" if entity else ""))
    table.add_column("", style="bold")
    table.add_column("")
    for entity, snapshot in report.snapshots.items():
        table.add_row(f"started from snapshot of {entity}", snapshot)
    if report.snapshots:
        table.add_row("snapshot rows", f"{report.snapshot_rows:,}")
    table.add_row("messages read", f"{report.messages:,}")
    table.add_row("applied / skipped", f"{report.applied:,} / {report.skipped:,}")
    if report.refused:
        table.add_row(
            "not applied (as the projector)",
            ", ".join(f"{reason} {count}" for reason, count in sorted(report.refused.items())),
        )
    table.add_row(
        "build",
        f"{report.build_messages + report.snapshot_rows:,} in {report.build_s:.1f}s "
        f"({report.rate:,.0f}/s)",
    )
    if report.swapped:
        table.add_row("writers held", f"{report.locked_s:.2f}s ({report.tail_messages:,} tail)")
        table.add_row("staging epoch", f"{report.epoch} (devices re-bootstrap)")
        table.add_row("watermarks", ", ".join(f"{e} {w}" for e, w in report.watermarks.items()))
    else:
        table.add_row("shadow schema", f"{report.shadow} (not swapped in)")
    table.add_row("elapsed", f"{report.elapsed_s:.1f}s")
    console.print(table)


__all__ = [
    "ReplayError",
    "ReplayReport",
    "Swapped",
    "TopicReader",
    "lock_writers",
    "replay",
    "replay_command",
    "shadow_schema",
    "switch",
]
