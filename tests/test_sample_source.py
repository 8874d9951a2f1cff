"""The sample CRM source against a real PostgreSQL: schema, deterministic fill, paced churn."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from engine.sample import (
    PRIMARY_KEYS,
    RECORD_TABLES,
    TABLES,
    ChangeGenerator,
    ChangeMix,
    SampleSourceError,
    churn,
    create_source,
    fill,
    scale,
)
from engine.sample.cli import app

TIME_TYPES = ("date", "timestamp with time zone", "timestamp without time zone")


def _query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def _scalar(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return _query(dsn, sql, params)[0][0]


def _counts(dsn: str) -> dict[str, int]:
    return {table: _scalar(dsn, f"SELECT count(*) FROM crm.{table}") for table in TABLES}


def _digest(dsn: str, *, without_time: bool = False) -> dict[str, tuple[int, str]]:
    """Row count and md5 of every row (in key order) per table, optionally ignoring clock-based
    columns (churn stamps rows with now())."""
    digests: dict[str, tuple[int, str]] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            columns = [
                name
                for name, data_type in conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'crm' AND table_name = %s ORDER BY ordinal_position",
                    (table,),
                )
                if not (without_time and data_type in TIME_TYPES)
            ]
            row = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(row({', '.join(columns)})::text,"
                f" E'\\n' ORDER BY {', '.join(PRIMARY_KEYS[table])}), ''))"
                f" FROM crm.{table}"
            ).fetchone()
            assert row is not None
            digests[table] = (row[0], row[1])
    return digests


def _owners(dsn: str) -> dict[tuple[str, Any], Any]:
    owners: dict[tuple[str, Any], Any] = {}
    for table in RECORD_TABLES:
        for key, owner in _query(
            dsn, f"SELECT {PRIMARY_KEYS[table][0]}, owner_id FROM crm.{table}"
        ):
            owners[(table, key)] = owner
    return owners


def _drop_source(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP SCHEMA crm CASCADE")


# --- schema -------------------------------------------------------------------------------------


def test_create_source_is_idempotent_and_covers_the_column_types(fresh_database: str) -> None:
    create_source(fresh_database)
    create_source(fresh_database)

    tables = _query(
        fresh_database,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'crm'",
    )
    assert sorted(t for (t,) in tables) == sorted(TABLES)
    keyed = _query(
        fresh_database,
        "SELECT conrelid::regclass::text, array_agg(a.attname::text ORDER BY a.attname)"
        " FROM pg_constraint c JOIN pg_attribute a"
        "   ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.contype = 'p' AND c.connamespace = 'crm'::regnamespace GROUP BY 1",
    )
    assert {table: sorted(cols) for table, cols in keyed} == {
        f"crm.{table}": sorted(pk) for table, pk in PRIMARY_KEYS.items()
    }

    types = {
        (data_type, udt, precision, scale_, identity)
        for data_type, udt, precision, scale_, identity in _query(
            fresh_database,
            "SELECT data_type, udt_name, numeric_precision, numeric_scale, is_identity"
            " FROM information_schema.columns WHERE table_schema = 'crm'",
        )
    }
    data_types = {t[0] for t in types}
    for expected in (
        "uuid", "smallint", "integer", "bigint", "numeric", "double precision", "boolean", "text",
        "character varying", "date", "timestamp with time zone", "timestamp without time zone",
        "jsonb", "bytea", "ARRAY",
    ):  # fmt: skip
        assert expected in data_types, expected
    assert ("bigint", "int8", 64, 0, "YES") in types  # bigint identity keys
    assert ("numeric", "numeric", 12, 2, "NO") in types
    assert ("numeric", "numeric", None, None, "NO") in types  # unconstrained
    assert ("ARRAY", "_text", None, None, "NO") in types
    nullable = _scalar(
        fresh_database,
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_schema = 'crm' AND is_nullable = 'YES'",
    )
    assert nullable > 20
    for table in RECORD_TABLES:
        columns = {
            name
            for (name,) in _query(
                fresh_database,
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'crm' AND table_name = %s",
                (table,),
            )
        }
        assert {"owner_id", "owning_team_id", "created_on", "modified_on"} <= columns


def test_create_source_keeps_existing_data(fresh_database: str) -> None:
    fill(fresh_database, accounts=20, seed=1)
    before = _digest(fresh_database)
    create_source(fresh_database)
    assert _digest(fresh_database) == before


# --- fill ---------------------------------------------------------------------------------------


def test_fill_writes_the_expected_counts_and_consistent_relations(fresh_database: str) -> None:
    counts = fill(fresh_database, accounts=300, seed=7)

    sizes = scale(300)
    assert counts.accounts == 300
    assert (counts.contacts, counts.opportunities, counts.activities) == (900, 600, 1200)
    assert (counts.users, counts.teams) == (sizes["users"], sizes["teams"]) == (6, 3)
    assert counts.business_units == sizes["business_units"] == 2
    assert counts.users <= counts.team_members <= 3 * counts.users
    assert _counts(fresh_database) == counts.as_dict()
    assert counts.total == sum(counts.as_dict().values())

    # Foreign keys and indexes that fill set aside while loading are all back and validated.
    foreign_keys = _query(
        fresh_database,
        "SELECT conname, convalidated FROM pg_constraint"
        " WHERE contype = 'f' AND connamespace = 'crm'::regnamespace",
    )
    assert len(foreign_keys) == 18
    assert all(valid for _, valid in foreign_keys)
    indexes = {
        name
        for (name,) in _query(
            fresh_database, "SELECT indexname FROM pg_indexes WHERE schemaname = 'crm'"
        )
    }
    assert {"contacts_account_idx", "activities_opportunity_idx", "team_members_user_idx"} <= (
        indexes
    )

    # Relations a CRM would keep, beyond what the keys enforce.
    assert not _query(
        fresh_database,
        "SELECT FROM crm.activities a JOIN crm.opportunities o"
        " ON o.opportunity_id = a.regarding_opportunity_id"
        " WHERE a.regarding_account_id IS DISTINCT FROM o.account_id",
    )
    assert not _query(
        fresh_database,
        "SELECT FROM crm.opportunities o JOIN crm.contacts c ON c.contact_id = o.contact_id"
        " WHERE c.account_id <> o.account_id",
    )
    for table in RECORD_TABLES:
        assert not _query(fresh_database, f"SELECT FROM crm.{table} WHERE modified_on < created_on")
        owners, teams = _query(
            fresh_database,
            f"SELECT count(DISTINCT owner_id), count(owning_team_id) FROM crm.{table}",
        )[0]
        assert owners > 1 and 0 < teams < _counts(fresh_database)[table]
    assert (
        _scalar(fresh_database, "SELECT count(*) FROM crm.accounts WHERE account_id IS NULL") == 0
    )
    # Nullable columns really hold NULLs, and values spread (3 contacts per account on average).
    assert (
        0 < _scalar(fresh_database, "SELECT count(*) FROM crm.contacts WHERE photo IS NULL") < 900
    )
    spread = _query(
        fresh_database,
        "SELECT min(n), max(n) FROM (SELECT count(c.contact_id) AS n FROM crm.accounts a"
        " LEFT JOIN crm.contacts c USING (account_id) GROUP BY a.account_id) s",
    )[0]
    assert spread[0] < 3 < spread[1]

    # Long e-mail threads are stored out of line (TOAST), which capture must cope with.
    assert _scalar(fresh_database, "SELECT max(length(body)) FROM crm.activities") > 8_000
    assert (
        _scalar(
            fresh_database,
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class"
            " WHERE oid = 'crm.activities'::regclass",
        )
        > 0
    )

    # Identity sequences continue after the copied keys.
    with psycopg.connect(fresh_database) as conn:
        account = conn.execute("SELECT account_id, owner_id FROM crm.accounts LIMIT 1").fetchone()
        assert account is not None
        new_id = conn.execute(
            "INSERT INTO crm.contacts (account_id, first_name, last_name, owner_id)"
            " VALUES (%s, 'New', 'Contact', %s) RETURNING contact_id",
            account,
        ).fetchone()
        assert new_id == (901,)
        conn.rollback()


def test_fill_refuses_a_source_that_has_rows(fresh_database: str) -> None:
    fill(fresh_database, accounts=10, seed=1)
    with pytest.raises(SampleSourceError, match="already has rows") as raised:
        fill(fresh_database, accounts=10, seed=1)
    assert raised.value.code == "sample_not_empty"
    assert _counts(fresh_database)["accounts"] == 10


def test_fill_with_no_accounts_creates_only_the_organisation(fresh_database: str) -> None:
    counts = fill(fresh_database, accounts=0)
    assert counts.users == 5 and counts.accounts == counts.activities == 0
    assert _counts(fresh_database) == counts.as_dict()


def test_same_seed_gives_identical_data_and_another_seed_does_not(fresh_database: str) -> None:
    first_counts = fill(fresh_database, accounts=150, seed=42)
    first = _digest(fresh_database)
    _drop_source(fresh_database)

    assert fill(fresh_database, accounts=150, seed=42) == first_counts
    assert _digest(fresh_database) == first
    _drop_source(fresh_database)

    fill(fresh_database, accounts=150, seed=43)
    other = _digest(fresh_database)
    assert other["accounts"][0] == first["accounts"][0]  # same scale
    assert all(other[table][1] != first[table][1] for table in TABLES)


# --- churn --------------------------------------------------------------------------------------


def test_churn_makes_every_kind_of_change_and_keeps_to_the_rate(fresh_database: str) -> None:
    fill(fresh_database, accounts=200, seed=3)
    before_counts = _counts(fresh_database)
    before_owners = _owners(fresh_database)

    started = time.monotonic()
    stats = churn(fresh_database, rate_per_s=200, max_changes=100, seed=3)
    took = time.monotonic() - started

    assert stats.changes == 100 and stats.transactions == 100
    assert sum(stats.by_kind.values()) == 100
    for kind in ("insert", "update", "delete", "reassign", "team"):
        assert stats.by_kind[kind] > 0, kind
    # Paced: change 99 is not due before 0.495 s; and it did not run much slower than asked.
    assert took >= 0.45 and stats.elapsed_s >= 0.45
    assert stats.achieved_rate <= 210
    assert stats.achieved_rate > 100

    # The database agrees with what churn says it did, table by table.
    after_counts = _counts(fresh_database)
    for table in (*RECORD_TABLES, "team_members"):
        ops = stats.by_table.get(table, {"insert": 0, "delete": 0})
        assert after_counts[table] == before_counts[table] + ops["insert"] - ops["delete"], table
    assert sum(ops["update"] for ops in stats.by_table.values()) >= stats.by_kind["update"]

    # Updates stamp modified_on with now(); reassignments really moved records to other users.
    touched = sum(
        _scalar(fresh_database, f"SELECT count(*) FROM crm.{t} WHERE modified_on > '2025-01-02'")
        for t in RECORD_TABLES
    )
    assert touched > stats.by_kind["update"] // 2
    moved = [
        key
        for key, owner in _owners(fresh_database).items()
        if key in before_owners and before_owners[key] != owner
    ]
    assert moved


def test_churn_deletes_accounts_with_their_children_first(fresh_database: str) -> None:
    fill(fresh_database, accounts=15, seed=5)
    deletes_only = ChangeMix(insert=0, update=0, delete=1, reassign=0, team=0, membership=0)
    stats = churn(fresh_database, rate_per_s=float("inf"), max_changes=250, mix=deletes_only)

    assert stats.by_table["accounts"]["delete"] > 0
    assert stats.by_table["activities"]["delete"] > 0
    counts = _counts(fresh_database)
    # Emptied tables make a delete fall back to an insert, so churn never stalls.
    for table in RECORD_TABLES:
        ops = stats.by_table[table]
        assert (
            counts[table]
            == {"accounts": 15, "contacts": 45, "opportunities": 30}.get(table, 60)
            + ops["insert"]
            - ops["delete"]
        )
    assert stats.by_kind["delete"] + stats.by_kind["insert"] == 250


def test_churn_sequence_is_deterministic_for_a_seed(fresh_database: str) -> None:
    def run() -> tuple[list[Any], dict[str, tuple[int, str]]]:
        fill(fresh_database, accounts=60, seed=11)
        with psycopg.connect(fresh_database) as conn:
            generator = ChangeGenerator(conn, seed=9)
            changes = [generator.step() for _ in range(150)]
            conn.commit()
        digest = _digest(fresh_database, without_time=True)
        _drop_source(fresh_database)
        return changes, digest

    first_changes, first_digest = run()
    second_changes, second_digest = run()
    assert first_changes == second_changes
    assert first_digest == second_digest
    assert {change.kind for change in first_changes} >= {"insert", "update", "delete"}


def test_churn_groups_changes_into_transactions_and_honours_duration(
    fresh_database: str,
) -> None:
    fill(fresh_database, accounts=50, seed=2)
    grouped = churn(fresh_database, rate_per_s=float("inf"), max_changes=50, changes_per_tx=8)
    assert (grouped.changes, grouped.transactions) == (50, 7)

    timed = churn(fresh_database, rate_per_s=50, duration_s=0.5, seed=1)
    assert timed.elapsed_s >= 0.5
    assert 15 <= timed.changes <= 25  # due at 0, 0.02, ... 0.48 s


def test_churn_stops_when_asked(fresh_database: str) -> None:
    fill(fresh_database, accounts=20, seed=2)
    stop = threading.Event()
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(churn(fresh_database, rate_per_s=100, stop=stop))
    )
    worker.start()
    time.sleep(0.3)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert 0 < result[0].changes <= 40


def test_churn_needs_a_filled_source(fresh_database: str) -> None:
    create_source(fresh_database)
    with pytest.raises(SampleSourceError, match="run fill first"):
        churn(fresh_database, rate_per_s=10, max_changes=1)
    with pytest.raises(ValueError, match="rate_per_s"):
        churn(fresh_database, rate_per_s=0, max_changes=1)


# --- cli ----------------------------------------------------------------------------------------


def test_cli_creates_fills_and_churns(fresh_database: str) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["create", "--dsn", fresh_database])
    assert created.exit_code == 0, created.output

    filled = runner.invoke(
        app, ["fill", "--dsn", fresh_database, "--accounts", "40", "--seed", "4"]
    )
    assert filled.exit_code == 0, filled.output
    assert "crm.activities" in filled.output and "160" in filled.output
    assert _counts(fresh_database)["activities"] == 160

    again = runner.invoke(app, ["fill", "--dsn", fresh_database, "--accounts", "40"])
    assert again.exit_code == 1
    assert "[sample_not_empty]" in again.output

    churned = runner.invoke(
        app,
        ["churn", "--dsn", fresh_database, "--rate", "500", "--max-changes", "30", "--seed", "4"],
    )
    assert churned.exit_code == 0, churned.output
    assert "30 changes in 30 transactions" in churned.output
