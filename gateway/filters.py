"""Sync filters: a small JSON language compiled to parameterised SQL.

A filter is a condition or a combination::

    {"field": "status", "op": "eq", "value": "open"}
    {"field": "owner_id", "op": "eq", "value": "$user_id"}
    {"field": "modified_at", "op": "last_days", "value": 30}
    {"and": [f, …]}   {"or": [f, …]}   {"not": f}

Operators: ``eq ne lt le gt ge`` (one value), ``in not_in`` (a list), ``is_null not_null`` (no
value), ``starts_with`` (text), and the relative windows ``last_days`` (the field lies within
the last N days), ``next_days`` (within the next N days) and ``older_than_days``. Parameters:
``$user_id`` (the device user) with ``eq``/``ne``, ``$team_ids`` (the user's teams) with
``in``/``not_in``.

:func:`validate_filter` checks a filter against the columns an entity really has when it is
configured and names the field and the problem. :func:`compile_filter` turns a validated filter
into a :class:`psycopg.sql.Composable` over a table alias whose values are all placeholders:
nothing user-supplied reaches SQL text. Column types come from the staging catalog.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg import sql

COMPARISONS = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
LISTS = {"in", "not_in"}
NULLS = {"is_null", "not_null"}
WINDOWS = {"last_days", "next_days", "older_than_days"}
OPERATORS = set(COMPARISONS) | LISTS | NULLS | WINDOWS | {"starts_with"}
PARAMETERS = {"$user_id": ("eq", "ne"), "$team_ids": ("in", "not_in")}
MAX_DEPTH = 16
MAX_WINDOW_DAYS = 36_500

_NUMERIC = re.compile(r"^(smallint|integer|bigint|real|double precision|numeric(\(\d+,\s*\d+\))?)$")
_TEMPORAL = re.compile(r"^(date|timestamp(tz)?( with(out)? time zone)?)$")
_TEXT = re.compile(r"^(text|character varying(\(\d+\))?|varchar(\(\d+\))?|character(\(\d+\))?)$")
_SAFE_TYPE = re.compile(r"^[a-z][a-z0-9 _(),]*(\[\])?$")


class FilterError(ValueError):
    """A filter that cannot be used; the message names the path, the field and the problem."""


def _kind(pg_type: str) -> str:
    if _NUMERIC.match(pg_type):
        return "number"
    if _TEMPORAL.match(pg_type):
        return "time"
    if _TEXT.match(pg_type):
        return "text"
    if pg_type == "boolean":
        return "bool"
    if pg_type == "uuid":
        return "uuid"
    return "other"


def _check_value(path: str, name: str, pg_type: str, value: Any) -> None:
    """A literal must be usable as the column's type (checked here, cast in SQL)."""
    kind = _kind(pg_type)
    ok: bool
    if value is None:
        raise FilterError(f"{path}: field {name!r}: use is_null/not_null to compare with null")
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(value, str):
            try:
                Decimal(value)
                ok = True
            except InvalidOperation:
                ok = False
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "time":
        ok = isinstance(value, str) and _parses_as_time(value)
    elif kind == "uuid":
        ok = isinstance(value, str) and _parses_as_uuid(value)
    elif kind == "text":
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, str | int | float | bool)
    if not ok:
        raise FilterError(f"{path}: field {name!r} is {pg_type}; {value!r} is not a {kind} value")


def _parses_as_time(value: str) -> bool:
    for parse in (datetime.fromisoformat, date.fromisoformat):
        try:
            parse(value)
            return True
        except ValueError:
            continue
    return False


def _parses_as_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False


def validate_filter(
    node: Any, columns: Mapping[str, str], path: str = "filter", depth: int = 0
) -> None:
    """Raise :class:`FilterError` unless ``node`` is a filter over ``columns`` (name → type)."""
    if depth > MAX_DEPTH:
        raise FilterError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise FilterError(f"{path}: expected an object, got {type(node).__name__}")
    combinators = {"and", "or", "not"} & node.keys()
    if combinators:
        if len(node) != 1:
            raise FilterError(f"{path}: {sorted(combinators)[0]!r} must be the only key")
        (combinator,) = combinators
        body = node[combinator]
        if combinator == "not":
            validate_filter(body, columns, f"{path}.not", depth + 1)
            return
        if not isinstance(body, list) or not body:
            raise FilterError(f"{path}.{combinator}: expected a non-empty list of filters")
        for index, child in enumerate(body):
            validate_filter(child, columns, f"{path}.{combinator}[{index}]", depth + 1)
        return
    unknown = node.keys() - {"field", "op", "value"}
    if unknown:
        raise FilterError(f"{path}: unknown keys {sorted(unknown)}")
    name, op = node.get("field"), node.get("op")
    if not isinstance(name, str) or not name:
        raise FilterError(f"{path}: 'field' must name a column")
    if name not in columns:
        raise FilterError(
            f"{path}: field {name!r} does not exist; columns are {', '.join(sorted(columns))}"
        )
    pg_type = columns[name]
    if op not in OPERATORS:
        raise FilterError(
            f"{path}: field {name!r}: unknown op {op!r}; use one of {', '.join(sorted(OPERATORS))}"
        )
    value = node.get("value")
    if op in NULLS:
        if "value" in node:
            raise FilterError(f"{path}: field {name!r}: {op} takes no value")
        return
    if "value" not in node:
        raise FilterError(f"{path}: field {name!r}: {op} needs a value")
    if isinstance(value, str) and value.startswith("$"):
        if value not in PARAMETERS:
            raise FilterError(
                f"{path}: field {name!r}: unknown parameter {value!r}; "
                f"parameters are {', '.join(sorted(PARAMETERS))}"
            )
        if op not in PARAMETERS[value]:
            raise FilterError(
                f"{path}: field {name!r}: {value} works with {'/'.join(PARAMETERS[value])}, "
                f"not {op}"
            )
        if _kind(pg_type) not in ("text", "uuid", "number", "other"):
            raise FilterError(f"{path}: field {name!r} is {pg_type}; it cannot hold {value}")
        return
    if op in WINDOWS:
        if _kind(pg_type) != "time":
            raise FilterError(f"{path}: field {name!r} is {pg_type}; {op} needs a date or time")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 36_500:
            raise FilterError(f"{path}: field {name!r}: {op} needs a whole number of days 1..36500")
        return
    if op == "starts_with":
        if _kind(pg_type) != "text" or not isinstance(value, str):
            raise FilterError(f"{path}: field {name!r}: starts_with needs a text column and text")
        return
    if op in LISTS:
        if not isinstance(value, list) or not value:
            raise FilterError(f"{path}: field {name!r}: {op} needs a non-empty list")
        for item in value:
            _check_value(path, name, pg_type, item)
        return
    if op in ("lt", "le", "gt", "ge") and _kind(pg_type) in ("bool", "uuid", "other"):
        raise FilterError(f"{path}: field {name!r} is {pg_type}; it has no order for {op}")
    _check_value(path, name, pg_type, value)


@dataclass
class Compiled:
    """SQL text (placeholders only) and its parameter values; ``windows`` are the window atoms,
    compiled once per clock, whose change between two times moves rows in or out of a view."""

    params: dict[str, Any] = field(default_factory=dict)
    windows: list[tuple[sql.Composable, sql.Composable]] = field(default_factory=list)
    _counter: int = 0

    def bind(self, value: Any) -> sql.Placeholder:
        self._counter += 1
        name = f"f{self._counter}"
        self.params[name] = value
        return sql.Placeholder(name)


def _cast(pg_type: str) -> sql.Composable:
    if not _SAFE_TYPE.match(pg_type):  # catalog types only; never reached by user text
        raise FilterError(f"unsupported column type {pg_type!r}")
    return sql.SQL(pg_type)


def compile_filter(
    node: Mapping[str, Any],
    columns: Mapping[str, str],
    alias: str,
    compiled: Compiled,
    *,
    user_params: Mapping[str, Any],
    clocks: tuple[str, str] = ("now_new", "now_old"),
) -> sql.Composable:
    """``node`` (validated) as a predicate over ``alias``, evaluated at ``%(<clocks[0]>)s``.

    Window atoms are also compiled at ``clocks[1]`` into ``compiled.windows`` so a caller can
    find rows whose visibility moved only because time passed."""
    if "and" in node or "or" in node:
        joiner = " AND " if "and" in node else " OR "
        parts = [
            compile_filter(c, columns, alias, compiled, user_params=user_params, clocks=clocks)
            for c in node["and" if "and" in node else "or"]
        ]
        return sql.SQL("(") + sql.SQL(joiner).join(parts) + sql.SQL(")")
    if "not" in node:
        inner = compile_filter(
            node["not"], columns, alias, compiled, user_params=user_params, clocks=clocks
        )
        return sql.SQL("(NOT coalesce({}, false))").format(inner)
    name, op, value = node["field"], node["op"], node.get("value")
    column = sql.Identifier(alias, name)
    pg_type = columns[name]
    if op == "is_null":
        return sql.SQL("({} IS NULL)").format(column)
    if op == "not_null":
        return sql.SQL("({} IS NOT NULL)").format(column)
    if op in WINDOWS:
        days = int(node["value"])
        atoms = [_window(column, op, days, compiled, clock) for clock in clocks]
        compiled.windows.append((atoms[0], atoms[1]))
        return atoms[0]
    if isinstance(value, str) and value in PARAMETERS:
        bound = compiled.bind(user_params[value])
        if value == "$team_ids":
            test = sql.SQL("{}::text = ANY({}::text[])").format(column, bound)
            return sql.SQL("(NOT coalesce({}, false))" if op == "not_in" else "({})").format(test)
        return sql.SQL("({}::text {} {}::text)").format(column, sql.SQL(COMPARISONS[op]), bound)
    if op == "starts_with":
        return sql.SQL("(left({}, length({})) = {})").format(
            column, bound := compiled.bind(value), bound
        )
    cast = _cast(pg_type)
    if op in LISTS:
        test = sql.SQL("{} = ANY({}::{}[])").format(column, compiled.bind(value), cast)
        return sql.SQL("(NOT coalesce({}, false))" if op == "not_in" else "({})").format(test)
    return sql.SQL("({} {} {}::{})").format(
        column, sql.SQL(COMPARISONS[op]), compiled.bind(value), cast
    )


def _window(
    column: sql.Composable, op: str, days: int, compiled: Compiled, clock: str
) -> sql.Composable:
    now = sql.Placeholder(clock)
    span = compiled.bind(days)
    if op == "last_days":
        return sql.SQL("({0} >= {1}::timestamptz - make_interval(days => {2}::int))").format(
            column, now, span
        )
    if op == "next_days":
        return sql.SQL(
            "({0} >= {1}::timestamptz"
            " AND {0} <= {1}::timestamptz + make_interval(days => {2}::int))"
        ).format(column, now, span)
    return sql.SQL("({0} < {1}::timestamptz - make_interval(days => {2}::int))").format(
        column, now, span
    )


__all__ = ["Compiled", "FilterError", "compile_filter", "validate_filter"]
