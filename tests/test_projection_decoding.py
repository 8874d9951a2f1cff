"""Projector input decoding: our Avro, Debezium JSON (with and without schema), Confluent Avro.

Real inputs throughout: messages captured from a real PostgreSQL by FieldSync's capture, real
Debezium events (``tests/data/debezium``, see ``SOURCES.md``), and Debezium-shaped Avro
registered with a schema registry stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import orjson
import psycopg
import pytest

from engine.exceptions import ConfigError
from engine.projections.decoding import (
    EventDecoder,
    TopicRouter,
    UnsupportedSchema,
    compile_avro_reader,
)
from engine.projections.exceptions import DecodeError
from engine.projections.model import UNAVAILABLE, ChangeEvent, Position, Tombstone
from engine.streams.framing import (
    SINGLE_OBJECT_MAGIC,
    ConfluentRegistry,
    ConfluentResolver,
    FingerprintResolver,
    schema_fingerprint,
)
from engine.streams.pgtypes import column_type
from engine.streams.reader import load_schemas
from engine.streams.schemas import CapturedColumn, EntitySchema
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, fetch, new_org
from tests.schema_registry_stub import schema_registry

DATA = Path(__file__).parent / "data" / "debezium"
BIG = "".join(f"{i:08x}" for i in range(40_000))  # stored out of line (TOAST)

DEBEZIUM_TOPICS = {
    "pg.public.persons": ("acme", "person"),
    "admin_flights.public.flights": ("acme", "flight"),
    "cqrs.public.widgets": ("acme", "widget"),
    "dbserver1.inventory.orderline": ("acme", "orderline"),
    "instance_mypostgres.public.film": ("acme", "film"),
    "dbserver1.public.t": ("acme", "t"),
    "demo.public.users": ("acme", "user"),
}


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes().strip()


def decoder(**options: Any) -> EventDecoder:
    options.setdefault("single_object", FingerprintResolver())
    return EventDecoder(TopicRouter(DEBEZIUM_TOPICS), **options)


def decode(
    dec: EventDecoder,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] = (),
    *,
    offset: int = 7,
) -> ChangeEvent | Tombstone:
    return asyncio.run(dec.decode(topic, 0, offset, key, value, headers))


def change(dec: EventDecoder, topic: str, key: bytes | None, value: bytes) -> ChangeEvent:
    event = decode(dec, topic, key, value)
    assert isinstance(event, ChangeEvent)
    return event


def pg_types(event: ChangeEvent) -> dict[str, str]:
    return {c.name: c.pg_type for c in event.shape.columns}


# -- our own topics, through real capture ----------------------------------------------------

EVERYTHING = """
CREATE TABLE public.everything (
    id bigint PRIMARY KEY,
    small smallint, normal integer, big bigint, real_ real, dbl double precision,
    money_ numeric(12,2), anyscale numeric, flag boolean, label text,
    day date, at_local timestamp, at timestamptz, clock time,
    ident uuid, doc jsonb, tags text[], blob bytea, body text
)
"""
FULL_ROW = {
    "small": -7,
    "normal": 2_000_000_000,
    "big": 9_000_000_000_000,
    "real_": 1.5,
    "dbl": -2.25,
    "money_": Decimal("-1234567890.12"),
    "anyscale": Decimal("3.14159265358979"),
    "flag": True,
    "label": "héllo, wörld",
    "day": date(2024, 2, 29),
    "at_local": datetime(2024, 2, 29, 13, 14, 15, 123456),  # noqa: DTZ001 - timestamp column
    "at": "2024-02-29 13:14:15.5+02",
    "clock": time(13, 14, 15, 250000),
    "ident": "6ecd8c99-4036-403d-bf84-cf8400f67836",
    "doc": '{"a": [1, 2], "b": null}',
    "tags": ["a", None, "b,c"],
    "blob": b"\x00\xff\x10",
    "body": "short",
}
EXPECTED_TYPES = {
    "id": "bigint",
    "small": "smallint",
    "normal": "integer",
    "big": "bigint",
    "real_": "real",
    "dbl": "double precision",
    "money_": "numeric(12,2)",
    "anyscale": "numeric",
    "flag": "boolean",
    "label": "text",
    "day": "date",
    "at_local": "timestamp",
    "at": "timestamptz",
    "clock": "time",
    "ident": "uuid",
    "doc": "jsonb",
    "tags": "text[]",
    "blob": "bytea",
    "body": "text",
}


def _insert(conn: psycopg.Connection[Any], row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    conn.execute(
        f"INSERT INTO public.everything ({columns}) VALUES ({', '.join(['%s'] * len(row))})",
        list(row.values()),
    )


def _read_back(conn: psycopg.Connection[Any], row_id: int) -> dict[str, Any]:
    """The row as psycopg reads it, in the decoder's representation of uuid and jsonb."""
    cursor = conn.execute("SELECT * FROM public.everything WHERE id = %s", (row_id,))
    names = [d.name for d in cursor.description or ()]
    values = cursor.fetchone()
    assert values is not None
    row = dict(zip(names, values, strict=True))
    if row["ident"] is not None:
        row["ident"] = str(row["ident"])  # io.debezium.data.Uuid travels as text
    return row


def _reader_agrees_with_fastavro(parsed: Any, payload: memoryview, message: bytes) -> None:
    """The compiled reader reads exactly what fastavro reads (the decoder uses the former)."""
    expected = fastavro.schemaless_reader(io.BytesIO(payload), parsed, None)
    assert compile_avro_reader(parsed)(message, len(message) - len(payload)) == expected


def _same_row(decoded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(decoded) == set(expected)
    for name, value in expected.items():
        got = decoded[name]
        if name == "doc" and value is not None:  # jsonb: the JSON text PostgreSQL rendered
            assert isinstance(got, str) and json.loads(got) == value
        else:
            assert got == value, name
            assert type(got) is type(value), name


def test_captured_events_decode_to_the_values_in_the_table(
    fresh_database: str, bootstrap_servers: str
) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(EVERYTHING)
        _insert(conn, {"id": 1, **FULL_ROW})
        _insert(conn, {"id": 2})  # every optional column null
        snapshot_rows = {1: _read_back(conn, 1), 2: _read_back(conn, 2)}
    spec = CaptureSpec(
        org=new_org(), source_dsn=fresh_database, entities={"everything": "public.everything"}
    )
    capture_once(spec, bootstrap_servers)  # snapshot: r
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        _insert(conn, {"id": 3, **FULL_ROW, "body": BIG, "blob": BIG.encode(), "tags": [BIG]})
        created = _read_back(conn, 3)
        conn.execute("UPDATE everything SET label = 'changed', anyscale = -0.5 WHERE id = 1")
        updated_1 = _read_back(conn, 1)
        conn.execute("UPDATE everything SET small = 32767 WHERE id = 3")  # TOASTed untouched
        updated_3 = _read_back(conn, 3)
        conn.execute("DELETE FROM everything WHERE id = 2")
    capture_once(spec, bootstrap_servers)  # stream: c, u, u, d + tombstone
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("TRUNCATE everything")
    capture_once(spec, bootstrap_servers)  # t, once per partition

    topic = f"fieldsync.{spec.org}.everything"
    resolver = load_schemas(bootstrap_servers)
    dec = EventDecoder(TopicRouter(), single_object=resolver)
    records = fetch(bootstrap_servers, topic)
    for record in records:
        for message in (record.key, record.value):
            if message is not None:
                _reader_agrees_with_fastavro(*asyncio.run(resolver.resolve(message)), message)
    decoded = [
        (
            record,
            asyncio.run(
                dec.decode(
                    topic,
                    record.partition,
                    record.offset,
                    record.key,
                    record.value,
                    record.headers or [],
                )
            ),
        )
        for record in records
    ]

    key_ids = {
        record.key: event.key["id"]
        for record, event in decoded
        if isinstance(event, ChangeEvent) and event.key is not None
    }
    per_key: dict[int | None, list[ChangeEvent | Tombstone]] = {}
    for record, event in decoded:
        if isinstance(event, Tombstone):
            assert record.value is None and event.origin.offset == record.offset
            per_key.setdefault(key_ids[record.key], []).append(event)
            continue
        assert (event.org, event.entity) == (spec.org, "everything")
        assert event.origin.partition == record.partition
        assert event.epoch and event.epoch == dict(record.headers)["fieldsync.epoch"].decode()
        assert pg_types(event) == EXPECTED_TYPES
        assert event.shape.key_names == ("id",)
        per_key.setdefault(event.key["id"] if event.key else None, []).append(event)

    def ops(key: int | None) -> list[str]:
        return ["tombstone" if isinstance(e, Tombstone) else e.op for e in per_key[key]]

    assert ops(1) == ["r", "u"]
    assert ops(2) == ["r", "d", "tombstone"]
    assert ops(3) == ["c", "u"]
    assert ops(None) == ["t", "t"]

    events = {
        (e.op, e.key["id"]): e
        for _record, e in decoded
        if isinstance(e, ChangeEvent) and e.key is not None
    }
    _same_row(events[("r", 1)].after, snapshot_rows[1])
    _same_row(events[("r", 2)].after, snapshot_rows[2])
    _same_row(events[("c", 3)].after, created)
    _same_row(events[("u", 1)].after, updated_1)
    assert events[("u", 1)].after["anyscale"] == Decimal("-0.5")
    toasted = events[("u", 3)].after
    assert toasted["body"] is UNAVAILABLE and toasted["blob"] is UNAVAILABLE
    assert toasted["tags"] is UNAVAILABLE
    _same_row({**toasted, "body": BIG, "blob": BIG.encode(), "tags": [BIG]}, updated_3)
    delete = events[("d", 2)]
    assert delete.after is None and delete.before == {n: None for n in EXPECTED_TYPES} | {"id": 2}
    assert events[("u", 1)].before is None  # REPLICA IDENTITY DEFAULT: no before image

    for key in (1, 2, 3):
        positions = [e.position for e in per_key[key] if isinstance(e, ChangeEvent)]
        assert positions == sorted(set(positions)), f"positions of key {key} not increasing"
    truncates = per_key[None]
    assert all(
        isinstance(t, ChangeEvent) and t.before is None and t.after is None for t in truncates
    )
    assert len({t.position for t in truncates}) == 1  # one truncate, copied per partition
    assert truncates[0].position > max(
        e.position for k in (1, 2, 3) for e in per_key[k] if isinstance(e, ChangeEvent)
    )
    assert all(e.source_ts_ms > 1_600_000_000_000 for k in (1, 3) for e in per_key[k])


# -- Debezium JsonConverter ------------------------------------------------------------------


def test_debezium_json_with_schema() -> None:
    dec = decoder()
    created = change(
        dec,
        "pg.public.persons",
        fixture("pg_persons_2.7.1_create.key.json"),
        fixture("pg_persons_2.7.1_create.value.json"),
    )
    assert (created.org, created.entity, created.op) == ("acme", "person", "c")
    assert created.key == {"id": 2}
    assert created.before is None and created.after == {"id": 2, "name": "Paul", "age": 25}
    # "[null,\"23043920\"]": Debezium had no previous commit LSN yet; the LSN stands in
    assert created.position == Position(23043920, 23043920)
    assert created.source_ts_ms == 1764100127886 and created.epoch is None
    assert pg_types(created) == {"id": "integer", "name": "text", "age": "integer"}
    assert created.shape.key_names == ("id",)

    # the update's payload, in the schema of the create (same table, same connector)
    wrapped = orjson.loads(fixture("pg_persons_2.7.1_create.value.json"))
    wrapped["payload"] = orjson.loads(fixture("pg_persons_2.7.1_update.payload.json"))
    key = (
        b'{"schema":'
        + orjson.dumps(orjson.loads(fixture("pg_persons_2.7.1_create.key.json"))["schema"])
        + b',"payload":{"id":1}}'
    )
    updated = change(dec, "pg.public.persons", key, orjson.dumps(wrapped))
    assert updated.op == "u" and updated.key == {"id": 1}
    assert updated.before is None and updated.after == {"id": 1, "name": "Tom", "age": 30}
    assert updated.position == Position(23044320, 23044320) > created.position

    flight = change(
        dec,
        "admin_flights.public.flights",
        b'{"id":"855ac320-1067-4d99-b4f1-6d46c64c514f"}',  # a bare key, typed by the value's schema
        fixture("admin_flights_3.0.0_snapshot.value.json"),
    )
    assert flight.op == "r" and flight.key == {"id": "855ac320-1067-4d99-b4f1-6d46c64c514f"}
    assert flight.after == {
        "id": "855ac320-1067-4d99-b4f1-6d46c64c514f",
        "boarding_at": datetime(2025, 7, 16, 18, 10, 13, 467000, tzinfo=UTC),
        "capacity": 2,
        "created_at": None,
        "destination": "Nossa",
        "landing_at": datetime(2025, 7, 19, 18, 10, 13, 467000, tzinfo=UTC),
        "origin": "Minha casa",
        "updated_at": datetime(2025, 7, 30, 18, 36, 58, 596117, tzinfo=UTC),
    }
    assert flight.after["boarding_at"].utcoffset().total_seconds() == 0
    assert flight.position == Position(26834688, 26834688)
    assert pg_types(flight) == {
        "id": "uuid",
        "boarding_at": "timestamptz",
        "capacity": "smallint",
        "created_at": "timestamptz",
        "destination": "text",
        "landing_at": "timestamptz",
        "origin": "text",
        "updated_at": "timestamptz",
    }

    film = change(
        dec,
        "instance_mypostgres.public.film",
        fixture("instance_mypostgres_film_1.2.0_snapshot.key.json"),
        fixture("instance_mypostgres_film_1.2.0_snapshot.value.json"),
    )
    # the source paired the key of film 965 with the value of film 778 (SOURCES.md): the key
    # is the Kafka key, decoded as sent
    assert film.key == {"film_id": 965} and film.after["film_id"] == 778
    assert film.after["rental_rate"] == Decimal("4.99")  # "AfM=" = 0x01F3 = 499, scale 2
    assert film.after["replacement_cost"] == Decimal("24.99")  # "CcM="
    assert film.after["last_update"] == datetime(2013, 5, 26, 14, 50, 58, 951000)  # noqa: DTZ001
    assert film.after["special_features"] == ["Trailers", "Commentaries"]
    assert film.after["rating"] == "G" and film.after["language_id"] == 1
    assert film.position == Position(30998528, 30998528)  # Debezium 1.2: no sequence, lsn
    types = pg_types(film)
    assert types["rental_rate"] == "numeric(4,2)" and types["replacement_cost"] == "numeric(5,2)"
    assert types["last_update"] == "timestamp" and types["language_id"] == "smallint"
    assert types["special_features"] == "text[]" and types["rating"] == "text"


def test_debezium_json_without_schema() -> None:
    dec = decoder()
    key = b'{"id":"w1"}'
    create, update, delete = (
        change(dec, "cqrs.public.widgets", key, fixture(f"cqrs_widgets_2.7.3_{op}.json"))
        for op in ("create", "update", "delete")
    )
    assert [e.op for e in (create, update, delete)] == ["c", "u", "d"]
    assert all(e.key == {"id": "w1"} for e in (create, update, delete))
    assert create.after == {"id": "w1", "name": "gadget", "active": True}
    assert update.before is None and update.after == {
        "id": "w1",
        "name": "gadget2",
        "active": False,
    }
    # REPLICA IDENTITY DEFAULT: Debezium fills NOT NULL non-key columns with zero values
    assert delete.after is None and delete.before == {"id": "w1", "name": "", "active": False}
    # sequence[0] is the *previous* commit's LSN in Debezium
    assert create.position == Position(306218576, 314477488)
    assert update.position == Position(314477768, 314477768)
    assert delete.position == Position(314477896, 314477896)
    assert create.position < update.position < delete.position
    assert create.source_ts_ms == 1790710562903
    assert pg_types(create) == {"id": "text", "name": "text", "active": "boolean"}
    assert create.shape.key_names == ("id",)
    tombstone = decode(dec, "cqrs.public.widgets", key, None, offset=99)
    assert isinstance(tombstone, Tombstone) and tombstone.origin.offset == 99

    old = change(
        dec,
        "dbserver1.inventory.orderline",
        b'{"id":1}',
        fixture("dbserver1_orderline_1.4.0_create.json"),
    )
    assert old.op == "c" and old.key == {"id": 1}
    assert old.position == Position(34251136, 34251136)  # Debezium 1.x: no sequence
    # without a schema nothing says "D54=" is a decimal: inferred types, documented
    assert old.after["totalprice"] == "D54="
    assert pg_types(old) == {
        "id": "bigint",
        "item": "text",
        "quantity": "bigint",
        "status": "text",
        "totalprice": "text",
        "order_id": "bigint",
    }


def test_schemaless_unavailable_placeholders() -> None:
    body = orjson.loads(fixture("cqrs_widgets_2.7.3_update.json"))
    body["after"]["name"] = "__debezium_unavailable_value"
    body["after"]["tags"] = ["__debezium_unavailable_value"]
    body["after"]["blob"] = base64.b64encode(b"__debezium_unavailable_value").decode()
    event = change(decoder(), "cqrs.public.widgets", b'{"id":"w1"}', orjson.dumps(body))
    assert event.after == {
        "id": "w1",
        "name": UNAVAILABLE,
        "active": False,
        "tags": UNAVAILABLE,
        "blob": UNAVAILABLE,
    }


# -- Debezium AvroConverter in Confluent wire format ----------------------------------------

KEY_SCHEMA = {
    "type": "record",
    "name": "Key",
    "namespace": "dbserver1.public.t",
    "fields": [{"name": "id", "type": {"type": "int", "connect.default": 0}, "default": 0}],
    "connect.name": "dbserver1.public.t.Key",
}
ALL_TYPES_ROW: dict[str, Any] = {
    "id": 1,
    "c_smallint": -7,
    "c_int": 2_000_000_000,
    "c_bigint": 9_000_000_000_000,
    "c_real": 1.5,
    "c_double": -2.25,
    "c_bool": True,
    "c_text": "héllo",
    "c_varchar": "v",
    "c_char": "ab        ",
    "c_numeric": Decimal("12345678.90"),
    "c_numeric_var": {"scale": 3, "value": (-1234567).to_bytes(3, "big", signed=True)},
    "c_date": 17109,
    "c_ts": 1478267490123456,
    "c_ts3": 1478267490123,
    "c_tstz": "2016-11-04T11:51:30.123456Z",
    "c_time": 49890000000,
    "c_timetz": "11:51:30.123789Z",
    "c_uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "c_json": '{"bar": "baz"}',
    "c_jsonb": '{"bar": "baz"}',
    "c_text_arr": ["one", None, "three"],
    "c_bytea": b"\x00\x01\x02",
    "c_interval": 37091106780000,
}
USER_ROW: dict[str, Any] = {
    "id": 5,
    "user_id": "u-5",
    "email": None,
    "country": "NL",
    "created_at": 1478267490123456,
    "updated_at": None,
}


def _source(lsn: int, commit: int | None) -> dict[str, Any]:
    first = "null" if commit is None else f'"{commit}"'
    sequence = f'[{first},"{lsn}"]'
    return {
        "version": "3.5.0.Final",
        "connector": "postgresql",
        "name": "dbserver1",
        "ts_ms": 1_700_000_000_000 + lsn,
        "snapshot": "false",
        "db": "postgres",
        "sequence": sequence,
        "ts_us": None,
        "ts_ns": None,
        "schema": "public",
        "table": "t",
        "txId": 777,
        "lsn": lsn,
        "xmin": None,
        "origin": None,
        "origin_lsn": None,
    }


def _avro(schema: dict[str, Any], datum: Any) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), datum)
    return buffer.getvalue()


def test_debezium_avro_in_confluent_wire_format() -> None:
    value_schema = json.loads((DATA / "derived_envelope_3x.avsc").read_text())
    users_schema = json.loads((DATA / "demo_users_registry_envelope.avsc").read_text())
    users_key = {
        "type": "record",
        "name": "Key",
        "namespace": "demo.public.users",
        "fields": [{"name": "id", "type": {"type": "int", "connect.default": 0}, "default": 0}],
        "connect.name": "demo.public.users.Key",
    }

    async def run() -> list[ChangeEvent | Tombstone]:
        with schema_registry() as (url, _registry):
            registry = ConfluentRegistry(url)
            try:
                key_id = await registry.register("dbserver1.public.t-key", KEY_SCHEMA)
                value_id = await registry.register("dbserver1.public.t-value", value_schema)
                users_key_id = await registry.register("demo.public.users-key", users_key)
                users_id = await registry.register("demo.public.users-value", users_schema)

                def framed(schema_id: int, schema: dict[str, Any], datum: Any) -> bytes:
                    message = b"\x00" + schema_id.to_bytes(4, "big") + _avro(schema, datum)
                    parsed = fastavro.parse_schema(copy.deepcopy(schema))
                    _reader_agrees_with_fastavro(parsed, memoryview(message)[5:], message)
                    return message

                def envelope(op: str, before: Any, after: Any, lsn: int) -> bytes:
                    body = {
                        "before": before,
                        "after": after,
                        "source": _source(lsn, lsn - 8),
                        "transaction": None,
                        "op": op,
                        "ts_ms": 1_700_000_000_999,
                        "ts_us": None,
                        "ts_ns": None,
                    }
                    return framed(value_id, value_schema, body)

                key = framed(key_id, KEY_SCHEMA, {"id": 1})
                toasted = {
                    **ALL_TYPES_ROW,
                    "c_text": "__debezium_unavailable_value",
                    "c_jsonb": "__debezium_unavailable_value",
                    "c_bytea": b"__debezium_unavailable_value",
                    "c_text_arr": ["__debezium_unavailable_value"],
                }
                key_only = {n: None for n in ALL_TYPES_ROW} | {"id": 1, "c_bigint": 0}
                messages = [
                    (key, envelope("c", None, ALL_TYPES_ROW, 100)),
                    (key, envelope("u", None, toasted, 200)),
                    (key, envelope("d", key_only, None, 300)),
                    (key, None),
                    (None, envelope("t", None, None, 400)),
                ]
                dec = EventDecoder(
                    TopicRouter(DEBEZIUM_TOPICS),
                    single_object=FingerprintResolver(),
                    confluent=ConfluentResolver(registry),
                )
                out = [
                    await dec.decode("dbserver1.public.t", 0, offset, k, v, [])
                    for offset, (k, v) in enumerate(messages)
                ]
                user = {
                    "before": None,
                    "after": USER_ROW,
                    "source": _source(500, None) | {"name": "demo", "table": "users"},
                    "transaction": {"id": "777:500", "total_order": 1, "data_collection_order": 1},
                    "op": "c",
                    "ts_ms": None,
                    "ts_us": None,
                    "ts_ns": None,
                }
                for field in ("origin", "origin_lsn"):  # a 3.0 Source has neither
                    del user["source"][field]
                out.append(
                    await dec.decode(
                        "demo.public.users",
                        1,
                        0,
                        framed(users_key_id, users_key, {"id": 5}),
                        framed(users_id, users_schema, user),
                        [("fieldsync.epoch", b"ignored-for-debezium")],
                    )
                )
                return out
            finally:
                await registry.close()

    created, updated, deleted, tombstone, truncated, user = asyncio.run(run())
    assert isinstance(created, ChangeEvent) and isinstance(updated, ChangeEvent)
    assert isinstance(deleted, ChangeEvent) and isinstance(truncated, ChangeEvent)
    assert isinstance(tombstone, Tombstone) and isinstance(user, ChangeEvent)
    assert (created.org, created.entity, created.op, created.key) == ("acme", "t", "c", {"id": 1})
    assert created.after == {
        **ALL_TYPES_ROW,
        "c_numeric": Decimal("12345678.90"),
        "c_numeric_var": Decimal("-1234.567"),
        "c_date": date(2016, 11, 4),
        "c_ts": datetime(2016, 11, 4, 13, 51, 30, 123456),  # noqa: DTZ001
        "c_ts3": datetime(2016, 11, 4, 13, 51, 30, 123000),  # noqa: DTZ001
        "c_tstz": datetime(2016, 11, 4, 11, 51, 30, 123456, tzinfo=UTC),
        "c_time": time(13, 51, 30),
        "c_timetz": "11:51:30.123789Z",  # ZonedTime: no column type of ours, kept as text
        "c_interval": 37091106780000,  # MicroDuration: kept as its base type
    }
    assert pg_types(created) == {
        "id": "integer",
        "c_smallint": "smallint",
        "c_int": "integer",
        "c_bigint": "bigint",
        "c_real": "real",
        "c_double": "double precision",
        "c_bool": "boolean",
        "c_text": "text",
        "c_varchar": "text",
        "c_char": "text",
        "c_numeric": "numeric(10,2)",
        "c_numeric_var": "numeric",
        "c_date": "date",
        "c_ts": "timestamp",
        "c_ts3": "timestamp",
        "c_tstz": "timestamptz",
        "c_time": "time",
        "c_timetz": "text",
        "c_uuid": "uuid",
        "c_json": "jsonb",
        "c_jsonb": "jsonb",
        "c_text_arr": "text[]",
        "c_bytea": "bytea",
        "c_interval": "bigint",
    }
    assert created.shape.key_names == ("id",)
    assert created.position == Position(92, 100) and created.source_ts_ms == 1_700_000_000_100
    assert updated.op == "u"
    for column in ("c_text", "c_jsonb", "c_bytea", "c_text_arr"):
        assert updated.after[column] is UNAVAILABLE, column
    assert deleted.op == "d" and deleted.after is None and deleted.before["id"] == 1
    assert tombstone.origin.offset == 3
    assert truncated.op == "t" and truncated.key is None
    assert truncated.before is None and truncated.after is None
    assert truncated.shape.key_names == ("id",)  # remembered from the topic's earlier keys
    assert created.position < updated.position < deleted.position < truncated.position

    assert (user.org, user.entity, user.key, user.epoch) == (
        "acme",
        "user",
        {"id": 5},
        "ignored-for-debezium",
    )
    assert user.after == {
        **USER_ROW,
        "created_at": datetime(2016, 11, 4, 13, 51, 30, 123456),  # noqa: DTZ001
    }
    assert user.position == Position(500, 500)
    assert pg_types(user)["created_at"] == "timestamp"


# -- every DecodeError reason ---------------------------------------------------------------


def _our_envelope() -> tuple[EntitySchema, dict[str, Any]]:
    """A FieldSync entity schema as capture builds it: id integer key, small smallint."""
    schema = EntitySchema(
        "acme",
        "thing",
        (
            CapturedColumn("id", column_type(23, -1, where="acme/thing/id"), True),
            CapturedColumn("small", column_type(21, -1, where="acme/thing/small"), False),
        ),
    )
    body = {
        "before": None,
        "after": {"id": 1, "small": 5},
        "source": _source(100, 90) | {"version": "fieldsync-0.1.0", "name": "fieldsync"},
        "transaction": None,
        "op": "c",
        "ts_ms": None,
        "ts_us": None,
        "ts_ns": None,
    }
    for field in ("origin", "origin_lsn"):
        del body["source"][field]
    return schema, body


def _single_object(schema: dict[str, Any], datum: Any) -> bytes:
    return SINGLE_OBJECT_MAGIC + schema_fingerprint(schema) + _avro(schema, datum)


def _expect(
    reason: str, dec: EventDecoder, topic: str, key: bytes | None, value: bytes | None
) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(dec, topic, key, value, offset=41)
    error = caught.value
    assert error.reason == reason, str(error)
    assert f"{topic} partition 0 offset 41" in str(error)
    assert not error.retryable and error.origin is not None and error.origin.offset == 41
    return error


def test_our_avro_decodes_and_each_avro_failure_has_its_reason() -> None:
    schema, body = _our_envelope()
    known = FingerprintResolver()
    known.add(schema.key_schema)
    known.add(schema.envelope_schema)
    dec = EventDecoder(TopicRouter(), single_object=known)
    key = _single_object(schema.key_schema, {"id": 1})
    topic = "fieldsync.acme.thing"
    event = change(dec, topic, key, _single_object(schema.envelope_schema, body))
    assert (event.org, event.entity, event.key, event.after) == (
        "acme",
        "thing",
        {"id": 1},
        {"id": 1, "small": 5},
    )
    assert pg_types(event) == {"id": "integer", "small": "smallint"}

    overflow = _single_object(schema.envelope_schema, {**body, "after": {"id": 1, "small": 70000}})
    error = _expect("type_overflow", dec, topic, key, overflow)
    assert "'small'" in str(error) and "70000" in str(error)
    # Avro int and long share one encoding: a long written where the schema says int
    wide = copy.deepcopy(schema.envelope_schema)
    wide["fields"][0]["type"][1]["fields"][0]["type"] = "long"
    int32 = (
        SINGLE_OBJECT_MAGIC
        + schema_fingerprint(schema.envelope_schema)
        + _avro(wide, {**body, "after": {"id": 2**31, "small": 1}})
    )
    _expect("type_overflow", dec, topic, key, int32)

    unknown = FingerprintResolver()
    _expect(
        "unknown_schema",
        EventDecoder(TopicRouter(), single_object=unknown),
        topic,
        key,
        _single_object(schema.envelope_schema, body),
    )
    _expect("undecodable", dec, topic, key, _single_object(schema.envelope_schema, body)[:14])
    _expect("bad_magic", dec, topic, key, b"\x01\x02\x03garbage")
    error = _expect("bad_magic", dec, topic, key, b"\x00\x00\x00\x00\x01payload")
    assert "FIELDSYNC_SCHEMA_REGISTRY_URL" in str(error)
    _expect("missing_key", dec, topic, None, _single_object(schema.envelope_schema, body))
    # truncates carry no key: fine; their shape's key flags follow our schema convention
    truncate = change(
        EventDecoder(TopicRouter(), single_object=known),
        topic,
        None,
        _single_object(schema.envelope_schema, {**body, "op": "t", "after": None}),
    )
    assert truncate.key is None and truncate.shape.key_names == ("id",)


def test_unknown_registry_id_is_unknown_schema() -> None:
    async def run() -> DecodeError:
        with schema_registry() as (url, _registry):
            registry = ConfluentRegistry(url)
            try:
                dec = decoder(confluent=ConfluentResolver(registry))
                with pytest.raises(DecodeError) as caught:
                    await dec.decode(
                        "cqrs.public.widgets", 0, 1, b'{"id":1}', b"\x00\x00\x00\x03\xe7xx", []
                    )
                return caught.value
            finally:
                await registry.close()

    assert asyncio.run(run()).reason == "unknown_schema"


def _widget(**changes: Any) -> bytes:
    body = orjson.loads(fixture("cqrs_widgets_2.7.3_create.json"))
    for name, value in changes.items():
        if value is ...:
            del body[name]
        else:
            body[name] = value
    return orjson.dumps(body)


def test_each_json_failure_has_its_reason() -> None:
    dec = decoder()
    topic, key = "cqrs.public.widgets", b'{"id":"w1"}'
    _expect("undecodable", dec, topic, key, b'{"before": null, "after": {')
    _expect("missing_op", dec, topic, key, _widget(op=...))
    _expect("bad_op", dec, topic, key, _widget(op="m"))
    _expect("missing_key", dec, topic, None, _widget())
    _expect("bad_envelope", dec, topic, key, _widget(after=None))
    _expect("bad_envelope", dec, topic, key, _widget(source=...))
    source = orjson.loads(fixture("cqrs_widgets_2.7.3_create.json"))["source"]
    del source["sequence"], source["lsn"]
    _expect("bad_envelope", dec, topic, key, _widget(source=source))
    _expect("bad_magic", dec, topic, b"\x07key", _widget())

    # with a schema, values are checked against it
    flights = orjson.loads(fixture("admin_flights_3.0.0_snapshot.value.json"))
    flights["payload"]["after"]["capacity"] = 40_000
    flight = b'{"id":"8a5d4c1e-2b0f-4c5e-9d3a-7f6e5d4c3b2a"}'
    error = _expect(
        "type_overflow", dec, "admin_flights.public.flights", flight, orjson.dumps(flights)
    )
    assert "'capacity'" in str(error) and "int16" in str(error)
    # a uuid key that is none: staging could not hold it
    valid = fixture("admin_flights_3.0.0_snapshot.value.json")
    error = _expect("bad_value", dec, "admin_flights.public.flights", b'{"id":"x"}', valid)
    assert "'x' is not a uuid" in str(error)
    persons = orjson.loads(fixture("pg_persons_2.7.1_create.value.json"))
    persons["payload"]["after"]["age"] = 2**31
    _expect("type_overflow", dec, "pg.public.persons", b'{"id":2}', orjson.dumps(persons))
    persons["payload"]["after"]["age"] = "thirty"
    _expect("undecodable", dec, "pg.public.persons", b'{"id":2}', orjson.dumps(persons))

    value = fixture("cqrs_widgets_2.7.3_create.json")
    small = decoder(max_message_bytes=len(value) + len(key) - 1)
    error = _expect("oversized", small, topic, key, value)
    assert str(len(value) + len(key)) in str(error)
    assert isinstance(
        decode(decoder(max_message_bytes=len(value) + len(key)), topic, key, value), ChangeEvent
    )

    for unrouted in (
        "fieldsync.acme.transaction",
        "fieldsync.acme.dlq",
        "fieldsync.schemas",
        "fieldsync.dlq",
        "fieldsync.Acme.thing",
        "fieldsync.acme.thing.extra",
        "dbserver1.inventory.unmapped",
    ):
        _expect("unknown_org", dec, unrouted, key, value)


def test_topic_router() -> None:
    router = TopicRouter({"dbserver1.inventory.customers": ("acme", "customer")})
    assert router.route("fieldsync.acme.account") == ("acme", "account")
    assert router.route("fieldsync.org_2.line_item") == ("org_2", "line_item")
    assert router.route("dbserver1.inventory.customers") == ("acme", "customer")
    assert router.route("dbserver1.inventory.orders") is None
    assert router.route("fieldsync.acme.transaction") is None
    assert router.route("fieldsync.2acme.account") is None
    assert router.route("fieldsync." + "a" * 41 + ".account") is None
    assert router.route("fieldsync.acme.account\n") is None
    with pytest.raises(ConfigError):
        TopicRouter({"x.y.z": ("Acme", "customer")})
    with pytest.raises(ConfigError):
        TopicRouter({"x.y.z": ("acme", "Customer")})


def test_other_avro_logical_types_are_left_to_fastavro() -> None:
    """Debezium with ``time.precision.mode=connect`` uses Kafka's Date/Timestamp, which the
    AvroConverter marks with Avro logical types: the compiled reader steps aside."""
    schema = json.loads((DATA / "derived_envelope_3x.avsc").read_text())
    value_fields = schema["fields"][0]["type"][1]["fields"]
    value_fields += [
        {
            "name": "c_connect_ts",
            "type": [
                "null",
                {
                    "type": "long",
                    "connect.version": 1,
                    "connect.name": "org.apache.kafka.connect.data.Timestamp",
                    "logicalType": "timestamp-millis",
                },
            ],
            "default": None,
        },
        {
            "name": "c_connect_date",
            "type": [
                "null",
                {
                    "type": "int",
                    "connect.version": 1,
                    "connect.name": "org.apache.kafka.connect.data.Date",
                    "logicalType": "date",
                },
            ],
            "default": None,
        },
    ]
    with pytest.raises(UnsupportedSchema):
        compile_avro_reader(fastavro.parse_schema(copy.deepcopy(schema)))
    row = {
        **ALL_TYPES_ROW,
        "c_connect_ts": datetime(2016, 11, 4, 13, 51, 30, 123000, tzinfo=UTC),
        "c_connect_date": date(2016, 11, 4),
    }
    body = {
        "before": None,
        "after": row,
        "source": _source(100, 92),
        "transaction": None,
        "op": "r",
        "ts_ms": None,
        "ts_us": None,
        "ts_ns": None,
    }
    resolver = FingerprintResolver()  # our framing of a Debezium-shaped schema: same path
    resolver.add(schema)
    resolver.add(KEY_SCHEMA)
    dec = EventDecoder(TopicRouter(DEBEZIUM_TOPICS), single_object=resolver)
    event = change(
        dec,
        "dbserver1.public.t",
        _single_object(KEY_SCHEMA, {"id": 1}),
        _single_object(schema, body),
    )
    assert event.after is not None
    assert event.after["c_connect_ts"] == datetime(2016, 11, 4, 13, 51, 30, 123000)  # noqa: DTZ001
    assert event.after["c_connect_date"] == date(2016, 11, 4)
    assert event.after["c_numeric"] == Decimal("12345678.90")
    assert event.after["c_tstz"] == datetime(2016, 11, 4, 11, 51, 30, 123456, tzinfo=UTC)
    types = pg_types(event)
    assert types["c_connect_ts"] == "timestamp" and types["c_connect_date"] == "date"
    assert event.position == Position(92, 100)


def test_corrupt_avro_is_undecodable() -> None:
    schema, body = _our_envelope()
    known = FingerprintResolver()
    known.add(schema.key_schema)
    known.add(schema.envelope_schema)
    dec = EventDecoder(TopicRouter(), single_object=known)
    key = _single_object(schema.key_schema, {"id": 1})
    value = bytearray(_single_object(schema.envelope_schema, body))
    assert value[10] == 0  # the union index of `before` (null)
    value[10] = 4  # a third branch that does not exist
    error = _expect("undecodable", dec, "fieldsync.acme.thing", key, bytes(value))
    assert "union index" in str(error)
    text = _single_object(schema.envelope_schema, body)
    _expect("undecodable", dec, "fieldsync.acme.thing", key, text[:-3])


def test_schemaless_truncate_has_no_key_and_an_empty_shape() -> None:
    body = orjson.loads(fixture("cqrs_widgets_2.7.3_create.json"))
    body.update(op="t", before=None, after=None)
    dec = decoder()
    change(dec, "cqrs.public.widgets", b'{"id":"w1"}', fixture("cqrs_widgets_2.7.3_create.json"))
    event = change(dec, "cqrs.public.widgets", None, orjson.dumps(body))
    assert (event.op, event.key, event.before, event.after) == ("t", None, None, None)
    assert event.shape.columns == ()
    assert event.position == Position(306218576, 314477488)
