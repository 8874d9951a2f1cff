"""The oracle every reliability scenario is judged by.

* **Staging equals the source.** A digest of an org's staging — per entity, key and row, live
  (not deleted) rows only, source columns only — equals the same digest computed from the
  source tables. :func:`source_digest`, :func:`staging_digest`, :func:`wait_converged`.
* **Each device holds its user's view.** A device's SQLite equals the rows its user may see,
  computed in Python from the source rows by the gateway tests' oracle
  (:func:`tests.gateway_helpers.view_of`). :func:`source_world`, :func:`device_rows`.
* **Watermarks never go back.** :class:`WatermarkSampler` reads every entity's watermark a few
  times a second while a scenario runs and records any that went down.
* **No change applied twice.** :func:`assert_applied_once`: the change log holds every change
  once and its versions run ``1 … watermark`` without a gap (see
  :func:`tests.projector_helpers.assert_change_log_sound`), and the reconciliation counts add up.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from device.store import LocalStore
from tests.gateway_helpers import USERS, view_of
from tests.projector_helpers import assert_change_log_sound

Row = tuple[Any, ...]


# -- staging = source ------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    """A value as text that compares the same on both sides (time zones and types aside)."""
    if value is None:
        return "∅"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return repr(value)


@dataclass(frozen=True)
class Digest:
    """One digest of an org: per entity the hash of every live row, keyed by the row's key."""

    rows: Mapping[str, Mapping[str, str]]  # entity → key text → row hash

    @property
    def value(self) -> str:
        whole = hashlib.sha256()
        for entity in sorted(self.rows):
            for key in sorted(self.rows[entity]):
                whole.update(f"{entity}\0{key}\0{self.rows[entity][key]}\n".encode())
        return whole.hexdigest()

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def diff(self, other: Digest, limit: int = 5) -> str:
        """What differs, for an assertion message: missing, extra and changed keys."""
        lines = []
        for entity in sorted(set(self.rows) | set(other.rows)):
            mine, theirs = self.rows.get(entity, {}), other.rows.get(entity, {})
            missing = sorted(set(mine) - set(theirs))
            extra = sorted(set(theirs) - set(mine))
            changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            if missing or extra or changed:
                lines.append(
                    f"{entity}: {len(missing)} missing {missing[:limit]}, {len(extra)} extra"
                    f" {extra[:limit]}, {len(changed)} changed {changed[:limit]}"
                )
        return "; ".join(lines) or "equal"


def source_columns(conn: psycopg.Connection[Any], table: str) -> tuple[list[str], list[str]]:
    """(columns, key columns) of a source table ``schema.name``, in column order."""
    schema, name = table.split(".", 1)
    columns = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (f'"{schema}"."{name}"',),
        )
    ]
    keys = [
        r[0]
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY a.attnum",
            (f'"{schema}"."{name}"',),
        )
    ]
    assert columns and keys, f"source table {table} has no columns or no primary key"
    return columns, keys


def _hash_rows(
    conn: psycopg.Connection[Any],
    query: sql.Composable,
    columns: Sequence[str],
    keys: Sequence[str],
) -> dict[str, str]:
    key_at = [columns.index(k) for k in keys]
    out: dict[str, str] = {}
    with conn.cursor(name=f"digest_{time.monotonic_ns()}") as cursor:
        cursor.itersize = 20_000
        cursor.execute(query)
        for row in cursor:
            text = [_canonical(v) for v in row]
            key = "|".join(text[i] for i in key_at)
            out[key] = hashlib.sha256("\x1f".join(text).encode()).hexdigest()[:24]
    return out


def source_digest(source_dsn: str, tables: Mapping[str, str]) -> Digest:
    """The digest of the source tables (``entity → schema.table``), read in one snapshot."""
    rows: dict[str, dict[str, str]] = {}
    with psycopg.connect(source_dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SET TimeZone = 'UTC'")
        for entity, table in tables.items():
            columns, keys = source_columns(conn, table)
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.Identifier(*table.split(".", 1)),
            )
            rows[entity] = _hash_rows(conn, query, columns, keys)
    return Digest(rows)


def staging_digest(
    staging_dsn: str, org: str, columns: Mapping[str, tuple[Sequence[str], Sequence[str]]]
) -> Digest:
    """The digest of an org's staging: live rows, the given (source) columns only."""
    rows: dict[str, dict[str, str]] = {}
    with psycopg.connect(staging_dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute("SET TimeZone = 'UTC'")
        for entity, (names, keys) in columns.items():
            exists = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f'"org_{org}"."{entity}"',)
            ).fetchone()
            if not (exists and exists[0]):
                rows[entity] = {}
                continue
            query = sql.SQL("SELECT {} FROM {}.{} WHERE NOT _fs_deleted").format(
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.Identifier(f"org_{org}"),
                sql.Identifier(entity),
            )
            rows[entity] = _hash_rows(conn, query, names, keys)
    return Digest(rows)


@dataclass
class Oracle:
    """Compares one org's staging with its source tables."""

    source_dsn: str
    staging_dsn: str
    org: str
    tables: Mapping[str, str]  # entity → source schema.table
    _columns: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)

    def columns(self) -> dict[str, tuple[list[str], list[str]]]:
        if not self._columns:
            with psycopg.connect(self.source_dsn) as conn:
                self._columns = {e: source_columns(conn, t) for e, t in self.tables.items()}
        return self._columns

    def source(self) -> Digest:
        return source_digest(self.source_dsn, self.tables)

    def staging(self) -> Digest:
        return staging_digest(self.staging_dsn, self.org, self.columns())

    def matches(self) -> tuple[bool, str]:
        source, staging = self.source(), self.staging()
        return source.value == staging.value, source.diff(staging)

    def wait_converged(self, timeout: float, context: str = "") -> float:
        """Seconds until staging's digest equals the source's (the source must be quiet)."""
        started = time.monotonic()
        detail = ""
        while time.monotonic() - started < timeout:
            equal, detail = self.matches()
            if equal:
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(
            f"staging of org {self.org} did not converge to the source within {timeout:.0f}s:"
            f" {detail}\n{context}"
        )

    def assert_applied_once(self) -> dict[str, int]:
        """No change applied twice, gap-free versions, and consumed = applied + duplicates +
        dead letters with no dead letter; returns the watermarks."""
        watermarks = {
            e: assert_change_log_sound(self.staging_dsn, self.org, e) for e in self.tables
        }
        with psycopg.connect(self.staging_dsn) as conn:
            counts = conn.execute(
                "SELECT entity, consumed, applied, duplicates, dead_lettered"
                " FROM fieldsync_control.projection_counts WHERE org = %s",
                (self.org,),
            ).fetchall()
        for entity, consumed, applied, duplicates, dead in counts:
            assert consumed == applied + duplicates + dead, (entity, consumed, applied, duplicates)
            assert dead == 0, f"{entity}: {dead} dead letters"
        return watermarks

    def assert_no_stale_overwrite(self) -> None:
        """Per key, every change-log entry's source position is above the previous entry's:
        no change ever overwrote a newer one (within one capture epoch: a restored source's
        positions may go back)."""
        with psycopg.connect(self.staging_dsn) as conn:
            for entity in self.tables:
                row = conn.execute(
                    sql.SQL(
                        """
                        SELECT count(*) FROM (
                            SELECT commit_lsn, lsn, lag(commit_lsn) OVER w AS pc,
                                   lag(lsn) OVER w AS pl
                            FROM {}.{} WINDOW w AS (PARTITION BY key ORDER BY version)) s
                        WHERE pc IS NOT NULL AND (commit_lsn, lsn) <= (pc, pl)
                        """
                    ).format(sql.Identifier(f"org_{self.org}"), sql.Identifier(f"{entity}__log"))
                ).fetchone()
                assert row == (0,), f"{entity}: {row} change-log entries older than their key's"


# -- watermarks never go back ------------------------------------------------------------------


class WatermarkSampler:
    """Samples every entity's watermark of an org every ``interval`` seconds in a thread; any
    value below one seen earlier is a regression."""

    def __init__(self, staging_dsn: str, org: str, interval: float = 0.2) -> None:
        self.dsn, self.org, self.interval = staging_dsn, org, interval
        self.highest: dict[str, int] = {}
        self.samples = 0
        self.regressions: list[tuple[str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watermarks", daemon=True)

    def __enter__(self) -> WatermarkSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample(self, conn: psycopg.Connection[Any]) -> None:
        try:
            rows = conn.execute(
                sql.SQL("SELECT entity, version FROM {}._fs_entities").format(
                    sql.Identifier(f"org_{self.org}")
                )
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            conn.rollback()
            return
        conn.rollback()
        for entity, version in rows:
            seen = self.highest.get(entity, 0)
            if version < seen:
                self.regressions.append((entity, seen, version))
            self.highest[entity] = max(seen, version)
        self.samples += 1

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=3)
                self.sample(conn)
            except psycopg.OperationalError:  # scenarios cut the database: sample again later
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def assert_never_back(self) -> None:
        assert self.samples > 0, "the watermark sampler took no sample"
        assert not self.regressions, f"watermarks went back: {self.regressions[:10]}"


# -- devices = their views ----------------------------------------------------------------------


@dataclass
class SourceWorld:
    """The source rows of ``job`` and ``account`` in the shape :func:`view_of` reads."""

    rows: dict[str, dict[int, dict[str, Any]]]


def source_world(source_dsn: str, tables: Mapping[str, str]) -> SourceWorld:
    with psycopg.connect(source_dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        rows: dict[str, dict[int, dict[str, Any]]] = {}
        for entity in ("job", "account"):
            cursor = conn.execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier(*tables[entity].split(".", 1)))
            )
            names = [d.name for d in cursor.description or []]
            rows[entity] = {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}
    return SourceWorld(rows)


def source_view(
    source_dsn: str, tables: Mapping[str, str], user: str, now: float | None = None
) -> dict[str, dict[int, dict[str, Any]]]:
    """What ``user`` (of :data:`tests.gateway_helpers.USERS`) may see of the source now."""
    roles, teams = USERS[user]
    world = source_world(source_dsn, tables)
    return view_of(world, user, roles, teams, time.time() if now is None else now)  # type: ignore[arg-type]


def device_rows(store: LocalStore) -> dict[str, dict[int, dict[str, Any]]]:
    """A device's local rows per entity and key (entities it does not hold: empty)."""
    held = store.models()
    return {e: {r["id"]: r for r in store.rows(e)} if e in held else {} for e in ("job", "account")}


def view_diff(
    local: Mapping[str, Mapping[int, Any]], view: Mapping[str, Mapping[int, Any]], limit: int = 5
) -> str:
    lines = []
    for entity in sorted(set(local) | set(view)):
        mine, theirs = local.get(entity, {}), view.get(entity, {})
        missing = sorted(set(theirs) - set(mine))
        extra = sorted(set(mine) - set(theirs))
        changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        if missing or extra or changed:
            sample = [(mine[k], theirs[k]) for k in changed[:2]]
            lines.append(
                f"{entity}: missing {missing[:limit]} ({len(missing)}), extra {extra[:limit]}"
                f" ({len(extra)}), changed {changed[:limit]} ({len(changed)}) e.g. {sample}"
            )
    return "; ".join(lines) or "equal"
