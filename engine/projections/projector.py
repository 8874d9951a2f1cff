"""The projector's batch step, independent of the stream framework that feeds it.

For a batch of raw messages:
  1. Decode each (any accepted input format); a message that cannot be decoded, or whose org
     is not known, becomes a dead letter with its reason.
  2. Group the changes by org and entity. A group whose columns changed type (staging's
     catalog tells, nothing is written) stops its entity: ``incompatible_schema``.
  3. Apply the groups to staging (idempotent by source position): those of one staging server
     in one transaction; when that fails, each group in its own. A value staging refuses (a
     numeric that overflows its precision, a NUL character in text, JSON that does not parse)
     fails the group's transaction: the group is split in halves, in source order, until the
     refused events are found; they become dead letters (``type_overflow``, ``bad_value``) and
     the rest is applied.
  4. The error-rate breaker: an org whose latest events failed too often (decode or staging)
     stops with ``error_rate_exceeded`` instead of dead-lettering them (:mod:`.stops`).
  5. Send the dead letters and wait for the broker's acknowledgement.
  6. Add the batch to the reconciliation counts: consumed = applied + duplicates + dead letters.
Only then does the caller acknowledge the batch (the consumer commits offsets later still):
a crash anywhere re-delivers the batch, and step 3 skips what was already applied. A stop
(steps 2 and 4) is recorded in the control schema and raised as :class:`ProjectionStopped`
before any dead letter is sent or count written: the caller must not acknowledge the batch
(the worker re-subscribes without the stopped topics, so their offsets stay where they were).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import psycopg

from engine.control import run_control_ddl
from engine.projections.decoding import EventDecoder, TopicRouter
from engine.projections.exceptions import DecodeError
from engine.projections.metrics import METRICS
from engine.projections.model import ChangeEvent, Tombstone
from engine.projections.staging import ApplyResult, IncompatibleSchema, Staging
from engine.projections.stops import (
    ERROR_RATE_EXCEEDED,
    INCOMPATIBLE_SCHEMA,
    STOPS_DDL,
    Breaker,
    ProjectionStopped,
    Stop,
    record_stop,
)
from engine.runtime.placement import MAIN, StagingServers
from engine.streams.topics import dead_letter_topic

log = logging.getLogger("fieldsync.projector")

REASON_HEADER = "fieldsync.dlq.reason"


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    org: str | None
    message: RawMessage
    reason: str
    detail: str

    @property
    def topic(self) -> str:
        return dead_letter_topic(self.org)

    def headers(self) -> list[tuple[str, bytes]]:
        """The original headers, plus why and where from."""
        return [
            *self.message.headers,
            (REASON_HEADER, self.reason.encode()),
            ("fieldsync.dlq.detail", self.detail.encode()[:2000]),
            ("fieldsync.dlq.topic", self.message.topic.encode()),
            ("fieldsync.dlq.partition", str(self.message.partition).encode()),
            ("fieldsync.dlq.offset", str(self.message.offset).encode()),
        ]


SendDeadLetters = Callable[[Sequence[DeadLetter]], Awaitable[None]]


@dataclass
class BatchReport:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    per_entity: dict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0])
    )


COUNTS_DDL = (
    """
CREATE SCHEMA IF NOT EXISTS fieldsync_control;
CREATE TABLE IF NOT EXISTS fieldsync_control.orgs (
    org text PRIMARY KEY,
    retention_days int NOT NULL DEFAULT 30,
    debezium_topics jsonb NOT NULL DEFAULT '{}',
    registered_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS fieldsync_control.projection_counts (
    org text NOT NULL,
    entity text NOT NULL,
    consumed bigint NOT NULL DEFAULT 0,
    applied bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org, entity)
);
"""
    + STOPS_DDL
)

#: SQLSTATEs of values outside their column type's range; any other data exception (class 22,
#: and a null key) is a ``bad_value``.
_OVERFLOW_STATES = frozenset({"22001", "22003", "22008", "22015"})
# the staging connection is gone (server away, or it ended a transaction left idle): the
# batch is not applied, a new connection retries it
CONNECTION_LOST = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)

_REFUSED_VALUE = (
    psycopg.DataError,
    psycopg.errors.NotNullViolation,
    psycopg.errors.CheckViolation,  # a constraint an operator added to staging
)


class _GiveUp(Exception):
    """Isolating refused values would only confirm that the breaker trips."""

    def __init__(self, refused: list[tuple[ChangeEvent, psycopg.Error]]) -> None:
        super().__init__(f"{len(refused)} values refused")
        self.refused = refused


class Projector:
    """Decodes, applies and dead-letters batches (see the module docstring)."""

    def __init__(
        self,
        servers: StagingServers,
        decoder: EventDecoder,
        router: TopicRouter,
        placement: Callable[[], Mapping[str, str]],
        send_dead_letters: SendDeadLetters,
        *,
        breaker: Breaker | None = None,
        breaker_paused: Callable[[str], bool] = lambda _org: False,
        idle_transaction_timeout_s: float = 30.0,
    ) -> None:
        """``placement``: the known orgs and the staging server of each. Without ``breaker``
        failures are dead-lettered whatever their share; ``breaker_paused(org)``: the org's
        failures are dead-lettered for now (``fieldsync org resume --dead-letter-for``)."""
        self._servers = servers
        self._decoder = decoder
        self._router = router
        self._placement = placement
        self._send_dead_letters = send_dead_letters
        self._breaker = breaker
        self._breaker_paused = breaker_paused
        self._staging: dict[str, Staging] = {}
        self._idle_transaction_timeout_ms = round(idle_transaction_timeout_s * 1000)

    def _connection(self, server: str) -> Staging:
        staging = self._staging.get(server)
        if staging is None or staging.conn.closed:
            conn = psycopg.connect(
                self._servers.dsn(server), application_name="fieldsync-projector"
            )
            # a worker stopped mid-batch must not keep its locks: its partitions' new owner
            # writes the same entities (and the stopped worker's late commit then fails)
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(self._idle_transaction_timeout_ms),),
            )
            run_control_ddl(conn, COUNTS_DDL)
            conn.commit()
            staging = self._staging[server] = Staging(conn)
        return staging

    async def handle(self, messages: Sequence[RawMessage]) -> BatchReport:
        report = BatchReport(consumed=len(messages))
        groups: dict[tuple[str, str], list[ChangeEvent]] = defaultdict(list)
        dead: list[DeadLetter] = []
        known = self._placement()
        org_of: list[str | None] = []  # per message, the known org it counts for (breaker)
        for message in messages:  # step 1
            route = self._router.route(message.topic)
            org_of.append(route[0] if route and route[0] in known else None)
            try:
                decoded = await self._decoder.decode(
                    message.topic,
                    message.partition,
                    message.offset,
                    message.key,
                    message.value,
                    message.headers,
                )
            except DecodeError as error:
                dead.append(
                    DeadLetter(
                        route[0] if route and route[0] in known else None,
                        message,
                        error.reason,
                        str(error),
                    )
                )
                continue
            if isinstance(decoded, Tombstone):
                if route is not None:  # a tombstone changes nothing: counted as skipped
                    counts = report.per_entity[route]
                    counts[0] += 1
                    counts[2] += 1
                report.duplicates += 1
                continue
            if decoded.org not in known:
                dead.append(
                    DeadLetter(
                        None, message, "unknown_org", f"org {decoded.org} is not provisioned"
                    )
                )
                continue
            groups[(decoded.org, decoded.entity)].append(decoded)

        incompatible = []  # step 2
        conflicts_found = await asyncio.to_thread(self._incompatibilities, groups, known)
        for (org, entity), conflict in conflicts_found.items():
            detail, conflicts = conflict.args[0], conflict.conflicts
            incompatible.append(Stop(org, entity, INCOMPATIBLE_SCHEMA, detail, None, conflicts))
        if incompatible:  # orgs whose decoding failed too often stop in the same go
            outcomes = self._outcomes(messages, org_of, dead)
            tripped = [org for org, seen in outcomes.items() if self._would_trip(org, seen)]
            stops = [*incompatible, *self._trip_stops(tripped, messages, org_of, dead)]
            await self._stop(stops, known)

        by_origin = {(m.topic, m.partition, m.offset): m for m in messages}
        failed_orgs: dict[str, int] = defaultdict(int)  # failures so far, per org
        batch_events: dict[str, int] = defaultdict(int)
        for counted in org_of:
            if counted is not None:
                batch_events[counted] += 1
        for letter in dead:
            if letter.org is not None:
                failed_orgs[letter.org] += 1

        def tally(
            org: str,
            entity: str,
            events: list[ChangeEvent],
            result: ApplyResult,
            refused: Sequence[tuple[ChangeEvent, psycopg.Error]],
        ) -> None:
            counts = report.per_entity[(org, entity)]
            counts[0] += len(events) - len(refused)
            counts[1] += result.applied
            counts[2] += result.duplicates
            report.applied += result.applied
            report.duplicates += result.duplicates
            if result.watermark:
                METRICS.watermark.labels(org, entity).set(result.watermark)

        by_server: dict[str, list[tuple[str, str, list[ChangeEvent]]]] = defaultdict(list)
        for (org, entity), events in groups.items():  # step 3
            by_server[known[org]].append((org, entity, events))
        for server, server_groups in by_server.items():
            together = await asyncio.to_thread(self._apply_together, server, server_groups)
            if together is not None:
                for (org, entity, events), result in zip(server_groups, together, strict=True):
                    tally(org, entity, events, result, [])
                continue
            for org, entity, events in server_groups:  # entity by entity

                def give_up(refused: int, org: str = org) -> bool:
                    failed = failed_orgs[org] + refused
                    ok = batch_events[org] - failed
                    return self._would_trip(org, [False] * ok + [True] * failed)

                try:
                    result, refused = await asyncio.to_thread(
                        self._apply, server, org, entity, events, give_up
                    )
                except IncompatibleSchema as error:  # the table changed since step 2
                    stop = Stop(
                        org, entity, INCOMPATIBLE_SCHEMA, error.args[0], None, error.conflicts
                    )
                    await self._stop([stop], known)
                except _GiveUp as giving_up:
                    letters = [_refused(org, e, error, by_origin) for e, error in giving_up.refused]
                    await self._trip([org], messages, org_of, [*dead, *letters], known)
                failed_orgs[org] += len(refused)
                dead += [_refused(org, event, error, by_origin) for event, error in refused]
                tally(org, entity, events, result, refused)

        outcomes = self._outcomes(messages, org_of, dead)  # step 4
        tripped = [org for org, seen in outcomes.items() if self._would_trip(org, seen)]
        if tripped:
            await self._trip(tripped, messages, org_of, dead, known)
        if self._breaker is not None:
            for org, seen in outcomes.items():
                self._breaker.add(org, seen)

        if dead:  # step 5
            await self._send_dead_letters(dead)
            report.dead_lettered = len(dead)
            for letter in dead:
                METRICS.dead_lettered.labels(letter.org or "", letter.reason).inc()
        await asyncio.to_thread(self._record_counts, report, dead, known)  # step 6
        METRICS.events.inc(report.consumed)
        METRICS.batch_size.observe(report.consumed)
        return report

    # -- stops ---------------------------------------------------------------------------
    def _would_trip(self, org: str, outcomes: list[bool]) -> bool:
        return (
            self._breaker is not None
            and not self._breaker_paused(org)
            and self._breaker.would_trip(org, outcomes)
        )

    @staticmethod
    def _outcomes(
        messages: Sequence[RawMessage], org_of: Sequence[str | None], dead: Sequence[DeadLetter]
    ) -> dict[str, list[bool]]:
        """Per known org, its messages' outcomes in batch order (True: failed)."""
        failed = {(d.message.topic, d.message.partition, d.message.offset) for d in dead}
        outcomes: dict[str, list[bool]] = defaultdict(list)
        for message, org in zip(messages, org_of, strict=True):
            if org is not None:
                outcomes[org].append((message.topic, message.partition, message.offset) in failed)
        return outcomes

    async def _trip(
        self,
        orgs: Sequence[str],
        messages: Sequence[RawMessage],
        org_of: Sequence[str | None],
        dead: Sequence[DeadLetter],
        known: Mapping[str, str],
    ) -> NoReturn:
        await self._stop(self._trip_stops(orgs, messages, org_of, dead), known)

    def _trip_stops(
        self,
        orgs: Sequence[str],
        messages: Sequence[RawMessage],
        org_of: Sequence[str | None],
        dead: Sequence[DeadLetter],
    ) -> list[Stop]:
        if not orgs:
            return []
        assert self._breaker is not None
        outcomes = self._outcomes(messages, org_of, dead)
        stops = []
        for org in orgs:
            reasons = Counter(d.reason for d in dead if d.org == org)
            failed, events = self._breaker.failure_share(org)
            batch = outcomes.get(org, [])
            example = next((d.detail for d in dead if d.org == org), "")
            detail = (
                f"more than {self._breaker.ratio:.0%} of the org's latest events failed "
                f"(before this batch {failed} of {events}; in this batch at least "
                f"{sum(batch)} of {len(batch)}; reasons {dict(reasons.most_common())}); "
                f"e.g. {example[:500]}"
            )
            stops.append(Stop(org, None, ERROR_RATE_EXCEEDED, detail))
        return stops

    async def _stop(self, stops: Sequence[Stop], known: Mapping[str, str]) -> NoReturn:
        """Record the stops on each org's server, then raise :class:`ProjectionStopped`."""
        for stop in stops:
            log.error("%s; the batch is not acknowledged", stop.describe())
            await asyncio.to_thread(self._record_stop, known.get(stop.org, MAIN), stop)
        raise ProjectionStopped(stops)

    def _record_stop(self, server: str, stop: Stop) -> None:
        staging = self._connection(server)
        try:
            with staging.conn.transaction():
                record_stop(staging.conn, stop)
        except CONNECTION_LOST:
            self._staging.pop(server, None)
            raise
        staging.forget(stop.org)

    # -- staging -------------------------------------------------------------------------
    def _incompatibilities(
        self, groups: Mapping[tuple[str, str], list[ChangeEvent]], known: Mapping[str, str]
    ) -> dict[tuple[str, str], IncompatibleSchema]:
        """The groups whose columns changed type (one thread hop for the whole batch)."""
        found = {}
        for (org, entity), events in groups.items():
            server = known[org]
            staging = self._connection(server)
            try:
                conflict = staging.incompatibility(org, entity, events)
            except CONNECTION_LOST:
                self._staging.pop(server, None)
                raise
            if conflict is not None:
                found[(org, entity)] = conflict
        return found

    def _apply_together(
        self, server: str, groups: Sequence[tuple[str, str, list[ChangeEvent]]]
    ) -> list[ApplyResult] | None:
        """A batch's entities on one server in one transaction; None when staging raised
        anything but a lost connection: then each entity goes alone (:meth:`_apply`), where a
        refused value, a new capture epoch or a changed table is handled for that entity."""
        if len(groups) < 2:
            return None
        staging = self._connection(server)
        try:
            return staging.apply_together(groups)
        except CONNECTION_LOST:
            self._staging.pop(server, None)  # reconnect next time; the batch is re-delivered
            raise
        except Exception as error:  # redone entity by entity, which reports it
            log.debug("server %s: one transaction for the batch failed (%s)", server, error)
            return None

    def _apply(
        self,
        server: str,
        org: str,
        entity: str,
        events: list[ChangeEvent],
        give_up: Callable[[int], bool],
    ) -> tuple[ApplyResult, list[tuple[ChangeEvent, psycopg.Error]]]:
        staging = self._connection(server)
        try:
            return self._isolate(staging, org, entity, events, give_up, [])
        except CONNECTION_LOST:
            self._staging.pop(server, None)  # reconnect next time; the batch is re-delivered
            raise

    def _isolate(
        self,
        staging: Staging,
        org: str,
        entity: str,
        events: list[ChangeEvent],
        give_up: Callable[[int], bool],
        refused: list[tuple[ChangeEvent, psycopg.Error]],
    ) -> tuple[ApplyResult, list[tuple[ChangeEvent, psycopg.Error]]]:
        """Apply; where staging refuses a value, halve (in source order) down to the events
        it refuses. Halves are separate transactions: the same outcome as smaller batches."""
        try:
            return staging.apply(org, entity, events), refused
        except _REFUSED_VALUE as error:
            staging.forget(org)  # rolled back: added columns and temporary tables are gone
            if len(events) == 1:
                log.warning(
                    "org %s, entity %s: staging refused %s: %s",
                    org,
                    entity,
                    events[0].origin,
                    error,
                )
                refused.append((events[0], error))
                if give_up(len(refused)):
                    raise _GiveUp(refused) from None
                return ApplyResult(), refused
            if give_up(len(refused) + 1):
                raise _GiveUp([*refused, (events[0], error)]) from None
        ordered = sorted(events, key=lambda e: e.position)
        middle = len(ordered) // 2
        total = ApplyResult()
        for half in (ordered[:middle], ordered[middle:]):
            result, refused = self._isolate(staging, org, entity, half, give_up, refused)
            total.applied += result.applied
            total.duplicates += result.duplicates
            total.truncated_rows += result.truncated_rows
            total.watermark = max(total.watermark, result.watermark)
        return total, refused

    def _record_counts(
        self, report: BatchReport, dead: Sequence[DeadLetter], placement: Mapping[str, str]
    ) -> None:
        """Counts go to each org's server (those of no known org to the main one)."""
        rows: dict[tuple[str, str], list[int]] = {
            key: list(value) for key, value in report.per_entity.items()
        }
        for letter in dead:
            route = self._router.route(letter.message.topic)
            key = (route[0], route[1]) if route else ("", letter.message.topic)
            counts = rows.setdefault(key, [0, 0, 0, 0])
            counts[0] += 1
            counts[3] += 1
        by_server: dict[str, list[tuple[str, str, int, int, int, int]]] = defaultdict(list)
        for (org, entity), counts in rows.items():
            consumed, applied, duplicates, dead_lettered = counts
            by_server[placement.get(org, MAIN)].append(
                (org, entity, consumed, applied, duplicates, dead_lettered)
            )
        for server, server_rows in by_server.items():
            try:
                self._write_counts(self._connection(server), server_rows)
            except CONNECTION_LOST:
                self._staging.pop(server, None)
                raise

    @staticmethod
    def _write_counts(
        staging: Staging, rows: Sequence[tuple[str, str, int, int, int, int]]
    ) -> None:
        with staging.conn.transaction(), staging.conn.cursor() as cursor:
            cursor.executemany(
                """
                INSERT INTO fieldsync_control.projection_counts AS c
                    (org, entity, consumed, applied, duplicates, dead_lettered)
                VALUES (%s, %s, %s, %s, %s, %s)
                ON CONFLICT (org, entity) DO UPDATE SET
                    consumed = c.consumed + EXCLUDED.consumed,
                    applied = c.applied + EXCLUDED.applied,
                    duplicates = c.duplicates + EXCLUDED.duplicates,
                    dead_lettered = c.dead_lettered + EXCLUDED.dead_lettered
                """,
                rows,
            )


def _refused(
    org: str,
    event: ChangeEvent,
    error: psycopg.Error,
    messages: Mapping[tuple[str, int, int], RawMessage],
) -> DeadLetter:
    """The dead letter of an event staging refused: ``type_overflow`` or ``bad_value``."""
    origin = event.origin
    diag = error.diag
    detail = "; ".join(
        part for part in (diag.message_primary, diag.message_detail, diag.context) if part
    )
    return DeadLetter(
        org,
        messages[(origin.topic, origin.partition, origin.offset)],
        "type_overflow" if error.sqlstate in _OVERFLOW_STATES else "bad_value",
        f"{origin.topic} partition {origin.partition} offset {origin.offset}: "
        f"staging refused a value ({error.sqlstate}): {detail}",
    )
