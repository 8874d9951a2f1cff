"""Sync tokens: opaque to devices, signed, bound to org, user, entity, rules and staging epoch.

A token is a compact JWS (HS256, key ``FIELDSYNC_GATEWAY_TOKEN_SECRET``) over a small payload:
where the device stands (watermark, the clock its time windows were evaluated at, the watermarks
of the parents of related rules) and, while a delta or bootstrap is paged, the target and the
last key served. A token that fails verification was tampered with or signed elsewhere: 400.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import jwt

ALGORITHM = "HS256"
TYPE = "fs-sync"


class BadToken(ValueError):
    """Not a token this deployment issued (tampered, truncated, or signed with another key)."""


@dataclass(frozen=True)
class Position:
    """A device's standing in one entity: watermark, evaluation clock, parents' watermarks."""

    watermark: int
    clock: float  # unix seconds
    parents: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SyncToken:
    kind: Literal["delta", "bootstrap"]
    org: str
    user: str
    entity: str
    rules: str  # UserView.rule_hash
    epoch: str  # staging epoch
    at: Position  # delta: where the device is; bootstrap: the snapshot being served
    target: Position | None = None  # delta paging: where this delta goes
    after: str | None = None  # paging: JSON of the last key served

    def advance(self, after: str | None) -> SyncToken:
        return replace(self, after=after)


def encode(token: SyncToken, secret: str) -> str:
    payload: dict[str, Any] = {"typ": TYPE, **asdict(token)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def decode(text: str, secret: str) -> SyncToken:
    try:
        payload = jwt.decode(text, secret, algorithms=[ALGORITHM], options={"verify_aud": False})
    except jwt.PyJWTError as error:
        raise BadToken(f"sync token rejected: {error}") from None
    try:
        if payload.pop("typ") != TYPE:
            raise BadToken("not a sync token")
        at = Position(**payload.pop("at"))
        target = payload.pop("target")
        return SyncToken(at=at, target=Position(**target) if target else None, **payload)
    except (KeyError, TypeError) as error:
        raise BadToken(f"sync token malformed: {error}") from None


__all__ = ["BadToken", "Position", "SyncToken", "decode", "encode"]
