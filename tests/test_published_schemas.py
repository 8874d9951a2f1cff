"""The published schemas in docs/ are exactly what capture registers for the sample org."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from engine.orgfile import SAMPLE_ENTITIES
from engine.sample.generator import create_source
from engine.streams.export import entity_schemas
from engine.streams.framing import schema_fingerprint
from engine.streams.source import LogicalSource
from engine.streams.spec import CaptureSpec

ROOT = Path(__file__).resolve().parents[1]


def test_docs_schemas_match_capture(fresh_database: str) -> None:
    create_source(fresh_database)
    spec = CaptureSpec(org="demo", source_dsn=fresh_database, entities=SAMPLE_ENTITIES)
    source = LogicalSource(spec)

    async def columns() -> dict:
        try:
            return await source.prepare()
        finally:
            await source.close()

    expected = entity_schemas(spec, asyncio.run(columns()))
    published = ROOT / "docs" / "schemas"
    fingerprints = json.loads((published / "fingerprints.json").read_text())
    assert set(fingerprints) == set(expected)
    for name, schema in expected.items():
        assert json.loads((published / name).read_text()) == schema, (
            f"{name} is stale: run fieldsync schemas"
        )
        assert fingerprints[name] == schema_fingerprint(schema).hex()


def test_example_org_file_is_the_sample_org() -> None:
    example = yaml.safe_load((ROOT / "examples" / "demo-org.yaml").read_text())
    assert example["entities"] == SAMPLE_ENTITIES
