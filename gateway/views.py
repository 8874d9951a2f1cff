"""A user's filtered view of a staging entity, at a watermark: bootstrap pages and deltas.

Everything rests on one reconstruction: the state of a key at watermark ``W`` is the ``before``
image of its first change-log entry above ``W`` if there is one (null: the key did not exist),
else its current staging row (absent if deleted). The log keeps every entry above the retention
horizon, so for any ``W`` at or above the horizon this is exact, whatever the projector has
written since — which makes every page a pure function of its token: a page retried after a cut
connection is byte-for-byte the same page.

* **Bootstrap page** at ``(W, now)`` after key ``k``: current rows with version ≤ ``W`` that the
  rules admit, in key order, plus the reconstructed rows of keys changed above ``W`` in the
  page's key range.
* **Delta page** from ``(W_old, now_old)`` to ``(W_new, now_new)``: candidates are keys changed in
  ``(W_old, W_new]``, rows a relative time window moved in or out of the view, and (for related
  rules) keys the parent entity's changes point at. For each the rules are evaluated on the
  state at the old and at the new watermark: visible now and changed or newly visible → upsert;
  visible before and not now → removal. A removal names only a key the user could see at the old
  watermark, an upsert only a row the user sees at the new one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from engine.projections.staging import SYSTEM_COLUMNS, org_schema
from gateway.access import OfflineConfig, ProfileItem, UserView
from gateway.filters import Compiled, compile_filter

SYSTEM = sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, SYSTEM_COLUMNS)))
Side = str  # "new" | "old"


@dataclass(frozen=True)
class EntityMeta:
    """An entity as staging has it: source columns (name → type, in table order) and key."""

    entity: str
    columns: Mapping[str, str]
    keys: tuple[str, ...]


def load_catalog(conn: psycopg.Connection[Any], org: str) -> dict[str, EntityMeta]:
    """Every staging entity of ``org`` (empty when the org has no staging schema yet)."""
    schema = org_schema(org)
    rows = conn.execute(
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relname NOT LIKE '%%\\_\\_log' AND c.relname <> '_fs_entities'
        ORDER BY c.relname, a.attnum
        """,
        (schema,),
    ).fetchall()
    if not rows:
        return {}
    keys = dict(
        conn.execute(
            sql.SQL("SELECT entity, key_columns FROM {}._fs_entities").format(
                sql.Identifier(schema)
            )
        ).fetchall()
    )
    columns: dict[str, dict[str, str]] = {}
    for table, column, pg_type in rows:
        if column not in SYSTEM_COLUMNS:
            columns.setdefault(table, {})[column] = pg_type
    return {
        entity: EntityMeta(entity, cols, tuple(keys[entity]))
        for entity, cols in columns.items()
        if entity in keys
    }


@dataclass(frozen=True)
class Marks:
    watermark: int
    horizon: int


def read_marks(conn: psycopg.Connection[Any], org: str) -> dict[str, Marks]:
    rows = conn.execute(
        sql.SQL("SELECT entity, version, horizon_version FROM {}._fs_entities").format(
            sql.Identifier(org_schema(org))
        )
    ).fetchall()
    return {entity: Marks(version, horizon) for entity, version, horizon in rows}


@dataclass
class RuleSQL:
    """The rules of one user for one entity, compiled to SQL predicates (placeholders only)."""

    view: UserView
    config: OfflineConfig
    catalog: Mapping[str, EntityMeta]
    entity: str
    compiled: Compiled = field(default_factory=Compiled)

    def __post_init__(self) -> None:
        self.compiled.params["user_id"] = self.view.user
        self.compiled.params["team_ids"] = list(self.view.teams)

    @property
    def meta(self) -> EntityMeta:
        return self.catalog[self.entity]

    @property
    def parents(self) -> list[str]:
        """Entities whose rows decide this one's related rules (their watermarks go in tokens)."""
        return sorted(
            {i.related.entity for i in self.view.items[self.entity] if i.related is not None}
        )

    @property
    def sees_everything(self) -> bool:
        """Every row of the entity is in the view (a rule of distribution ``all``)."""
        return any(i.distribution == "all" for i in self.view.items[self.entity])

    def predicate(self, alias: str, side: Side, *, windows: bool = False) -> sql.Composable:
        """OR of the entity's rules over ``alias``, at ``%(now_<side>)s`` and, for related rules,
        the parents' state at ``%(rw_<parent>_<side>)s``."""
        return self._rules(self.entity, self.view.items[self.entity], alias, side, windows)

    def _rules(
        self,
        entity: str,
        items: Sequence[ProfileItem],
        alias: str,
        side: Side,
        windows: bool,
    ) -> sql.Composable:
        parts = [self._rule(entity, item, alias, side, windows) for item in items]
        return sql.SQL("coalesce(({}), false)").format(sql.SQL(" OR ").join(parts))

    def _rule(
        self, entity: str, item: ProfileItem, alias: str, side: Side, windows: bool
    ) -> sql.Composable:
        other = "old" if side == "new" else "new"
        if item.distribution == "all":
            return sql.SQL("true")
        if item.distribution in ("owner", "team"):
            owner = self.config.entities[entity].owner_column
            column = sql.Identifier(alias, owner or "")
            if item.distribution == "owner":
                return sql.SQL("({}::text = %(user_id)s)").format(column)
            return sql.SQL("({}::text = ANY(%(team_ids)s::text[]))").format(column)
        if item.distribution == "custom":
            assert item.filter is not None
            before = len(self.compiled.windows)
            predicate = compile_filter(
                item.filter,
                self.catalog[entity].columns,
                alias,
                self.compiled,
                user_params=self.view.params,
                clocks=(f"now_{side}", f"now_{other}"),
            )
            if not windows:  # only the candidate query asks for the window atoms
                del self.compiled.windows[before:]
            return predicate
        assert item.related is not None
        return self._related(item.related.entity, item.related.column, alias, side)

    def _related(self, parent: str, column: str, alias: str, side: Side) -> sql.Composable:
        """A parent row the user sees, at the parent's watermark, references this row's key."""
        (key,) = self.meta.keys
        schema = sql.Identifier(org_schema(self.view.org))
        table, log = sql.Identifier(parent), sql.Identifier(f"{parent}__log")
        mark = sql.Placeholder(f"rw_{parent}_{side}")
        parent_rules = self._rules(
            parent,
            [i for i in self.view.items[parent] if i.distribution != "related"],
            "p",
            side,
            False,
        )
        return sql.SQL(
            """(EXISTS (SELECT 1 FROM {schema}.{table} p
                        WHERE p.{column} = {alias}.{key} AND NOT p._fs_deleted
                          AND p._fs_version <= {mark} AND {rules})
               OR EXISTS (SELECT 1 FROM (SELECT DISTINCT ON (l.key) l.before FROM {schema}.{log} l
                                         WHERE l.version > {mark} ORDER BY l.key, l.version) x
                          CROSS JOIN LATERAL
                              jsonb_populate_record(NULL::{schema}.{table}, x.before) p
                          WHERE x.before IS NOT NULL AND p.{column} = {alias}.{key} AND {rules}))"""
        ).format(
            schema=schema,
            table=table,
            log=log,
            column=sql.Identifier(column),
            alias=sql.Identifier(alias),
            key=sql.Identifier(key),
            mark=mark,
            rules=parent_rules,
        )


def _key_object(alias: str, keys: Sequence[str]) -> sql.Composable:
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(k), sql.Identifier(alias, k)) for k in keys
        )
    )


def _columns(alias: str, meta: EntityMeta) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in meta.columns)


@dataclass(frozen=True)
class Page:
    rows: list[bytes]  # JSON objects of source columns, as PostgreSQL wrote them
    removed: list[bytes]  # JSON key objects
    last_key: str | None  # JSON of the page's last key; None = nothing after this page


def _key_of(row: bytes, keys: Sequence[str]) -> str:
    """The key object of a row as JSON (exact: numbers keep their digits)."""
    import json
    from decimal import Decimal

    values = json.loads(row, parse_float=Decimal)
    return json.dumps({k: values[k] for k in keys}, default=str)


def _bind_key(meta: EntityMeta, prefix: str, key: str, bound: dict[str, Any]) -> sql.Composable:
    """The JSON key object ``key`` as a row of typed placeholders; its values go to ``bound``."""
    import orjson

    values = orjson.loads(key)
    for i, column in enumerate(meta.keys):
        value = values[column]
        bound[f"{prefix}_{i}"] = None if value is None else str(value)
    return sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Placeholder(f"{prefix}_{i}"), sql.SQL(meta.columns[k]))
        for i, k in enumerate(meta.keys)
    )


def bootstrap_page(
    conn: psycopg.Connection[Any],
    rule: RuleSQL,
    watermark: int,
    params: Mapping[str, Any],
    after: str | None,
    limit: int,
) -> Page:
    """Rows of the user's view at ``watermark`` with keys after ``after`` (a JSON key object)."""
    meta = rule.meta
    schema, table = sql.Identifier(org_schema(rule.view.org)), sql.Identifier(meta.entity)
    log = sql.Identifier(f"{meta.entity}__log")
    keys = sql.SQL(", ").join(sql.Identifier("t", k) for k in meta.keys)
    predicate = rule.predicate("t", "new")  # before binding: compiling adds parameters
    bound: dict[str, Any] = {**rule.compiled.params, **params, "w": watermark, "lim": limit}
    after_clause: sql.Composable = sql.SQL("")
    if after is not None:
        after_clause = sql.SQL("AND ({}) > ({})").format(keys, _bind_key(meta, "a", after, bound))
    main = sql.SQL(
        """SELECT row_to_json(r)::text FROM (
             SELECT {cols} FROM {schema}.{table} t
             WHERE NOT t._fs_deleted AND t._fs_version <= %(w)s AND {predicate} {after}
             ORDER BY {keys} LIMIT %(lim)s) r"""
    ).format(
        cols=_columns("t", meta),
        schema=schema,
        table=table,
        predicate=predicate,
        after=after_clause,
        keys=keys,
    )
    rows = [row.encode() for (row,) in conn.execute(main, bound)]
    last = _key_of(rows[-1], meta.keys) if len(rows) == limit else None
    # keys changed above the watermark: their state at it, in this page's key range
    upto_clause: sql.Composable = sql.SQL("")
    if last is not None:
        upto_clause = sql.SQL("AND ({}) <= ({})").format(keys, _bind_key(meta, "u", last, bound))
    extra = sql.SQL(
        """SELECT row_to_json(r)::text FROM (
             SELECT {cols}
             FROM (SELECT DISTINCT ON (l.key) l.before FROM {schema}.{log} l
                   WHERE l.version > %(w)s ORDER BY l.key, l.version) x
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{table}, x.before) t
             WHERE x.before IS NOT NULL AND {predicate} {after} {upto}) r"""
    ).format(
        cols=_columns("t", meta),
        schema=schema,
        log=log,
        table=table,
        predicate=predicate,
        after=after_clause,
        upto=upto_clause,
    )
    rows += [row.encode() for (row,) in conn.execute(extra, bound)]
    return Page(rows, [], last)


def delta_page(
    conn: psycopg.Connection[Any],
    rule: RuleSQL,
    w_old: int,
    w_new: int,
    params: Mapping[str, Any],
    after: str | None,
    limit: int,
) -> Page:
    """Upserts and removals between two watermarks for the candidates after key ``after``."""
    meta = rule.meta
    schema, table = sql.Identifier(org_schema(rule.view.org)), sql.Identifier(meta.entity)
    log = sql.Identifier(f"{meta.entity}__log")
    pred_new = rule.predicate("n", "new")
    pred_old = rule.predicate("o", "old")
    # keys changed in the window whose state at either end may be in the view: the state at
    # w_old is the before image of the key's first change after it, the state at w_new the
    # after image of its last change up to it (the log's images are whole staging rows), so a
    # key none of whose images passes either side's rules can neither appear nor leave
    if rule.sees_everything:
        candidates: list[sql.Composable] = [
            sql.SQL(
                "SELECT l.key FROM {}.{} l WHERE l.version > %(w_old)s AND l.version <= %(w_new)s"
            ).format(schema, log)
        ]
    else:
        candidates = [
            sql.SQL(
                "SELECT l.key FROM {schema}.{log} l"
                " CROSS JOIN LATERAL (VALUES (l.before), (l.after)) v(img)"
                " CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{table}, v.img) f"
                " WHERE l.version > %(w_old)s AND l.version <= %(w_new)s AND v.img IS NOT NULL"
                " AND ({old} OR {new})"
            ).format(
                schema=schema,
                log=log,
                table=table,
                old=rule.predicate("f", "old"),
                new=rule.predicate("f", "new"),
            )
        ]
    # rows a moving time window may have carried in or out of the view
    rule.compiled.windows.clear()
    rule.predicate("t", "new", windows=True)
    if rule.compiled.windows:
        moved = sql.SQL(" OR ").join(
            sql.SQL("({} IS DISTINCT FROM {})").format(a, b) for a, b in rule.compiled.windows
        )
        candidates.append(
            sql.SQL("SELECT {} FROM {}.{} t WHERE NOT t._fs_deleted AND ({})").format(
                _key_object("t", meta.keys), schema, table, moved
            )
        )
        candidates.append(
            sql.SQL(
                "SELECT l.key FROM {}.{} l"
                " CROSS JOIN LATERAL jsonb_populate_record(NULL::{}.{}, l.before) t"
                " WHERE l.version > %(w_new)s AND l.before IS NOT NULL AND ({})"
            ).format(schema, log, schema, table, moved)
        )
    # keys that changes of a parent entity point at (related rules)
    for parent in rule.parents:
        parent_items = [i for i in rule.view.items[parent] if i.distribution != "related"]
        # and keys of parent rows a moving time window carried in or out of the parent's view
        rule.compiled.windows.clear()
        rule._rules(parent, parent_items, "p", "new", True)  # the window atoms over alias p
        parent_moved = sql.SQL(" OR ").join(
            sql.SQL("({} IS DISTINCT FROM {})").format(a, b) for a, b in rule.compiled.windows
        )
        for item in rule.view.items[meta.entity]:
            if item.related is None or item.related.entity != parent:
                continue
            (key,) = meta.keys
            column = sql.Literal(item.related.column)
            if rule.compiled.windows:
                candidates.append(
                    sql.SQL(
                        "SELECT jsonb_build_object({key}, to_jsonb(p.{column})) FROM {schema}.{p}"
                        " p WHERE NOT p._fs_deleted AND p.{column} IS NOT NULL AND ({moved})"
                    ).format(
                        key=sql.Literal(key),
                        column=sql.Identifier(item.related.column),
                        schema=schema,
                        p=sql.Identifier(parent),
                        moved=parent_moved,
                    )
                )
            # parent images that point at a key; only those the parent's rules pass on either
            # side can change whether that key is seen (the same argument as above)
            candidates.append(
                sql.SQL(
                    "SELECT jsonb_build_object({key}, img -> {column}) FROM {schema}.{plog} l"
                    " CROSS JOIN LATERAL (VALUES (l.before), (l.after)) v(img)"
                    " CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{p}, v.img) p"
                    " WHERE l.version > {mark} AND img ? {column}"
                    " AND img -> {column} <> 'null'::jsonb AND ({old} OR {new})"
                ).format(
                    key=sql.Literal(key),
                    column=column,
                    schema=schema,
                    plog=sql.Identifier(f"{parent}__log"),
                    p=sql.Identifier(parent),
                    mark=sql.Placeholder(f"rw_{parent}_old"),
                    old=rule._rules(parent, parent_items, "p", "old", False),
                    new=rule._rules(parent, parent_items, "p", "new", False),
                )
            )
    after_clause = sql.SQL("WHERE u.key > %(after)s::jsonb") if after is not None else sql.SQL("")
    join = sql.SQL(" AND ").join(
        sql.SQL("t.{0} = k.{0}").format(sql.Identifier(k)) for k in meta.keys
    )

    def state_at(mark: str, name: str) -> sql.Composable:
        return sql.SQL(
            """LEFT JOIN LATERAL (SELECT true AS found, l.before FROM {schema}.{log} l
                                  WHERE l.key = c.key AND l.version > {mark}
                                  ORDER BY l.version LIMIT 1) {name} ON true"""
        ).format(schema=schema, log=log, mark=sql.Placeholder(mark), name=sql.Identifier(name))

    statement = sql.SQL(
        """
        WITH cand AS (
            SELECT u.key FROM ({union}) u {after} GROUP BY u.key ORDER BY u.key LIMIT %(lim)s
        ), img AS MATERIALIZED (
            SELECT c.key,
                   CASE WHEN so.found THEN so.before WHEN t._fs_deleted IS NOT false THEN NULL
                        ELSE to_jsonb(t) - {system} END AS old_img,
                   CASE WHEN sn.found THEN sn.before WHEN t._fs_deleted IS NOT false THEN NULL
                        ELSE to_jsonb(t) - {system} END AS new_img,
                   EXISTS (SELECT 1 FROM {schema}.{log} l WHERE l.key = c.key
                           AND l.version > %(w_old)s AND l.version <= %(w_new)s) AS changed
            FROM cand c
            CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{table}, c.key) k
            LEFT JOIN {schema}.{table} t ON {join}
            {state_old}
            {state_new}
        )
        SELECT i.key::text, i.new_img::text,
               i.old_img IS NOT NULL AND {pred_old} AS vis_old,
               i.new_img IS NOT NULL AND {pred_new} AS vis_new,
               i.changed
        FROM img i
        CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{table}, i.old_img) o
        CROSS JOIN LATERAL jsonb_populate_record(NULL::{schema}.{table}, i.new_img) n
        ORDER BY i.key
        """
    ).format(
        union=sql.SQL(" UNION ALL ").join(candidates),
        after=after_clause,
        system=SYSTEM,
        schema=schema,
        log=log,
        table=table,
        join=join,
        state_old=state_at("w_old", "so"),
        state_new=state_at("w_new", "sn"),
        pred_old=pred_old,
        pred_new=pred_new,
    )
    bound = {
        **rule.compiled.params,
        **params,
        "w_old": w_old,
        "w_new": w_new,
        "after": after,
        "lim": limit,
    }
    found = conn.execute(statement, bound).fetchall()
    rows: list[bytes] = []
    removed: list[bytes] = []
    for key, new_img, vis_old, vis_new, changed in found:
        if vis_new and (changed or not vis_old):
            rows.append(new_img.encode())
        elif vis_old and not vis_new:
            removed.append(key.encode())
    last = found[-1][0] if len(found) == limit else None
    return Page(rows, removed, last)


__all__ = [
    "EntityMeta",
    "Marks",
    "Page",
    "RuleSQL",
    "bootstrap_page",
    "delta_page",
    "load_catalog",
    "read_marks",
]
