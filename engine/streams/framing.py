"""Wire framing of Avro payloads: how a message names the schema it was written with.

Two standard framings, one interface (:class:`Framing`):

* :class:`SingleObjectFraming` (default): Avro single-object encoding, ``C3 01`` + the 8-byte
  little-endian CRC-64-AVRO fingerprint of the schema's parsing canonical form + the payload.
  Every schema is published, full JSON, on the compacted topic ``fieldsync.schemas`` keyed by
  the fingerprint's hex, before the first message that uses it.
* :class:`ConfluentFraming`: Confluent wire format, ``00`` + 4-byte big-endian schema id + the
  payload, ids from a Confluent-compatible schema registry (``FIELDSYNC_SCHEMA_REGISTRY_URL``).

Readers resolve a message's writer schema with :class:`SchemaResolver` implementations.
"""

from __future__ import annotations

import copy
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import fastavro
import httpx
import orjson
from fastavro.schema import fingerprint, to_parsing_canonical_form

from engine.exceptions import FieldSyncError
from engine.streams.avro_writer import Write, compile_writer

SCHEMA_TOPIC = "fieldsync.schemas"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_CONFLUENT_ID = struct.Struct(">I")


class FramingError(FieldSyncError):
    """A message whose framing or schema reference cannot be resolved."""

    code = "bad_framing"


def schema_fingerprint(schema: dict[str, Any] | str) -> bytes:
    """8-byte CRC-64-AVRO fingerprint (little-endian, as single-object encoding writes it)."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@dataclass(frozen=True)
class WriterSchema:
    """A schema as the writer uses it: its JSON, its wire header and a compiled encoder."""

    schema: dict[str, Any]
    header: bytes
    write: Write

    @classmethod
    def of(cls, schema: dict[str, Any], header: bytes) -> WriterSchema:
        return cls(schema, header, compile_writer(schema))

    def frame(self, datum: Any) -> bytes:
        """Header + Avro binary encoding of ``datum``."""
        buffer = bytearray(self.header)
        self.write(buffer, datum)
        return bytes(buffer)


#: Sends (topic, key, value) and resolves once the broker acknowledged it.
Publish = Callable[[str, bytes, bytes], Awaitable[None]]


class Framing(ABC):
    """Registers writer schemas and prefixes payloads with a reference to them."""

    @abstractmethod
    async def writer_schema(self, subject: str, schema: dict[str, Any]) -> WriterSchema:
        """Make ``schema`` retrievable by readers (once) and return its header."""


class SingleObjectFraming(Framing):
    """Avro single-object encoding; schemas published on :data:`SCHEMA_TOPIC`."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._known: dict[bytes, WriterSchema] = {}

    async def writer_schema(self, subject: str, schema: dict[str, Any]) -> WriterSchema:
        fp = schema_fingerprint(schema)
        known = self._known.get(fp)
        if known is None:
            await self._publish(SCHEMA_TOPIC, fp.hex().encode(), orjson.dumps(schema))
            known = WriterSchema.of(schema, SINGLE_OBJECT_MAGIC + fp)
            self._known[fp] = known
        return known


class ConfluentRegistry:
    """Minimal client of the Confluent schema registry REST API (register, fetch by id)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s)

    async def register(self, subject: str, schema: dict[str, Any]) -> int:
        response = await self._client.post(
            f"/subjects/{subject}/versions",
            content=orjson.dumps({"schema": orjson.dumps(schema).decode()}),
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        if response.status_code >= 400:
            raise FramingError(
                f"schema registry refused subject {subject!r}: "
                f"{response.status_code} {response.text[:500]}",
                retryable=response.status_code >= 500,
            )
        return int(response.json()["id"])

    async def fetch(self, schema_id: int) -> dict[str, Any]:
        response = await self._client.get(f"/schemas/ids/{schema_id}")
        if response.status_code == 404:
            raise FramingError(f"schema id {schema_id} is unknown to the registry")
        response.raise_for_status()
        schema: dict[str, Any] = orjson.loads(response.json()["schema"])
        return schema

    async def close(self) -> None:
        await self._client.aclose()


class ConfluentFraming(Framing):
    """Confluent wire format against a registry; subjects are ``<topic>-key|value``."""

    def __init__(self, registry: ConfluentRegistry) -> None:
        self._registry = registry
        self._known: dict[tuple[str, bytes], WriterSchema] = {}

    async def writer_schema(self, subject: str, schema: dict[str, Any]) -> WriterSchema:
        cache_key = (subject, schema_fingerprint(schema))
        known = self._known.get(cache_key)
        if known is None:
            schema_id = await self._registry.register(subject, schema)
            known = WriterSchema.of(schema, CONFLUENT_MAGIC + _CONFLUENT_ID.pack(schema_id))
            self._known[cache_key] = known
        return known


class SchemaResolver(ABC):
    """Finds the writer schema a framed message references."""

    @abstractmethod
    async def resolve(self, message: bytes) -> tuple[Any, memoryview]:
        """Return (parsed writer schema, payload) or raise :class:`FramingError`."""

    async def decode(self, message: bytes) -> Any:
        parsed, payload = await self.resolve(message)
        return decode_payload(parsed, payload)


def decode_payload(parsed: Any, payload: memoryview | bytes) -> Any:
    import io

    return fastavro.schemaless_reader(io.BytesIO(payload), parsed, None)


class FingerprintResolver(SchemaResolver):
    """Resolves single-object messages from schemas read off :data:`SCHEMA_TOPIC`.

    ``fetch_missing`` is called with an unknown fingerprint and must return the schemas
    published since the last call (fingerprint → schema JSON), e.g. by reading the topic's tail.
    """

    def __init__(
        self,
        fetch_missing: Callable[[], Awaitable[dict[bytes, dict[str, Any]]]] | None = None,
    ) -> None:
        self._parsed: dict[bytes, Any] = {}
        self._fetch_missing = fetch_missing

    def add(self, schema: dict[str, Any]) -> None:
        self._parsed[schema_fingerprint(schema)] = fastavro.parse_schema(copy.deepcopy(schema))

    async def resolve(self, message: bytes) -> tuple[Any, memoryview]:
        view = memoryview(message)
        if len(view) < 10 or view[:2] != SINGLE_OBJECT_MAGIC:
            raise FramingError(
                f"not Avro single-object encoded (starts with {bytes(view[:2]).hex() or 'nothing'})"
            )
        fp = bytes(view[2:10])
        parsed = self._parsed.get(fp)
        if parsed is None and self._fetch_missing is not None:
            for found_fp, schema in (await self._fetch_missing()).items():
                self._parsed[found_fp] = fastavro.parse_schema(copy.deepcopy(schema))
            parsed = self._parsed.get(fp)
        if parsed is None:
            raise FramingError(f"unknown schema fingerprint {fp.hex()}")
        return parsed, view[10:]


class ConfluentResolver(SchemaResolver):
    """Resolves Confluent-framed messages by schema id through the registry (cached)."""

    def __init__(self, registry: ConfluentRegistry) -> None:
        self._registry = registry
        self._parsed: dict[int, Any] = {}

    async def resolve(self, message: bytes) -> tuple[Any, memoryview]:
        view = memoryview(message)
        if len(view) < 5 or view[:1] != CONFLUENT_MAGIC:
            raise FramingError(
                f"not Confluent wire format (magic byte {bytes(view[:1]).hex() or 'missing'})"
            )
        (schema_id,) = _CONFLUENT_ID.unpack(view[1:5])
        parsed = self._parsed.get(schema_id)
        if parsed is None:
            parsed = fastavro.parse_schema(await self._registry.fetch(schema_id))
            self._parsed[schema_id] = parsed
        return parsed, view[5:]
