"""Staging column types → Avro types, and the SQL that reads each column in its Avro form.

Every value is converted by PostgreSQL in the snapshot's ``SELECT``, so it is exact whatever its
size (a ``numeric`` keeps every digit, a timestamp after year 9999 still has its microseconds):

=================================  =============================================================
staging type                       Avro
=================================  =============================================================
``smallint``, ``integer``          ``int``
``bigint``                         ``long``
``real`` / ``double precision``    ``float`` / ``double``
``boolean``                        ``boolean``
``text``, ``character varying``…   ``string``
``numeric``                        ``string`` (PostgreSQL's exact text, e.g. ``"12.30"``)
``timestamp with time zone``       ``long``, logicalType ``timestamp-micros`` (UTC)
``timestamp without time zone``    ``long``, logicalType ``local-timestamp-micros`` (wall clock)
``date``                           ``int``, logicalType ``date``
``time without time zone``         ``long``, logicalType ``time-micros``
``uuid``                           ``string``
``json``, ``jsonb``, arrays        ``string`` holding JSON
``bytea``                          ``bytes``
anything else                      ``string`` (PostgreSQL's text form)
=================================  =============================================================

Key columns are required; every other column is a union with ``null`` (default ``null``).
``±infinity`` timestamps and dates have no Avro form: they are written as ``null``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from engine.snapshots.exceptions import SnapshotSchemaError

AvroType = dict[str, Any] | str
AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VERSION_FIELD = "_fs_version"

_Expr = Callable[[sql.Identifier], sql.Composable]


def _plain(column: sql.Identifier) -> sql.Composable:
    return column


def _text(column: sql.Identifier) -> sql.Composable:
    return sql.SQL("{}::text").format(column)


def _json(column: sql.Identifier) -> sql.Composable:
    return sql.SQL("to_jsonb({})::text").format(column)


def _micros(column: sql.Identifier) -> sql.Composable:
    # extract() is exact (numeric) since PostgreSQL 14; infinite values have no Avro form
    return sql.SQL(
        "CASE WHEN isfinite({0}) THEN (extract(epoch FROM {0}) * 1000000)::bigint END"
    ).format(column)


def _time_micros(column: sql.Identifier) -> sql.Composable:
    return sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint").format(column)


def _days(column: sql.Identifier) -> sql.Composable:
    return sql.SQL("CASE WHEN isfinite({0}) THEN {0} - DATE '1970-01-01' END").format(column)


_STRING: tuple[AvroType, _Expr] = ("string", _text)
_EXACT: dict[str, tuple[AvroType, _Expr]] = {
    "smallint": ("int", _plain),
    "integer": ("int", _plain),
    "bigint": ("long", _plain),
    "real": ("float", _plain),
    "double precision": ("double", _plain),
    "boolean": ("boolean", _plain),
    "text": ("string", _plain),
    "bytea": ("bytes", _plain),
    "date": ({"type": "int", "logicalType": "date"}, _days),
    "uuid": _STRING,
    "json": _STRING,
    "jsonb": _STRING,
}
_PATTERNS: tuple[tuple[re.Pattern[str], tuple[AvroType, _Expr]], ...] = (
    (re.compile(r"^(character varying|character|varchar|char)(\(\d+\))?$"), ("string", _plain)),
    (re.compile(r"^(numeric|decimal)(\(.*\))?$"), _STRING),
    (
        re.compile(r"^timestamp(\(\d\))? with time zone$|^timestamptz$"),
        ({"type": "long", "logicalType": "timestamp-micros"}, _micros),
    ),
    (
        re.compile(r"^timestamp(\(\d\))?( without time zone)?$"),
        ({"type": "long", "logicalType": "local-timestamp-micros"}, _micros),
    ),
    (
        re.compile(r"^time(\(\d\))?( without time zone)?$"),
        ({"type": "long", "logicalType": "time-micros"}, _time_micros),
    ),
    (re.compile(r"\[\]$"), ("string", _json)),
)


def column_mapping(pg_type: str) -> tuple[AvroType, _Expr]:
    """The Avro type of a staging column and the SQL expression that reads it in that form."""
    normalised = pg_type.strip().lower()
    if normalised in _EXACT:
        return _EXACT[normalised]
    for pattern, mapping in _PATTERNS:
        if pattern.search(normalised):
            return mapping
    return _STRING


@dataclass(frozen=True)
class RecordLayout:
    """One entity's Avro record: the schema and the ``SELECT`` list that produces its fields."""

    schema: dict[str, Any]
    fields: tuple[str, ...]  # source columns, then _fs_version
    select: sql.Composable


def record_layout(
    org: str, entity: str, columns: Mapping[str, str], keys: Sequence[str]
) -> RecordLayout:
    """``columns``: source column → staging type, in table order; ``keys``: the key columns."""
    fields: list[dict[str, Any]] = []
    select: list[sql.Composable] = []
    for name, pg_type in columns.items():
        if not AVRO_NAME.match(name) or name == VERSION_FIELD:
            raise SnapshotSchemaError(
                f"{org}.{entity}: column {name!r} is not a valid Avro field name"
            )
        avro_type, expression = column_mapping(pg_type)
        field: dict[str, Any] = {"name": name, "doc": pg_type}
        if name in keys:
            field["type"] = avro_type
        else:
            field["type"] = ["null", avro_type]
            field["default"] = None
        fields.append(field)
        select.append(expression(sql.Identifier("t", name)))
    fields.append(
        {"name": VERSION_FIELD, "type": "long", "doc": "change version of the row's last change"}
    )
    select.append(sql.Identifier("t", VERSION_FIELD))
    schema = {
        "type": "record",
        "name": entity,
        "namespace": f"fieldsync.snapshot.{org}",
        "doc": f"Compacted snapshot of staging entity {org}.{entity}",
        "fields": fields,
    }
    return RecordLayout(schema, tuple(f["name"] for f in fields), sql.SQL(", ").join(select))


__all__ = [
    "AVRO_NAME",
    "VERSION_FIELD",
    "AvroType",
    "RecordLayout",
    "SnapshotSchemaError",
    "column_mapping",
    "record_layout",
]
