"""The published schemas: what a third party needs to decode an org's topics with fastavro.

Writes, per entity, ``<topic>-key.avsc`` and ``<topic>-value.avsc`` (the Debezium envelope),
plus the transaction topic's schemas, exactly as capture registers them, each with its
single-object fingerprint in ``fingerprints.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from engine.streams.framing import schema_fingerprint
from engine.streams.pgtypes import column_type
from engine.streams.schemas import (
    CapturedColumn,
    EntitySchema,
    transaction_key_schema,
    transaction_value_schema,
)
from engine.streams.source import LogicalSource, SourceColumn
from engine.streams.spec import CaptureSpec
from engine.streams.topics import change_topic, transaction_topic


def entity_schemas(
    spec: CaptureSpec, columns: dict[str, list[SourceColumn]]
) -> dict[str, dict[str, Any]]:
    """File name → schema for every topic of the org."""
    files: dict[str, dict[str, Any]] = {}
    for entity, cols in columns.items():
        where = f"org {spec.org}, entity {entity}"
        schema = EntitySchema(
            spec.org,
            entity,
            tuple(
                CapturedColumn(
                    c.name,
                    column_type(c.type_oid, c.type_modifier, where=f"{where}, column {c.name}"),
                    c.is_key,
                )
                for c in cols
            ),
        )
        topic = change_topic(spec.org, entity)
        files[f"{topic}-key.avsc"] = schema.key_schema
        files[f"{topic}-value.avsc"] = schema.envelope_schema
    files[f"{transaction_topic(spec.org)}-key.avsc"] = transaction_key_schema()
    files[f"{transaction_topic(spec.org)}-value.avsc"] = transaction_value_schema()
    return files


async def export_schemas(spec: CaptureSpec, directory: Path) -> list[Path]:
    source = LogicalSource(spec)
    try:
        columns = await source.prepare()
    finally:
        await source.close()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    fingerprints = {}
    for name, schema in entity_schemas(spec, columns).items():
        path = directory / name
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n")
        fingerprints[name] = schema_fingerprint(schema).hex()
        written.append(path)
    index = directory / "fingerprints.json"
    index.write_bytes(
        orjson.dumps(fingerprints, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    return [*written, index]
