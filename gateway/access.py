"""Who may take which records offline: entities, security roles, mobile offline profiles, users.

One document per organisation (:class:`OfflineConfig`), written by the admin API or an org file's
``offline:`` section, validated against the staging catalog when it is written (a precise message
names the path and the problem), stored in ``fieldsync_control.offline_config``.

Authorisation works as Dynamics' mobile offline does: a user's security roles (token claim
``roles`` plus roles assigned here) decide whether the user may go offline; each offline-enabled
role names a profile; a profile lists entities with a distribution — ``all`` records, records
``owner``-ed by the user, owned by one of the user's ``team``-s, a ``custom`` filter, or only
``related`` records (rows referenced through a named foreign key by rows of another entity that
the device has). Several offline roles add up: a record is in the view if any of their rules
admits it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.filters import FilterError, validate_filter

Distribution = Literal["all", "owner", "team", "related", "custom"]
IDENT = r"^[a-z_][a-z0-9_]{0,62}$"


class AccessError(ValueError):
    """An offline configuration that cannot be served; the message names path and problem."""


class StagingMismatch(Exception):
    """A stored configuration that no longer fits staging (e.g. a filter's column is gone)."""


class EntityAccess(BaseModel):
    """An entity enabled for offline use; ``owner_column`` holds the owning user or team id."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    owner_column: str | None = Field(default=None, pattern=IDENT)


class RelatedVia(BaseModel):
    """Rows of this entity referenced by ``entity``.``column`` of rows the device has."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    entity: str = Field(pattern=IDENT)
    column: str = Field(pattern=IDENT)


class ProfileItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    entity: str = Field(pattern=IDENT)
    distribution: Distribution = "all"
    filter: dict[str, Any] | None = None
    related: RelatedVia | None = None
    priority: int = Field(default=100, ge=0, le=10_000, description="lower syncs first")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    items: list[ProfileItem] = Field(default_factory=list)


class Role(BaseModel):
    """A security role; ``profile`` unset = the role does not allow going offline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: str | None = None


class UserAccess(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    roles: list[str] = Field(default_factory=list)
    teams: list[str] = Field(default_factory=list)


class OfflineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    entities: dict[Annotated[str, Field(pattern=IDENT)], EntityAccess] = Field(default_factory=dict)
    roles: dict[str, Role] = Field(default_factory=dict)
    profiles: dict[str, Profile] = Field(default_factory=dict)
    users: dict[str, UserAccess] = Field(default_factory=dict)


Catalog = Mapping[str, Mapping[str, str]]  # entity → column → PostgreSQL type


def parse_config(data: Any) -> OfflineConfig:
    """The document as a model, or :class:`AccessError` listing every structural problem."""
    try:
        return OfflineConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        raise AccessError(problems) from None


def validate_config(config: OfflineConfig, catalog: Catalog, *, pending: bool = False) -> None:
    """Check references and filters against the staging catalog; raise :class:`AccessError`.

    ``pending``: entities staging does not have yet (an org being provisioned) are accepted and
    their columns checked once they exist (the gateway validates on every request)."""
    for entity, access in config.entities.items():
        if entity not in catalog:
            if pending:
                continue
            raise AccessError(f"entities.{entity}: no such entity in staging")
        if access.owner_column and access.owner_column not in catalog[entity]:
            raise AccessError(
                f"entities.{entity}.owner_column: column {access.owner_column!r} does not exist"
            )
    for name, role in config.roles.items():
        if role.profile is not None and role.profile not in config.profiles:
            raise AccessError(f"roles.{name}.profile: no profile {role.profile!r}")
    for name, profile in config.profiles.items():
        for index, item in enumerate(profile.items):
            _validate_item(
                config, catalog, f"profiles.{name}.items[{index}]", item, profile, pending
            )
    for user, assigned in config.users.items():
        for role_name in assigned.roles:
            if role_name not in config.roles:
                raise AccessError(f"users.{user}.roles: no role {role_name!r}")


def _validate_item(
    config: OfflineConfig,
    catalog: Catalog,
    path: str,
    item: ProfileItem,
    profile: Profile,
    pending: bool,
) -> None:
    if item.entity not in config.entities:
        raise AccessError(f"{path}.entity: {item.entity!r} is not enabled for offline")
    if pending and (
        item.entity not in catalog or (item.related and item.related.entity not in catalog)
    ):
        return
    columns = catalog[item.entity]
    if item.distribution in ("owner", "team") and not config.entities[item.entity].owner_column:
        raise AccessError(
            f"{path}: distribution {item.distribution!r} needs entities.{item.entity}.owner_column"
        )
    if item.distribution == "custom":
        if item.filter is None:
            raise AccessError(f"{path}: distribution 'custom' needs a filter")
        try:
            validate_filter(item.filter, columns, f"{path}.filter")
        except FilterError as error:
            raise AccessError(str(error)) from None
    elif item.filter is not None:
        raise AccessError(f"{path}.filter: only distribution 'custom' takes a filter")
    if item.distribution == "related":
        via = item.related
        if via is None:
            raise AccessError(f"{path}: distribution 'related' needs related.entity/column")
        parents = [i for i in profile.items if i.entity == via.entity]
        if not parents:
            raise AccessError(f"{path}.related.entity: {via.entity!r} is not in this profile")
        if any(p.distribution == "related" for p in parents):
            raise AccessError(f"{path}.related.entity: {via.entity!r} is itself related-only")
        if via.column not in catalog.get(via.entity, {}):
            raise AccessError(f"{path}.related.column: {via.entity} has no column {via.column!r}")
    elif item.related is not None:
        raise AccessError(f"{path}.related: only distribution 'related' takes related")


@dataclass(frozen=True)
class UserView:
    """What one user may take offline: per entity its rules and the parameters they use."""

    org: str
    user: str
    roles: tuple[str, ...]
    teams: tuple[str, ...]
    items: Mapping[str, tuple[ProfileItem, ...]]  # entity → the profile items that admit rows

    def entities_by_priority(self) -> list[str]:
        return sorted(self.items, key=lambda e: (min(i.priority for i in self.items[e]), e))

    @property
    def params(self) -> dict[str, Any]:
        return {"$user_id": self.user, "$team_ids": list(self.teams)}

    def rule_hash(self, entity: str, config: OfflineConfig) -> str:
        """Changes whenever what this user may see of ``entity`` could change by configuration:
        the rules, the owner column, the user's teams (and, for related rules, the parent's)."""
        involved = {entity} | {
            i.related.entity for i in self.items[entity] if i.related is not None
        }
        material: dict[str, Any] = {
            e: {
                "items": [i.model_dump() for i in self.items.get(e, ())],
                "owner": config.entities[e].owner_column if e in config.entities else None,
            }
            for e in sorted(involved)
        }
        material["$"] = {"user": self.user, "teams": sorted(self.teams)}
        return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


class NotOffline(Exception):
    """The user has no offline-enabled role."""


def user_view(
    config: OfflineConfig,
    org: str,
    user: str,
    claimed_roles: tuple[str, ...],
    claimed_teams: tuple[str, ...] = (),
) -> UserView:
    assigned = config.users.get(user)
    roles = tuple(sorted(set(claimed_roles) | set(assigned.roles if assigned else ())))
    teams = tuple(sorted(set(claimed_teams) | set(assigned.teams if assigned else ())))
    profiles = {
        config.roles[r].profile for r in roles if r in config.roles and config.roles[r].profile
    }
    if not profiles:
        raise NotOffline(f"user {user} has no offline-enabled security role in org {org}")
    items: dict[str, list[ProfileItem]] = {}
    for name in sorted(p for p in profiles if p is not None):
        for item in config.profiles[name].items:
            if item not in items.setdefault(item.entity, []):
                items[item.entity].append(item)
    return UserView(org, user, roles, teams, {e: tuple(v) for e, v in items.items()})


__all__ = [
    "AccessError",
    "Catalog",
    "EntityAccess",
    "NotOffline",
    "OfflineConfig",
    "Profile",
    "ProfileItem",
    "RelatedVia",
    "Role",
    "StagingMismatch",
    "UserAccess",
    "UserView",
    "parse_config",
    "user_view",
    "validate_config",
]
