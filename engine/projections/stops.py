"""Stopped orgs and entities: what the projector refuses to go on with until an operator acts.

Two causes stop consumption instead of dead-lettering:

* ``error_rate_exceeded`` (the whole org): more than ``FIELDSYNC_PROJECTOR_BREAKER_RATIO`` of
  the org's latest ``FIELDSYNC_PROJECTOR_BREAKER_WINDOW`` events failed (see :class:`Breaker`).
  Something is wrong upstream (a producer writing garbage, a schema never published); sending
  everything to the dead-letter topic would only move the problem.
* ``incompatible_schema`` (one entity): a column changed type; staging needs a replay or an
  ``ALTER TABLE`` before that entity can go on. Resuming it accepts both types of each
  conflicting column from then on (``fieldsync_control.accepted_types``): values of either
  are cast to the column's type, so changes written before the type change, redelivered after
  the fix, apply too (one that does not cast is dead-lettered as ``bad_value``).

A stop is a row of ``fieldsync_control.stopped`` on the org's staging server. The batch that
caused it is not acknowledged, and every projector worker drops the org's (or entity's) topics
from its subscription (``engine/projections/app.py``), so their committed offsets stay where
they were: nothing is skipped, nothing is dead-lettered. ``fieldsync org resume <org>
[--entity E]`` deletes the row; the workers subscribe again and continue from those offsets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from engine.control import run_control_ddl
from engine.projections.exceptions import ProjectionError
from engine.runtime.placement import StagingServers

ERROR_RATE_EXCEEDED = "error_rate_exceeded"
INCOMPATIBLE_SCHEMA = "incompatible_schema"

STOPS_DDL = """
CREATE SCHEMA IF NOT EXISTS fieldsync_control;
CREATE TABLE IF NOT EXISTS fieldsync_control.stopped (
    org text NOT NULL,
    entity text,
    code text NOT NULL,
    detail text NOT NULL,
    conflicts jsonb NOT NULL DEFAULT '[]',
    since timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS stopped_org_entity
    ON fieldsync_control.stopped (org, (coalesce(entity, '')));
CREATE TABLE IF NOT EXISTS fieldsync_control.accepted_types (
    org text NOT NULL,
    entity text NOT NULL,
    column_name text NOT NULL,
    pg_type text NOT NULL,
    PRIMARY KEY (org, entity, column_name, pg_type)
);
CREATE TABLE IF NOT EXISTS fieldsync_control.breaker_pauses (
    org text PRIMARY KEY,
    until timestamptz NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Stop:
    """``entity`` None: the whole org is stopped. ``conflicts``: (column, staging type,
    incoming type) of an ``incompatible_schema`` stop."""

    org: str
    entity: str | None
    code: str
    detail: str
    since: datetime | None = None
    conflicts: tuple[tuple[str, str, str], ...] = ()

    def covers(self, org: str, entity: str) -> bool:
        return self.org == org and (self.entity is None or self.entity == entity)

    def describe(self) -> str:
        what = f"org {self.org}" if self.entity is None else f"org {self.org}, entity {self.entity}"
        return f"{what}: stopped ({self.code}): {self.detail}"

    def as_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "entity": self.entity,
            "code": self.code,
            "detail": self.detail,
            "since": self.since.isoformat() if self.since else None,
            "conflicts": [
                {"column": c, "staging_type": a, "incoming_type": b} for c, a, b in self.conflicts
            ],
        }


class ProjectionStopped(ProjectionError):
    """Raised by :meth:`Projector.handle` after recording stops: the batch must not be
    acknowledged; the worker re-subscribes without the stopped topics."""

    code = "projection_stopped"

    def __init__(self, stops: Iterable[Stop]) -> None:
        self.stops = tuple(stops)
        super().__init__("; ".join(s.describe() for s in self.stops), retryable=False)


def record_stop(conn: psycopg.Connection[Any], stop: Stop) -> None:
    """Insert or refresh the stop (the first ``since`` stays)."""
    conn.execute(
        """
        INSERT INTO fieldsync_control.stopped AS s (org, entity, code, detail, conflicts)
        VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (org, (coalesce(entity, ''))) DO UPDATE
            SET code = EXCLUDED.code, detail = EXCLUDED.detail, conflicts = EXCLUDED.conflicts
        """,
        (stop.org, stop.entity, stop.code, stop.detail[:4000], Jsonb(stop.conflicts)),
    )


def read_stops(conn: psycopg.Connection[Any], org: str | None = None) -> list[Stop]:
    """The stops on this server (of ``org`` only, if given); none where the table is missing."""
    exists = conn.execute("SELECT to_regclass('fieldsync_control.stopped')").fetchone()
    if not exists or exists[0] is None:
        return []
    rows = conn.execute(
        "SELECT org, entity, code, detail, since, conflicts FROM fieldsync_control.stopped"
        " WHERE %s::text IS NULL OR org = %s ORDER BY org, entity NULLS FIRST",
        (org, org),
    ).fetchall()
    return [_stop(row) for row in rows]


def _stop(row: Sequence[Any]) -> Stop:
    org, entity, code, detail, since, conflicts = row
    return Stop(org, entity, code, detail, since, tuple(tuple(c) for c in conflicts or ()))


def resume(conn: psycopg.Connection[Any], org: str, entity: str | None = None) -> list[Stop]:
    """Delete the org's stops (all of them, or the one of ``entity``) and accept the types of
    their conflicting columns; returns the stops deleted. ``entity`` does not clear a stop of
    the whole org."""
    run_control_ddl(conn, STOPS_DDL)
    with conn.transaction():
        stops = [
            _stop(row)
            for row in conn.execute(
                "DELETE FROM fieldsync_control.stopped"
                " WHERE org = %s AND (%s::text IS NULL OR entity = %s)"
                " RETURNING org, entity, code, detail, since, conflicts",
                (org, entity, entity),
            ).fetchall()
        ]
        accepted = [
            (stop.org, stop.entity, column, pg_type)
            for stop in stops
            for column, *types in stop.conflicts
            for pg_type in types
        ]
        if accepted:
            conn.cursor().executemany(
                "INSERT INTO fieldsync_control.accepted_types (org, entity, column_name, pg_type)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                accepted,
            )
    return stops


def pause_breaker(conn: psycopg.Connection[Any], org: str, seconds: float) -> None:
    """Let the org's failures go to the dead-letter topic for ``seconds`` instead of stopping
    it (for messages that no fix will make readable)."""
    run_control_ddl(conn, STOPS_DDL)
    conn.execute(
        """
        INSERT INTO fieldsync_control.breaker_pauses (org, until)
        VALUES (%s, now() + make_interval(secs => %s))
        ON CONFLICT (org) DO UPDATE SET until = EXCLUDED.until
        """,
        (org, seconds),
    )


def read_breaker_pauses(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """Org → monotonic-clock deadline of its breaker pause (pauses still running only)."""
    rows = conn.execute(
        "SELECT org, extract(epoch FROM until - now())::float8"
        " FROM fieldsync_control.breaker_pauses WHERE until > now()"
    ).fetchall()
    now = time.monotonic()
    return {org: now + float(left) for org, left in rows}


class Breaker:
    """The error-rate breaker: per org, the outcome of its latest ``window`` events.

    The org trips when the window holds at least ``min_events`` outcomes and more than
    ``ratio`` of them failed (``ratio`` 1 never trips). Outcomes are added once the batch's
    fate is known; :meth:`would_trip` asks without adding. A worker keeps the windows in
    memory: a restart starts them empty.
    """

    def __init__(self, ratio: float, window: int, min_events: int) -> None:
        self.ratio = ratio
        self.window = window
        self.min_events = min(min_events, window)
        self._outcomes: dict[str, deque[bool]] = {}  # True: failed
        self._failed: dict[str, int] = {}

    def _counts(self, org: str, outcomes: list[bool]) -> tuple[int, int]:
        """(events, failures) in the org's window after adding ``outcomes``."""
        old = self._outcomes.get(org) or deque()
        new = outcomes[-self.window :]
        keep = max(0, min(len(old), self.window - len(new)))
        old_failed = self._failed.get(org, 0)
        if keep < len(old):  # the oldest outcomes leave the window
            dropped = list(old)[: len(old) - keep]
            old_failed -= sum(dropped)
        return keep + len(new), old_failed + sum(new)

    def would_trip(self, org: str, outcomes: list[bool]) -> bool:
        events, failed = self._counts(org, outcomes)
        return events >= self.min_events and failed > self.ratio * events

    def add(self, org: str, outcomes: list[bool]) -> None:
        window = self._outcomes.setdefault(org, deque(maxlen=self.window))
        failed = self._failed.get(org, 0)
        for outcome in outcomes:
            if len(window) == self.window:
                failed -= window[0]
            window.append(outcome)
            failed += outcome
        self._failed[org] = failed

    def failure_share(self, org: str) -> tuple[int, int]:
        """(failures, events) in the org's window."""
        return self._failed.get(org, 0), len(self._outcomes.get(org) or ())

    def reset(self, orgs: Iterable[str] | None = None) -> None:
        for org in list(self._outcomes) if orgs is None else orgs:
            self._outcomes.pop(org, None)
            self._failed.pop(org, None)


def resume_org(
    servers: StagingServers, org: str, entity: str | None = None, dead_letter_for_s: float = 0
) -> list[Stop]:
    """``fieldsync org resume``: clear the org's stops on every server (an org's rows are on
    its own), optionally pausing its breaker; returns the stops cleared."""
    cleared: list[Stop] = []
    for dsn in servers.servers.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            cleared += resume(conn, org, entity)
    if dead_letter_for_s > 0:
        with psycopg.connect(servers.dsn_for(org), autocommit=True) as conn:
            pause_breaker(conn, org, dead_letter_for_s)
    return cleared


def stopped_route(stops: Iterable[Stop], route: tuple[str, str] | None) -> Stop | None:
    if route is None:
        return None
    return next((s for s in stops if s.covers(*route)), None)


__all__ = [
    "ERROR_RATE_EXCEEDED",
    "INCOMPATIBLE_SCHEMA",
    "STOPS_DDL",
    "Breaker",
    "ProjectionStopped",
    "Stop",
    "pause_breaker",
    "read_stops",
    "record_stop",
    "resume",
    "resume_org",
]
