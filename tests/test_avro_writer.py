"""The compiled Avro writer against fastavro, the reference: same bytes in, same datum out."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.streams.avro_writer import compile_writer, decimal_bytes
from engine.streams.pgtypes import VARIABLE_SCALE_DECIMAL, column_type
from engine.streams.schemas import CapturedColumn, EntitySchema, transaction_value_schema

COLUMNS = [
    ("id", 20, -1, True),
    ("s", 21, -1, False),
    ("i", 23, -1, False),
    ("l", 20, -1, False),
    ("r", 700, -1, False),
    ("d", 701, -1, False),
    ("m", 1700, (38 << 16 | 10) + 4, False),
    ("v", 1700, -1, False),
    ("b", 16, -1, False),
    ("t", 25, -1, False),
    ("u", 2950, -1, False),
    ("day", 1082, -1, False),
    ("ts", 1114, -1, False),
    ("tz", 1184, -1, False),
    ("tags", 1009, -1, False),
    ("ints", 1007, -1, False),
    ("blob", 17, -1, False),
]
ENTITY = EntitySchema(
    "org",
    "thing",
    tuple(CapturedColumn(n, column_type(o, m, where="t"), k) for n, o, m, k in COLUMNS),
)

texts = st.text(max_size=30)
longs = st.integers(-(2**63), 2**63 - 1)
ints = st.integers(-(2**31), 2**31 - 1)
decimals = st.decimals(
    min_value=Decimal("-1e27"),
    max_value=Decimal("1e27"),
    places=10,
    allow_nan=False,
    allow_infinity=False,
)
floats32 = st.floats(width=32, allow_nan=False)
values = st.fixed_dictionaries(
    {"id": longs},
    optional={
        "s": st.none() | st.integers(-32768, 32767),
        "i": st.none() | ints,
        "l": st.none() | longs,
        "r": st.none() | floats32,
        "d": st.none() | st.floats(allow_nan=False),
        "m": st.none() | decimals,
        "v": st.none()
        | st.builds(
            lambda s, v: {"scale": s, "value": v}, st.integers(0, 20), st.binary(max_size=12)
        ),
        "b": st.none() | st.booleans(),
        "t": st.none() | texts,
        "u": st.none() | st.uuids().map(str),
        "day": st.none() | ints,
        "ts": st.none() | longs,
        "tz": st.none() | texts,
        "tags": st.none() | st.lists(st.none() | texts, max_size=5),
        "ints": st.none() | st.lists(st.none() | ints, max_size=5),
        "blob": st.none() | st.binary(max_size=40),
    },
)
sources = st.fixed_dictionaries(
    {
        "version": texts,
        "connector": texts,
        "name": texts,
        "ts_ms": longs,
        "snapshot": st.none() | st.sampled_from(["true", "false", "last"]),
        "db": texts,
        "sequence": st.none() | texts,
        "ts_us": st.none() | longs,
        "ts_ns": st.none() | longs,
        "schema": texts,
        "table": texts,
        "txId": st.none() | longs,
        "lsn": st.none() | longs,
        "xmin": st.none() | longs,
    }
)
blocks = st.none() | st.fixed_dictionaries(
    {"id": texts, "total_order": longs, "data_collection_order": longs}
)


def _both(schema: dict[str, Any], datum: Any) -> tuple[bytes, Any]:
    buffer = bytearray()
    compile_writer(schema)(buffer, datum)
    parsed = fastavro.parse_schema(schema)
    return bytes(buffer), fastavro.schemaless_reader(io.BytesIO(bytes(buffer)), parsed, None)


def _reference(schema: dict[str, Any], datum: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), datum)
    return out.getvalue()


def _full(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row.get(name) for name, *_ in COLUMNS}


@settings(max_examples=300, deadline=None)
@given(
    before=st.none() | values,
    after=st.none() | values,
    source=sources,
    block=blocks,
    op=st.sampled_from("crudt"),
    ts=st.none() | longs,
)
def test_envelopes_match_fastavro(
    before: Any, after: Any, source: Any, block: Any, op: str, ts: Any
) -> None:
    envelope = {
        "before": before and _full(before),
        "after": after and _full(after),
        "source": source,
        "transaction": block,
        "op": op,
        "ts_ms": ts,
        "ts_us": ts,
        "ts_ns": ts,
    }
    written, decoded = _both(ENTITY.envelope_schema, envelope)
    assert written == _reference(ENTITY.envelope_schema, envelope)
    assert decoded == envelope


@given(key=st.fixed_dictionaries({"id": longs}))
def test_keys_match_fastavro(key: dict[str, int]) -> None:
    written, decoded = _both(ENTITY.key_schema, key)
    assert written == _reference(ENTITY.key_schema, key) and decoded == key


@given(
    count=st.none() | longs,
    collections=st.none()
    | st.lists(st.fixed_dictionaries({"data_collection": texts, "event_count": longs}), max_size=4),
)
def test_transaction_records_match_fastavro(count: Any, collections: Any) -> None:
    record = {
        "status": "END",
        "id": "1:2",
        "event_count": count,
        "data_collections": collections,
        "ts_ms": 5,
    }
    written, decoded = _both(transaction_value_schema(), record)
    assert written == _reference(transaction_value_schema(), record) and decoded == record


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4))
def test_decimal_bytes_are_exact(value: Decimal) -> None:
    schema = {"type": "bytes", "logicalType": "decimal", "precision": 60, "scale": 4}
    written, decoded = _both(schema, value)
    assert written == _reference(schema, value) and decoded == value
    assert decimal_bytes(Decimal("-128"), 0) == b"\xff\x80"


def test_variable_scale_decimal_is_a_plain_record() -> None:
    datum = {"scale": 3, "value": b"\x30\x39"}
    assert _both(VARIABLE_SCALE_DECIMAL, datum)[1] == datum


def test_out_of_range_values_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="does not fit an Avro int"):
        compile_writer("int")(bytearray(), 2**31)
    with pytest.raises(ValueError, match="more than 2 fractional digits"):
        compile_writer({"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2})(
            bytearray(), Decimal("1.234")
        )
