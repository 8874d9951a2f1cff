"""Staging: one schema per organisation, one table and one change log per entity.

Layout of ``org_<org>``:

* ``<entity>``: the source columns (typed from the event schema) plus system columns
  ``_fs_version`` (change version), ``_fs_deleted``, ``_fs_commit_lsn``/``_fs_lsn`` (source
  position), ``_fs_changed_at`` (source commit time) and ``_fs_epoch`` (capture epoch).
* ``<entity>__log``: per change version the op, the key and the row before and after (the row
  before is the previous *staging* row, so it is complete even when the source sent only a key).
* ``_fs_entities``: per entity its watermark (highest committed version), truncate position,
  retention horizon and current shape.

Applying a batch of one entity, in one transaction:

  1. Lock the entity's row in ``_fs_entities``: writers of one entity serialise here, so
     versions are assigned in commit order and a reader that reads rows and watermark in one
     snapshot never misses a change below that watermark.
  2. Bring the table to the batch's shape (new columns added; a changed type stops the entity).
  3. Apply a truncate newer than the stored one: every older row becomes deleted.
  4. Copy the batch — one row per key, its newest event — into a temporary table.
  5. One statement: keep the events newer than the stored position of their key (older ones are
     duplicates: redelivery or replay), give them versions after the watermark, update or insert
     them (a delete keeps the row with ``_fs_deleted``; an unavailable TOAST value keeps the
     stored one), and write their change-log entries.
  6. Raise the watermark; commit.
A batch replayed after a crash finds every position already stored and changes nothing.

A replay (``engine/projections/replay.py``) rebuilds an org into another schema
(``schema_for``) and swaps it in under ``org_<org>`` between two batches: a writer waiting at
step 1 then works on the new schema only, and cached table state the new schema does not
match is read again (:meth:`Staging.apply`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from engine.projections import capture_epochs, faults
from engine.projections.exceptions import ProjectionError
from engine.projections.model import UNAVAILABLE, ChangeEvent, ColumnSpec, EntityShape

CHANGES_CHANNEL = "fieldsync_changes"  # NOTIFY payload: "<org>.<entity>:<watermark>"

SYSTEM_COLUMNS = (
    "_fs_version",
    "_fs_deleted",
    "_fs_commit_lsn",
    "_fs_lsn",
    "_fs_changed_at",
    "_fs_epoch",
)
SYSTEM_DDL = """
    _fs_version bigint NOT NULL,
    _fs_deleted boolean NOT NULL DEFAULT false,
    _fs_commit_lsn bigint NOT NULL,
    _fs_lsn bigint NOT NULL,
    _fs_changed_at timestamptz NOT NULL,
    _fs_epoch text
"""

# Temp-table types for values psycopg's binary dumpers take as given; others travel as text.
_BINARY_COPY_TYPES = {
    "boolean",
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "text",
    "bytea",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "timestamp without time zone",
    "timestamp with time zone",
    "time without time zone",
    "text[]",
    "integer[]",
    "bigint[]",
}


class IncompatibleSchema(ProjectionError):
    """A column changed type: the entity stops before writing anything.

    ``conflicts``: (column, staging type, incoming type) of each such column.
    """

    code = "incompatible_schema"

    def __init__(self, message: str, conflicts: Sequence[tuple[str, str, str]]) -> None:
        super().__init__(message)
        self.conflicts = tuple(conflicts)


def org_schema(org: str) -> str:
    return f"org_{org}"


def _copy_type(pg_type: str) -> str:
    if pg_type in _BINARY_COPY_TYPES:
        return pg_type
    if pg_type.startswith("numeric"):
        return "numeric"
    if pg_type.endswith("[]"):
        return "text[]"
    return "text"  # uuid, jsonb, json: their text, cast in SQL


@dataclass
class ApplyResult:
    """What a batch did, per the reconciliation consumed = applied + duplicates + dead letters."""

    applied: int = 0
    duplicates: int = 0
    truncated_rows: int = 0
    watermark: int = 0


@dataclass
class _EntityState:
    columns: dict[str, str] = field(default_factory=dict)  # name → pg type, as the table has it
    keys: tuple[str, ...] = ()
    #: column → incoming types an operator accepted (``fieldsync org resume`` after a type
    #: change): values of those types are cast to the column's type instead of stopping
    accepted: dict[str, set[str]] = field(default_factory=dict)


#: Incoming column types accepted after a type change, per org, entity and column.
ACCEPTED_TYPES = "fieldsync_control.accepted_types"


#: What may go wrong when the cached state of an org no longer describes its tables (a replay
#: swapped another schema in under the same name, see ``engine/projections/replay.py``; an
#: operator altered a column's type).
_STALE_STATE = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.DatatypeMismatch,
)


class Staging:
    """Applies change batches to one staging database (see the module docstring).

    ``schema_for`` names the schema an org's staging lives in (``org_<org>``; a replay builds a
    shadow schema with another name). ``notify=False`` sends no change notifications (nobody
    reads a shadow schema).
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        schema_for: Callable[[str], str] = org_schema,
        notify: bool = True,
    ) -> None:
        self.conn = conn
        self._schema = schema_for
        self._notify = notify
        self._entities: dict[tuple[str, str], _EntityState] = {}
        self._temp_tables: set[str] = set()
        # the merge statement of each (schema, entity, shape, table columns, input table), as
        # sent: composing it costs more than PostgreSQL takes to run it for a small batch
        self._merge_sql: dict[tuple[Any, ...], bytes] = {}
        self._orgs: set[str] = set()

    def forget(self, org: str) -> None:
        """Drop what is cached about ``org``'s tables (and the temporary input tables, whose
        creation may have been rolled back); the next apply reads the catalog again."""
        self._orgs.discard(org)
        for key in [k for k in self._entities if k[0] == org]:
            del self._entities[key]
        self._temp_tables.clear()

    # -- schema ------------------------------------------------------------------------
    def ensure_org(self, org: str) -> None:
        if org in self._orgs:
            return
        schema = sql.Identifier(self._schema(org))
        # workers meeting a new org at once would race on IF NOT EXISTS: serialise them, and
        # take a schema another writer created after all as created (a savepoint: the rest of
        # this transaction goes on)
        self._lock_ddl(self._schema(org))
        with contextlib.suppress(psycopg.errors.UniqueViolation), self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        self.conn.execute(
            sql.SQL(
                """
                CREATE TABLE IF NOT EXISTS {}._fs_entities (
                    entity text PRIMARY KEY,
                    version bigint NOT NULL DEFAULT 0,
                    truncated_commit_lsn bigint NOT NULL DEFAULT 0,
                    truncated_lsn bigint NOT NULL DEFAULT 0,
                    horizon_version bigint NOT NULL DEFAULT 0,
                    purged_commit_lsn bigint NOT NULL DEFAULT 0,
                    purged_lsn bigint NOT NULL DEFAULT 0,
                    horizon_at timestamptz,
                    key_columns text[] NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(schema)
        )
        capture_epochs.ensure_columns(self.conn, self._schema(org))
        self._orgs.add(org)

    def _lock_ddl(self, name: str) -> None:
        """A transaction-scoped advisory lock around creating ``name``."""
        if self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            self.conn.execute("BEGIN")
        self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fieldsync.staging.{name}",)
        )

    def _state(self, org: str, entity: str) -> _EntityState:
        state = self._entities.get((org, entity))
        if state is None:
            rows = self.conn.execute(
                """
                SELECT a.attname, format_type(a.atttypid, a.atttypmod)
                FROM pg_attribute a
                WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum
                """,
                (f'"{self._schema(org)}"."{entity}"',),
            ).fetchall()
            keys = self.conn.execute(
                sql.SQL("SELECT key_columns FROM {}._fs_entities WHERE entity = %s").format(
                    sql.Identifier(self._schema(org))
                ),
                (entity,),
            ).fetchone()
            accepted: dict[str, set[str]] = {}
            found = self.conn.execute("SELECT to_regclass(%s)", (ACCEPTED_TYPES,)).fetchone()
            if found is not None and found[0] is not None:
                for column, pg_type in self.conn.execute(
                    "SELECT column_name, pg_type FROM fieldsync_control.accepted_types"
                    " WHERE org = %s AND entity = %s",
                    (org, entity),
                ):
                    accepted.setdefault(column, set()).add(pg_type)
            state = _EntityState(
                {name: pg_type for name, pg_type in rows if name not in SYSTEM_COLUMNS},
                tuple(keys[0]) if keys else (),
                accepted,
            )
            self._entities[(org, entity)] = state
        return state

    def ensure_entity(
        self,
        org: str,
        entity: str,
        shape: EntityShape,
        shapes: Sequence[EntityShape] = (),
    ) -> _EntityState:
        """Create the table, log and watermark row, or add the shape's new columns; raise
        :class:`IncompatibleSchema` where ``shape`` or one of ``shapes`` (those the batch's
        events came with) types a column otherwise than the table, unaccepted."""
        self.ensure_org(org)
        state = self._state(org, entity)
        schema = sql.Identifier(self._schema(org))
        table = sql.Identifier(entity)
        if not state.columns:
            self._lock_ddl(f"{self._schema(org)}.{entity}")
            keys = shape.key_names
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(
                    sql.Identifier(c.name),
                    sql.SQL(c.pg_type),
                    sql.SQL(" NOT NULL" if c.is_key else ""),
                )
                for c in shape.columns
            )
            self.conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} ({}, {}, PRIMARY KEY ({}))").format(
                    schema,
                    table,
                    columns,
                    sql.SQL(SYSTEM_DDL),
                    sql.SQL(", ").join(map(sql.Identifier, keys)),
                )
            )
            self.conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {}.{} (_fs_version)").format(
                    sql.Identifier(f"{entity}__version"), schema, table
                )
            )
            self.conn.execute(
                sql.SQL(
                    """
                    CREATE TABLE IF NOT EXISTS {}.{} (
                        version bigint PRIMARY KEY,
                        op char(1) NOT NULL,
                        key jsonb NOT NULL,
                        before jsonb,
                        after jsonb,
                        commit_lsn bigint NOT NULL,
                        lsn bigint NOT NULL,
                        changed_at timestamptz NOT NULL,
                        recorded_at timestamptz NOT NULL DEFAULT now()
                    )
                    """
                ).format(schema, sql.Identifier(f"{entity}__log"))
            )
            self.conn.execute(  # the gateway finds a key's changes after a watermark
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {}.{} (key, version)").format(
                    sql.Identifier(f"{entity}__log_key"),
                    schema,
                    sql.Identifier(f"{entity}__log"),
                )
            )
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {}._fs_entities (entity, key_columns) VALUES (%s, %s)"
                    " ON CONFLICT DO NOTHING"
                ).format(schema),
                (entity, list(keys)),
            )
            self._entities.pop((org, entity), None)
            state = self._state(org, entity)
        conflict = _type_conflict(org, entity, state, [shape, *shapes])
        if conflict is not None:
            raise conflict
        for column in shape.columns:
            if column.name not in state.columns:
                self.conn.execute(
                    sql.SQL("ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS {} {}").format(
                        schema, table, sql.Identifier(column.name), sql.SQL(column.pg_type)
                    )
                )
                state.columns[column.name] = column.pg_type
        return state

    def incompatibility(
        self, org: str, entity: str, events: Sequence[ChangeEvent]
    ) -> IncompatibleSchema | None:
        """The :class:`IncompatibleSchema` :meth:`apply` would raise for these events, found
        by reading the catalog only (nothing is written). A conflict with the cached table
        state is checked again against the catalog: an operator may have altered the column."""
        shapes = _distinct_shapes(events)
        if not shapes:
            return None
        cached = self._entities.get((org, entity))
        if cached is not None and _type_conflict(org, entity, cached, shapes) is None:
            return None  # what apply checks first (a conflict is confirmed in the catalog)
        conflict: IncompatibleSchema | None = None
        for _attempt in range(2):
            try:
                with self.conn.transaction():
                    found = self.conn.execute(
                        "SELECT to_regclass(%s)", (f'"{self._schema(org)}"._fs_entities',)
                    ).fetchone()
                    if found is None or found[0] is None:
                        return None  # a new org: everything will be created
                    state = self._state(org, entity)
            except _STALE_STATE:
                self.forget(org)
                continue
            conflict = _type_conflict(org, entity, state, shapes)
            if conflict is None:
                return None
            self.forget(org)
        return conflict

    # -- apply -------------------------------------------------------------------------
    def apply(self, org: str, entity: str, events: Sequence[ChangeEvent]) -> ApplyResult:
        """Apply one entity's events (any order, duplicates welcome) in one transaction.

        A table or column the cached state names but the database no longer has means another
        schema was swapped in under the org's name (a replay): forget the cache, apply again.
        """
        for _ in range(5):  # a new capture epoch resets the org first (capture_epochs.py)
            try:
                try:
                    return self._apply(org, entity, events)
                except _STALE_STATE:
                    self.forget(org)
                    return self._apply(org, entity, events)
            except capture_epochs.NewCaptureEpoch as new:
                self.forget(org)
                capture_epochs.reset(
                    self.conn, self._schema(org), org, new.epoch, live=self._notify
                )
        raise ProjectionError(f"org {org}: the capture epoch keeps changing ({entity})")

    def apply_together(
        self, groups: Sequence[tuple[str, str, Sequence[ChangeEvent]]]
    ) -> list[ApplyResult]:
        """Apply several entities' events, (org, entity, events) each, in ONE transaction:
        one commit for a batch rather than one per entity, which is most of an entity's cost
        when a batch spreads over many entities with a few events each.

        The entities are locked in (org, entity) order, the order of :func:`capture_epochs.reset`
        too, so concurrent writers cannot deadlock. Anything raised rolls all of it back and
        forgets the cached state of the orgs involved (tables it created are gone); the caller
        then applies entity by entity with :meth:`apply`, which handles each failure (a refused
        value, a new capture epoch, a swapped schema) for its entity alone.
        """
        results = [ApplyResult() for _ in groups]
        try:
            with self.conn.transaction():
                for index in sorted(range(len(groups)), key=lambda i: groups[i][:2]):
                    org, entity, events = groups[index]
                    results[index] = self._apply_in_transaction(org, entity, events)
                faults.reached("before_db_commit")
        except BaseException:
            for org in {org for org, _entity, _events in groups}:
                self.forget(org)
            raise
        return results

    def _apply(self, org: str, entity: str, events: Sequence[ChangeEvent]) -> ApplyResult:
        with self.conn.transaction():
            result = self._apply_in_transaction(org, entity, events)
            faults.reached("before_db_commit")
        return result

    def _apply_in_transaction(
        self, org: str, entity: str, events: Sequence[ChangeEvent]
    ) -> ApplyResult:
        result = ApplyResult()
        if not events:
            return result
        schema = sql.Identifier(self._schema(org))
        shapes = _distinct_shapes(events)
        shape = _merge_shapes(shapes)
        if shape is not None:
            state = self.ensure_entity(org, entity, shape, shapes)
        else:
            self.ensure_org(org)
            state = self._state(org, entity)
            keyed = next((e.shape for e in events if e.shape.key_names), None)
            if not state.columns and keyed is not None:
                # a truncate of an entity never seen, that names its columns (ours do):
                # create the entity, so that the truncate's position is kept and changes
                # older than it, arriving later (from another partition), stay skipped
                state = self.ensure_entity(org, entity, keyed)
            elif not state.columns:  # nothing to create it from: nothing to do
                result.duplicates = len(events)
                return result
        # step 1: serialise writers of this entity
        watermark, t_commit, t_lsn, p_commit, p_lsn, epoch, retired = self.conn.execute(  # type: ignore[misc]
            sql.SQL(
                "SELECT version, truncated_commit_lsn, truncated_lsn,"
                " purged_commit_lsn, purged_lsn, capture_epoch, retired_epochs"
                " FROM {}._fs_entities WHERE entity = %s FOR UPDATE"
            ).format(schema),
            (entity,),
        ).fetchone()
        events, stale = capture_epochs.admit(
            self.conn, self._schema(org), entity, events, (epoch, retired)
        )
        truncate = max((e for e in events if e.op == "t"), key=lambda e: e.position, default=None)
        _newer_truncate = truncate is not None and (
            truncate.position.commit_lsn,
            truncate.position.lsn,
        ) > (t_commit, t_lsn)
        if truncate is not None and _newer_truncate:
            truncated, watermark = self._truncate(org, entity, state, truncate, watermark)
            result.truncated_rows = truncated
            t_commit, t_lsn = truncate.position.commit_lsn, truncate.position.lsn
        truncates = [e for e in events if e.op == "t"]
        applied_truncate = int(_newer_truncate)
        rows = [e for e in events if e.op != "t"]
        newer, written = self._merge(
            org, entity, state, shape, rows, watermark, (t_commit, t_lsn), (p_commit, p_lsn)
        )
        result.applied = newer + applied_truncate
        result.duplicates = len(rows) - newer + len(truncates) - applied_truncate + stale
        watermark += written
        if written or _newer_truncate:
            update = sql.SQL(
                "UPDATE {}._fs_entities SET version = %s, truncated_commit_lsn = %s, "
                "truncated_lsn = %s, updated_at = now() WHERE entity = %s"
            ).format(schema)
            params: tuple[Any, ...] = (watermark, t_commit, t_lsn, entity)
            if self._notify:  # delivered at commit: wakes the gateway's long-polls
                update = sql.SQL(
                    "WITH moved AS ({} RETURNING 1) SELECT pg_notify(%s, %s) FROM moved"
                ).format(update)
                params += (CHANGES_CHANNEL, f"{org}.{entity}:{watermark}")
            self.conn.execute(update, params)
        result.watermark = watermark
        return result

    def _truncate(
        self, org: str, entity: str, state: _EntityState, event: ChangeEvent, watermark: int
    ) -> tuple[int, int]:
        """Step 3: rows older than the truncate become deleted, each with a version and a log
        entry."""
        schema, table = sql.Identifier(self._schema(org)), sql.Identifier(entity)
        log = sql.Identifier(f"{entity}__log")
        keys = [sql.Identifier(k) for k in state.keys]
        key_json = sql.SQL(", ").join(
            sql.SQL("{}, t.{}").format(sql.Literal(k), sql.Identifier(k)) for k in state.keys
        )
        join = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(k) for k in keys)
        statement = sql.SQL(
            """
            WITH gone AS (
                SELECT {keys}, %(wm)s + row_number() OVER (ORDER BY {keys}) AS v
                FROM {schema}.{table}
                WHERE NOT _fs_deleted AND (_fs_commit_lsn, _fs_lsn) < (%(c)s, %(l)s)
            ), before AS (
                SELECT t.* FROM {schema}.{table} t JOIN gone s ON {join}
            ), marked AS (
                UPDATE {schema}.{table} t
                SET _fs_deleted = true, _fs_version = s.v, _fs_commit_lsn = %(c)s, _fs_lsn = %(l)s,
                    _fs_changed_at = to_timestamp(%(ts)s / 1000.0), _fs_epoch = %(epoch)s
                FROM gone s WHERE {join}
                RETURNING t.*
            )
            INSERT INTO {schema}.{log}
                (version, op, key, before, after, commit_lsn, lsn, changed_at)
            SELECT t._fs_version, 't', jsonb_build_object({key_json}), to_jsonb(b) - {system}, NULL,
                   t._fs_commit_lsn, t._fs_lsn, t._fs_changed_at
            FROM marked t JOIN before b ON {join_b}
            """
        ).format(
            keys=sql.SQL(", ").join(keys),
            schema=schema,
            table=table,
            log=log,
            join=join,
            key_json=key_json,
            system=sql.SQL("ARRAY[{}]").format(
                sql.SQL(", ").join(map(sql.Literal, SYSTEM_COLUMNS))
            ),
            join_b=sql.SQL(" AND ").join(sql.SQL("t.{0} = b.{0}").format(k) for k in keys),
        )
        cursor = self.conn.execute(
            statement,
            {
                "wm": watermark,
                "c": event.position.commit_lsn,
                "l": event.position.lsn,
                "ts": event.source_ts_ms,
                "epoch": event.epoch,
            },
        )
        count = cursor.rowcount
        return count, watermark + count

    def _temp_table(self, transport: Sequence[tuple[str, str]]) -> str:
        """The temporary input table with these (column, copy type)."""
        digest = hashlib.sha1(repr(transport).encode(), usedforsecurity=False).hexdigest()[:12]
        name = f"_fs_in_{digest}"
        if name not in self._temp_tables:
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(copy_type))
                for column, copy_type in transport
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} ({}, _fs_op text, _fs_unavailable text[], "
                    "_fs_commit_lsn bigint, _fs_lsn bigint, _fs_changed_at timestamptz, "
                    "_fs_epoch text) "
                    "ON COMMIT DELETE ROWS"
                ).format(sql.Identifier(name), columns)
            )
            self._temp_tables.add(name)
        return name

    def _merge(
        self,
        org: str,
        entity: str,
        state: _EntityState,
        shape: EntityShape | None,
        events: list[ChangeEvent],
        watermark: int,
        truncated: tuple[int, int],
        purged: tuple[int, int],
    ) -> tuple[int, int]:
        """Steps 4 and 5; returns (events newer than staging, rows written with a new version)."""
        if not events or shape is None:
            return 0, 0
        # a column some event types otherwise than the table (a type change the operator
        # accepted, or two schema versions in one batch) travels as text, cast in SQL
        target = {c.name: c.pg_type for c in shape.columns} | state.columns
        as_text = {
            c.name
            for event_shape in _distinct_shapes(events)
            for c in event_shape.columns
            if not _same_type(target[c.name], c.pg_type)
        }
        transport = [
            (c.name, "text" if c.name in as_text else _copy_type(c.pg_type)) for c in shape.columns
        ]
        temp = self._temp_table(transport)
        names = [c.name for c in shape.columns]
        copy_columns = [
            *names,
            "_fs_op",
            "_fs_unavailable",
            "_fs_commit_lsn",
            "_fs_lsn",
            "_fs_changed_at",
            "_fs_epoch",
        ]
        types = [copy_type for _, copy_type in transport] + [
            "text",
            "text[]",
            "int8",
            "int8",
            "timestamptz",
            "text",
        ]
        from datetime import UTC, datetime

        events = _carry_unavailable(events)
        with self.conn.cursor().copy(
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                sql.Identifier(temp), sql.SQL(", ").join(map(sql.Identifier, copy_columns))
            )
        ) as copy:
            copy.set_types(types)
            for event in events:
                image = event.after if event.op != "d" else event.before
                image = image or {}
                key = event.key or {}
                values = []
                unavailable = []
                for column in shape.columns:
                    value = key[column.name] if column.is_key else image.get(column.name)
                    if value is UNAVAILABLE:
                        unavailable.append(column.name)
                        value = None
                    elif value is not None and column.name in as_text:
                        value = _as_text(value)
                    elif (
                        value is not None
                        and _copy_type(column.pg_type) == "text"
                        and column.pg_type != "text"
                    ):
                        value = str(value)
                    elif (
                        value is not None
                        and column.pg_type.endswith("[]")
                        and _copy_type(column.pg_type) == "text[]"
                    ):
                        value = [None if v is None else str(v) for v in value]
                    values.append(value)
                copy.write_row(
                    [
                        *values,
                        event.op,
                        unavailable or None,
                        event.position.commit_lsn,
                        event.position.lsn,
                        datetime.fromtimestamp(event.source_ts_ms / 1000, UTC),
                        event.epoch,
                    ]
                )
        return self._merge_statement(org, entity, state, shape, temp, watermark, truncated, purged)

    def _merge_statement(
        self,
        org: str,
        entity: str,
        state: _EntityState,
        shape: EntityShape,
        temp: str,
        watermark: int,
        truncated: tuple[int, int],
        purged: tuple[int, int],
    ) -> tuple[int, int]:
        cache_key = (
            self._schema(org),
            entity,
            shape,
            tuple(state.keys),
            tuple(sorted(state.columns.items())),
            temp,
        )
        statement = self._merge_sql.get(cache_key)
        if statement is None:
            if len(self._merge_sql) > 10_000:  # bounded: entities x shapes in use
                self._merge_sql.clear()
            statement = self._merge_sql[cache_key] = self._compose_merge(
                org, entity, state, shape, temp
            ).as_bytes(self.conn)
        row = self.conn.execute(
            statement,
            {
                "wm": watermark,
                "tc": truncated[0],
                "tl": truncated[1],
                "pc": purged[0],
                "pl": purged[1],
            },
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def _compose_merge(
        self, org: str, entity: str, state: _EntityState, shape: EntityShape, temp: str
    ) -> sql.Composed:
        schema, table = sql.Identifier(self._schema(org)), sql.Identifier(entity)
        log = sql.Identifier(f"{entity}__log")
        keys = [sql.Identifier(k) for k in state.keys]

        def on(a: str, b: str) -> sql.Composed:
            return sql.SQL(" AND ").join(
                sql.SQL("{}.{} = {}.{}").format(sql.Identifier(a), k, sql.Identifier(b), k)
                for k in keys
            )

        value_columns = [c for c in shape.columns if not c.is_key]

        def cast(c: ColumnSpec) -> sql.Composed:
            return sql.SQL("f.{}").format(sql.Identifier(c.name))

        def typed(c: ColumnSpec) -> sql.Composed:
            return sql.SQL("{0}::{1} AS {0}").format(
                sql.Identifier(c.name), sql.SQL(state.columns.get(c.name, c.pg_type))
            )

        # keys are cast at once (they are compared with the table's); the other values only
        # for the changes that are newer: a duplicate's value never fails a cast (one from
        # before a type change an operator accepted, redelivered after it was applied)
        incoming_columns = sql.SQL(", ").join(
            typed(c) if c.is_key else sql.Identifier(c.name) for c in shape.columns
        )
        fresh_columns = sql.SQL(", ").join(
            sql.Identifier(c.name) if c.is_key else typed(c) for c in shape.columns
        )
        sets = sql.SQL(", ").join(
            sql.SQL(
                "{col} = CASE"
                " WHEN f._fs_op = 'd' OR {name} = ANY(coalesce(f._fs_unavailable, '{{}}'))"
                " THEN t.{col} ELSE {value} END"
            ).format(col=sql.Identifier(c.name), name=sql.Literal(c.name), value=cast(c))
            for c in value_columns
        )
        insert_columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in shape.columns)
        insert_values = sql.SQL(", ").join(
            cast(c)
            if c.is_key
            else sql.SQL("CASE WHEN f._fs_op = 'd' THEN NULL ELSE {} END").format(cast(c))
            for c in shape.columns
        )
        system = sql.SQL("ARRAY[{}]").format(sql.SQL(", ").join(map(sql.Literal, SYSTEM_COLUMNS)))
        key_json = sql.SQL(", ").join(
            sql.SQL("{}, w.{}").format(sql.Literal(k), sql.Identifier(k)) for k in state.keys
        )
        return sql.SQL(
            """
            WITH incoming AS (  -- taken out: the next entity of the transaction fills it anew
                DELETE FROM {temp}
                RETURNING {incoming_columns}, _fs_op, _fs_unavailable, _fs_commit_lsn, _fs_lsn,
                          _fs_changed_at, _fs_epoch
            ), cur AS (
                SELECT t.* FROM {schema}.{table} t
                WHERE ({key_list}) IN (SELECT {key_list} FROM incoming)
                FOR UPDATE OF t
            ), newer AS (
                SELECT i.*, c.{first_key} IS NOT NULL AS _existed
                FROM incoming i LEFT JOIN cur c ON {on_ic}
                -- newer than the stored row; a key staging no longer holds must be newer than the
                -- newest purged delete (else it would resurrect a delete purged at the horizon)
                WHERE ((c.{first_key} IS NULL AND (i._fs_commit_lsn, i._fs_lsn) > (%(pc)s, %(pl)s))
                       OR (i._fs_commit_lsn, i._fs_lsn) > (c._fs_commit_lsn, c._fs_lsn))
                  AND (i._fs_commit_lsn, i._fs_lsn) > (%(tc)s, %(tl)s)
            ), newest AS (
                SELECT DISTINCT ON ({key_list}) * FROM newer
                ORDER BY {key_list}, _fs_commit_lsn DESC, _fs_lsn DESC
            ), fresh AS (
                SELECT {fresh_columns}, _fs_op, _fs_unavailable, _fs_commit_lsn, _fs_lsn,
                       _fs_changed_at, _fs_epoch, _existed,
                       %(wm)s + row_number() OVER (ORDER BY _fs_commit_lsn, _fs_lsn) AS _new_version
                FROM newest
            ), updated AS (
                UPDATE {schema}.{table} t SET {sets},
                    _fs_version = f._new_version, _fs_deleted = (f._fs_op = 'd'),
                    _fs_commit_lsn = f._fs_commit_lsn, _fs_lsn = f._fs_lsn,
                    _fs_changed_at = f._fs_changed_at, _fs_epoch = f._fs_epoch
                FROM fresh f WHERE f._existed AND {on_tf}
                RETURNING t.*
            ), inserted AS (
                INSERT INTO {schema}.{table} ({insert_columns}, _fs_version, _fs_deleted,
                                              _fs_commit_lsn, _fs_lsn, _fs_changed_at, _fs_epoch)
                SELECT {insert_values}, f._new_version, f._fs_op = 'd',
                       f._fs_commit_lsn, f._fs_lsn, f._fs_changed_at, f._fs_epoch
                FROM fresh f WHERE NOT f._existed
                RETURNING *
            ), written AS (
                SELECT * FROM updated UNION ALL SELECT * FROM inserted
            ), logged AS (
                INSERT INTO {schema}.{log}
                    (version, op, key, before, after, commit_lsn, lsn, changed_at)
                SELECT w._fs_version, f._fs_op, jsonb_build_object({key_json}),
                       CASE WHEN c.{first_key} IS NULL OR c._fs_deleted THEN NULL
                            ELSE to_jsonb(c) - {system} END,
                       CASE WHEN w._fs_deleted THEN NULL ELSE to_jsonb(w) - {system} END,
                       w._fs_commit_lsn, w._fs_lsn, w._fs_changed_at
                FROM written w JOIN fresh f ON {on_wf} LEFT JOIN cur c ON {on_wc}
                RETURNING 1
            )
            SELECT (SELECT count(*)
                    FROM (SELECT DISTINCT {key_list}, _fs_commit_lsn, _fs_lsn FROM newer) d),
                   (SELECT count(*) FROM logged)
            """
        ).format(
            schema=schema,
            table=table,
            log=log,
            temp=sql.Identifier(temp),
            sets=sets,
            incoming_columns=incoming_columns,
            fresh_columns=fresh_columns,
            first_key=keys[0],
            key_list=sql.SQL(", ").join(keys),
            insert_columns=insert_columns,
            insert_values=insert_values,
            key_json=key_json,
            system=system,
            on_ic=on("i", "c"),
            on_tf=on("t", "f"),
            on_wf=on("w", "f"),
            on_wc=on("w", "c"),
        )


def _type_conflict(
    org: str, entity: str, state: _EntityState, shapes: Sequence[EntityShape]
) -> IncompatibleSchema | None:
    conflicts: dict[str, tuple[str, str, str]] = {}
    for shape in shapes:
        for column in shape.columns:
            existing = state.columns.get(column.name)
            if (
                existing is not None
                and column.name not in conflicts
                and not _same_type(existing, column.pg_type)
                and not any(
                    _same_type(t, column.pg_type) for t in state.accepted.get(column.name, ())
                )
            ):
                conflicts[column.name] = (column.name, existing, column.pg_type)
    if not conflicts:
        return None
    changes = ", ".join(
        f"column {column} changed type from {old} to {new}"
        for column, old, new in conflicts.values()
    )
    return IncompatibleSchema(
        f"org {org}, entity {entity}: {changes}; make staging match (ALTER TABLE, or a replay "
        f"into a new schema), then: fieldsync org resume {org} --entity {entity}",
        list(conflicts.values()),
    )


def _distinct_shapes(events: Sequence[ChangeEvent]) -> list[EntityShape]:
    """The shapes of the events that carry rows, each once, oldest first."""
    seen: dict[int, EntityShape] = {}
    for event in sorted(events, key=lambda e: e.position):
        if event.op != "t" and id(event.shape) not in seen:
            seen[id(event.shape)] = event.shape
    return list(seen.values())


def _as_text(value: Any) -> str:
    """A value as PostgreSQL's text input of its type reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list):
        items = (
            "NULL"
            if item is None
            else '"' + _as_text(item).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for item in value
        )
        return "{" + ",".join(items) + "}"
    return str(value)


def _same_type(existing: str, incoming: str) -> bool:
    aliases = {
        "timestamp": "timestamp without time zone",
        "timestamptz": "timestamp with time zone",
        "time": "time without time zone",
    }
    return aliases.get(existing, existing) == aliases.get(incoming, incoming) or (
        existing.startswith("numeric") and incoming.startswith("numeric")
    )


def _carry_unavailable(events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
    """Only a key's newest event of a batch is applied, and an unchanged-TOAST placeholder in
    it keeps the *stored* value — which is older than a value an earlier event of the same
    batch set. Fill such placeholders from the batch's earlier events of the key."""
    known: dict[tuple[Any, ...], dict[str, Any]] = {}
    result = []
    for event in sorted(events, key=lambda e: e.position):
        key = tuple(sorted((event.key or {}).items()))
        if event.op == "d" or event.op == "t":
            known.pop(key, None)
        elif event.after is not None:
            seen = known.setdefault(key, {})
            after = event.after
            if seen and any(v is UNAVAILABLE for v in after.values()):
                after = {c: seen.get(c, v) if v is UNAVAILABLE else v for c, v in after.items()}
                event = replace(event, after=after)
            seen.update((c, v) for c, v in after.items() if v is not UNAVAILABLE)
        result.append(event)
    return result


def _merge_shapes(shapes: Sequence[EntityShape]) -> EntityShape | None:
    """The union of the batch's shapes (oldest first), columns in first-seen order (newest
    type wins)."""
    if not shapes:
        return None
    merged: dict[str, ColumnSpec] = {}
    for shape in shapes:
        for column in shape.columns:
            merged[column.name] = column
    return EntityShape(tuple(merged.values()))
