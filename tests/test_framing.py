"""One conformance suite for both framings: whatever capture writes, the matching reader decodes."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from engine.streams.framing import (
    ConfluentRegistry,
    ConfluentResolver,
    FingerprintResolver,
    FramingError,
    SchemaResolver,
)
from engine.streams.reader import load_schemas
from engine.streams.spec import CaptureSpec
from tests.capture_helpers import capture_once, fetch, new_org
from tests.schema_registry_stub import schema_registry


@pytest.fixture(params=["single-object", "confluent"])
def framing(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    if request.param == "single-object":
        yield "single-object", {}
    else:
        with schema_registry() as (url, _registry):
            yield "confluent", {"schema_registry_url": url}


def _resolver(kind: str, bootstrap: str, overrides: dict[str, Any]) -> SchemaResolver:
    if kind == "single-object":
        return load_schemas(bootstrap)
    return ConfluentResolver(ConfluentRegistry(overrides["schema_registry_url"]))


def test_both_framings_round_trip(
    framing: tuple[str, dict[str, Any]], fresh_database: str, bootstrap_servers: str
) -> None:
    kind, overrides = framing
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, amount numeric(8,2), note text)")
        conn.execute("INSERT INTO t VALUES (1, 1.25, 'a'), (2, NULL, NULL)")
    spec = CaptureSpec(org=new_org(), source_dsn=fresh_database, entities={"t": "public.t"})
    capture_once(spec, bootstrap_servers, **overrides)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("UPDATE t SET note = 'b' WHERE id = 1")
        conn.execute("DELETE FROM t WHERE id = 2")
    capture_once(spec, bootstrap_servers, **overrides)

    resolver = _resolver(kind, bootstrap_servers, overrides)
    magic = b"\xc3\x01" if kind == "single-object" else b"\x00"

    async def decode_all() -> list[tuple[Any, Any]]:
        out = []
        for record in fetch(bootstrap_servers, f"fieldsync.{spec.org}.t"):
            assert record.key.startswith(magic) and (
                record.value is None or record.value.startswith(magic)
            )
            out.append(
                (
                    await resolver.decode(record.key),
                    None if record.value is None else await resolver.decode(record.value),
                )
            )
        return out

    decoded = asyncio.run(decode_all())
    per_key: dict[int, list[Any]] = {}
    for key, value in decoded:
        per_key.setdefault(key["id"], []).append(value and (value["op"], value["after"]))
    assert per_key == {
        1: [
            ("r", {"id": 1, "amount": Decimal("1.25"), "note": "a"}),
            ("u", {"id": 1, "amount": Decimal("1.25"), "note": "b"}),
        ],
        2: [("r", {"id": 2, "amount": None, "note": None}), ("d", None), None],
    }


def test_confluent_subjects_follow_topic_names(fresh_database: str, bootstrap_servers: str) -> None:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    org = new_org()
    with schema_registry() as (url, registry):
        capture_once(
            CaptureSpec(org=org, source_dsn=fresh_database, entities={"t": "public.t"}),
            bootstrap_servers,
            schema_registry_url=url,
        )
        assert {f"fieldsync.{org}.t-key", f"fieldsync.{org}.t-value"} <= set(registry.subjects)
        record = fetch(bootstrap_servers, f"fieldsync.{org}.t")[0]
        (schema_id,) = struct.unpack(">I", record.value[1:5])
        assert schema_id in registry.subjects[f"fieldsync.{org}.t-value"]


def test_unframed_and_unknown_messages_are_refused() -> None:
    resolver = FingerprintResolver()

    async def check() -> None:
        with pytest.raises(FramingError, match="not Avro single-object encoded"):
            await resolver.decode(b"\x00\x00\x00\x00\x01payload")
        with pytest.raises(FramingError, match="unknown schema fingerprint"):
            await resolver.decode(b"\xc3\x01" + b"\x01" * 8 + b"payload")
        with schema_registry() as (url, _registry):
            confluent = ConfluentResolver(ConfluentRegistry(url))
            with pytest.raises(FramingError, match="not Confluent wire format"):
                await confluent.decode(b"\xc3\x01" + b"\x01" * 8)
            with pytest.raises(FramingError, match="schema id 99 is unknown"):
                await confluent.decode(b"\x00" + struct.pack(">I", 99) + b"x")

    asyncio.run(check())
