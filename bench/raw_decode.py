"""The raw logical-decoding rate: the ceiling any capture built on a pgoutput slot can reach.

:func:`measure_raw_decode` reads a slot's pending changes with
``pg_logical_slot_peek_binary_changes`` and iterates the rows in Python, so the figure includes
the server's decoding, the wire and the client's row handling, but none of the capture's own
work (parsing pgoutput, Avro encoding, producing to Kafka). Capture benchmarks report their
throughput as a ratio against it. :func:`make_update_workload` makes the UPDATE-heavy workload
both measure. The ``raw_decode`` benchmark below runs the two on their own.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from bench.harness import BenchContext, Result, benchmark
from bench.services import scratch_database

# The data column's first byte is the pgoutput message type; these three carry a row change.
_CHANGE_MESSAGES = frozenset(b"IUD")

_PEEK = (
    "SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes("
    "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s)"
)


@dataclass(frozen=True)
class _ColumnType:
    sql_type: str
    expression: str  # SQL (``%`` doubled: it runs with parameters) from the bigint {x}


# The mix a field-service table has; column i (after the bigint PK) takes type (i - 1) % 9.
_COLUMN_TYPES = (
    _ColumnType("integer", "({x} %% 2000000000)::integer"),
    _ColumnType("bigint", "{x} * 1000"),
    _ColumnType("text", "'note ' || md5({x}::text)"),
    _ColumnType("numeric(12,2)", "(({x} %% 10000000) / 100.0)::numeric(12,2)"),
    _ColumnType("timestamptz", "timestamptz '2024-01-01 00:00:00+00' + {x} * interval '1 second'"),
    _ColumnType("boolean", "{x} %% 2 = 0"),
    _ColumnType("double precision", "({x} * 0.25)::double precision"),
    _ColumnType("varchar(64)", "('code-' || {x})::varchar(64)"),
    _ColumnType("date", "date '2020-01-01' + ({x} %% 3650)::integer"),
)


def _columns(columns: int) -> list[tuple[str, _ColumnType]]:
    return [(f"c{i:02d}", _COLUMN_TYPES[(i - 1) % len(_COLUMN_TYPES)]) for i in range(1, columns)]


def make_update_workload(
    dsn: str,
    table: str,
    columns: int = 10,
    *,
    rows: int,
    updates: int,
    txn_size: int = 1000,
    before_updates: Callable[[], None] | None = None,
    seed: int = 42,
) -> None:
    """Create ``table`` (bigint PK + ``columns - 1`` mixed-type columns), fill it, then UPDATE.

    Every UPDATE is its own statement changing every non-key column of one random row, grouped
    ``txn_size`` per transaction (pipelined with executemany, so the client is not the limit).
    ``before_updates`` runs between the fill and the updates with no transaction open, e.g. to
    create the publication and slot so that only the updates are decoded. The updates commit
    synchronously: a slot only decodes flushed WAL, and on a server with
    ``synchronous_commit=off`` the last commits could otherwise still be unflushed on return.
    The table is vacuumed at the end, so no autovacuum competes with what is measured next.
    """
    if columns < 2:
        raise ValueError("columns must be >= 2 (the key and at least one value column)")
    if rows < 1 or updates < 0 or txn_size < 1:
        raise ValueError("need rows >= 1, updates >= 0 and txn_size >= 1")
    spec = _columns(columns)
    ident = sql.Identifier(table)
    create = sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, {})").format(
        ident,
        sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind.sql_type))
            for name, kind in spec
        ),
    )
    fill = sql.SQL("INSERT INTO {} SELECT g, {} FROM generate_series(1, %s::bigint) AS g").format(
        ident, sql.SQL(", ").join(sql.SQL(kind.expression.format(x="g")) for _, kind in spec)
    )
    update = sql.SQL("UPDATE {} SET {} WHERE id = %(id)s").format(
        ident,
        sql.SQL(", ").join(
            sql.SQL("{} = {}").format(
                sql.Identifier(name), sql.SQL(kind.expression.format(x="%(v)s::bigint"))
            )
            for name, kind in spec
        ),
    )
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(create)
        conn.execute(fill, (rows,))
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ident))
        if before_updates is not None:
            before_updates()
        conn.execute("SET synchronous_commit = on")
        with conn.cursor() as cur:
            for start in range(0, updates, txn_size):
                batch = [
                    {"id": rng.randint(1, rows), "v": rows + n}
                    for n in range(start, min(start + txn_size, updates))
                ]
                with conn.transaction():
                    cur.executemany(update, batch)
        # Settle the table now, so an autovacuum of the dead versions does not start (and
        # compete for the CPU) while the caller measures.
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ident))


@dataclass(frozen=True)
class RawDecodeRuns:
    """Every timed read of the slot: changes/s of each run, and what one read returned."""

    rates: tuple[float, ...]
    changes: int
    messages: int
    payload_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def measure_raw_decode_runs(
    dsn: str,
    slot: str,
    publication: str,
    expected_changes: int,
    *,
    runs: int = 3,
    binary: bool = True,
) -> RawDecodeRuns:
    """Time ``runs`` full peeks of the slot (peek: the slot does not advance between runs).

    ``binary`` fetches ``data`` in binary format, as the replication protocol delivers it; the
    text format adds bytea hex encoding/decoding (about a quarter slower) that a capture need
    not pay, and a baseline must be the ceiling, not a handicap.

    Raises if a read does not return exactly ``expected_changes`` Insert/Update/Delete messages,
    so a rate is never computed over a wrong amount of work.
    """
    if expected_changes < 1:
        raise ValueError("expected_changes must be >= 1")
    rates = []
    messages = payload = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(runs):
            changes = messages = payload = 0
            started = time.perf_counter()
            with conn.cursor(binary=binary) as cur:
                cur.execute(_PEEK, (slot, publication))
                for _lsn, _xid, data in cur:
                    messages += 1
                    payload += len(data)
                    if data[0] in _CHANGE_MESSAGES:
                        changes += 1
            elapsed = time.perf_counter() - started
            if changes != expected_changes:
                raise RuntimeError(
                    f"slot {slot!r} returned {changes} row changes, expected {expected_changes}"
                )
            rates.append(changes / elapsed)
    return RawDecodeRuns(tuple(rates), expected_changes, messages, payload)


def measure_raw_decode(
    dsn: str, slot: str, publication: str, expected_changes: int, *, binary: bool = True
) -> float:
    """Changes/s of a raw pgoutput read of the slot (median of 3), the capture baseline."""
    return measure_raw_decode_runs(dsn, slot, publication, expected_changes, binary=binary).median


@benchmark("raw_decode")
def raw_decode(ctx: BenchContext) -> Iterator[Result]:
    """The decoding ceiling on its own: proves the harness end to end against real services."""
    updates = 20_000 if ctx.quick else 200_000
    rows = updates // 2
    table = "field_visit"
    suffix = uuid.uuid4().hex[:8]
    publication, slot = f"bench_pub_{suffix}", f"bench_slot_{suffix}"
    with scratch_database(ctx.services.pg_dsn, "bench_raw") as dsn:

        def create_slot() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                        sql.Identifier(publication), sql.Identifier(table)
                    )
                )
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))

        make_update_workload(dsn, table, rows=rows, updates=updates, before_updates=create_slot)
        runs = measure_raw_decode_runs(dsn, slot, publication, updates)
    yield Result(
        bench="raw_decode",
        metric="raw_decode",
        unit="changes/s",
        value=runs.median,
        details={
            "rows": rows,
            "updates": updates,
            "columns": 10,
            "txn_size": 1000,
            "fetch": "binary",
            "runs_changes_per_s": [round(r, 1) for r in runs.rates],
            "messages": runs.messages,
            "payload_bytes": runs.payload_bytes,
        },
    )
