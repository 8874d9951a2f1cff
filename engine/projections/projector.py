"""The projector's batch step, independent of the stream framework that feeds it.

For a batch of raw messages:
  1. Decode each (any accepted input format); a message that cannot be decoded, or whose org
     is not known, becomes a dead letter with its reason.
  2. Group the changes by org and entity and apply each group to staging in its own
     transaction (idempotent by source position). A group staging refuses (a column that
     changed type) becomes dead letters too: nothing is lost, ``fieldsync dlq replay`` brings
     it back after a fix.
  3. Send the dead letters and wait for the broker's acknowledgement.
  4. Add the batch to the reconciliation counts: consumed = applied + duplicates + dead letters.
Only then does the caller acknowledge the batch (the consumer commits offsets later still):
a crash anywhere re-delivers the batch, and step 2 skips what was already applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from engine.projections.decoding import EventDecoder, TopicRouter
from engine.projections.exceptions import DecodeError, ProjectionError
from engine.projections.metrics import METRICS
from engine.projections.model import ChangeEvent, Tombstone
from engine.projections.staging import Staging
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


COUNTS_DDL = """
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


class Projector:
    """Decodes, applies and dead-letters batches (see the module docstring)."""

    def __init__(
        self,
        servers: StagingServers,
        decoder: EventDecoder,
        router: TopicRouter,
        placement: Callable[[], Mapping[str, str]],
        send_dead_letters: SendDeadLetters,
    ) -> None:
        """``placement``: the known orgs and the staging server of each."""
        self._servers = servers
        self._decoder = decoder
        self._router = router
        self._placement = placement
        self._send_dead_letters = send_dead_letters
        self._staging: dict[str, Staging] = {}

    def _connection(self, server: str) -> Staging:
        staging = self._staging.get(server)
        if staging is None or staging.conn.closed:
            conn = psycopg.connect(
                self._servers.dsn(server), application_name="fieldsync-projector"
            )
            conn.execute(COUNTS_DDL)
            conn.commit()
            staging = self._staging[server] = Staging(conn)
        return staging

    async def handle(self, messages: Sequence[RawMessage]) -> BatchReport:
        report = BatchReport(consumed=len(messages))
        groups: dict[tuple[str, str], list[ChangeEvent]] = defaultdict(list)
        dead: list[DeadLetter] = []
        known = self._placement()
        for message in messages:  # step 1
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
                route = self._router.route(message.topic)
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
                route = self._router.route(message.topic)
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
        by_origin = {(m.topic, m.partition, m.offset): m for m in messages}
        for (org, entity), events in groups.items():  # step 2
            try:
                result = await asyncio.to_thread(self._apply, known[org], org, entity, events)
            except ProjectionError as error:
                log.error(
                    "org %s, entity %s: %s; dead-lettering %d events",
                    org,
                    entity,
                    error,
                    len(events),
                )
                dead.extend(
                    DeadLetter(
                        org,
                        by_origin[(e.origin.topic, e.origin.partition, e.origin.offset)],
                        error.code,
                        str(error),
                    )
                    for e in events
                )
                continue
            counts = report.per_entity[(org, entity)]
            counts[0] += len(events)
            counts[1] += result.applied
            counts[2] += result.duplicates
            report.applied += result.applied
            report.duplicates += result.duplicates
            METRICS.watermark.labels(org, entity).set(result.watermark)
        if dead:  # step 3
            await self._send_dead_letters(dead)
            report.dead_lettered = len(dead)
            for letter in dead:
                METRICS.dead_lettered.labels(letter.org or "", letter.reason).inc()
        await asyncio.to_thread(self._record_counts, report, dead, known)  # step 4
        METRICS.events.inc(report.consumed)
        METRICS.batch_size.observe(report.consumed)
        return report

    def _apply(self, server: str, org: str, entity: str, events: list[ChangeEvent]) -> Any:
        staging = self._connection(server)
        try:
            return staging.apply(org, entity, events)
        except psycopg.OperationalError:
            self._staging.pop(server, None)  # reconnect next time; the batch is re-delivered
            raise

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
            except psycopg.OperationalError:
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
