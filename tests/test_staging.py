"""Staging apply: idempotent by source position, versions in commit order, change log images."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from engine.projections.model import (
    UNAVAILABLE,
    ChangeEvent,
    ColumnSpec,
    EntityShape,
    Origin,
    Position,
)
from engine.projections.staging import IncompatibleSchema, Staging

SHAPE = EntityShape(
    (
        ColumnSpec("id", "integer", True),
        ColumnSpec("name", "text", False),
        ColumnSpec("amount", "numeric(10,2)", False),
    )
)
ORIGIN = Origin("t", 0, 0)


def event(op: str, key: int, pos: int, shape: EntityShape = SHAPE, **row: Any) -> ChangeEvent:
    image = {"id": key, **row}
    return ChangeEvent(
        org="acme",
        entity="thing",
        op=op,
        key=None if op == "t" else {"id": key},
        before=image if op == "d" else None,
        after=None if op in "dt" else image,
        position=Position(pos, pos),
        shape=shape,
        source_ts_ms=1_700_000_000_000 + pos,
        origin=ORIGIN,
    )


@pytest.fixture()
def staging(fresh_database: str) -> Iterator[Staging]:
    with psycopg.connect(fresh_database) as conn:
        yield Staging(conn)


def rows(staging: Staging) -> dict[int, tuple[Any, ...]]:
    result = staging.conn.execute(
        "SELECT id, name, amount, _fs_deleted, _fs_version FROM org_acme.thing"
    ).fetchall()
    staging.conn.commit()
    return {r[0]: r[1:] for r in result}


def log(staging: Staging) -> list[tuple[Any, ...]]:
    result = staging.conn.execute(
        "SELECT version, op, key, before, after FROM org_acme.thing__log ORDER BY version"
    ).fetchall()
    staging.conn.commit()
    return result


def test_changes_apply_with_versions_and_log_images(staging: Staging) -> None:
    first = staging.apply(
        "acme",
        "thing",
        [event("c", 1, 10, name="a", amount=Decimal("1.50")), event("c", 2, 11, name="b")],
    )
    assert (first.applied, first.duplicates, first.watermark) == (2, 0, 2)
    staging.apply(
        "acme",
        "thing",
        [event("u", 1, 20, name="a2", amount=Decimal("2.00")), event("d", 2, 21, name="b")],
    )
    assert rows(staging) == {1: ("a2", Decimal("2.00"), False, 3), 2: ("b", None, True, 4)}
    entries = log(staging)
    assert [(v, op) for v, op, *_ in entries] == [(1, "c"), (2, "c"), (3, "u"), (4, "d")]
    assert entries[2][3] == {"id": 1, "name": "a", "amount": 1.50} and entries[2][4]["name"] == "a2"
    # delete: before image from staging
    assert entries[3][3]["name"] == "b" and entries[3][4] is None


def test_replaying_a_batch_changes_nothing(staging: Staging) -> None:
    batch = [event("c", k, k, name=f"n{k}") for k in range(1, 51)] + [event("u", 7, 100, name="x")]
    staging.apply("acme", "thing", batch)
    before, entries = rows(staging), log(staging)
    again = staging.apply("acme", "thing", batch)
    assert (again.applied, again.duplicates) == (0, len(batch))
    assert rows(staging) == before and log(staging) == entries


def test_newest_position_wins_whatever_the_arrival_order(staging: Staging) -> None:
    staging.apply("acme", "thing", [event("u", 1, 50, name="new")])
    stale = staging.apply(
        "acme", "thing", [event("c", 1, 10, name="old"), event("r", 1, 40, name="snap")]
    )
    assert stale.applied == 0 and stale.duplicates == 2
    assert rows(staging)[1][0] == "new"
    staging.apply("acme", "thing", [event("d", 1, 60)])
    # incremental read older than the delete
    staging.apply("acme", "thing", [event("r", 1, 55, name="resurrected?")])
    assert rows(staging)[1][2] is True


def test_same_key_many_times_in_one_batch(staging: Staging) -> None:
    rng = random.Random(4)
    batch = [event("u", 1, p, name=f"v{p}") for p in rng.sample(range(1, 200), 60)]
    result = staging.apply("acme", "thing", batch + batch[:10])
    assert result.applied == 60 and result.duplicates == 10
    assert rows(staging)[1][0] == f"v{max(e.position.lsn for e in batch)}"
    assert len(log(staging)) == 1  # one net change per key and batch


def test_truncate_removes_older_rows_and_skips_older_events(staging: Staging) -> None:
    staging.apply("acme", "thing", [event("c", k, k, name="x") for k in (1, 2, 3)])
    result = staging.apply(
        "acme",
        "thing",
        [event("t", 0, 50), event("c", 4, 40, name="too old"), event("c", 5, 60, name="after")],
    )
    assert result.truncated_rows == 3
    state = rows(staging)
    assert {k for k, v in state.items() if not v[2]} == {5}
    assert 4 not in state
    assert [op for _, op, *_ in log(staging)][-4:] == ["t", "t", "t", "c"]


def test_unavailable_toast_value_keeps_the_stored_one(staging: Staging) -> None:
    staging.apply("acme", "thing", [event("c", 1, 1, name="long text", amount=Decimal(1))])
    staging.apply("acme", "thing", [event("u", 1, 2, name=UNAVAILABLE, amount=Decimal(2))])
    assert rows(staging)[1][:2] == ("long text", Decimal("2.00"))


def test_unavailable_toast_value_takes_a_value_set_earlier_in_the_same_batch(
    staging: Staging,
) -> None:
    staging.apply("acme", "thing", [event("c", 1, 1, name="old text", amount=Decimal(1))])
    staging.apply(
        "acme",
        "thing",
        [
            event("u", 1, 2, name="new text", amount=Decimal(2)),
            event("u", 1, 3, name=UNAVAILABLE, amount=Decimal(3)),  # TOAST unchanged since 2
        ],
    )
    assert rows(staging)[1][:2] == ("new text", Decimal("3.00"))


def test_new_column_is_added_and_a_type_change_stops_the_entity(staging: Staging) -> None:
    staging.apply("acme", "thing", [event("c", 1, 1, name="a")])
    wider = EntityShape((*SHAPE.columns, ColumnSpec("tags", "text[]", False)))
    staging.apply("acme", "thing", [event("c", 2, 2, shape=wider, name="b", tags=["x", None])])
    assert staging.conn.execute("SELECT tags FROM org_acme.thing WHERE id = 2").fetchone() == (
        ["x", None],
    )
    staging.conn.commit()
    changed = EntityShape((ColumnSpec("id", "integer", True), ColumnSpec("name", "integer", False)))
    with pytest.raises(
        IncompatibleSchema,
        match="org acme, entity thing: column name changed type from text to integer",
    ):
        staging.apply("acme", "thing", [event("u", 1, 3, shape=changed, name=5)])
    assert rows(staging)[1][0] == "a"


def test_concurrent_writers_commit_versions_in_order(fresh_database: str) -> None:
    """Readers never see a version appear at or below a watermark they already read."""
    with psycopg.connect(fresh_database) as conn:
        Staging(conn).apply("acme", "thing", [event("c", 0, 0, name="seed")])
    stop = threading.Event()
    violations: list[str] = []

    def writer(offset: int) -> None:
        with psycopg.connect(fresh_database) as conn:
            staging = Staging(conn)
            for i in range(60):
                pos = 1 + i * 2 + offset
                staging.apply(
                    "acme",
                    "thing",
                    [
                        event("u", k, pos, name=f"{pos}")
                        for k in range(1 + offset * 100, 40 + offset * 100)
                    ],
                )

    def reader() -> None:
        seen: dict[int, int] = {}
        last_watermark = 0
        with psycopg.connect(fresh_database) as conn:
            while not stop.is_set():
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    (watermark,) = conn.execute(
                        "SELECT version FROM org_acme._fs_entities WHERE entity = 'thing'"
                    ).fetchone()
                    versions = conn.execute(
                        "SELECT version FROM org_acme.thing__log WHERE version <= %s", (watermark,)
                    ).fetchall()
                for (version,) in versions:
                    if version <= last_watermark and version not in seen:
                        violations.append(
                            f"version {version} appeared below watermark {last_watermark}"
                        )
                    seen[version] = 1
                last_watermark = watermark

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert violations == []
    with psycopg.connect(fresh_database) as conn:
        versions = [
            v for (v,) in conn.execute("SELECT version FROM org_acme.thing__log ORDER BY version")
        ]
        (watermark,) = conn.execute("SELECT version FROM org_acme._fs_entities").fetchone()
    assert versions == list(range(1, len(versions) + 1)) and watermark == versions[-1]
