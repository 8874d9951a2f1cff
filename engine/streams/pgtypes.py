"""PostgreSQL column types → Debezium's Avro types, and values → Avro datums.

The mapping is Debezium's default one (``decimal.handling.mode=precise``,
``time.precision.mode=adaptive``, ``binary.handling.mode=bytes``), so a consumer written for
Debezium reads our topics unchanged. Streaming values arrive as pgoutput text and are parsed by
psycopg's own loaders; snapshot values arrive as Python objects from psycopg. Both go through
the same ``to_avro`` step, so one mapping serves both paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from psycopg import adapters, pq

from engine.streams.exceptions import UnsupportedTable

AvroType = dict[str, Any] | str | list[Any]
ToAvro = Callable[[Any], Any]
FromText = Callable[[bytes], Any]

EPOCH_DATE = date(1970, 1, 1)
EPOCH = datetime(1970, 1, 1)  # noqa: DTZ001 - naive on purpose: `timestamp` has no zone
UNAVAILABLE_VALUE = "__debezium_unavailable_value"


def _connect(avro_type: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": avro_type, "connect.version": 1, "connect.name": name, **extra}


VARIABLE_SCALE_DECIMAL: dict[str, Any] = {
    "type": "record",
    "name": "VariableScaleDecimal",
    "namespace": "io.debezium.data",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    "connect.doc": "Variable scaled decimal",
    "connect.version": 1,
    "connect.name": "io.debezium.data.VariableScaleDecimal",
}


def _unscaled_bytes(value: Decimal, scale: int) -> bytes:
    unscaled = int(value.scaleb(scale))
    length = max(1, (unscaled.bit_length() + 8) // 8)
    return unscaled.to_bytes(length, "big", signed=True)


def _variable_decimal(value: Decimal) -> dict[str, Any]:
    if not value.is_finite():
        raise ValueError(f"numeric {value} has no Avro decimal form")
    exponent = value.as_tuple().exponent
    scale = max(0, -int(exponent))
    return {"scale": scale, "value": _unscaled_bytes(value, scale)}


def _fixed_decimal(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError(f"numeric {value} has no Avro decimal form")
    return value


def _days(value: date) -> int:
    return (value - EPOCH_DATE).days


def _micros(value: datetime) -> int:
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _millis(value: datetime) -> int:
    return _micros(value) // 1000


def _zoned_formatter(precision: int) -> ToAvro:
    """ISO-8601 in UTC with exactly ``precision`` fractional digits, as Debezium (≥ 2.2) writes."""

    cut = 20 + precision if precision > 0 else 19  # "YYYY-MM-DDTHH:MM:SS" + "." + digits

    def zoned(value: datetime) -> str:
        return value.astimezone(UTC).isoformat(timespec="microseconds")[:cut] + "Z"

    return zoned


def _micro_time(value: time) -> int:
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


def _identity(value: Any) -> Any:
    return value


def _text(value: bytes) -> str:
    return value.decode()


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True, slots=True)
class ColumnType:
    """How one column travels: its Avro type, its text parser and its Avro conversion."""

    avro: AvroType
    from_text: FromText
    to_avro: ToAvro
    pg_name: str

    @property
    def text_to_avro(self) -> FromText:
        """pgoutput text → Avro datum in one call (the parser alone where no conversion is due)."""
        if self.to_avro is _identity:
            return self.from_text
        parse, convert = self.from_text, self.to_avro
        return lambda raw: convert(parse(raw))


def _loader(oid: int) -> FromText:
    loader_class = adapters.get_loader(oid, pq.Format.TEXT)
    if loader_class is None:  # pragma: no cover - psycopg knows every builtin we map
        raise LookupError(oid)
    load = loader_class(oid, None).load
    return load


_ARRAY_ELEMENTS = {
    1009: (25, "string"),
    1015: (1043, "string"),
    1007: (23, "int"),
    1016: (20, "long"),
    2951: (2950, "string"),
}


def column_type(type_oid: int, type_modifier: int, *, where: str) -> ColumnType:
    """The mapping for one column; ``where`` (org/entity/column) names it in errors."""
    if type_oid == 16:
        return ColumnType("boolean", lambda raw: raw == b"t", _identity, "boolean")
    if type_oid == 21:
        return ColumnType({"type": "int", "connect.type": "int16"}, int, _identity, "smallint")
    if type_oid == 23:
        return ColumnType("int", int, _identity, "integer")
    if type_oid == 20:
        return ColumnType("long", int, _identity, "bigint")
    if type_oid == 700:
        return ColumnType("float", float, _identity, "real")
    if type_oid == 701:
        return ColumnType("double", float, _identity, "double precision")
    if type_oid in (25, 1043, 1042, 19):
        return ColumnType("string", _text, _identity, "text")
    if type_oid == 2950:
        return ColumnType(_connect("string", "io.debezium.data.Uuid"), _text, _as_str, "uuid")
    if type_oid in (114, 3802):
        return ColumnType(_connect("string", "io.debezium.data.Json"), _text, _as_str, "jsonb")
    if type_oid == 17:
        return ColumnType("bytes", _loader(17), bytes, "bytea")
    if type_oid == 1700:
        parse = _loader(1700)
        if type_modifier >= 4:
            precision = ((type_modifier - 4) >> 16) & 0xFFFF
            scale = (type_modifier - 4) & 0xFFFF
            avro = {
                "type": "bytes",
                "scale": scale,
                "precision": precision,
                "connect.version": 1,
                "connect.parameters": {
                    "scale": str(scale),
                    "connect.decimal.precision": str(precision),
                },
                "connect.name": "org.apache.kafka.connect.data.Decimal",
                "logicalType": "decimal",
            }
            return ColumnType(avro, parse, _fixed_decimal, f"numeric({precision},{scale})")
        return ColumnType(VARIABLE_SCALE_DECIMAL, parse, _variable_decimal, "numeric")
    if type_oid == 1082:
        return ColumnType(_connect("int", "io.debezium.time.Date"), _loader(1082), _days, "date")
    if type_oid == 1114:
        precision = type_modifier if type_modifier >= 0 else 6
        if precision <= 3:
            avro = _connect("long", "io.debezium.time.Timestamp")
            return ColumnType(avro, _loader(1114), _millis, "timestamp")
        avro = _connect("long", "io.debezium.time.MicroTimestamp")
        return ColumnType(avro, _loader(1114), _micros, "timestamp")
    if type_oid == 1184:
        avro = _connect("string", "io.debezium.time.ZonedTimestamp")
        precision = type_modifier if type_modifier >= 0 else 6
        return ColumnType(
            avro, _loader(1184), _zoned_formatter(precision), f"timestamptz({precision})"
        )
    if type_oid == 1083:
        avro = _connect("long", "io.debezium.time.MicroTime")
        return ColumnType(avro, _loader(1083), _micro_time, "time")
    if type_oid in _ARRAY_ELEMENTS:
        element_oid, element_avro = _ARRAY_ELEMENTS[type_oid]
        element = column_type(element_oid, -1, where=where)
        convert = element.to_avro

        def array_to_avro(values: list[Any]) -> list[Any]:
            return [None if v is None else convert(v) for v in values]

        avro = {
            "type": "array",
            "items": ["null", element_avro if isinstance(element.avro, str) else element.avro],
        }
        return ColumnType(avro, _loader(type_oid), array_to_avro, f"{element.pg_name}[]")
    raise UnsupportedTable(
        f"{where}: column type oid {type_oid} is not supported by capture "
        "(supported: boolean, smallint, integer, bigint, real, double precision, numeric, text, "
        "varchar, char, uuid, json, jsonb, bytea, date, time, timestamp, timestamptz, and arrays "
        "of text, varchar, integer, bigint, uuid)"
    )


def unavailable_placeholder(column: ColumnType) -> Any:
    """Debezium's stand-in for an unchanged TOASTed value, in the column's Avro type."""
    if column.avro == "bytes":
        return UNAVAILABLE_VALUE.encode()
    if isinstance(column.avro, dict) and column.avro.get("type") == "array":
        return [UNAVAILABLE_VALUE]
    return UNAVAILABLE_VALUE
