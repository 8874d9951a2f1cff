"""Snapshots on a schedule: every ``FIELDSYNC_SNAPSHOT_INTERVAL_S``, each staging entity whose
watermark or epoch moved gets a new snapshot, and old ones are pruned to
``FIELDSYNC_SNAPSHOT_KEEP`` per entity (``fieldsync snapshot schedule``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import psycopg

from engine.snapshots.build import BuildResult, build_snapshot, staging_entities
from engine.snapshots.exceptions import SnapshotError
from engine.snapshots.store import SnapshotStore

log = logging.getLogger("fieldsync.snapshots")


def snapshot_round(
    dsn: str,
    store: SnapshotStore,
    *,
    group: str,
    keep: int,
    bootstrap_servers: str | None = None,
    org: str | None = None,
) -> list[BuildResult]:
    """One pass over every staging entity (of ``org``); a failing entity is logged and skipped."""
    results = []
    for name, entity in staging_entities(dsn, org):
        try:
            results.append(
                build_snapshot(
                    dsn,
                    name,
                    entity,
                    store,
                    group=group,
                    bootstrap_servers=bootstrap_servers,
                    keep=keep,
                )
            )
        except (SnapshotError, psycopg.Error, OSError) as error:
            log.warning("snapshot of %s.%s failed: %s", name, entity, error)
    return results


def run_schedule(
    dsns: Sequence[str],
    store: SnapshotStore,
    interval_s: float,
    *,
    group: str,
    keep: int,
    bootstrap_servers: str | None = None,
    org: str | None = None,
    stop: threading.Event | None = None,
    rounds: int | None = None,
) -> int:
    """Run rounds over every staging server (``dsns``) every ``interval_s`` until ``stop`` is
    set (or ``rounds`` ran); returns the number of snapshots built."""
    stop = stop or threading.Event()
    built = done = 0
    while not stop.is_set() and (rounds is None or done < rounds):
        results = []
        for dsn in dsns:
            try:
                results += snapshot_round(
                    dsn, store, group=group, keep=keep, bootstrap_servers=bootstrap_servers, org=org
                )
            except psycopg.OperationalError as error:  # server down: try again next round
                log.warning("snapshot round skipped on a staging server: %s", error)
        fresh = [r for r in results if r.built]
        built += len(fresh)
        log.info("snapshot round: %d built, %d unchanged", len(fresh), len(results) - len(fresh))
        done += 1
        if rounds is None or done < rounds:
            stop.wait(interval_s)
    return built


__all__ = ["run_schedule", "snapshot_round"]
