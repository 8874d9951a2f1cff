"""The projector's input decoding: Kafka messages → :class:`ChangeEvent` / :class:`Tombstone`.

Three wire formats carry the same Debezium envelope (``before``, ``after``, ``source``, ``op``,
…), told apart by the value's first bytes:

* ``C3 01`` — Avro single-object encoding: FieldSync's own change topics (writer schemas from
  ``fieldsync.schemas``, resolved by fingerprint);
* ``00`` — Confluent wire format: Debezium's AvroConverter, or FieldSync with
  ``FIELDSYNC_SCHEMA_REGISTRY_URL`` set (writer schemas from the registry, by id);
* ``{`` — Debezium's JsonConverter, with the schema embedded (``{"schema": …, "payload": …}``,
  ``schemas.enable=true``) or without (a bare envelope, ``schemas.enable=false``).

Keys are detected the same way, independently of the value. Our Avro uses Debezium's field
names and ``connect.*`` properties, so one Avro path serves our topics and Debezium's.

Values become the Python types psycopg writes, driven by the Connect semantic name of each
field (``connect.name`` in Avro, ``name`` in the JSON converter's schema) and its base type;
each field also gets a staging column type (:class:`EntityShape`). Schemaless JSON has no
types to go by: column types are *inferred from the values of the event* (bool → boolean,
int → bigint, float → double precision, str → text, object/array → jsonb, null → text), so
decimals stay base64 text, timestamps stay numbers, and a column that is null in one event
and set in the next changes inferred type. Use ``schemas.enable=true`` (or Avro) when the
staging tables must be typed like the source.

Semantic types not listed in ``docs/formats.md`` (``ZonedTime``, ``MicroDuration``, ``Enum``,
``Xml``, …) pass through as their base type (string → text, int64 → bigint).

The source position is ``source.sequence`` ``["<a>","<b>"]`` as ``Position(a, b)`` (a null
``a`` — Debezium before its first commit, and in snapshots — becomes ``b``), or
``Position(lsn, lsn)`` without a sequence (Debezium 1.x).

Avro is read by readers compiled per writer schema (see "compiled Avro reader" below): they
read only the envelope fields decoding uses and convert the row's columns on the way, about
twice as fast as fastavro followed by a conversion pass.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Context, Decimal
from typing import Any, Final
from uuid import UUID as PyUUID

import fastavro
import httpx
import orjson
from fastavro.schema import SchemaParseException, UnknownType

from engine.exceptions import ConfigError
from engine.projections.exceptions import DecodeError, SchemaUnavailable
from engine.projections.model import (
    UNAVAILABLE,
    ChangeEvent,
    ColumnSpec,
    EntityShape,
    Origin,
    Position,
    Tombstone,
)
from engine.streams.framing import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    FramingError,
    SchemaResolver,
)

TOPIC_PREFIX: Final = "fieldsync"
EPOCH_HEADER: Final = "fieldsync.epoch"
REGISTRY_SETTING: Final = "FIELDSYNC_SCHEMA_REGISTRY_URL"
OPS: Final = frozenset({"c", "u", "d", "r", "t"})

#: Debezium's stand-in for an unchanged TOASTed value, in each form it takes on the wire.
PLACEHOLDER: Final = "__debezium_unavailable_value"
PLACEHOLDER_BYTES: Final = PLACEHOLDER.encode()
PLACEHOLDER_BASE64: Final = base64.b64encode(PLACEHOLDER_BYTES).decode()  # bytes in JSON
PLACEHOLDER_UUID: Final = "b68a35a7-17ad-35b3-af2a-ae46edb4545a"  # uuid[]: nameUUIDFromBytes
PLACEHOLDER_INTS: Final = list(PLACEHOLDER_BYTES)  # int[]/bigint[]: the placeholder's bytes

ORG_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,39}")
ENTITY_PATTERN: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: Names under ``fieldsync.`` that are not change topics of an entity.
RESERVED: Final = frozenset({"transaction", "dlq", "schemas"})

# Connect semantic names
ZONED_TIMESTAMP: Final = "io.debezium.time.ZonedTimestamp"
DATE: Final = "io.debezium.time.Date"
TIMESTAMP: Final = "io.debezium.time.Timestamp"
MICRO_TIMESTAMP: Final = "io.debezium.time.MicroTimestamp"
NANO_TIMESTAMP: Final = "io.debezium.time.NanoTimestamp"
TIME: Final = "io.debezium.time.Time"
MICRO_TIME: Final = "io.debezium.time.MicroTime"
NANO_TIME: Final = "io.debezium.time.NanoTime"
DECIMAL: Final = "org.apache.kafka.connect.data.Decimal"
VARIABLE_SCALE_DECIMAL: Final = "io.debezium.data.VariableScaleDecimal"
JSON: Final = "io.debezium.data.Json"
UUID: Final = "io.debezium.data.Uuid"
KAFKA_DATE: Final = "org.apache.kafka.connect.data.Date"
KAFKA_TIME: Final = "org.apache.kafka.connect.data.Time"
KAFKA_TIMESTAMP: Final = "org.apache.kafka.connect.data.Timestamp"
_AVRO_INSTANT: Final = "avro.timestamp"  # Avro timestamp-* logical type without connect.name

_EPOCH: Final = datetime(1970, 1, 1)  # noqa: DTZ001 - naive on purpose: `timestamp` has no zone
_EPOCH_DATE: Final = date(1970, 1, 1)
_DAY_US: Final = 86_400_000_000

Convert = Callable[[Any], Any]


class _Bad(Exception):
    """A decoding problem found below :meth:`EventDecoder.decode`, which adds the origin."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- routing -------------------------------------------------------------------------------


class TopicRouter:
    """Which organisation and entity a topic feeds.

    FieldSync topics route by name (``fieldsync.<org>.<entity>``); Debezium's topics
    (``<prefix>.<schema>.<table>``) say nothing about organisations, so each is mapped
    explicitly at construction, e.g. ``{"dbserver1.inventory.customers": ("acme", "customer")}``.
    """

    def __init__(
        self,
        mappings: Mapping[str, tuple[str, str]] | None = None,
        *,
        prefix: str = TOPIC_PREFIX,
    ) -> None:
        self._prefix = prefix
        self._explicit: dict[str, tuple[str, str]] = {}
        for topic, (org, entity) in (mappings or {}).items():
            if not ORG_PATTERN.fullmatch(org):
                raise ConfigError(
                    f"topic mapping {topic!r}: org {org!r} must match ^[a-z][a-z0-9_]{{0,39}}$"
                )
            if not ENTITY_PATTERN.fullmatch(entity):
                raise ConfigError(
                    f"topic mapping {topic!r}: entity {entity!r} must be a lowercase identifier"
                )
            self._explicit[topic] = (org, entity)
        self._cache: dict[str, tuple[str, str] | None] = {}

    def route(self, topic: str) -> tuple[str, str] | None:
        """``(org, entity)`` for a change topic, None for anything else."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        routed = self._explicit.get(topic) or self._by_name(topic)
        if len(self._cache) < 100_000:  # topics are few; don't let garbage grow it unbounded
            self._cache[topic] = routed
        return routed

    def _by_name(self, topic: str) -> tuple[str, str] | None:
        parts = topic.split(".")
        if len(parts) != 3 or parts[0] != self._prefix:
            return None
        org, entity = parts[1], parts[2]
        if org in RESERVED or entity in RESERVED:
            return None
        if not ORG_PATTERN.fullmatch(org) or not ENTITY_PATTERN.fullmatch(entity):
            return None
        return org, entity


# -- field types ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Type:
    """A field's type in Connect terms, whichever schema language described it.

    ``kind`` is a Connect type (boolean, int8, int16, int32, int64, float32, float64, string,
    bytes, array, map, struct) or ``opaque`` (a union we cannot narrow, an unknown reference).
    """

    kind: str
    name: str | None = None
    scale: int | None = None
    precision: int | None = None
    items: _Type | None = None
    fields: tuple[tuple[str, _Type, bool], ...] = ()  # (name, type, optional)
    optional: bool = False


_AVRO_KINDS: Final = {
    "boolean": "boolean",
    "int": "int32",
    "long": "int64",
    "float": "float32",
    "double": "float64",
    "string": "string",
    "bytes": "bytes",
    "fixed": "bytes",
    "enum": "string",
    "array": "array",
    "map": "map",
    "record": "struct",
    "null": "opaque",
}
_AVRO_LOGICAL: Final = {
    "date": DATE,
    "time-millis": TIME,
    "time-micros": MICRO_TIME,
    "timestamp-millis": _AVRO_INSTANT,
    "timestamp-micros": _AVRO_INSTANT,
    "local-timestamp-millis": TIMESTAMP,
    "local-timestamp-micros": MICRO_TIMESTAMP,
    "uuid": UUID,
}
_CONNECT_KINDS: Final = frozenset(
    {"boolean", "int8", "int16", "int32", "int64", "float32", "float64", "string", "bytes"}
)


def _int_param(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _avro_type(schema: Any, named: Mapping[str, Any], depth: int = 0) -> _Type:
    """A (fastavro-parsed) Avro type as a :class:`_Type`; unions with null become optional."""
    if depth > 32:  # a recursive schema: Debezium never writes one
        return _Type("opaque")
    if isinstance(schema, list):
        branches = [s for s in schema if s != "null"]
        if len(branches) != 1:
            return _Type("opaque", optional="null" in schema)
        inner = _avro_type(branches[0], named, depth + 1)
        return _replace_optional(inner, len(branches) < len(schema))
    if isinstance(schema, str):
        if schema in _AVRO_KINDS:
            return _Type(_AVRO_KINDS[schema])
        if schema in named:
            return _avro_type(named[schema], named, depth + 1)
        return _Type("opaque")
    if not isinstance(schema, dict):
        return _Type("opaque")
    avro = schema.get("type")
    if not isinstance(avro, str) or avro not in _AVRO_KINDS:
        return _avro_type(avro, named, depth + 1)
    kind = _AVRO_KINDS[avro]
    connect_type = schema.get("connect.type")
    if connect_type in ("int8", "int16") and kind == "int32":
        kind = connect_type
    name = schema.get("connect.name")
    params = schema.get("connect.parameters") or {}
    logical = schema.get("logicalType")
    scale = precision = None
    if logical == "decimal" or name == DECIMAL:
        name = name or DECIMAL
        scale = _int_param(schema.get("scale", params.get("scale")))
        precision = _int_param(params.get("connect.decimal.precision", schema.get("precision")))
    elif name is None and logical in _AVRO_LOGICAL:
        name = _AVRO_LOGICAL[logical]
    if kind == "struct":
        fields = tuple(
            (f["name"], _avro_type(f["type"], named, depth + 1), _avro_optional(f["type"]))
            for f in schema.get("fields", ())
        )
        return _Type(kind, name or schema.get("name"), fields=fields)
    if kind == "array":
        return _Type(kind, name, items=_avro_type(schema.get("items"), named, depth + 1))
    if kind == "map":
        return _Type(kind, name, items=_avro_type(schema.get("values"), named, depth + 1))
    return _Type(kind, name, scale, precision)


def _avro_optional(schema: Any) -> bool:
    return isinstance(schema, list) and "null" in schema


def _replace_optional(t: _Type, optional: bool) -> _Type:
    if t.optional == optional:
        return t
    return _Type(t.kind, t.name, t.scale, t.precision, t.items, t.fields, optional)


def _connect_type(schema: Any) -> _Type:
    """A JsonConverter schema (``{"type": "int32", "optional": …, "name": …}``)."""
    if not isinstance(schema, dict):
        raise _Bad("undecodable", f"embedded schema {schema!r} is not an object")
    kind = schema.get("type")
    name = schema.get("name")
    optional = bool(schema.get("optional", False))
    params = schema.get("parameters") or {}
    if kind == "struct":
        fields = []
        for field in schema.get("fields") or ():
            if not isinstance(field, dict) or not isinstance(field.get("field"), str):
                raise _Bad("undecodable", f"embedded schema field {field!r} has no name")
            inner = _connect_type(field)
            fields.append((field["field"], inner, inner.optional))
        return _Type("struct", name, fields=tuple(fields), optional=optional)
    if kind == "array":
        return _Type("array", name, items=_connect_type(schema.get("items")), optional=optional)
    if kind == "map":
        return _Type("map", name, items=_connect_type(schema.get("values")), optional=optional)
    if kind not in _CONNECT_KINDS:
        raise _Bad("undecodable", f"embedded schema type {kind!r} is not a Connect type")
    scale = precision = None
    if name == DECIMAL:
        scale = _int_param(params.get("scale"))
        precision = _int_param(params.get("connect.decimal.precision"))
    return _Type(kind, name, scale, precision, optional=optional)


# -- value converters ----------------------------------------------------------------------
# Each takes a non-null wire value and returns the psycopg value, UNAVAILABLE, or raises _Bad.


def _kind_of(value: Any) -> str:
    return type(value).__name__


def _text(value: Any) -> Any:
    if type(value) is not str:
        raise _Bad("undecodable", f"expected a string, got {_kind_of(value)}")
    if "\x00" in value:  # PostgreSQL text cannot hold it
        raise _Bad("bad_value", f"text with a NUL character at {value.index(chr(0))}")
    return UNAVAILABLE if value == PLACEHOLDER else value


def _uuid(value: Any) -> Any:
    if type(value) is str:
        if value == PLACEHOLDER:
            return UNAVAILABLE
        try:
            PyUUID(value)
        except ValueError:
            raise _Bad("bad_value", f"{value[:40]!r} is not a uuid") from None
        return value
    if isinstance(value, PyUUID):  # fastavro's `uuid` logical type
        return str(value)
    raise _Bad("undecodable", f"expected a uuid string, got {_kind_of(value)}")


def _json_document(value: Any) -> Any:
    """io.debezium.data.Json: text that must parse, without what ``jsonb`` cannot hold."""
    value = _text(value)
    if value is UNAVAILABLE:
        return value
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        document = _lenient_json(value, error)  # numbers beyond a double are still JSON
    if "\\u0000" in value and _holds_nul(document):
        raise _Bad("bad_value", "JSON with \\u0000, which jsonb cannot hold")
    return value


def _lenient_json(value: str, error: Exception) -> Any:
    import json

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(value, parse_constant=constant)
    except ValueError:
        raise _Bad("bad_value", f"not valid JSON ({error})") from None


def _holds_nul(document: Any) -> bool:
    if isinstance(document, str):
        return "\x00" in document
    if isinstance(document, list):
        return any(_holds_nul(item) for item in document)
    if isinstance(document, dict):
        return any("\x00" in k or _holds_nul(v) for k, v in document.items())
    return False


def _boolean(value: Any) -> Any:
    if type(value) is not bool:
        raise _Bad("undecodable", f"expected a boolean, got {_kind_of(value)}")
    return value


def _int_range(bits: int, label: str) -> Convert:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def check(value: Any) -> Any:
        if type(value) is not int:
            raise _Bad("undecodable", f"expected an integer, got {_kind_of(value)}")
        if value < low or value > high:
            raise _Bad("type_overflow", f"{value} does not fit {label}")
        return value

    return check


_INT8 = _int_range(8, "int8")
_INT16 = _int_range(16, "int16 (smallint)")
_INT32 = _int_range(32, "int32 (integer)")
_INT64 = _int_range(64, "int64 (bigint)")
_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})


def _float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    if kind is str and value in _NON_FINITE:  # Jackson quotes non-finite numbers
        return float(value)
    raise _Bad("undecodable", f"expected a number, got {_kind_of(value)}")


_FLOAT32_MAX: Final = 3.4028234663852886e38


def _float32(value: Any) -> Any:
    """A JSON number for a ``real`` column: beyond its range it would silently be infinity."""
    number = _float(value)
    if abs(number) > _FLOAT32_MAX and number not in (float("inf"), float("-inf")):
        raise _Bad("type_overflow", f"{value} does not fit float32 (real)")
    return number


def _avro_bytes(value: Any) -> Any:
    if value == PLACEHOLDER_BYTES:
        return UNAVAILABLE
    if not isinstance(value, bytes):
        raise _Bad("undecodable", f"expected bytes, got {_kind_of(value)}")
    return value


def _b64(value: Any) -> bytes:
    if type(value) is not str:
        raise _Bad("undecodable", f"expected base64 text, got {_kind_of(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _Bad("undecodable", f"{value[:40]!r} is not base64 ({error})") from None


def _json_bytes(value: Any) -> Any:
    raw = _b64(value)
    return UNAVAILABLE if raw == PLACEHOLDER_BYTES else raw


def _unscaled(raw: bytes, scale: int) -> Decimal:
    """Connect's Decimal wire form: big-endian two's-complement unscaled integer."""
    unscaled = int.from_bytes(raw, "big", signed=True)
    return Decimal(f"{unscaled}E{-scale}") if scale else Decimal(unscaled)  # exact, no context


_WIDE: Final = Context(prec=2000, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _decimal(scale: int, precision: int | None = None) -> Convert:
    """Connect's Decimal; with a ``precision`` (``numeric(p,s)``) a value that needs more than
    ``p - s`` integer digits once rounded to ``s`` places (as PostgreSQL rounds it), or an
    infinity, is a ``type_overflow``."""
    digits = precision - scale if precision else None  # integer digits it may have
    bound = Decimal(1).scaleb(digits or 0)
    quantum = Decimal(1).scaleb(-scale)

    def fit(number: Decimal) -> Decimal:
        if digits is None or number.is_nan() or number.is_zero():
            return number
        if number.is_infinite() or (
            number.adjusted() >= digits - 1  # else far below the bound, even rounded
            and abs(number.quantize(quantum, ROUND_HALF_UP, _WIDE)) >= bound
        ):
            raise _Bad("type_overflow", f"{number} does not fit numeric({precision},{scale})")
        return number

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):  # fastavro's decimal logical type
            return fit(value)
        if isinstance(value, bytes):
            return fit(_unscaled(value, scale))
        if type(value) is str:  # JsonConverter, decimal.format=BASE64 (the default)
            if value == PLACEHOLDER:
                return UNAVAILABLE
            return fit(_unscaled(_b64(value), scale))
        if type(value) is int or type(value) is float:  # decimal.format=NUMERIC
            return fit(Decimal(str(value)))
        raise _Bad("undecodable", f"expected a decimal, got {_kind_of(value)}")

    return convert


def _variable_decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, dict):
        raise _Bad("undecodable", f"expected {{scale, value}}, got {_kind_of(value)}")
    scale, raw = value.get("scale"), value.get("value")
    if type(scale) is not int or raw is None:
        raise _Bad("undecodable", f"VariableScaleDecimal {value!r} lacks scale or value")
    if isinstance(raw, str):
        raw = _b64(raw)
    if not isinstance(raw, bytes):
        raise _Bad("undecodable", f"VariableScaleDecimal value is {_kind_of(raw)}")
    return _unscaled(raw, scale)


def _epoch_int(value: Any) -> int:
    if type(value) is not int:
        raise _Bad("undecodable", f"expected an integer, got {_kind_of(value)}")
    return value


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def _timestamp(per_microsecond: int, units_per_us: int) -> Convert:
    """Epoch count → naive datetime; ``per_microsecond`` multiplies, ``units_per_us`` divides."""

    def convert(value: Any) -> Any:
        if isinstance(value, datetime):  # fastavro's timestamp logical types
            return _naive_utc(value)
        micros = _epoch_int(value) * per_microsecond // units_per_us
        try:
            return _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise _Bad("type_overflow", f"timestamp {value} is outside Python's range") from None

    return convert


def _instant(value: Any) -> Any:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    raise _Bad("undecodable", f"expected a timestamp, got {_kind_of(value)}")


def _date(value: Any) -> Any:
    if isinstance(value, date):
        return value
    try:
        return _EPOCH_DATE + timedelta(days=_epoch_int(value))
    except OverflowError:
        raise _Bad("type_overflow", f"date {value} days is outside Python's range") from None


def _time(per_microsecond: int, units_per_us: int) -> Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, time):
            return value
        micros = _epoch_int(value) * per_microsecond // units_per_us
        if not 0 <= micros < _DAY_US:  # PostgreSQL's 24:00:00 has no Python time
            raise _Bad("type_overflow", f"time {value} is not within one day")
        seconds, micro = divmod(micros, 1_000_000)
        minutes, second = divmod(seconds, 60)
        hour, minute = divmod(minutes, 60)
        return time(hour, minute, second, micro)

    return convert


def _zoned(value: Any) -> Any:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if type(value) is not str:
        raise _Bad("undecodable", f"expected an ISO-8601 string, got {_kind_of(value)}")
    if value == PLACEHOLDER:
        return UNAVAILABLE
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        if value in ("infinity", "-infinity") or value[:1] in ("+", "-"):
            raise _Bad("type_overflow", f"timestamptz {value!r} has no Python datetime") from None
        raise _Bad("undecodable", f"{value[:40]!r} is not an ISO-8601 timestamp") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


def _json_text(value: Any) -> Any:
    """A nested record/map/union we have no column type for: kept whole as JSON text."""
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except TypeError as error:
        raise _Bad("undecodable", f"value cannot be kept as JSON ({error})") from None


def _array(element: Convert | None, placeholders: tuple[list[Any], ...]) -> Convert:
    def convert(value: Any) -> Any:
        if type(value) is not list:
            raise _Bad("undecodable", f"expected an array, got {_kind_of(value)}")
        for placeholder in placeholders:
            if value == placeholder:
                return UNAVAILABLE
        if element is None:
            return value
        return [None if item is None else element(item) for item in value]

    return convert


def _compile(t: _Type, *, json: bool) -> tuple[Convert | None, str]:
    """The converter (None: value as is) and the staging column type of one field."""
    name = t.name
    if name is not None:
        semantic = _semantic(t)
        if semantic is not None:
            return semantic
    kind = t.kind
    if kind == "boolean":
        return (_boolean if json else None), "boolean"
    if kind == "int8":
        return _INT8, "smallint"
    if kind == "int16":
        return _INT16, "smallint"
    if kind == "int32":
        return _INT32, "integer"
    if kind == "int64":
        return (_INT64 if json else None), "bigint"
    if kind == "float32":
        return (_float32 if json else None), "real"
    if kind == "float64":
        return (_float if json else None), "double precision"
    if kind == "string":
        return _text, "text"
    if kind == "bytes":
        return (_json_bytes if json else _avro_bytes), "bytea"
    if kind == "array":
        assert t.items is not None
        element, element_pg = _compile(t.items, json=json)
        element_kind = _compile_kind(t.items)
        placeholders: list[list[Any]] = [[PLACEHOLDER]]
        if element_kind == "bytes":
            placeholders.append([PLACEHOLDER_BASE64] if json else [PLACEHOLDER_BYTES])
        elif element_kind == "uuid":
            placeholders.append([PLACEHOLDER_UUID])
        elif element_kind == "int":
            placeholders.append(PLACEHOLDER_INTS)
        array_pg = element_pg if element_pg.endswith("[]") else f"{element_pg}[]"
        return _array(element, tuple(placeholders)), array_pg
    return _json_text, "jsonb"  # map, struct, opaque


def _compile_kind(t: _Type) -> str:
    if t.name == UUID:
        return "uuid"
    if t.kind == "bytes" and t.name is None:
        return "bytes"
    if t.kind in ("int8", "int16", "int32", "int64") and t.name is None:
        return "int"
    return t.kind


def _semantic(t: _Type) -> tuple[Convert | None, str] | None:
    name = t.name
    if name == ZONED_TIMESTAMP:
        return _zoned, "timestamptz"
    if name in (DATE, KAFKA_DATE):
        return _date, "date"
    if name in (TIMESTAMP, KAFKA_TIMESTAMP):
        return _timestamp(1000, 1), "timestamp"
    if name == MICRO_TIMESTAMP:
        return _timestamp(1, 1), "timestamp"
    if name == NANO_TIMESTAMP:
        return _timestamp(1, 1000), "timestamp"
    if name == _AVRO_INSTANT:
        return _instant, "timestamptz"
    if name in (TIME, KAFKA_TIME):
        return _time(1000, 1), "time"
    if name == MICRO_TIME:
        return _time(1, 1), "time"
    if name == NANO_TIME:
        return _time(1, 1000), "time"
    if name == DECIMAL:
        scale = t.scale or 0
        pg = f"numeric({t.precision},{scale})" if t.precision else "numeric"
        return _decimal(scale, t.precision), pg
    if name == VARIABLE_SCALE_DECIMAL:
        return _variable_decimal, "numeric"
    if name == JSON:
        return _json_document, "jsonb"
    if name == UUID:
        return _uuid, "uuid"
    return None


# -- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    pg_type: str
    convert: Convert | None
    optional: bool


class _RowCodec:
    """Converts rows of one Value schema and describes them as an :class:`EntityShape`."""

    __slots__ = (
        "_by_name",
        "_shapes",
        "columns",
        "conversions",
        "converter_map",
        "default_keys",
        "names",
    )

    def __init__(self, row_type: _Type, *, json: bool) -> None:
        columns = []
        for name, field_type, optional in row_type.fields:
            convert, pg_type = _compile(field_type, json=json)
            columns.append(_Column(name, pg_type, convert, optional))
        self.columns: tuple[_Column, ...] = tuple(columns)
        self.names = tuple(c.name for c in columns)
        self.conversions = tuple((c.name, c.convert) for c in columns if c.convert is not None)
        self._by_name = {c.name: c for c in columns}
        self.converter_map = {c.name: c.convert for c in columns if c.convert is not None}
        self._shapes: dict[tuple[str, ...], EntityShape] = {}
        # Our own Value schemas make exactly the key columns required (docs/formats.md): the
        # key flags of a truncate, which carries no key, when no key was seen on the topic yet.
        record_name = row_type.name or ""
        self.default_keys = (
            tuple(c.name for c in columns if not c.optional)
            if record_name.startswith(f"{TOPIC_PREFIX}.")
            else ()
        )

    def convert(self, row: dict[str, Any], *, complete: bool) -> dict[str, Any]:
        """Convert in place (``row`` is freshly decoded); ``complete=False`` fills gaps first."""
        if not complete:
            row = {name: row.get(name) for name in self.names}
        name = ""
        try:
            for name, convert in self.conversions:
                value = row[name]
                if value is not None:
                    row[name] = convert(value)
        except _Bad as bad:
            raise _Bad(bad.reason, f"column {name!r}: {bad.detail}") from None
        return row

    def convert_key(self, key: dict[str, Any]) -> dict[str, Any]:
        """A schemaless key, converted by the Value schema's columns of the same names."""
        out = {}
        for name, value in key.items():
            column = self._by_name.get(name)
            if value is None or column is None or column.convert is None:
                out[name] = value
                continue
            try:
                out[name] = column.convert(value)
            except _Bad as bad:
                raise _Bad(bad.reason, f"key column {name!r}: {bad.detail}") from None
        return out

    def shape(self, key_names: tuple[str, ...]) -> EntityShape:
        shape = self._shapes.get(key_names)
        if shape is None:
            keys = set(key_names)
            shape = EntityShape(
                tuple(ColumnSpec(c.name, c.pg_type, c.name in keys) for c in self.columns)
            )
            self._shapes[key_names] = shape
        return shape


def _infer(value: Any) -> tuple[Any, str]:
    """Schemaless JSON: a value and the column type it suggests."""
    if value is None:
        return None, "text"
    kind = type(value)
    if kind is bool:
        return value, "boolean"
    if kind is int:
        return _INT64(value), "bigint"
    if kind is float:
        return value, "double precision"
    if kind is str:
        if value in (PLACEHOLDER, PLACEHOLDER_BASE64):
            return UNAVAILABLE, "text"
        return value, "text"
    if kind is list and value == [PLACEHOLDER]:
        return UNAVAILABLE, "jsonb"
    return orjson.dumps(value).decode(), "jsonb"


def _infer_row(row: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    out: dict[str, Any] = {}
    types: dict[str, str] = {}
    for name, value in row.items():
        try:
            out[name], types[name] = _infer(value)
        except _Bad as bad:
            raise _Bad(bad.reason, f"{where} column {name!r}: {bad.detail}") from None
    return out, types


# -- compiled Avro reader --------------------------------------------------------------------
# fastavro's reader walks the schema dicts and calls the file object for every value; a change
# envelope has 30+ fields, so with fastavro reading was most of the decoding time. As capture
# does for writing (engine/streams/avro_writer.py), each writer schema is compiled once: a
# record becomes one generated function that reads its fields straight from the message
# bytes, steps over the fields decoding does not use, and converts the row's columns as it
# goes. Schemas with logical types other than ``decimal`` are left to fastavro.
# ``test_projection_decoding`` checks both read the same datum from every captured message.

Read = Callable[[bytes, int], tuple[Any, int]]
_UNPACK_FLOAT = struct.Struct("<f").unpack_from
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from


class UnsupportedSchema(ValueError):
    """A schema construct the compiled reader leaves to fastavro."""


class _Corrupt(ValueError):
    """Bytes that are not a valid encoding under the writer schema."""


def _varint(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a zig-zag varint whose first byte (``first`` ≥ 0x80) was read."""
    n = first & 0x7F
    shift = 7
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    return _varint(data, pos + 1, b)


def _read_raw(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise _Corrupt(f"length {n} runs past the end of the message")
    return data[pos:end], end


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    raw, pos = _read_raw(data, pos)
    return raw.decode(), pos


def _read_boolean(data: bytes, pos: int) -> tuple[bool, int]:
    return data[pos] == 1, pos + 1


def _read_float(data: bytes, pos: int) -> tuple[float, int]:
    return _UNPACK_FLOAT(data, pos)[0], pos + 4


def _read_double(data: bytes, pos: int) -> tuple[float, int]:
    return _UNPACK_DOUBLE(data, pos)[0], pos + 8


def _read_null(data: bytes, pos: int) -> tuple[None, int]:
    return None, pos


_PRIMITIVE_READERS: Final[dict[str, Read]] = {
    "null": _read_null,
    "boolean": _read_boolean,
    "int": _read_long,
    "long": _read_long,
    "float": _read_float,
    "double": _read_double,
    "bytes": _read_raw,
    "string": _read_string,
}

# Generated code: reading a primitive into `x` (or skipping it), advancing `pos`.
_VARINT_INTO = (
    "b = data[pos]",
    "pos += 1",
    "if b < 128:",
    "    {v} = (b >> 1) ^ -(b & 1)",
    "else:",
    "    {v} = b & 127",
    "    s = 7",
    "    while True:",
    "        b = data[pos]",
    "        pos += 1",
    "        {v} |= (b & 127) << s",
    "        if b < 128:",
    "            break",
    "        s += 7",
    "    {v} = ({v} >> 1) ^ -({v} & 1)",
)
_LENGTH_CHECK = (
    "end = pos + n",
    "if n < 0 or end > size:",
    "    raise _Corrupt(f'length {n} runs past the end of the message')",
)


def _inline_read(avro: str) -> list[str]:
    if avro in ("int", "long"):
        return [line.format(v="x") for line in _VARINT_INTO]
    if avro in ("string", "bytes"):
        lines = [line.format(v="n") for line in _VARINT_INTO]
        lines += [*_LENGTH_CHECK, "x = data[pos:end]", "pos = end"]
        return [*lines, "x = x.decode()"] if avro == "string" else lines
    if avro == "boolean":
        return ["x = data[pos] == 1", "pos += 1"]
    if avro == "float":
        return ["x = _unpack_float(data, pos)[0]", "pos += 4"]
    if avro == "double":
        return ["x = _unpack_double(data, pos)[0]", "pos += 8"]
    return ["x = None"]


def _inline_skip(avro: str) -> list[str]:
    if avro in ("int", "long"):
        return ["while data[pos] >= 128:", "    pos += 1", "pos += 1"]
    if avro in ("string", "bytes"):
        lines = [line.format(v="n") for line in _VARINT_INTO]
        return [*lines, *_LENGTH_CHECK, "pos = end"]
    if avro == "boolean":
        return ["pos += 1"]
    if avro == "float":
        return ["pos += 4"]
    if avro == "double":
        return ["pos += 8"]
    return []


class _ReaderCompiler:
    """Compiles a fastavro-parsed schema into readers; ``keep`` (record full name → field
    names) makes a record skip the fields nobody reads (their bytes are stepped over)."""

    def __init__(
        self,
        named: Mapping[str, Any],
        converters: Mapping[str, Mapping[str, Convert]],
        keep: Mapping[str, frozenset[str]],
    ) -> None:
        self.named = named
        self.converters = converters
        self.keep = keep
        self.cells: dict[tuple[str, bool], list[Read | None]] = {}

    def compile(self, schema: Any, *, skip: bool = False) -> Read:
        if isinstance(schema, str):
            if schema in _PRIMITIVE_READERS:
                return _PRIMITIVE_READERS[schema]
            return self._reference(schema, skip)
        if isinstance(schema, list):
            return self._union(schema, skip)
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"schema {schema!r}")
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if kind in ("record", "error"):
            return self._record(schema, skip)
        if kind == "array":
            return self._array(self.compile(schema.get("items"), skip=skip))
        if kind == "map":
            return self._map(self.compile(schema.get("values"), skip=skip))
        if kind == "enum":
            return self._register(schema, self._enum(tuple(schema["symbols"])))
        if kind == "fixed":
            reader = self._fixed(int(schema["size"]))
            if logical == "decimal":
                reader = self._decimal(reader, int(schema.get("scale", 0)))
            elif logical is not None:
                raise UnsupportedSchema(f"logical type {logical!r}")
            return self._register(schema, reader)
        if logical == "decimal" and kind == "bytes":
            return self._decimal(_read_raw, int(schema.get("scale", 0)))
        if logical is not None:
            raise UnsupportedSchema(f"logical type {logical!r}")
        if isinstance(kind, str) and kind in _PRIMITIVE_READERS:
            return _PRIMITIVE_READERS[kind]
        return self.compile(kind, skip=skip)

    def _register(self, schema: dict[str, Any], reader: Read) -> Read:
        if isinstance(schema.get("name"), str):
            self.cells[(schema["name"], False)] = [reader]
            self.cells[(schema["name"], True)] = [reader]
        return reader

    def _reference(self, name: str, skip: bool) -> Read:
        cell = self.cells.get((name, skip))
        if cell is None:
            if name not in self.named:
                raise UnsupportedSchema(f"unknown named type {name!r}")
            return self.compile(self.named[name], skip=skip)
        compiled = cell[0]
        if compiled is not None:
            return compiled

        def recursive(data: bytes, pos: int) -> tuple[Any, int]:
            read = cell[0]
            assert read is not None
            return read(data, pos)

        return recursive

    def _record(self, schema: dict[str, Any], skip: bool) -> Read:
        """One generated function per record: fields read (or skipped) inline, row columns
        converted as they are read."""
        fullname = schema["name"]
        cell: list[Read | None] = [None]
        self.cells[(fullname, skip)] = cell
        converters = {} if skip else self.converters.get(fullname, {})
        keep = frozenset() if skip else self.keep.get(fullname)
        scope: dict[str, Any] = {
            "_Corrupt": _Corrupt,
            "_Bad": _Bad,
            "_unpack_float": _UNPACK_FLOAT,
            "_unpack_double": _UNPACK_DOUBLE,
        }
        lines = ["def record(data, pos):", "    size = len(data)"]
        kept: list[tuple[int, str]] = []
        for index, field in enumerate(schema["fields"]):
            name = field["name"]
            wanted = keep is None or name in keep
            avro = field["type"]
            null_byte = other_byte = -1
            if isinstance(avro, list) and len(avro) == 2 and "null" in avro:
                null_index = avro.index("null")
                null_byte, other_byte = null_index * 2, (1 - null_index) * 2
                avro = avro[1 - null_index]
            primitive = self._primitive(avro)
            if primitive is not None:
                body = _inline_read(primitive) if wanted else _inline_skip(primitive)
                may_be_null = primitive == "null"
            else:
                scope[f"r{index}"] = self.compile(avro, skip=not wanted)
                body = [f"{'x' if wanted else '_'}, pos = r{index}(data, pos)"]
                may_be_null = True
            if wanted:
                convert = converters.get(name)
                if convert is not None:
                    scope[f"c{index}"] = convert
                    prefix = f"column {name!r}: "
                    guarded = [
                        "try:",
                        f"    x = c{index}(x)",
                        "except _Bad as bad:",
                        f"    raise _Bad(bad.reason, {prefix!r} + bad.detail) from None",
                    ]
                    if may_be_null:
                        guarded = ["if x is not None:", *(f"    {line}" for line in guarded)]
                    body += guarded
                body.append(f"v{index} = x")
                kept.append((index, name))
            if null_byte < 0:
                lines += [f"    {line}" for line in body or ["pass"]]
                continue
            lines += [
                "    b = data[pos]",
                "    pos += 1",
                f"    if b == {other_byte}:",
                *(f"        {line}" for line in body or ["pass"]),
                f"    elif b != {null_byte}:",
                f"        raise _Corrupt(f'union index byte {{b}} of field ' + {name!r})",
            ]
            if wanted:
                lines += ["    else:", f"        v{index} = None"]
        items = ", ".join(f"{name!r}: v{index}" for index, name in kept)
        lines.append(f"    return {{{items}}}, pos" if not skip else "    return None, pos")
        exec(compile("\n".join(lines), f"<avro reader {fullname}>", "exec"), scope)  # noqa: S102
        record: Read = scope["record"]
        cell[0] = record
        return record

    @staticmethod
    def _primitive(avro: Any) -> str | None:
        if isinstance(avro, dict):
            if "logicalType" in avro:
                return None
            avro = avro.get("type")
        return avro if isinstance(avro, str) and avro in _PRIMITIVE_READERS else None

    def _union(self, branches: list[Any], skip: bool) -> Read:
        readers = tuple(self.compile(branch, skip=skip) for branch in branches)
        count = len(readers)

        def union(data: bytes, pos: int) -> tuple[Any, int]:
            index, pos = _read_long(data, pos)
            if not 0 <= index < count:
                raise _Corrupt(f"union index {index} of {count} branches")
            return readers[index](data, pos)

        return union

    @staticmethod
    def _array(read_item: Read) -> Read:
        def array(data: bytes, pos: int) -> tuple[list[Any], int]:
            out: list[Any] = []
            while True:
                count, pos = _read_long(data, pos)
                if count == 0:
                    return out, pos
                if count < 0:
                    count = -count
                    _block_size, pos = _read_long(data, pos)
                if count > len(data):
                    raise _Corrupt(f"array block of {count} items")
                for _ in range(count):
                    item, pos = read_item(data, pos)
                    out.append(item)

        return array

    @staticmethod
    def _map(read_value: Read) -> Read:
        def mapping(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
            out: dict[str, Any] = {}
            while True:
                count, pos = _read_long(data, pos)
                if count == 0:
                    return out, pos
                if count < 0:
                    count = -count
                    _block_size, pos = _read_long(data, pos)
                if count > len(data):
                    raise _Corrupt(f"map block of {count} entries")
                for _ in range(count):
                    key, pos = _read_string(data, pos)
                    out[key], pos = read_value(data, pos)

        return mapping

    @staticmethod
    def _enum(symbols: tuple[str, ...]) -> Read:
        def enum(data: bytes, pos: int) -> tuple[str, int]:
            index, pos = _read_long(data, pos)
            if not 0 <= index < len(symbols):
                raise _Corrupt(f"enum index {index} of {len(symbols)} symbols")
            return symbols[index], pos

        return enum

    @staticmethod
    def _fixed(size: int) -> Read:
        def fixed(data: bytes, pos: int) -> tuple[bytes, int]:
            end = pos + size
            if end > len(data):
                raise _Corrupt(f"fixed of {size} bytes runs past the end of the message")
            return data[pos:end], end

        return fixed

    @staticmethod
    def _decimal(read_raw: Read, scale: int) -> Read:
        def decimal(data: bytes, pos: int) -> tuple[Decimal, int]:
            raw, pos = read_raw(data, pos)
            return _unscaled(raw, scale), pos

        return decimal


def compile_avro_reader(
    parsed: Any,
    converters: Mapping[str, Mapping[str, Convert]] | None = None,
    keep: Mapping[str, frozenset[str]] | None = None,
) -> Callable[[bytes, int], Any]:
    """A reader ``read(message, start) -> datum`` of a fastavro-parsed writer schema.

    It returns what ``fastavro.schemaless_reader`` returns for the bytes from ``start`` on;
    ``converters`` (record full name → field → function) convert fields of those records as
    they are read; ``keep`` (record full name → field names) leaves the other fields of those
    records out. Raises :class:`UnsupportedSchema` for what it leaves to fastavro.
    """
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    read = _ReaderCompiler(named, converters or {}, keep or {}).compile(parsed)

    def datum(message: bytes, start: int) -> Any:
        return read(message, start)[0]

    return datum


# -- the decoder ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """A decoded value: the envelope, and the codec of its rows (None: schemaless JSON)."""

    body: dict[str, Any] | None
    rows: _RowCodec | None
    complete: bool = True  # every schema field present (Avro); JSON payloads get filled in
    converted: bool = False  # rows already converted while reading (compiled Avro)


@dataclass(frozen=True, slots=True)
class _AvroPlan:
    """How to read one writer schema: compiled (rows converted while reading), or fastavro
    and the codec's conversion afterwards where the compiler leaves the schema alone."""

    parsed: Any
    rows: _RowCodec | None
    read: Callable[[bytes, int], Any] | None

    def decode(self, message: bytes, payload: memoryview, what: str) -> tuple[Any, bool]:
        """(datum, whether its rows are converted already)."""
        if self.read is None:
            return _avro_record(self.parsed, payload, what), False
        try:
            return self.read(message, len(message) - len(payload)), True
        except _Bad:
            raise
        except (IndexError, ValueError, struct.error, RecursionError) as error:
            raise _Bad(
                "undecodable",
                f"{what}: Avro payload does not match its writer schema "
                f"({type(error).__name__}: {error})",
            ) from None


class EventDecoder:
    """Decodes one Kafka message of a change topic (see the module docstring).

    ``single_object`` resolves ``C3 01`` messages (a :class:`FingerprintResolver` over
    ``fieldsync.schemas``); ``confluent`` resolves ``00`` messages (a
    :class:`ConfluentResolver`), without it they are refused as ``bad_magic``.
    """

    def __init__(
        self,
        router: TopicRouter,
        *,
        single_object: SchemaResolver,
        confluent: SchemaResolver | None = None,
        max_message_bytes: int = 1_048_576,
    ) -> None:
        self._router = router
        self._single_object = single_object
        self._confluent = confluent
        self._max_bytes = max_message_bytes
        # plans per parsed writer schema (by id: the plan keeps the schema, so ids stay unique)
        self._avro_values: dict[int, _AvroPlan] = {}
        self._avro_keys: dict[int, _AvroPlan] = {}
        self._json_rows: dict[bytes, _RowCodec | None] = {}
        self._key_names: dict[str, tuple[str, ...]] = {}  # last key columns seen per topic

    async def decode(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> ChangeEvent | Tombstone:
        """The message as a change event or a tombstone; :class:`DecodeError` otherwise."""
        origin = Origin(topic, partition, offset)
        try:
            return await self._decode(origin, key, value, headers)
        except _Bad as bad:
            raise DecodeError(bad.reason, bad.detail, origin) from None

    async def _decode(
        self,
        origin: Origin,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> ChangeEvent | Tombstone:
        size = (len(key) if key else 0) + (len(value) if value else 0)
        if size > self._max_bytes:
            raise _Bad(
                "oversized",
                f"message of {size} bytes exceeds the limit of {self._max_bytes} bytes",
            )
        routed = self._router.route(origin.topic)
        if routed is None:
            raise _Bad(
                "unknown_org",
                f"topic {origin.topic!r} routes to no organisation: neither "
                f"{TOPIC_PREFIX}.<org>.<entity> nor a configured topic mapping",
            )
        if value is None:
            return Tombstone(origin)
        envelope = await self._value(value, origin)
        body, rows = envelope.body, envelope.rows
        if body is None:  # JsonConverter {"schema": …, "payload": null}
            return Tombstone(origin)

        op = body.get("op")
        if op is None:
            raise _Bad("missing_op", "envelope has no op")
        if op not in OPS:
            raise _Bad("bad_op", f"op {op!r} is none of c, u, d, r, t")
        source = body.get("source")
        if not isinstance(source, dict):
            raise _Bad("bad_envelope", "envelope has no source block")
        position = _position(source)
        source_ts_ms = source.get("ts_ms")
        if type(source_ts_ms) is not int:
            raise _Bad("bad_envelope", "source block has no ts_ms")

        topic = origin.topic
        before = after = key_row = None
        if op == "t":
            key_names = self._key_names.get(topic) or (rows.default_keys if rows else ())
        else:
            if not key:
                raise _Bad("missing_key", f"{op!r} event without a key")
            key_row = await self._key(key, rows, origin)
            key_names = tuple(key_row)
            if self._key_names.get(topic) != key_names:
                self._key_names[topic] = key_names
            raw_before, raw_after = body.get("before"), body.get("after")
            if op == "d":
                if not isinstance(raw_before, dict):
                    raise _Bad("bad_envelope", "delete without a before image")
            elif not isinstance(raw_after, dict):
                raise _Bad("bad_envelope", f"{op!r} event without an after image")
            if raw_before is not None and not isinstance(raw_before, dict):
                raise _Bad("bad_envelope", "before is not a row")
            if raw_after is not None and not isinstance(raw_after, dict):
                raise _Bad("bad_envelope", "after is not a row")
            if envelope.converted:
                before, after = raw_before, raw_after
            elif rows is not None:
                if raw_before is not None:
                    before = rows.convert(raw_before, complete=envelope.complete)
                if raw_after is not None:
                    after = rows.convert(raw_after, complete=envelope.complete)

        if rows is not None:
            shape = rows.shape(key_names)
        else:
            before, after, shape = _schemaless(body, key_row, key_names, op)

        org, entity = routed
        return ChangeEvent(
            org=org,
            entity=entity,
            op=op,
            key=key_row,
            before=before,
            after=after,
            position=position,
            shape=shape,
            source_ts_ms=source_ts_ms,
            origin=origin,
            epoch=_epoch(headers),
        )

    # -- values --------------------------------------------------------------------------

    async def _value(self, value: bytes, origin: Origin) -> _Envelope:
        if value[:2] == SINGLE_OBJECT_MAGIC or value[:1] == CONFLUENT_MAGIC:
            resolver = self._confluent if value[:1] == CONFLUENT_MAGIC else self._single_object
            parsed, payload = await self._resolve(resolver, value, "value", origin)
            plan = self._avro_plan(parsed, key=False)
            body, converted = plan.decode(value, payload, "value")
            if not isinstance(body, dict):
                raise _Bad("bad_envelope", "value is not an envelope record")
            return _Envelope(body, plan.rows, converted=converted)
        if _looks_like_json(value):
            document = _json_object(value, "value")
            if _is_wrapped(document):
                payload = document["payload"]
                if payload is None:
                    return _Envelope(None, None)
                if not isinstance(payload, dict):
                    raise _Bad("bad_envelope", "payload is not an envelope object")
                return _Envelope(payload, self._json_row_codec(document["schema"]), False)
            return _Envelope(document, None, False)
        raise _Bad("bad_magic", f"value {_describe_start(value)}")

    async def _key(self, key: bytes, rows: _RowCodec | None, origin: Origin) -> dict[str, Any]:
        if key[:2] == SINGLE_OBJECT_MAGIC or key[:1] == CONFLUENT_MAGIC:
            resolver = self._single_object if key[:1] != CONFLUENT_MAGIC else self._confluent
            parsed, payload = await self._resolve(resolver, key, "key", origin)
            plan = self._avro_plan(parsed, key=True)
            record, converted = plan.decode(key, payload, "key")
            if not isinstance(record, dict) or not record:
                raise _Bad("missing_key", "key is not a record of the primary-key columns")
            if converted or plan.rows is None:
                return record
            return plan.rows.convert(record, complete=True)
        if _looks_like_json(key):
            document = _json_object(key, "key")
            if _is_wrapped(document):
                payload = document["payload"]
                if not isinstance(payload, dict) or not payload:
                    raise _Bad("missing_key", "key payload is not a record of key columns")
                codec = self._json_row_codec(document["schema"], what="key")
                if codec is not None:
                    return codec.convert(payload, complete=False)
                document = payload
            if not document:
                raise _Bad("missing_key", "key is an empty object")
            if rows is not None:
                return rows.convert_key(document)
            return _infer_row(document, "key")[0]
        raise _Bad("bad_magic", f"key {_describe_start(key)}")

    async def _resolve(
        self, resolver: SchemaResolver | None, message: bytes, what: str, origin: Origin
    ) -> tuple[Any, memoryview]:
        if resolver is None:
            raise _Bad(
                "bad_magic",
                f"{what} is in Confluent wire format (magic byte 00) but no schema registry is "
                f"configured: set {REGISTRY_SETTING}",
            )
        header = 10 if message[:2] == SINGLE_OBJECT_MAGIC else 5
        if len(message) < header:
            raise _Bad("undecodable", f"{what} of {len(message)} bytes is shorter than its header")
        try:
            return await resolver.resolve(message)
        except FramingError as error:
            if error.retryable:
                raise SchemaUnavailable(
                    f"{origin.topic} partition {origin.partition} offset {origin.offset}: "
                    f"{what} schema: {error.args[0]}"
                ) from error
            raise _Bad("unknown_schema", f"{what}: {error.args[0]}") from None
        except httpx.HTTPError as error:
            raise SchemaUnavailable(
                f"{origin.topic} partition {origin.partition} offset {origin.offset}: "
                f"{what} schema: registry unavailable ({error})"
            ) from error
        except (SchemaParseException, UnknownType, KeyError, TypeError, ValueError) as error:
            raise _Bad("undecodable", f"{what}: writer schema unusable ({error})") from None

    def _avro_plan(self, parsed: Any, *, key: bool) -> _AvroPlan:
        plans = self._avro_keys if key else self._avro_values
        plan = plans.get(id(parsed))
        if plan is not None and plan.parsed is parsed:
            return plan
        named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
        row_schema = parsed if key else _image_schema(parsed, named)
        rows = None
        converters: dict[str, dict[str, Convert]] = {}
        if row_schema is not None:
            row_type = _avro_type(row_schema, named)
            if row_type.kind == "struct":
                rows = _RowCodec(row_type, json=False)
                converters[row_schema["name"]] = rows.converter_map
        try:
            read = compile_avro_reader(parsed, converters, None if key else _envelope_keep(parsed))
        except (UnsupportedSchema, KeyError, TypeError):
            read = None  # fastavro reads it; the codec converts afterwards
        plan = _AvroPlan(parsed, rows, read)
        plans[id(parsed)] = plan
        return plan

    def _json_row_codec(self, schema: Any, *, what: str = "value") -> _RowCodec | None:
        """The codec of a JsonConverter schema: the envelope's Value struct, or a Key struct."""
        if not isinstance(schema, dict):
            raise _Bad("undecodable", f"{what} schema is not an object")
        row_schema: Any = schema
        if what == "value":
            fields = {f.get("field"): f for f in schema.get("fields") or () if isinstance(f, dict)}
            row_schema = fields.get("after") or fields.get("before")
            if row_schema is None:
                return None
        cache_key = orjson.dumps(row_schema, option=orjson.OPT_SORT_KEYS)
        if cache_key in self._json_rows:
            return self._json_rows[cache_key]
        row_type = _connect_type(row_schema)
        codec = _RowCodec(row_type, json=True) if row_type.kind == "struct" else None
        if len(self._json_rows) < 10_000:
            self._json_rows[cache_key] = codec
        return codec


#: What decoding reads of an envelope and its source block; the rest is stepped over.
ENVELOPE_FIELDS: Final = frozenset({"before", "after", "source", "op"})
SOURCE_FIELDS: Final = frozenset({"ts_ms", "sequence", "lsn"})


def _envelope_keep(envelope: Any) -> dict[str, frozenset[str]]:
    if not isinstance(envelope, dict) or envelope.get("type") != "record":
        return {}
    keep = {envelope["name"]: ENVELOPE_FIELDS}
    for field in envelope.get("fields", ()):
        source = field.get("type")
        if field.get("name") == "source" and isinstance(source, dict) and "name" in source:
            keep[source["name"]] = SOURCE_FIELDS
    return keep


def _image_schema(envelope: Any, named: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record schema of an envelope's ``before``/``after`` (the entity's Value)."""
    if not isinstance(envelope, dict) or envelope.get("type") != "record":
        return None
    for field in envelope.get("fields", ()):
        if field.get("name") not in ("before", "after"):
            continue
        avro = field.get("type")
        branches = avro if isinstance(avro, list) else [avro]
        for branch in branches:
            if isinstance(branch, str):
                branch = named.get(branch)
            if isinstance(branch, dict) and branch.get("type") == "record":
                return branch
    return None


def _avro_record(parsed: Any, payload: memoryview, what: str) -> Any:
    try:
        return fastavro.schemaless_reader(io.BytesIO(payload), parsed, None)
    except Exception as error:  # fastavro raises EOF, Value, Index, Unicode… errors alike
        raise _Bad(
            "undecodable",
            f"{what}: Avro payload does not match its writer schema "
            f"({type(error).__name__}: {error})",
        ) from None


def _looks_like_json(message: bytes) -> bool:
    first = message[:1]
    if first == b"{":
        return True
    return first in (b" ", b"\t", b"\r", b"\n") and message.lstrip()[:1] == b"{"


def _json_object(message: bytes, what: str) -> dict[str, Any]:
    try:
        document = orjson.loads(message)
    except orjson.JSONDecodeError as error:
        raise _Bad("undecodable", f"{what} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise _Bad("undecodable", f"{what} JSON is not an object")
    return document


def _is_wrapped(document: dict[str, Any]) -> bool:
    """JsonConverter with ``schemas.enable=true``: exactly ``schema`` and ``payload``."""
    return len(document) == 2 and "payload" in document and "schema" in document


def _describe_start(message: bytes) -> str:
    return (
        f"starts with {message[:4].hex() or 'nothing'}: none of Avro single-object (c301), "
        "Confluent wire format (00) or JSON ({)"
    )


def _position(source: dict[str, Any]) -> Position:
    """``source.sequence`` ``["<commit LSN>","<LSN>"]``; a null first element means the LSN.

    Without a sequence (Debezium 1.x), ``(lsn, lsn)``.
    """
    lsn = source.get("lsn")
    if lsn is not None and type(lsn) is not int:
        raise _Bad("bad_envelope", f"source.lsn {lsn!r} is not an integer")
    sequence = source.get("sequence")
    if sequence is not None:
        try:
            first, second = orjson.loads(sequence)
            change = int(second) if second is not None else lsn
            if change is not None:
                commit = int(first) if first is not None else change
                return Position(commit, change)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            raise _Bad("bad_envelope", f"source.sequence {sequence!r} is not [a, b]") from None
    if lsn is not None:
        return Position(lsn, lsn)
    raise _Bad("bad_envelope", "source has neither sequence nor lsn: no position")


def _epoch(headers: Sequence[tuple[str, bytes]]) -> str | None:
    epoch = None
    for name, raw in headers:
        if name == EPOCH_HEADER:
            epoch = None if raw is None else bytes(raw).decode("utf-8", "replace")
    return epoch


def _schemaless(
    body: dict[str, Any], key: dict[str, Any] | None, key_names: tuple[str, ...], op: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, EntityShape]:
    """Rows and inferred shape of a schemaless JSON envelope.

    A truncate has no row to infer from: its shape is empty rather than a guess that could
    contradict the column types staging already has.
    """
    if op == "t":
        return None, None, EntityShape(())
    before = after = None
    types: dict[str, str] = {}
    raw_before, raw_after = body.get("before"), body.get("after")
    if raw_before is not None:
        before, before_types = _infer_row(raw_before, "before")
        types.update(before_types)
    if raw_after is not None:
        after, after_types = _infer_row(raw_after, "after")
        # a column null in after takes its type from before, if before had a value
        for name, pg_type in after_types.items():
            if after[name] is not None or name not in types:
                types[name] = pg_type
    for name in key_names:
        if name not in types and key is not None:
            types[name] = _infer(key[name])[1]
    keys = set(key_names)
    shape = EntityShape(tuple(ColumnSpec(n, t, n in keys) for n, t in types.items()))
    return before, after, shape


__all__ = [
    "EPOCH_HEADER",
    "PLACEHOLDER",
    "EventDecoder",
    "TopicRouter",
]
