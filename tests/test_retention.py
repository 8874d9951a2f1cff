"""Retention horizon: purge of old change-log entries and tombstones, on real staging."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from engine.projections.model import ChangeEvent, ColumnSpec, EntityShape, Origin, Position
from engine.projections.projector import COUNTS_DDL
from engine.projections.retention import (
    EntityPurge,
    horizon,
    needs_rebootstrap,
    purge,
    purge_all,
)
from engine.projections.staging import Staging

SHAPE = EntityShape((ColumnSpec("id", "integer", True), ColumnSpec("name", "text", False)))
ORIGIN = Origin("t", 0, 0)
# Source times are in the future: every change is recorded (recorded_at = the real time of the
# apply) before any cutoff a test sets, so changed_at alone decides what is old.
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
DAYS_30 = timedelta(days=30)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def event(
    op: str, key: int, pos: int, *, at: datetime, org: str = "acme", name: str | None = None
) -> ChangeEvent:
    image = {"id": key, "name": name if name is not None else f"{key}@{pos}"}
    return ChangeEvent(
        org=org,
        entity="thing",
        op=op,
        key=None if op == "t" else {"id": key},
        before=image if op == "d" else None,
        after=None if op in "dt" else image,
        position=Position(pos, pos),
        shape=SHAPE,
        source_ts_ms=int(at.timestamp() * 1000),
        origin=ORIGIN,
    )


@pytest.fixture()
def conn(fresh_database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(fresh_database) as connection:
        yield connection


def apply(conn: psycopg.Connection[Any], *events: ChangeEvent, org: str = "acme") -> None:
    Staging(conn).apply(org, "thing", list(events))


def query(conn: psycopg.Connection[Any], statement: str, *args: Any) -> list[tuple[Any, ...]]:
    result = conn.execute(statement, args or None).fetchall()
    conn.commit()
    return result


def log_versions(conn: psycopg.Connection[Any], org: str = "acme") -> list[int]:
    return [v for (v,) in query(conn, f"SELECT version FROM org_{org}.thing__log ORDER BY version")]


def table(conn: psycopg.Connection[Any]) -> dict[int, tuple[bool, int]]:
    """key → (deleted, version)."""
    rows = query(conn, "SELECT id, _fs_deleted, _fs_version FROM org_acme.thing")
    return {key: (deleted, version) for key, deleted, version in rows}


def entity_row(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return query(conn, "SELECT version, horizon_version, horizon_at FROM org_acme._fs_entities")[0]


def test_purge_removes_only_entries_older_than_the_cutoff(conn: psycopg.Connection[Any]) -> None:
    apply(conn, *(event("c", k, k, at=day(0)) for k in (1, 2, 3)))  # versions 1-3
    apply(conn, event("u", 1, 10, at=day(5)))  # 4
    apply(conn, event("u", 2, 20, at=day(20)))  # 5
    apply(conn, event("d", 3, 30, at=day(40)))  # 6
    assert horizon(conn, "acme", "thing") == 0
    conn.commit()

    report = purge(conn, "acme", now=day(40))  # no control table: 30 days, cutoff = day 10

    assert report.retention == DAYS_30 and report.cutoff == day(10)
    assert report.entities == (EntityPurge("thing", 0, 4, 4, 0, 6),)
    assert log_versions(conn) == [5, 6]
    kept = query(conn, "SELECT min(changed_at) FROM org_acme.thing__log")[0][0]
    assert kept >= report.cutoff
    assert horizon(conn, "acme", "thing") == 4
    assert needs_rebootstrap(conn, "acme", "thing", 3)
    assert not needs_rebootstrap(conn, "acme", "thing", 4)


def test_tombstones_at_or_below_the_horizon_go_live_rows_never(
    conn: psycopg.Connection[Any],
) -> None:
    apply(conn, *(event("c", k, k, at=day(0)) for k in (1, 2, 3, 4)))  # 1-4
    apply(conn, event("d", 2, 10, at=day(1)), event("u", 4, 11, at=day(1)))  # 5, 6
    apply(conn, event("c", 5, 12, at=day(1)))  # 7
    apply(conn, event("d", 5, 13, at=day(2)))  # 8
    apply(conn, event("c", 5, 14, at=day(3)))  # 9: re-inserted after its delete
    apply(conn, event("d", 3, 20, at=day(20)))  # 10

    first = purge(conn, "acme", retention=DAYS_30, now=day(40))  # cutoff day 10

    assert first.entities == (EntityPurge("thing", 0, 9, 9, 1, 10),)
    assert table(conn) == {
        1: (False, 1),
        3: (True, 10),  # a delete newer than the horizon stays for devices that missed it
        4: (False, 6),
        5: (False, 9),
    }
    assert log_versions(conn) == [10]

    second = purge(conn, "acme", retention=DAYS_30, now=day(60))
    assert second.entities == (EntityPurge("thing", 9, 10, 1, 1, 10),)
    assert table(conn) == {1: (False, 1), 4: (False, 6), 5: (False, 9)}
    assert log_versions(conn) == []


def test_truncated_rows_are_purged_like_deletes(conn: psycopg.Connection[Any]) -> None:
    apply(conn, *(event("c", k, k, at=day(0)) for k in (1, 2, 3)))  # 1-3
    apply(conn, event("t", 0, 10, at=day(1)), event("c", 4, 11, at=day(1)))  # 4-6 t, 7 c
    apply(conn, event("u", 4, 12, at=day(30)))  # 8

    report = purge(conn, "acme", retention=DAYS_30, now=day(35))  # cutoff day 5

    assert report.entities == (EntityPurge("thing", 0, 7, 7, 3, 8),)
    assert table(conn) == {4: (False, 8)}
    assert log_versions(conn) == [8]


def test_horizon_is_recorded_and_never_moves_back(conn: psycopg.Connection[Any]) -> None:
    apply(conn, event("c", 1, 1, at=day(0)), event("c", 2, 2, at=day(0)))
    apply(conn, event("d", 1, 3, at=day(10)))
    apply(conn, event("u", 2, 4, at=day(20)))

    moved = purge(conn, "acme", retention=DAYS_30, now=day(45))  # cutoff day 15
    assert moved.entities == (EntityPurge("thing", 0, 3, 3, 1, 4),)
    assert entity_row(conn) == (4, 3, day(45))

    for earlier in (
        purge(conn, "acme", retention=DAYS_30, now=day(31)),  # cutoff day 1
        purge(conn, "acme", retention=timedelta(days=365), now=day(50)),
        purge(conn, "acme", retention=DAYS_30, now=day(0)),
    ):
        assert earlier.entities == (EntityPurge("thing", 3, 3, 0, 0, 4),)
        assert not earlier.entities[0].moved
    assert entity_row(conn) == (4, 3, day(45))
    assert horizon(conn, "acme", "thing") == 3


def test_running_purge_again_changes_nothing(conn: psycopg.Connection[Any]) -> None:
    apply(conn, *(event("c", k, k, at=day(0)) for k in range(1, 21)))
    apply(conn, *(event("d", k, 100 + k, at=day(1)) for k in range(1, 11)))
    apply(conn, *(event("u", k, 200 + k, at=day(20)) for k in range(11, 16)))

    def snapshot() -> tuple[Any, ...]:
        return (
            query(conn, "SELECT * FROM org_acme.thing ORDER BY id"),
            query(conn, "SELECT * FROM org_acme.thing__log ORDER BY version"),
            query(conn, "SELECT * FROM org_acme._fs_entities"),
        )

    first = purge(conn, "acme", retention=DAYS_30, now=day(40))
    assert first.log_deleted == 30 and first.tombstones_deleted == 10
    state = snapshot()
    again = purge(conn, "acme", retention=DAYS_30, now=day(40))
    assert again.entities == (EntityPurge("thing", 30, 30, 0, 0, 35),)
    assert snapshot() == state


def test_retention_per_org_from_the_control_table(
    fresh_database: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute(COUNTS_DDL)
    conn.execute("INSERT INTO fieldsync_control.orgs (org, retention_days) VALUES ('acme', 7)")
    conn.execute("INSERT INTO fieldsync_control.orgs (org) VALUES ('beta'), ('empty')")
    conn.commit()
    for org in ("acme", "beta", "gamma"):
        apply(conn, event("c", 1, 1, at=day(0), org=org), org=org)
        apply(conn, event("c", 2, 2, at=day(10), org=org), org=org)

    reports = purge_all(fresh_database, now=day(20))

    assert [(r.org, r.retention, r.cutoff, r.error) for r in reports] == [
        ("acme", timedelta(days=7), day(13), None),
        ("beta", DAYS_30, day(-10), None),
        ("empty", DAYS_30, day(-10), None),  # registered, no staging yet
    ]
    assert reports[0].entities == (EntityPurge("thing", 0, 2, 2, 0, 2),)
    assert reports[1].entities == (EntityPurge("thing", 0, 0, 0, 0, 2),)
    assert reports[2].entities == ()
    assert (log_versions(conn, "acme"), log_versions(conn, "beta")) == ([], [1, 2])

    # an org without a row gets the default 30 days
    assert purge(conn, "gamma", now=day(20)).entities[0].new_horizon == 0
    gamma = purge(conn, "gamma", now=day(35))  # cutoff day 5
    assert (gamma.retention, gamma.entities[0].new_horizon) == (DAYS_30, 1)
    assert log_versions(conn, "gamma") == [2]
    # an explicit retention overrides the org's
    assert purge(conn, "beta", retention=timedelta(days=1), now=day(5)).entities[0].new_horizon == 1


def test_changes_recorded_after_the_cutoff_are_kept(conn: psycopg.Connection[Any]) -> None:
    """A change with an old source time (a late replay) counts its retention from recording."""
    long_ago = datetime.now(UTC) - timedelta(days=700)
    apply(conn, event("c", 1, 1, at=long_ago), event("c", 2, 2, at=long_ago))
    apply(conn, event("d", 1, 3, at=long_ago))

    now = datetime.now(UTC)
    assert purge(conn, "acme", now=now).entities == (EntityPurge("thing", 0, 0, 0, 0, 3),)
    assert log_versions(conn) == [1, 2, 3]
    later = purge(conn, "acme", now=now + timedelta(days=31))
    assert later.entities == (EntityPurge("thing", 0, 3, 3, 1, 3),)


def test_a_late_change_does_not_drag_the_horizon_past_recent_ones(
    conn: psycopg.Connection[Any],
) -> None:
    apply(conn, event("c", 1, 1, at=day(0)))  # 1
    apply(conn, event("c", 2, 20, at=day(20)))  # 2
    apply(conn, event("c", 3, 5, at=day(0)))  # 3: arrives late, old source time

    report = purge(conn, "acme", retention=DAYS_30, now=day(40))  # cutoff day 10

    assert report.entities == (EntityPurge("thing", 0, 1, 1, 0, 3),)
    assert log_versions(conn) == [2, 3]


def test_horizon_of_unknown_org_or_entity_is_zero(conn: psycopg.Connection[Any]) -> None:
    assert horizon(conn, "nobody", "thing") == 0
    apply(conn, event("c", 1, 1, at=day(0)))
    assert horizon(conn, "acme", "other") == 0
    conn.commit()
    assert purge(conn, "nobody").entities == ()


def test_purge_refuses_a_connection_inside_a_transaction(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")
    with pytest.raises(ValueError, match="inside a transaction"):
        purge(conn, "acme")
    conn.rollback()
    with pytest.raises(ValueError, match="timezone-aware"):
        purge(conn, "acme", now=datetime(2030, 1, 1))  # noqa: DTZ001


def _check_consistent(conn: psycopg.Connection[Any]) -> list[str]:
    """In one snapshot: the log above the horizon is contiguous up to the watermark, and no
    tombstone at or below the horizon or row above the watermark is left."""
    problems: list[str] = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        watermark, horizon_version = conn.execute(
            "SELECT version, horizon_version FROM org_acme._fs_entities"
        ).fetchone()  # type: ignore[misc]
        versions = [
            v for (v,) in conn.execute("SELECT version FROM org_acme.thing__log ORDER BY version")
        ]
        stale = conn.execute(
            "SELECT count(*) FROM org_acme.thing WHERE (_fs_deleted AND _fs_version <= %s)"
            " OR _fs_version > %s",
            (horizon_version, watermark),
        ).fetchone()
    if versions != list(range(horizon_version + 1, watermark + 1)):
        problems.append(f"horizon {horizon_version}, watermark {watermark}, log {versions}")
    if stale and stale[0]:
        problems.append(f"{stale[0]} rows below the horizon or above the watermark")
    return problems


def test_concurrent_apply_and_purge_stay_consistent(fresh_database: str) -> None:
    batches: list[list[ChangeEvent]] = []
    live: dict[int, str] = {}
    for i in range(120):
        batch = []
        for j in range(5):
            key, pos = (i * 7 + j) % 30, i * 10 + j
            op = "c" if key not in live else ("d" if (i + j) % 3 == 0 else "u")
            batch.append(event(op, key, pos, at=T0 + timedelta(minutes=i), name=f"v{pos}"))
            if op == "d":
                live.pop(key)
            else:
                live[key] = f"v{pos}"
        batches.append(batch)
    with psycopg.connect(fresh_database) as conn:
        apply(conn, event("c", 1000, 0, at=day(-1)))

    writing = threading.Event()
    writing.set()
    errors: list[BaseException] = []
    problems: list[str] = []
    reports: list[EntityPurge] = []

    def guarded(target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as error:
                errors.append(error)

        return run

    def writer() -> None:
        try:
            with psycopg.connect(fresh_database) as conn:
                staging = Staging(conn)
                for batch in batches:
                    staging.apply("acme", "thing", batch)
        finally:
            writing.clear()

    def purger() -> None:
        with psycopg.connect(fresh_database) as conn:
            minute = 0
            while writing.is_set():
                report = purge(
                    conn, "acme", retention=timedelta(0), now=T0 + timedelta(minutes=minute)
                )
                reports.extend(report.entities)
                minute += 1
                time.sleep(0.002)

    def reader() -> None:
        with psycopg.connect(fresh_database) as conn:
            while writing.is_set():
                problems.extend(_check_consistent(conn))

    threads = [threading.Thread(target=guarded(f)) for f in (writer, purger, reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and problems == []
    assert any(r.moved for r in reports), "the purge never overlapped the writes"
    with psycopg.connect(fresh_database) as conn:
        assert _check_consistent(conn) == []
        final = purge(conn, "acme", retention=timedelta(0), now=day(1))
        assert final.entities[0].new_horizon == final.entities[0].watermark
        assert _check_consistent(conn) == []
        rows = query(conn, "SELECT id, name, _fs_deleted FROM org_acme.thing")
    assert {key: name for key, name, deleted in rows if key != 1000} == live
    assert not any(deleted for *_, deleted in rows)


def test_purge_waits_for_a_writer_that_alters_the_table(fresh_database: str) -> None:
    """The projector alters the table (new column) before taking its row lock: the purge must
    not hold that row lock while waiting for the table, or the two deadlock."""
    with psycopg.connect(fresh_database) as conn:
        apply(conn, event("c", 1, 1, at=day(0)), event("c", 2, 2, at=day(0)))
        apply(conn, event("d", 1, 3, at=day(0)))
    outcome: list[Any] = []

    def purger() -> None:
        try:
            with psycopg.connect(fresh_database, application_name="test-purger") as conn:
                outcome.append(purge(conn, "acme", retention=DAYS_30, now=day(40)))
        except BaseException as error:
            outcome.append(error)

    with (
        psycopg.connect(fresh_database) as writer,
        psycopg.connect(fresh_database, autocommit=True) as monitor,
    ):
        writer.execute("ALTER TABLE org_acme.thing ADD COLUMN extra text")  # the writer's step 2
        thread = threading.Thread(target=purger)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            waiting = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'test-purger' AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the purge never waited for the writer")
        time.sleep(0.2)
        result = Staging(writer).apply("acme", "thing", [event("u", 2, 10, at=day(50))])
        writer.commit()
        thread.join(timeout=30)
    assert result.watermark == 4
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].entities == (EntityPurge("thing", 0, 3, 3, 1, 4),)


def test_a_redelivered_change_does_not_resurrect_a_purged_delete(
    conn: psycopg.Connection[Any],
) -> None:
    apply(conn, event("c", 1, 10, at=day(0)), event("c", 2, 11, at=day(0)))
    apply(conn, event("d", 1, 20, at=day(1)))
    purge(conn, "acme", retention=DAYS_30, now=day(40))
    assert 1 not in table(conn)

    apply(conn, event("c", 1, 10, at=day(0)))  # redelivery / replay of an old offset

    assert table(conn).get(1, (True, 0))[0] is True


def test_purge_all_reports_a_failing_org_and_goes_on(
    fresh_database: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute(COUNTS_DDL)
    conn.execute("INSERT INTO fieldsync_control.orgs (org) VALUES ('acme'), ('broken')")
    conn.execute("CREATE SCHEMA org_broken")  # staging of another shape: no horizon column
    conn.execute("CREATE TABLE org_broken._fs_entities (entity text, version bigint)")
    conn.execute("CREATE TABLE org_broken.thing (id int)")
    conn.execute("CREATE TABLE org_broken.thing__log (version bigint)")
    conn.execute("INSERT INTO org_broken._fs_entities VALUES ('thing', 1)")
    conn.commit()
    apply(conn, event("c", 1, 1, at=day(0)))

    acme, broken = purge_all(fresh_database, now=day(40))

    assert acme.error is None and acme.entities[0].new_horizon == 1
    assert broken.org == "broken" and broken.entities == ()
    assert broken.error is not None and "horizon_version" in broken.error
