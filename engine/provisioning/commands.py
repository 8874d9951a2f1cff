"""Provisioning commands: the events on ``fieldsync.provisioning`` that define an org's life.

Every command is keyed by its org and carries the org's *whole* desired state, so the last
command of an org defines it: replaying the topic (or its compacted form) into an empty control
schema reproduces the same state, and applying a command twice changes nothing.

* ``provision`` — a new org: its source (by reference to a secret: ``env:NAME`` or
  ``file:PATH``; a DSN with a password in it is refused, so no password ever travels in a
  message), entities, retention, Debezium topic mapping, offline configuration.
* ``update`` — the same fields for an existing org; entities added start their initial
  snapshot, entities removed are dropped (topic, staging table, and from devices).
* ``decommission`` — remove everything the org has.

Org files (YAML/JSON) and the admin API produce commands through :func:`command_from_document`,
so both report the same validation errors.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.exceptions import ConfigError
from engine.orgfile import _read
from engine.streams.spec import CaptureSpec, OrgName

PROVISIONING_TOPIC = "fieldsync.provisioning"
Kind = Literal["provision", "update", "decommission"]


class CommandError(ConfigError):
    """A command that cannot be accepted; the message names the field and the problem."""

    code = "bad_command"


def resolve_secret(reference: str) -> str:
    """The value behind ``env:NAME`` or ``file:PATH`` (read when it is used, never stored)."""
    scheme, _, target = reference.partition(":")
    if scheme == "env":
        value = os.environ.get(target)
        if value is None:
            raise ConfigError(f"secret {reference}: environment variable {target} is not set")
        return value
    if scheme == "file":
        try:
            return Path(target).read_text().strip()
        except OSError as error:
            raise ConfigError(f"secret {reference}: {error.strerror}") from None
    raise ConfigError(f"secret {reference!r}: use env:NAME or file:PATH")


class OrgSpec(BaseModel):
    """An org's desired state (what ``provision``/``update`` carry)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_dsn: str | None = Field(
        default=None, description="a DSN without password (trust/peer/certificate auth)"
    )
    source_dsn_secret: str | None = Field(
        default=None, pattern=r"^(env|file):.+$", description="env:NAME or file:PATH"
    )
    entities: dict[str, str] = Field(min_length=1)
    retention_days: int = Field(default=30, ge=1, le=3650)
    debezium_topics: dict[str, str] = Field(default_factory=dict)
    offline: dict[str, Any] | None = None
    transaction_metadata: bool = True

    @field_validator("source_dsn")
    @classmethod
    def _no_password(cls, dsn: str | None) -> str | None:
        if dsn is None:
            return None
        try:
            parts = conninfo_to_dict(dsn)
        except Exception as error:
            raise ValueError(f"not a PostgreSQL DSN: {error}") from None
        if parts.get("password"):
            raise ValueError(
                "contains a password: put the DSN in a secret and reference it with "
                "source_dsn_secret: env:NAME or file:PATH"
            )
        return dsn

    @model_validator(mode="after")
    def _one_source(self) -> OrgSpec:
        if (self.source_dsn is None) == (self.source_dsn_secret is None):
            raise ValueError("give exactly one of source_dsn and source_dsn_secret")
        return self

    def capture_spec(self, org: str) -> CaptureSpec:
        dsn = self.source_dsn or resolve_secret(self.source_dsn_secret or "")
        return CaptureSpec(
            org=org,
            source_dsn=dsn,  # type: ignore[arg-type]  # pydantic coerces str to SecretStr
            entities=self.entities,
            transaction_metadata=self.transaction_metadata,
        )


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: Kind
    org: OrgName
    spec: OrgSpec | None = None
    issued_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @model_validator(mode="after")
    def _spec_when_needed(self) -> Command:
        if self.kind == "decommission" and self.spec is not None:
            raise ValueError("decommission takes no spec")
        if self.kind != "decommission" and self.spec is None:
            raise ValueError(f"{self.kind} needs the org's spec")
        if self.spec is not None:  # the same entity rules as capture
            try:
                CaptureSpec(org=self.org, source_dsn="x", entities=self.spec.entities)  # type: ignore[arg-type]
            except ValidationError as error:
                raise ValueError(_problems(error)) from None
        return self

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Command:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as error:
            raise CommandError(f"provisioning command: {_problems(error)}") from None


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
    )


def command_from_document(kind: Kind, document: dict[str, Any], org: str | None = None) -> Command:
    """A command from an org file's (or an admin request's) mapping; errors name the field."""
    data = dict(document)
    name = org or data.get("org")
    data.pop("org", None)
    try:
        if kind == "decommission":
            return Command(kind=kind, org=name)  # type: ignore[arg-type]
        return Command(kind=kind, org=name, spec=OrgSpec.model_validate(data))  # type: ignore[arg-type]
    except ValidationError as error:
        raise CommandError(_problems(error)) from None


def command_from_file(kind: Kind, path: Path) -> Command:
    try:
        return command_from_document(kind, _read(path))
    except CommandError as error:
        raise CommandError(f"org file {path}: {error.args[0]}") from None


__all__ = [
    "PROVISIONING_TOPIC",
    "Command",
    "CommandError",
    "OrgSpec",
    "command_from_document",
    "command_from_file",
    "resolve_secret",
]
