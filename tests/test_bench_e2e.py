"""The e2e benchmark's bookkeeping: latency percentiles, stage counts, the writer's statement."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import psycopg
import pytest

from bench.e2e import (
    ENTITIES,
    Latencies,
    OrgWriter,
    captured_count,
    count_at,
    create_source,
    percentile,
    stride_sample,
    write_transaction,
)
from bench.report import write_plots
from bench.services import scratch_database

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentiles_count_censored_versions_and_say_they_are_lower_bounds() -> None:
    seen = Latencies()
    for n in range(1, 100):
        seen.add(written_at=1000.0 + n, latency_s=n / 1000)  # 1..99 ms
    assert seen.summary()["p99_ms"] == 99.0 and not seen.summary()["percentiles_are_lower_bounds"]
    seen.add(written_at=1100.0, latency_s=30.0)  # not delivered by the deadline
    seen.censored += 1
    summary = seen.summary()
    assert summary["n"] == 100 and summary["max_ms"] == 30_000.0
    assert summary["p50_ms"] == 50.0 and summary["percentiles_are_lower_bounds"] is True
    assert seen.p99_by_bucket(1000.0, 50.0) == [49.0, 99.0, 30_000.0]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_samples_are_an_even_stride_in_write_order() -> None:
    seen = Latencies()
    for n in (3, 1, 2):  # delivered out of write order
        seen.add(written_at=float(n), latency_s=n / 10)
    assert seen.in_write_order() == [100.0, 200.0, 300.0]
    assert stride_sample(list(range(10)), 4) == [0, 3, 6, 9]
    assert stride_sample([1.0, 2.0], 5) == [1.0, 2.0]


def test_stage_counts_interpolate_and_the_slot_confirms_whole_transactions() -> None:
    times, counts = [10.0, 11.0, 12.0], [0.0, 100.0, 300.0]
    assert count_at(times, counts, 11.5) == 200.0
    assert count_at(times, counts, 5.0) == 0.0 and count_at(times, counts, 20.0) == 300.0
    marks = [(100, 50), (200, 120), (300, 170)]  # (WAL position after the rows, cumulative)
    assert captured_count(marks, None) == 0
    assert captured_count(marks, 100) == 0  # the commit record comes after position 100
    assert captured_count(marks, 101) == 50
    assert captured_count(marks, 10_000) == 170


def test_a_transaction_never_names_a_key_twice_per_entity() -> None:
    writer = OrgWriter("o", dict.fromkeys(ENTITIES, 2))
    planned = writer.plan(random.Random(3), 200, next_seq=1)
    assert set(planned) <= set(ENTITIES)
    seqs = []
    for keys, entity_seqs in planned.values():
        assert keys and len(keys) == len(set(keys)) == len(entity_seqs)
        seqs += entity_seqs
    assert sorted(seqs) == list(range(1, 201))


def test_the_transaction_returns_a_position_before_its_commit(pg_admin_dsn: str) -> None:
    """The writer's mark lies after the transaction's rows and before its (synchronous)
    commit, so a slot confirms it exactly when it confirmed the transaction."""
    position = "SELECT (pg_current_wal_{}_lsn() - '0/0'::pg_lsn)::bigint"

    async def write(dsn: str) -> tuple[int, int, int, list[int]]:
        planned = OrgWriter("o", dict.fromkeys(ENTITIES, 3)).plan(random.Random(1), 6, 1)
        options = "-c synchronous_commit=on"
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, options=options
        ) as conn:
            before = await (await conn.execute(position.format("insert"))).fetchone()
            mark = await write_transaction(conn, planned)
            flushed = await (await conn.execute(position.format("flush"))).fetchone()
            changed = await (
                await conn.execute(
                    " UNION ALL ".join(f"SELECT seq FROM {e} WHERE seq > 0" for e in ENTITIES)
                )
            ).fetchall()
        assert before and flushed
        return before[0], mark, flushed[0], sorted(seq for (seq,) in changed)

    with scratch_database(pg_admin_dsn, "test_e2e") as dsn:
        create_source(dsn, rows_per_entity=3)
        before, mark, flushed, seqs = asyncio.run(write(dsn))
    assert before < mark < flushed
    assert seqs == [1, 2, 3, 4, 5, 6]


def test_report_draws_each_stage_of_a_throughput_record(tmp_path: Path) -> None:
    stages = {"written": 1000.0, "captured": 990.0, "projected": 400.0, "delivered": 390.0}
    records = [
        {
            "bench": "e2e",
            "metric": "delivered_per_s",
            "unit": "changes/s",
            "value": 390.0,
            "baseline": {"name": "written", "value": 1000.0},
            "ratio": 0.39,
            "details": {"stages_per_s": stages},
        }
    ]
    written = {p.name: p for p in write_plots(records, tmp_path)}
    assert set(written) == {"bench-e2e.png", "stages-e2e.png"}
    assert written["stages-e2e.png"].read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("bad", [None, {"written": "fast"}, {"written": float("nan")}])
def test_stages_that_are_not_numbers_draw_nothing(tmp_path: Path, bad: object) -> None:
    record = {
        "bench": "x",
        "metric": "m",
        "unit": "u",
        "value": 1.0,
        "baseline": {"name": "b", "value": 1.0},
        "ratio": 1.0,
        "details": {"stages_per_s": bad},
    }
    assert [p.name for p in write_plots([record], tmp_path)] == ["bench-x.png"]
