"""Retention horizon: how long change-log entries and delete markers (tombstones) stay in staging.

Every entity of an org keeps, besides its rows, a change log (``<entity>__log``) and the rows of
deleted keys (``_fs_deleted``, with the version of the delete). Devices sync incrementally: a
device holding watermark ``W`` asks for the changes with a version above ``W``, deletes
included. Keeping every delete forever would let the log and the tombstones grow without bound,
so they are kept for a *retention* (``fieldsync_control.orgs.retention_days``, 30 days when the
org has no row) and then purged. The *horizon* of an entity (``_fs_entities.horizon_version``)
records how far the purge went: every change-log entry and every tombstone with a version at or
below it may be gone.

The purge (:func:`purge`, per org; :func:`purge_all`, every registered org, for the scheduled
job), per entity and in one transaction:

  1. Lock the entity's table and log (``ROW EXCLUSIVE``: writers are not blocked by it, but a
     writer's ``ALTER TABLE`` is waited for *before* step 2, not while holding the row lock of
     step 2 — the projector takes its row lock after altering the table, so taking the two
     locks in the other order could deadlock).
  2. Lock the entity's row in ``_fs_entities`` (``FOR UPDATE``): the lock every writer of the
     entity takes, so the purge serialises with the projector and never sees a half-applied
     batch.
  3. New horizon ``H``: the end of the longest run of versions above the old horizon whose
     change-log entries are all older than the cutoff (``now - retention``). *Older* means both
     the source commit time (``changed_at``) and the time staging recorded the change
     (``recorded_at``) are before the cutoff: a change replayed late (projector outage,
     dead-letter replay) reaches devices only when it is recorded, so its retention counts from
     then. A run rather than "the highest old version": versions follow commit order, not
     source time, and one late change with an old source time must not drag the horizon past
     recent changes. If no version qualifies the horizon stays where it is; it never moves
     backwards.
  4. Delete the change-log entries with ``version <= H`` and the tombstones (rows with
     ``_fs_deleted``) with ``_fs_version <= H``; live rows are never deleted, whatever their
     version: they are the state a bootstrap reads.
  5. Record ``horizon_version = H`` and ``horizon_at`` (the purge's ``now``).

Why this is safe:

* A delete stays as a row (and a log entry) until the horizon passes its version, which happens
  only once it has been recorded for longer than the retention. A device that synced at time
  ``S`` received every version committed before ``S``; if it has been offline for less than the
  retention, ``S`` is after the cutoff, so every purged version was committed before ``S`` and
  is at or below its watermark: the device receives every delete it has not seen, purge or not.
* A device whose watermark is below the horizon may have missed a delete whose tombstone is
  gone: an incremental sync would keep a row the server deleted. It must re-bootstrap (read
  all live rows and the watermark in one snapshot). :func:`needs_rebootstrap` is that test.
  The gateway must read the horizon in the same snapshot as the changes it serves (or re-check
  it after reading them): a purge committing in between could otherwise remove changes between
  the device's watermark and the new horizon.
* A device whose watermark equals the horizon or is above it needs only versions above the
  horizon, which are all still there: the purge deletes a prefix of versions, under the
  writers' lock, so the log above the horizon stays contiguous up to the watermark.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from engine.projections.staging import org_schema

log = logging.getLogger("fieldsync.retention")

DEFAULT_RETENTION_DAYS = 30


@dataclass(frozen=True, slots=True)
class EntityPurge:
    """What the purge did to one entity."""

    entity: str
    old_horizon: int
    new_horizon: int
    log_deleted: int
    tombstones_deleted: int
    watermark: int

    @property
    def moved(self) -> bool:
        return self.new_horizon > self.old_horizon


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """One org's purge: its retention, the cutoff it implied, and what happened per entity.

    ``error`` is set (and ``entities`` holds what was done before it) when :func:`purge_all`
    caught a database error for this org; :func:`purge` raises instead.
    """

    org: str
    retention: timedelta
    cutoff: datetime
    entities: tuple[EntityPurge, ...]
    error: str | None = None

    @property
    def log_deleted(self) -> int:
        return sum(e.log_deleted for e in self.entities)

    @property
    def tombstones_deleted(self) -> int:
        return sum(e.tombstones_deleted for e in self.entities)


def _control_table_exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('fieldsync_control.orgs') IS NOT NULL").fetchone()
    return bool(row and row[0])


def org_retention(conn: psycopg.Connection[Any], org: str) -> timedelta:
    """The org's retention (``fieldsync_control.orgs.retention_days``; 30 days without a row)."""
    days = DEFAULT_RETENTION_DAYS
    if _control_table_exists(conn):
        row = conn.execute(
            "SELECT retention_days FROM fieldsync_control.orgs WHERE org = %s", (org,)
        ).fetchone()
        if row is not None and row[0] is not None:
            days = int(row[0])
    return timedelta(days=days)


def _entities_table(org: str) -> sql.Composed:
    return sql.SQL("{}._fs_entities").format(sql.Identifier(org_schema(org)))


def _has_entities_table(conn: psycopg.Connection[Any], org: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f'"{org_schema(org)}"._fs_entities',)
    ).fetchone()
    return bool(row and row[0])


def horizon(conn: psycopg.Connection[Any], org: str, entity: str) -> int:
    """The entity's retention horizon: a device watermark below it must re-bootstrap.

    0 (nothing purged) for an org or entity staging has never seen. Read it in the snapshot
    that serves the changes (see the module docstring).
    """
    if not _has_entities_table(conn, org):
        return 0
    row = conn.execute(
        sql.SQL("SELECT horizon_version FROM {} WHERE entity = %s").format(_entities_table(org)),
        (entity,),
    ).fetchone()
    return int(row[0]) if row is not None else 0


def needs_rebootstrap(conn: psycopg.Connection[Any], org: str, entity: str, watermark: int) -> bool:
    """Whether a device at ``watermark`` may have missed a purged delete of the entity."""
    return watermark < horizon(conn, org, entity)


def purge(
    conn: psycopg.Connection[Any],
    org: str,
    *,
    retention: timedelta | None = None,
    now: datetime | None = None,
) -> PurgeReport:
    """Move every entity's horizon of the org forward (see the module docstring).

    ``conn`` must not be inside a transaction: each entity is purged in its own, committed
    before the next. ``retention`` defaults to the org's; ``now`` (timezone-aware) to the
    current time.
    """
    retention, cutoff, now, entities = _plan(conn, org, retention, now)
    done: list[EntityPurge] = []
    _purge_entities(conn, org, entities, cutoff, now, done)
    return PurgeReport(org, retention, cutoff, tuple(done))


def _plan(
    conn: psycopg.Connection[Any], org: str, retention: timedelta | None, now: datetime | None
) -> tuple[timedelta, datetime, datetime, list[str]]:
    """The retention, cutoff, purge time and entities of one org's purge."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("purge: now must be timezone-aware")
    if retention is not None and retention < timedelta(0):
        raise ValueError(f"purge: negative retention {retention}")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("purge: the connection must not be inside a transaction")
    with conn.transaction():
        if retention is None:
            retention = org_retention(conn, org)
        entities: list[str] = []
        if _has_entities_table(conn, org):
            entities = [
                name
                for (name,) in conn.execute(
                    sql.SQL("SELECT entity FROM {} ORDER BY entity").format(_entities_table(org))
                )
            ]
    return retention, now - retention, now, entities


def _purge_entities(
    conn: psycopg.Connection[Any],
    org: str,
    entities: list[str],
    cutoff: datetime,
    now: datetime,
    done: list[EntityPurge],
) -> None:
    """One transaction per entity; ``done`` receives each committed result."""
    for entity in entities:
        with conn.transaction():
            result = _purge_entity(conn, org, entity, cutoff, now)
        if result is None:
            continue
        done.append(result)
        if result.moved:
            log.info(
                "org %s, entity %s: horizon %d -> %d, %d log entries and %d tombstones purged",
                org,
                entity,
                result.old_horizon,
                result.new_horizon,
                result.log_deleted,
                result.tombstones_deleted,
            )


def _purge_entity(
    conn: psycopg.Connection[Any], org: str, entity: str, cutoff: datetime, now: datetime
) -> EntityPurge | None:
    """Steps 1 to 5 of the module docstring, inside the caller's transaction."""
    schema = org_schema(org)
    present = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
        (f'"{schema}"."{entity}"', f'"{schema}"."{entity}__log"'),
    ).fetchone()
    if not (present and present[0]):
        return None  # registered but never created (or dropped by hand): nothing to purge
    ident = sql.Identifier(schema)
    table = sql.SQL("{}.{}").format(ident, sql.Identifier(entity))
    change_log = sql.SQL("{}.{}").format(ident, sql.Identifier(f"{entity}__log"))
    entities = _entities_table(org)
    # step 1: wait for a writer's ALTER TABLE before taking the row lock it will ask for next
    conn.execute(sql.SQL("LOCK TABLE {}, {} IN ROW EXCLUSIVE MODE").format(table, change_log))
    # step 2: the projector's lock
    row = conn.execute(
        sql.SQL("SELECT version, horizon_version FROM {} WHERE entity = %s FOR UPDATE").format(
            entities
        ),
        (entity,),
    ).fetchone()
    if row is None:
        return None
    watermark, old_horizon = int(row[0]), int(row[1])
    # step 3: the first version above the old horizon that is not old ends the purgeable run
    # (an index scan in version order that stops there: the cost is what gets purged)
    first_recent = conn.execute(
        sql.SQL(
            "SELECT version FROM {} WHERE version > %(old)s"
            " AND NOT (changed_at < %(cutoff)s AND recorded_at < %(cutoff)s)"
            " ORDER BY version LIMIT 1"
        ).format(change_log),
        {"old": old_horizon, "cutoff": cutoff},
    ).fetchone()
    if first_recent is not None:
        candidate = int(first_recent[0]) - 1
    else:
        newest = conn.execute(
            sql.SQL("SELECT max(version) FROM {} WHERE version > %s").format(change_log),
            (old_horizon,),
        ).fetchone()
        candidate = int(newest[0]) if newest and newest[0] is not None else old_horizon
    new_horizon = max(old_horizon, min(candidate, watermark))
    if new_horizon == old_horizon:
        return EntityPurge(entity, old_horizon, old_horizon, 0, 0, watermark)
    # step 4
    log_deleted = conn.execute(
        sql.SQL("DELETE FROM {} WHERE version <= %s").format(change_log), (new_horizon,)
    ).rowcount
    purged = conn.execute(
        sql.SQL(
            "WITH gone AS (DELETE FROM {} WHERE _fs_deleted AND _fs_version <= %s"
            " RETURNING _fs_commit_lsn, _fs_lsn)"
            " SELECT (SELECT count(*) FROM gone),"
            " (SELECT ARRAY[_fs_commit_lsn, _fs_lsn] FROM gone"
            "  ORDER BY _fs_commit_lsn DESC, _fs_lsn DESC LIMIT 1)"
        ).format(table),
        (new_horizon,),
    ).fetchone()
    assert purged is not None
    tombstones_deleted, newest_purged = int(purged[0]), purged[1] or [0, 0]
    # step 5: the horizon, and the newest purged delete's position, below which staging
    # refuses changes of keys it no longer holds (they would resurrect purged deletes)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET horizon_version = %s, horizon_at = %s,"
            " (purged_commit_lsn, purged_lsn) = (SELECT * FROM (VALUES (%s::bigint, %s::bigint)) v"
            "  WHERE (v.column1, v.column2) > (purged_commit_lsn, purged_lsn)"
            "  UNION ALL SELECT purged_commit_lsn, purged_lsn LIMIT 1)"
            " WHERE entity = %s"
        ).format(entities),
        (new_horizon, now, newest_purged[0], newest_purged[1], entity),
    )
    return EntityPurge(entity, old_horizon, new_horizon, log_deleted, tombstones_deleted, watermark)


def purge_all(dsn: str, *, now: datetime | None = None) -> list[PurgeReport]:
    """Purge every org of ``fieldsync_control.orgs``, each with its own retention.

    For the scheduled job: an org that fails (its report carries the ``error``) does not stop
    the others.
    """
    reports: list[PurgeReport] = []
    with psycopg.connect(dsn, application_name="fieldsync-retention") as conn:
        with conn.transaction():
            orgs: list[str] = []
            if _control_table_exists(conn):
                orgs = [
                    name
                    for (name,) in conn.execute(
                        "SELECT org FROM fieldsync_control.orgs ORDER BY org"
                    )
                ]
        for org in orgs:
            done: list[EntityPurge] = []
            retention, cutoff = timedelta(0), now or datetime.now(UTC)
            try:
                retention, cutoff, at, entities = _plan(conn, org, None, now)
                _purge_entities(conn, org, entities, cutoff, at, done)
            except psycopg.Error as error:
                log.exception("org %s: retention purge failed", org)
                if conn.closed:
                    raise
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                reports.append(PurgeReport(org, retention, cutoff, tuple(done), error=str(error)))
            else:
                reports.append(PurgeReport(org, retention, cutoff, tuple(done)))
    return reports
