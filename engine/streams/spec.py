"""What one organisation's capture reads: its source database and the tables it offers offline."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

ORG_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

OrgName = Annotated[str, Field(pattern=ORG_PATTERN)]


class CaptureSpec(BaseModel):
    """One org's capture: ``entities`` maps entity names to ``schema.table`` on the source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    org: OrgName
    source_dsn: SecretStr
    entities: dict[str, str] = Field(min_length=1)
    transaction_metadata: bool = True

    @field_validator("entities")
    @classmethod
    def _qualified_tables(cls, entities: dict[str, str]) -> dict[str, str]:
        for entity, table in entities.items():
            if not IDENTIFIER.match(entity) or entity != entity.lower():
                raise ValueError(f"entity name {entity!r} must be a lowercase identifier")
            schema, dot, name = table.partition(".")
            if not dot or not IDENTIFIER.match(schema) or not IDENTIFIER.match(name):
                raise ValueError(f"entity {entity!r}: table {table!r} must be 'schema.table'")
        if len(set(entities.values())) != len(entities):
            raise ValueError("two entities name the same table")
        return entities

    @property
    def slot_name(self) -> str:
        return f"fieldsync_{self.org}"

    @property
    def publication(self) -> str:
        return f"fieldsync_{self.org}"

    @property
    def entity_by_table(self) -> dict[str, str]:
        return {table: entity for entity, table in self.entities.items()}
