"""Staging is idempotent by source position.

* Out of order and stale: 1,000 generated histories (seeded) arrive shuffled, with older
  positions after newer ones, redelivered in part and cut into batches at random; staging keeps
  the newest change of every key and the change log stays sound.
* A full replay is a no-op: a second consumer group reads every change topic from the start
  into the same staging; no row is rewritten (``xmin`` and ``_fs_version`` of every row, the
  watermarks and the change log are unchanged), every message counts as a duplicate.
"""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from engine.projections.app import register_org
from engine.projections.lag import projector_lag
from engine.projections.model import ChangeEvent, ColumnSpec, EntityShape, Origin, Position
from engine.projections.staging import Staging
from engine.streams.spec import CaptureSpec
from tests.bad_input_helpers import counts, read_topic
from tests.capture_helpers import capture_once, new_org
from tests.projector_helpers import (
    assert_change_log_sound,
    projector_env,
    staging_matches_source,
    start_projector,
    wait_until,
)

SHAPE = EntityShape(
    (
        ColumnSpec("id", "integer", True),
        ColumnSpec("name", "text", False),
        ColumnSpec("n", "bigint", False),
    )
)
CASES = 1_000
TRUNCATING = 40  # of them, each on an entity of its own (a truncate concerns every key)
KEYS_PER_CASE = 4


@dataclass(frozen=True)
class Case:
    entity: str
    events: list[ChangeEvent]  # the history, in source order
    batches: list[list[ChangeEvent]]  # as delivered


def _event(entity: str, op: str, key: int, position: Position, value: int) -> ChangeEvent:
    row = {"id": key, "name": f"v{value}", "n": value}
    return ChangeEvent(
        org="acme",
        entity=entity,
        op=op,
        key=None if op == "t" else {"id": key},
        before=row if op == "d" else None,
        after=None if op in "dt" else row,
        position=position,
        shape=SHAPE,
        source_ts_ms=1_700_000_000_000 + position.lsn,
        origin=Origin(f"fieldsync.acme.{entity}", 0, position.lsn),
    )


def _case(rng: random.Random, number: int, truncating: bool) -> Case:
    """A source history (transactions of one to three changes, some keys deleted and
    re-inserted, incremental-snapshot reads ``r`` of a key's then current row), delivered out
    of order: shuffled, some changes again, cut into batches."""
    entity = f"t{number}" if truncating else "shared"
    first_key = 0 if truncating else number * KEYS_PER_CASE
    keys = range(first_key, first_key + rng.randint(1, KEYS_PER_CASE))
    events: list[ChangeEvent] = []
    alive: dict[int, bool] = {}
    commit = number * 1_000_000
    for _ in range(rng.randint(1, 14)):
        commit += rng.randint(1, 50) * 100
        lsn = commit - 90
        for _ in range(rng.randint(1, 3)):
            lsn += rng.randint(1, 9)
            key = rng.choice(keys)
            if truncating and rng.random() < 0.08:
                events.append(_event(entity, "t", 0, Position(commit, lsn), 0))
                alive.clear()
                continue
            born = "c" if rng.random() < 0.8 else "r"
            op = rng.choice("uuudr") if alive.get(key) else born
            alive[key] = op != "d"
            events.append(_event(entity, op, key, Position(commit, lsn), rng.randint(0, 10**6)))
    delivered = events + rng.sample(events, k=rng.randint(0, len(events)))  # redelivered too
    rng.shuffle(delivered)
    if rng.random() < 0.3:  # newest first: every older change arrives after a newer one
        delivered.sort(key=lambda e: e.position, reverse=True)
    count = min(len(delivered) - 1, rng.randint(0, 4))
    cuts = sorted(rng.sample(range(1, len(delivered)), k=count))
    batches = [delivered[a:b] for a, b in zip([0, *cuts], [*cuts, len(delivered)], strict=True)]
    return Case(entity, events, batches)


def _expected(case: Case) -> tuple[dict[int, tuple[str, int]], set[int]]:
    """(live rows: key → (name, n) of its newest change, keys that must not be live)."""
    truncated = max((e.position for e in case.events if e.op == "t"), default=Position(0, 0))
    newest: dict[int, ChangeEvent] = {}
    for event in case.events:
        if event.op != "t" and event.key is not None:
            key = event.key["id"]
            if key not in newest or event.position > newest[key].position:
                newest[key] = event
    live = {
        key: (e.after["name"], e.after["n"])
        for key, e in newest.items()
        if e.op != "d" and e.position > truncated and e.after is not None
    }
    return live, set(newest) - set(live)


@pytest.fixture()
def staging(fresh_database: str) -> Iterator[Staging]:
    with psycopg.connect(fresh_database) as conn:
        yield Staging(conn)


def test_stale_and_out_of_order_changes_keep_the_newest(staging: Staging) -> None:
    rng = random.Random(20_260_101)
    truncating = set(rng.sample(range(CASES), TRUNCATING))
    delivered = applied = skipped = 0
    for number in range(CASES):
        case = _case(rng, number, number in truncating)
        for batch in case.batches:
            result = staging.apply("acme", case.entity, batch)
            delivered += len(batch)
            applied += result.applied
            skipped += result.duplicates
        live, gone = _expected(case)
        keys = sorted(live.keys() | gone)
        rows = staging.conn.execute(
            f"SELECT id, name, n, _fs_deleted FROM org_acme.{case.entity} WHERE id = ANY(%s)",
            (keys,),
        ).fetchall()
        staging.conn.commit()
        found = {key: (name, n) for key, name, n, deleted in rows if not deleted}
        assert found == live, f"case {number}: {case.batches}"
    assert applied + skipped == delivered

    # every entity's change log: versions 1..watermark, no change twice, and per key the
    # entries in version order have rising source positions, each `before` the previous
    # `after`, the last one the row as it is
    dsn = staging.conn.info.dsn
    entities = [
        e for (e,) in staging.conn.execute("SELECT entity FROM org_acme._fs_entities").fetchall()
    ]
    staging.conn.commit()
    assert len(entities) == TRUNCATING + 1
    with psycopg.connect(staging.conn.info.dsn) as conn:
        for entity in entities:
            assert_change_log_sound(dsn, "acme", entity)
            history: dict[int, list[tuple[Any, ...]]] = {}
            for key, op, before, after, commit, lsn in conn.execute(
                f"SELECT (key->>'id')::int, op, before, after, commit_lsn, lsn"
                f" FROM org_acme.{entity}__log ORDER BY version"
            ):
                history.setdefault(key, []).append((op, before, after, (commit, lsn)))
            stored_rows = {
                key: (name, n, deleted, (commit, lsn))
                for key, name, n, deleted, commit, lsn in conn.execute(
                    f"SELECT id, name, n, _fs_deleted, _fs_commit_lsn, _fs_lsn"
                    f" FROM org_acme.{entity}"
                )
            }
            for key, entries in history.items():
                positions = [position for *_, position in entries]
                assert positions == sorted(set(positions)), (entity, key)
                for previous, entry in itertools.pairwise(entries):
                    assert entry[1] == previous[2], (entity, key)  # before = previous after
                op, _before, after, position = entries[-1]
                name, n, deleted, stored = stored_rows[key]
                assert position == stored and deleted == (after is None), (entity, key)
                if after is not None:
                    assert (after["name"], after["n"]) == (name, n)


# -- a second consumer group reprocesses everything ---------------------------------------------


def _snapshot(dsn: str, org: str) -> dict[str, Any]:
    """Every row with its xmin (a rewrite changes it), the watermarks, the change logs."""
    with psycopg.connect(dsn) as conn:
        return {
            "rows": conn.execute(
                f"SELECT id, xmin::text, _fs_version, _fs_deleted, _fs_commit_lsn, _fs_lsn,"
                f" name, amount, tags FROM org_{org}.t ORDER BY id"
            ).fetchall(),
            "entities": conn.execute(
                f"SELECT entity, xmin::text, version, truncated_commit_lsn, truncated_lsn"
                f" FROM org_{org}._fs_entities"
            ).fetchall(),
            "log": conn.execute(
                f"SELECT version, op, key, before, after, commit_lsn, lsn, xmin::text"
                f" FROM org_{org}.t__log ORDER BY version"
            ).fetchall(),
        }


def test_a_full_replay_from_the_start_rewrites_nothing(
    fresh_database: str, fresh_broker: str, tmp_path: Path
) -> None:
    columns = "id, name, amount, tags"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id int PRIMARY KEY, name text, amount numeric(8,2), tags text[])"
        )
        conn.execute(
            "INSERT INTO t SELECT i, 'n' || i, i / 4.0, ARRAY['a', i::text]"
            " FROM generate_series(1, 1500) i"
        )
    org = new_org()
    spec = CaptureSpec(org=org, source_dsn=SecretStr(fresh_database), entities={"t": "public.t"})
    capture_once(spec, fresh_broker)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("UPDATE t SET name = name || '!' WHERE id % 3 = 0")
        conn.execute("DELETE FROM t WHERE id % 10 = 0")
        conn.execute("INSERT INTO t SELECT i, 'late', 1, NULL FROM generate_series(2001, 2200) i")
        conn.execute("TRUNCATE t")
        conn.execute("INSERT INTO t SELECT i, 'again', i, '{}' FROM generate_series(1, 300) i")
        conn.execute("UPDATE t SET amount = amount + 1 WHERE id % 7 = 0")
        conn.execute("DELETE FROM t WHERE id % 11 = 0")
    capture_once(spec, fresh_broker)
    register_org(fresh_database, org)
    topics = [f"fieldsync.{org}.t"]
    total = len(read_topic(fresh_broker, topics[0]))  # tombstones included

    def run(group: str, log: Path, consumed_before: int) -> None:
        def done() -> bool:
            consumed = counts(fresh_database, org).get((org, "t"), (0, 0, 0, 0))[0]
            lag = projector_lag(fresh_broker, group, topics).get(topics[0])
            return consumed - consumed_before >= total and lag == 0

        worker = start_projector(
            projector_env(fresh_broker, fresh_database, FIELDSYNC_PROJECTOR_GROUP=group), log
        )
        try:
            wait_until(done, 90, f"group {group} through every message", log)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)

    run("fieldsync-projector", tmp_path / "first.log", 0)
    assert staging_matches_source(fresh_database, org, "t", columns)()
    before, counted = _snapshot(fresh_database, org), counts(fresh_database, org)[(org, "t")]
    assert counted[0] >= total and counted[3] == 0

    started = time.monotonic()
    run("fieldsync-replay-check", tmp_path / "again.log", counted[0])
    replay_s = time.monotonic() - started
    after, recounted = _snapshot(fresh_database, org), counts(fresh_database, org)[(org, "t")]
    assert after == before  # no row rewritten, watermark and change log unchanged
    consumed, applied, duplicates, dead = (b - a for a, b in zip(counted, recounted, strict=True))
    assert consumed >= total and applied == 0 and dead == 0 and duplicates == consumed
    assert staging_matches_source(fresh_database, org, "t", columns)()
    print(f"\nreplayed {total} messages in {replay_s:.1f}s: {consumed} consumed, all duplicates")


def test_a_truncate_seen_before_its_entity_keeps_older_changes_out(staging: Staging) -> None:
    """The truncate goes to every partition; one partition's copy may arrive before the rows
    another partition holds, even before staging has the entity."""
    first = staging.apply("acme", "fresh", [_event("fresh", "t", 0, Position(100, 100), 0)])
    assert first.applied == 1
    older = staging.apply("acme", "fresh", [_event("fresh", "c", 1, Position(50, 50), 1)])
    assert (older.applied, older.duplicates) == (0, 1)
    newer = staging.apply("acme", "fresh", [_event("fresh", "c", 2, Position(150, 150), 2)])
    assert newer.applied == 1
    rows = staging.conn.execute("SELECT id FROM org_acme.fresh").fetchall()
    staging.conn.commit()
    assert rows == [(2,)]
