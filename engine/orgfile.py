"""Org files (YAML or JSON) describing what an organisation captures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.exceptions import ConfigError
from engine.streams.spec import CaptureSpec, OrgName

SAMPLE_ENTITIES = {
    "business_unit": "crm.business_units",
    "team": "crm.teams",
    "user": "crm.users",
    "team_member": "crm.team_members",
    "account": "crm.accounts",
    "contact": "crm.contacts",
    "opportunity": "crm.opportunities",
    "activity": "crm.activities",
}


class OrgRegistration(BaseModel):
    """What the projector needs of an org file: the org, its retention, Debezium topic mapping."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    org: OrgName
    retention_days: int = Field(default=30, ge=1, le=3650)
    debezium_topics: dict[str, str] = Field(default_factory=dict)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"org file {path}: {error.strerror}") from None
    try:
        data: Any = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"org file {path}: not valid {kind}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"org file {path}: expected a mapping at the top level")
    return data


def _validation_problems(path: Path, error: ValidationError) -> ConfigError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
    )
    return ConfigError(f"org file {path}: {problems}")


def load_org_registration(path: Path) -> OrgRegistration:
    try:
        return OrgRegistration.model_validate(_read(path))
    except ValidationError as error:
        raise _validation_problems(path, error) from None


# sections of an org file that other components read (projector, gateway), not capture
NOT_CAPTURE = ("offline", "retention_days", "debezium_topics")


def load_capture_spec(path: Path, *, source_dsn: str | None = None) -> CaptureSpec:
    """Read an org file; ``source_dsn`` (from the command line) overrides the file's."""
    data = {k: v for k, v in _read(path).items() if k not in NOT_CAPTURE}
    if source_dsn is not None:
        data["source_dsn"] = source_dsn
    try:
        return CaptureSpec.model_validate(data)
    except ValidationError as error:
        raise _validation_problems(path, error) from None


def load_offline_section(path: Path) -> dict[str, Any] | None:
    """The org file's ``offline:`` section (entities, roles, profiles, users), if it has one;
    validated by the gateway against staging when it is applied."""
    data = _read(path)
    section = data.get("offline")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"org file {path}: 'offline' must be a mapping")
    return section
