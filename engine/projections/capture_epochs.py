"""Capture epochs in staging: a new one replaces the org's staging contents.

Capture starts a new *capture epoch* (the ``fieldsync.epoch`` header of every message) whenever
it re-snapshots the source from a fresh slot: the slot was lost, the source was restored from a
backup, the broker lost its log, or a snapshot did not complete. The new epoch's snapshot is the
source's whole state, and nothing of the old epoch is comparable with it: the old epoch missed
what changed between its last message and the new slot (deletes included), and after a restore
the source's WAL positions may even be *behind* positions staging already holds.

So staging tracks the epoch per org (copied on every ``_fs_entities`` row: ``capture_epoch`` and
the ``retired_epochs`` before it), and :func:`admit` — called by ``Staging.apply`` under the
entity's row lock — sorts a batch's events:

* events of the current epoch (or without an epoch: Debezium input) are applied as usual;
* events of a retired epoch arrive late (another partition was behind): they are skipped, counted
  as duplicates — the new epoch's snapshot already holds what they would have written;
* an event of an unknown epoch raises :class:`NewCaptureEpoch`; ``Staging.apply`` rolls back and
  calls :func:`reset`, which, locking every entity's row of the org in name order, removes every
  row of an older epoch from every entity (the new snapshot writes them again), clears the
  truncate and purge positions, records the new epoch, bumps the org's staging epoch (so every
  device's next sync answers ``must_bootstrap``: no delta ever spans two capture epochs) and
  wakes the long-polls; then the batch is applied again.

The first epoch an org's staging meets is adopted without a reset (an entity first seen adopts
the org's epoch; staging written before epochs were tracked adopts its newest row's).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from engine.projections.model import ChangeEvent

log = logging.getLogger("fieldsync.staging")

COLUMNS_DDL = """
ALTER TABLE {}._fs_entities
    ADD COLUMN IF NOT EXISTS capture_epoch text,
    ADD COLUMN IF NOT EXISTS retired_epochs text[] NOT NULL DEFAULT '{{}}'
"""


class NewCaptureEpoch(Exception):
    def __init__(self, epoch: str) -> None:
        super().__init__(epoch)
        self.epoch = epoch


def ensure_columns(conn: psycopg.Connection[Any], schema: str) -> None:
    """The epoch columns on ``_fs_entities`` (added to schemas created before them)."""
    present = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname IN ('capture_epoch', 'retired_epochs') AND NOT attisdropped",
        (f'"{schema}"._fs_entities',),
    ).fetchone()
    if present is None or present[0] < 2:
        conn.execute(sql.SQL(COLUMNS_DDL).format(sql.Identifier(schema)))


def admit(
    conn: psycopg.Connection[Any],
    schema: str,
    entity: str,
    events: Sequence[ChangeEvent],
    stored: tuple[str | None, Sequence[str] | None],
) -> tuple[list[ChangeEvent], int]:
    """(events to apply, events of retired epochs skipped); raises :class:`NewCaptureEpoch`.
    The caller holds the entity's ``_fs_entities`` row lock and read ``stored`` (its
    ``capture_epoch`` and ``retired_epochs``) with it."""
    epochs = [e.epoch for e in events if e.epoch is not None]
    if not epochs:
        return list(events), 0
    current: str | None = stored[0]
    retired: set[str] = set(stored[1] or ())
    if current is None:
        current, retired = _adopt(conn, schema, entity, epochs)
    new = [e for e in epochs if e != current and e not in retired]
    if new:
        raise NewCaptureEpoch(new[-1])  # within a partition, the later epoch is the newer
    admitted = [e for e in events if e.epoch is None or e.epoch == current]
    return admitted, len(events) - len(admitted)


def _adopt(
    conn: psycopg.Connection[Any], schema: str, entity: str, epochs: Sequence[str]
) -> tuple[str, set[str]]:
    """The epoch of an entity that has none yet: the org's, else its newest row's, else the
    batch's last (earlier ones in the batch are retired)."""
    schema_id = sql.Identifier(schema)
    org_row = conn.execute(
        sql.SQL(
            "SELECT capture_epoch, retired_epochs FROM {}._fs_entities"
            " WHERE capture_epoch IS NOT NULL LIMIT 1"
        ).format(schema_id)
    ).fetchone()
    if org_row is not None:
        current, retired = str(org_row[0]), set(org_row[1] or ())
    else:
        newest = conn.execute(
            sql.SQL(
                "SELECT _fs_epoch FROM {}.{} WHERE _fs_epoch IS NOT NULL"
                " ORDER BY _fs_version DESC LIMIT 1"
            ).format(schema_id, sql.Identifier(entity))
        ).fetchone()
        current = str(newest[0]) if newest else epochs[-1]
        retired = set() if newest else set(epochs) - {current}
    conn.execute(
        sql.SQL(
            "UPDATE {}._fs_entities SET capture_epoch = %s, retired_epochs = %s WHERE entity = %s"
        ).format(schema_id),
        (current, sorted(retired), entity),
    )
    return current, retired


def reset(conn: psycopg.Connection[Any], schema: str, org: str, epoch: str, *, live: bool) -> None:
    """Make ``epoch`` the org's capture epoch: rows of older epochs go, positions reset, devices
    re-bootstrap (``live``: this is the org's served staging, not a replay's shadow)."""
    from engine.projections.staging import CHANGES_CHANNEL

    schema_id = sql.Identifier(schema)
    with conn.transaction():
        rows = conn.execute(
            sql.SQL(
                "SELECT entity, version, capture_epoch, retired_epochs FROM {}._fs_entities"
                " ORDER BY entity FOR UPDATE"
            ).format(schema_id)
        ).fetchall()
        if any(epoch in (r[3] or ()) for r in rows) or all(r[2] == epoch for r in rows):
            return  # another worker got here first (or already moved past this epoch)
        retired = {e for r in rows for e in [r[2], *(r[3] or ())] if e and e != epoch}
        removed = 0
        for entity, *_ in rows:
            if conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{entity}"',)).fetchone() == (
                None,
            ):
                continue
            removed += conn.execute(
                sql.SQL("DELETE FROM {}.{} WHERE _fs_epoch IS NOT NULL AND _fs_epoch <> %s").format(
                    schema_id, sql.Identifier(entity)
                ),
                (epoch,),
            ).rowcount
        conn.execute(
            sql.SQL(
                "UPDATE {}._fs_entities SET capture_epoch = %s, retired_epochs = %s,"
                " truncated_commit_lsn = 0, truncated_lsn = 0, purged_commit_lsn = 0,"
                " purged_lsn = 0, updated_at = now()"
            ).format(schema_id),
            (epoch, sorted(retired)),
        )
        if live:
            _bump_staging_epoch(conn, org)
            for entity, version, *_ in rows:  # wakes long-polls: they find the new epoch
                conn.execute(
                    "SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, f"{org}.{entity}:{version}")
                )
    log.warning(
        "org %s: new capture epoch %s: %d rows of earlier epochs removed, devices re-bootstrap",
        org,
        epoch,
        removed,
    )


def _bump_staging_epoch(conn: psycopg.Connection[Any], org: str) -> None:
    """What ``gateway.store.bump_epoch`` does, when the gateway's column exists (without a
    gateway there are no devices to tell)."""
    has_column = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('fieldsync_control.orgs')"
        " AND attname = 'staging_epoch' AND NOT attisdropped"
    ).fetchone()
    if has_column:
        conn.execute(
            "UPDATE fieldsync_control.orgs SET staging_epoch = %s WHERE org = %s",
            (secrets.token_hex(8), org),
        )


__all__ = ["NewCaptureEpoch", "admit", "ensure_columns", "reset"]
