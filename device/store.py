"""The device's local database: SQLite, one table per entity plus the sync bookkeeping.

* ``<entity>``: the columns of the client model (from ``/metadata``), primary key = the entity key.
* ``_fs_sync``: per entity its delta token, watermark and, while a bootstrap is under way, the
  cursor to resume it from.
* ``_fs_meta``: the metadata revision and staging epoch last seen.

A bootstrap fills ``<entity>__incoming`` page by page (rows and cursor in one transaction), and
swaps it for the live table in one transaction at the end, so the device keeps its old data
while a re-bootstrap runs and never shows a half-loaded entity. A delta page — upserts, removals
and the next token — is applied in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

_AFFINITY = {
    "smallint": "INTEGER",
    "integer": "INTEGER",
    "bigint": "INTEGER",
    "boolean": "INTEGER",
    "real": "REAL",
    "double precision": "REAL",
}


def affinity(pg_type: str) -> str:
    """SQLite column affinity for a PostgreSQL type (exact decimals and times stay TEXT)."""
    return _AFFINITY.get(pg_type, "TEXT")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def parse_row(line: bytes | str) -> dict[str, Any]:
    """A row as the gateway sends it, with exact decimals."""
    return dict(json.loads(line, parse_float=Decimal))


def to_sqlite(value: Any) -> Any:
    """A JSON value as SQLite stores it: decimals as text, objects and arrays as JSON text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return value


class LocalStore:
    def __init__(self, path: Path | str) -> None:
        # one client at a time, but not necessarily from the thread that opened it
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS _fs_sync (entity TEXT PRIMARY KEY, token TEXT,"
            " watermark INTEGER, cursor TEXT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS _fs_meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS _fs_model (entity TEXT PRIMARY KEY, model TEXT)"
        )

    def close(self) -> None:
        self.db.close()

    # -- model ------------------------------------------------------------------------------
    def models(self) -> dict[str, dict[str, Any]]:
        return {e: json.loads(m) for e, m in self.db.execute("SELECT entity, model FROM _fs_model")}

    def apply_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Create or widen the local tables of the client model; drop entities no longer in it."""
        current = self.models()
        wanted = {e["name"]: e for e in metadata["entities"]}
        with self._transaction():
            for name, model in wanted.items():
                self._ensure_table(name, model, current.get(name))
                self._ensure_table(f"{name}__incoming", model, current.get(name))
                self.db.execute(
                    "INSERT OR REPLACE INTO _fs_model VALUES (?, ?)", (name, json.dumps(model))
                )
            for name in set(current) - set(wanted):
                self.drop_entity(name, in_transaction=True)
            self.db.execute(
                "INSERT OR REPLACE INTO _fs_meta VALUES ('revision', ?), ('epoch', ?)",
                (metadata["revision"], metadata["epoch"]),
            )

    def _ensure_table(
        self, table: str, model: Mapping[str, Any], previous: Mapping[str, Any] | None
    ) -> None:
        columns = ", ".join(f"{_quote(c['name'])} {affinity(c['type'])}" for c in model["columns"])
        keys = ", ".join(map(_quote, model["keys"]))
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {_quote(table)} ({columns}, PRIMARY KEY ({keys}))"
        )
        have = {row[1] for row in self.db.execute(f"PRAGMA table_info({_quote(table)})")}
        for column in model["columns"]:
            if column["name"] not in have:
                self.db.execute(
                    f"ALTER TABLE {_quote(table)} ADD COLUMN {_quote(column['name'])}"
                    f" {affinity(column['type'])}"
                )

    def drop_entity(self, entity: str, *, in_transaction: bool = False) -> None:
        def drop() -> None:
            self.db.execute(f"DROP TABLE IF EXISTS {_quote(entity)}")
            self.db.execute(f"DROP TABLE IF EXISTS {_quote(entity + '__incoming')}")
            self.db.execute("DELETE FROM _fs_sync WHERE entity = ?", (entity,))
            self.db.execute("DELETE FROM _fs_model WHERE entity = ?", (entity,))

        if in_transaction:
            drop()
        else:
            with self._transaction():
                drop()

    # -- tokens -----------------------------------------------------------------------------
    def tokens(self) -> dict[str, str | None]:
        """Delta token per entity of the model (None: never bootstrapped)."""
        known = dict(self.db.execute("SELECT entity, token FROM _fs_sync").fetchall())
        return {entity: known.get(entity) for entity in self.models()}

    def cursor(self, entity: str) -> str | None:
        row = self.db.execute("SELECT cursor FROM _fs_sync WHERE entity = ?", (entity,)).fetchone()
        return row[0] if row else None

    # -- applying ---------------------------------------------------------------------------
    def _transaction(self) -> Any:
        store = self

        class _Tx:
            def __enter__(self) -> None:
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind: object, *_: object) -> None:
                store.db.execute("ROLLBACK" if kind else "COMMIT")

        return _Tx()

    def _upsert(self, table: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            names = ", ".join(map(_quote, row))
            marks = ", ".join("?" for _ in row)
            self.db.execute(
                f"INSERT OR REPLACE INTO {_quote(table)} ({names}) VALUES ({marks})",
                [to_sqlite(v) for v in row.values()],
            )

    def apply_delta(
        self,
        entity: str,
        upserts: Sequence[Mapping[str, Any]],
        removes: Sequence[Mapping[str, Any]],
        token: str,
        watermark: int | None,
    ) -> None:
        with self._transaction():
            self._upsert(entity, upserts)
            for key in removes:
                where = " AND ".join(f"{_quote(k)} = ?" for k in key)
                self.db.execute(
                    f"DELETE FROM {_quote(entity)} WHERE {where}",
                    [to_sqlite(v) for v in key.values()],
                )
            self.db.execute(
                "INSERT INTO _fs_sync (entity, token, watermark) VALUES (?, ?, ?)"
                " ON CONFLICT (entity) DO UPDATE SET token = excluded.token,"
                " watermark = excluded.watermark",
                (entity, token, watermark),
            )

    def begin_bootstrap(self, entity: str) -> None:
        """Forget a previous incoming copy and its cursor: a bootstrap from the start."""
        with self._transaction():
            self.db.execute(f"DELETE FROM {_quote(entity + '__incoming')}")
            self.db.execute(
                "INSERT INTO _fs_sync (entity, cursor) VALUES (?, NULL)"
                " ON CONFLICT (entity) DO UPDATE SET cursor = NULL",
                (entity,),
            )

    def add_bootstrap_page(
        self, entity: str, rows: Sequence[Mapping[str, Any]], cursor: str
    ) -> None:
        with self._transaction():
            self._upsert(entity + "__incoming", rows)
            self.db.execute("UPDATE _fs_sync SET cursor = ? WHERE entity = ?", (cursor, entity))

    def finish_bootstrap(
        self, entity: str, rows: Sequence[Mapping[str, Any]], token: str, watermark: int
    ) -> None:
        """The last rows, then the incoming copy replaces the live table, with its token."""
        incoming = _quote(entity + "__incoming")
        with self._transaction():
            self._upsert(entity + "__incoming", rows)
            self.db.execute(f"DELETE FROM {_quote(entity)}")
            self.db.execute(f"INSERT INTO {_quote(entity)} SELECT * FROM {incoming}")
            self.db.execute(f"DELETE FROM {incoming}")
            self.db.execute(
                "UPDATE _fs_sync SET token = ?, watermark = ?, cursor = NULL WHERE entity = ?",
                (token, watermark, entity),
            )

    # -- reading ----------------------------------------------------------------------------
    def rows(self, entity: str) -> list[dict[str, Any]]:
        cursor = self.db.execute(f"SELECT * FROM {_quote(entity)}")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]


__all__ = ["LocalStore", "affinity", "parse_row", "to_sqlite"]
