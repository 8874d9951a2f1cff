"""Avro schemas of the change topics: key, value, Debezium envelope, transaction records.

Names follow Debezium's ``<prefix>.<schema>.<table>`` shape with prefix ``fieldsync``, schema
= organisation and table = entity: the envelope of entity ``account`` in org ``acme`` is
``fieldsync.acme.account.Envelope`` with nested ``Key`` and ``Value`` records. Key columns are
required; every other column is optional (``["null", T]``) because a delete's ``before`` image
under ``REPLICA IDENTITY DEFAULT`` carries the key alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import fastavro
import orjson

from engine.streams.pgtypes import ColumnType

CONNECTOR = "postgresql"
TOPIC_PREFIX = "fieldsync"

SOURCE_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Source",
    "namespace": "io.debezium.connector.postgresql",
    "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {
            "name": "snapshot",
            "type": [
                {
                    "type": "string",
                    "connect.version": 1,
                    "connect.parameters": {
                        "allowed": "true,first,first_in_data_collection,"
                        "last_in_data_collection,last,false,incremental"
                    },
                    "connect.default": "false",
                    "connect.name": "io.debezium.data.Enum",
                },
                "null",
            ],
            "default": "false",
        },
        {"name": "db", "type": "string"},
        {"name": "sequence", "type": ["null", "string"], "default": None},
        {"name": "ts_us", "type": ["null", "long"], "default": None},
        {"name": "ts_ns", "type": ["null", "long"], "default": None},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", "type": ["null", "long"], "default": None},
        {"name": "lsn", "type": ["null", "long"], "default": None},
        {"name": "xmin", "type": ["null", "long"], "default": None},
    ],
    "connect.name": "io.debezium.connector.postgresql.Source",
}

SOURCE_FIELD_ORDER = (
    "version",
    "connector",
    "name",
    "ts_ms",
    "snapshot",
    "db",
    "sequence",
    "ts_us",
    "ts_ns",
    "schema",
    "table",
    "txId",
    "lsn",
    "xmin",
)

TRANSACTION_BLOCK_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "block",
    "namespace": "event",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "total_order", "type": "long"},
        {"name": "data_collection_order", "type": "long"},
    ],
    "connect.version": 1,
    "connect.name": "event.block",
}


def _namespace(org: str, entity: str) -> str:
    return f"{TOPIC_PREFIX}.{org}.{entity}"


def transaction_key_schema() -> dict[str, Any]:
    return {
        "type": "record",
        "name": "TransactionMetadataKey",
        "namespace": "io.debezium.connector.common",
        "fields": [{"name": "id", "type": "string"}],
        "connect.name": "io.debezium.connector.common.TransactionMetadataKey",
    }


def transaction_value_schema() -> dict[str, Any]:
    return {
        "type": "record",
        "name": "TransactionMetadataValue",
        "namespace": "io.debezium.connector.common",
        "fields": [
            {"name": "status", "type": "string"},
            {"name": "id", "type": "string"},
            {"name": "event_count", "type": ["null", "long"], "default": None},
            {
                "name": "data_collections",
                "type": [
                    "null",
                    {
                        "type": "array",
                        "items": {
                            "type": "record",
                            "name": "ConnectDefault",
                            "namespace": "io.confluent.connect.avro",
                            "fields": [
                                {"name": "data_collection", "type": "string"},
                                {"name": "event_count", "type": "long"},
                            ],
                        },
                    },
                ],
                "default": None,
            },
            {"name": "ts_ms", "type": "long"},
        ],
        "connect.name": "io.debezium.connector.common.TransactionMetadataValue",
    }


@dataclass(frozen=True)
class CapturedColumn:
    name: str
    type: ColumnType
    is_key: bool


@dataclass
class EntitySchema:
    """One version of an entity's schemas, built from its source columns."""

    org: str
    entity: str
    columns: tuple[CapturedColumn, ...]
    key_schema: dict[str, Any] = field(init=False)
    value_schema: dict[str, Any] = field(init=False)
    envelope_schema: dict[str, Any] = field(init=False)
    parsed_key: Any = field(init=False, repr=False)
    parsed_envelope: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        namespace = _namespace(self.org, self.entity)
        keys = [c for c in self.columns if c.is_key]
        self.key_schema = {
            "type": "record",
            "name": "Key",
            "namespace": namespace,
            "fields": [{"name": c.name, "type": copy.deepcopy(c.type.avro)} for c in keys],
            "connect.name": f"{namespace}.Key",
        }
        self.value_schema = {
            "type": "record",
            "name": "Value",
            "namespace": namespace,
            "fields": [self._value_field(c) for c in self.columns],
            "connect.name": f"{namespace}.Value",
        }
        self.envelope_schema = {
            "type": "record",
            "name": "Envelope",
            "namespace": namespace,
            "fields": [
                {"name": "before", "type": ["null", self.value_schema], "default": None},
                {"name": "after", "type": ["null", f"{namespace}.Value"], "default": None},
                {"name": "source", "type": SOURCE_SCHEMA},
                {
                    "name": "transaction",
                    "type": ["null", TRANSACTION_BLOCK_SCHEMA],
                    "default": None,
                },
                {"name": "op", "type": "string"},
                {"name": "ts_ms", "type": ["null", "long"], "default": None},
                {"name": "ts_us", "type": ["null", "long"], "default": None},
                {"name": "ts_ns", "type": ["null", "long"], "default": None},
            ],
            "connect.version": 2,
            "connect.name": f"{namespace}.Envelope",
        }
        self.parsed_key = fastavro.parse_schema(copy.deepcopy(self.key_schema))
        self.parsed_envelope = fastavro.parse_schema(copy.deepcopy(self.envelope_schema))

    @staticmethod
    def _value_field(column: CapturedColumn) -> dict[str, Any]:
        avro = copy.deepcopy(column.type.avro)
        if column.is_key:
            return {"name": column.name, "type": avro}
        return {"name": column.name, "type": ["null", avro], "default": None}

    @property
    def key_columns(self) -> tuple[CapturedColumn, ...]:
        return tuple(c for c in self.columns if c.is_key)

    def signature(self) -> tuple[tuple[str, str, bool], ...]:
        """What identifies this schema version: column names, Avro types and key flags."""
        return signature_of(self.columns)


def signature_of(columns: tuple[CapturedColumn, ...]) -> tuple[tuple[str, str, bool], ...]:
    return tuple((c.name, orjson.dumps(c.type.avro).decode(), c.is_key) for c in columns)
