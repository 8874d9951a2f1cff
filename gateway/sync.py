"""The sync protocol's logic, independent of HTTP: metadata, deltas, bootstrap streams.

Every call checks out one pooled connection to the org's staging server and reads in one
``REPEATABLE READ`` snapshot, so watermarks, horizons and rows agree. See ``docs/protocol.md``
for the wire format.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import psycopg

from gateway.access import (
    AccessError,
    NotOffline,
    OfflineConfig,
    StagingMismatch,
    UserView,
    user_view,
    validate_config,
)
from gateway.auth import Forbidden, Principal
from gateway.metrics import METRICS
from gateway.store import StagingPools, org_state
from gateway.tokens import BadToken, Position, SyncToken, decode, encode
from gateway.views import (
    EntityMeta,
    Marks,
    RuleSQL,
    bootstrap_page,
    delta_page,
    load_catalog,
    read_marks,
)

T = TypeVar("T")


@dataclass
class EntityResult:
    """One entity's part of a sync response."""

    entity: str
    control: str | None = None  # "must_bootstrap" | "removed"
    reason: str | None = None
    upserts: list[bytes] = field(default_factory=list)
    removes: list[bytes] = field(default_factory=list)
    token: str | None = None
    has_more: bool = False
    watermark: int | None = None

    @property
    def empty(self) -> bool:
        return not (self.control or self.upserts or self.removes or self.has_more)

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "control": self.control,
            "reason": self.reason,
            "upserts": [orjson.Fragment(r) for r in self.upserts],
            "removes": [orjson.Fragment(r) for r in self.removes],
            "token": self.token,
            "has_more": self.has_more,
            "watermark": self.watermark,
        }


@dataclass(frozen=True)
class OrgContext:
    """What one request needs to know about the org and the user, read in its snapshot."""

    org: str
    epoch: str
    config: OfflineConfig
    revision: int
    view: UserView
    catalog: dict[str, EntityMeta]
    marks: dict[str, Marks]

    def rule(self, entity: str) -> RuleSQL:
        return RuleSQL(self.view, self.config, self.catalog, entity)

    def position(self, entity: str, clock: float) -> Position:
        rule = self.rule(entity)
        return Position(
            self.marks[entity].watermark,
            clock,
            {p: self.marks[p].watermark for p in rule.parents if p in self.marks},
        )


def _clock(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class SyncService:
    def __init__(
        self,
        pools: StagingPools,
        token_secret: str,
        page_rows: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # time windows are evaluated at this clock (tests move it)
        self.pools = pools
        self.secret = token_secret
        self.page_rows = page_rows

    # -- context ------------------------------------------------------------------------
    def _context(self, conn: psycopg.Connection[Any], org: str, who: Principal) -> OrgContext:
        if not who.may_use(org):
            raise Forbidden(f"token is for org {who.org!r}, not {org!r}")
        epoch, config, revision = org_state(conn, org)
        try:
            view = user_view(config, org, who.user, who.roles, who.teams)
        except NotOffline as error:
            raise Forbidden(str(error)) from None
        catalog = load_catalog(conn, org)
        try:  # stored while entities were pending: their columns are checked now
            validate_config(config, {e: m.columns for e, m in catalog.items()}, pending=True)
        except AccessError as error:
            raise StagingMismatch(f"offline configuration does not fit staging: {error}") from None
        marks = read_marks(conn, org) if catalog else {}
        # an entity of the profile that staging does not have yet is simply not served yet
        items = {e: i for e, i in view.items.items() if e in catalog}
        view = UserView(view.org, view.user, view.roles, view.teams, items)
        return OrgContext(org, epoch, config, revision, view, catalog, marks)

    def read(self, org: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn`` in one ``REPEATABLE READ`` transaction on the org's staging server."""

        def snapshot(conn: psycopg.Connection[Any]) -> T:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                return fn(conn)

        return self.pools.run(org, snapshot)

    # -- metadata -----------------------------------------------------------------------
    def metadata(self, org: str, who: Principal) -> dict[str, Any]:
        ctx = self.read(org, lambda conn: self._context(conn, org, who))
        entities = []
        for entity in ctx.view.entities_by_priority():
            meta = ctx.catalog[entity]
            items = ctx.view.items[entity]
            entities.append(
                {
                    "name": entity,
                    "priority": min(i.priority for i in items),
                    "keys": list(meta.keys),
                    "columns": [{"name": c, "type": t} for c, t in meta.columns.items()],
                    "relationships": [
                        {"column": i.related.column, "from": i.related.entity, "to": entity}
                        for i in items
                        if i.related is not None
                    ],
                    "owner_column": ctx.config.entities[entity].owner_column,
                }
            )
        fingerprint = orjson.dumps(entities, option=orjson.OPT_SORT_KEYS)
        import hashlib

        return {
            "org": org,
            "user": who.user,
            "epoch": ctx.epoch,
            "revision": hashlib.sha256(fingerprint).hexdigest()[:16],
            "entities": entities,
        }

    # -- delta ----------------------------------------------------------------------------
    def sync(
        self, org: str, who: Principal, tokens: dict[str, str | None], limit: int | None
    ) -> list[EntityResult]:
        """Results per entity of the profile in priority order (then entities that left it)."""
        limit = min(limit or self.page_rows, self.page_rows)

        def read(conn: psycopg.Connection[Any]) -> list[EntityResult]:
            ctx = self._context(conn, org, who)
            wanted = ctx.view.entities_by_priority()
            results = [self._entity(conn, ctx, e, tokens.get(e), limit) for e in wanted]
            results += [
                EntityResult(entity, control="removed", reason="not_in_profile")
                for entity in sorted(set(tokens) - set(wanted))
            ]
            return results

        results = self.read(org, read)
        METRICS.rows_served.labels("delta").inc(sum(len(r.upserts) for r in results))
        return results

    def _check(self, token: SyncToken, ctx: OrgContext, entity: str, kind: str) -> str | None:
        """Raise for a token that is not this user's; return a must_bootstrap reason or None."""
        if (token.org, token.user, token.entity) != (ctx.org, ctx.view.user, entity):
            raise BadToken(f"token was issued for another org, user or entity than {entity}")
        if token.kind != kind:
            raise BadToken(f"a {token.kind} token cannot be used here")
        if token.epoch != ctx.epoch:
            return "staging_epoch_changed"
        if token.rules != ctx.view.rule_hash(entity, ctx.config):
            return "rules_changed"
        positions = [token.at, *([token.target] if token.target else [])]
        for position in positions:
            if position.watermark < ctx.marks[entity].horizon:
                return "below_retention_horizon"
            for parent, mark in position.parents.items():
                if parent not in ctx.marks or mark < ctx.marks[parent].horizon:
                    return "below_retention_horizon"
        return None

    def _entity(
        self,
        conn: psycopg.Connection[Any],
        ctx: OrgContext,
        entity: str,
        text: str | None,
        limit: int,
    ) -> EntityResult:
        if text is None:
            return EntityResult(entity, control="must_bootstrap", reason="no_token")
        token = decode(text, self.secret)
        reason = self._check(token, ctx, entity, "delta")
        if reason:
            return EntityResult(entity, control="must_bootstrap", reason=reason)
        rule = ctx.rule(entity)
        if set(token.at.parents) != set(rule.parents):
            return EntityResult(entity, control="must_bootstrap", reason="rules_changed")
        target = token.target or ctx.position(entity, self.clock())
        params: dict[str, Any] = {
            "now_old": _clock(token.at.clock),
            "now_new": _clock(target.clock),
        }
        for parent in rule.parents:
            params[f"rw_{parent}_old"] = token.at.parents[parent]
            params[f"rw_{parent}_new"] = target.parents[parent]
        page = delta_page(
            conn, rule, token.at.watermark, target.watermark, params, token.after, limit
        )
        if page.last_key is not None:
            following = SyncToken(
                "delta", ctx.org, ctx.view.user, entity, token.rules, ctx.epoch, token.at,
                target, page.last_key,
            )  # fmt: skip
        else:
            following = SyncToken(
                "delta", ctx.org, ctx.view.user, entity, token.rules, ctx.epoch, target
            )
        return EntityResult(
            entity,
            upserts=page.rows,
            removes=page.removed,
            token=encode(following, self.secret),
            has_more=page.last_key is not None,
            watermark=target.watermark,
        )

    # -- bootstrap ------------------------------------------------------------------------
    def bootstrap(
        self, org: str, who: Principal, entity: str, cursor: str | None
    ) -> Iterator[bytes]:
        """NDJSON lines: a header, rows, a ``$cursor`` after every page, ``$done`` with the
        delta token at the end. Validation happens before the first line is produced."""

        def read(conn: psycopg.Connection[Any]) -> tuple[OrgContext, SyncToken, str | None]:
            ctx = self._context(conn, org, who)
            if entity not in ctx.view.items:
                raise Forbidden(f"entity {entity!r} is not in this user's offline profile")
            if cursor is None:
                token = SyncToken(
                    "bootstrap", org, who.user, entity,
                    ctx.view.rule_hash(entity, ctx.config), ctx.epoch,
                    ctx.position(entity, self.clock()),
                )  # fmt: skip
                return ctx, token, None
            token = decode(cursor, self.secret)
            return ctx, token, self._check(token, ctx, entity, "bootstrap")

        ctx, token, reason = self.read(org, read)
        meta = ctx.catalog[entity]
        return self._bootstrap_lines(ctx, token, meta, reason)

    def _bootstrap_lines(
        self, ctx: OrgContext, token: SyncToken, meta: EntityMeta, reason: str | None
    ) -> Iterator[bytes]:
        if reason is not None:
            yield orjson.dumps({"$must_bootstrap": reason}) + b"\n"
            return
        yield (
            orjson.dumps(
                {
                    "$entity": meta.entity,
                    "watermark": token.at.watermark,
                    "keys": list(meta.keys),
                    "columns": [{"name": c, "type": t} for c, t in meta.columns.items()],
                }
            )
            + b"\n"
        )
        rule = ctx.rule(meta.entity)
        params: dict[str, Any] = {"now_new": _clock(token.at.clock)}
        for parent in rule.parents:
            params[f"rw_{parent}_new"] = token.at.parents[parent]
        while True:
            with self.pools.connection(ctx.org) as conn:
                # one snapshot: a row changed between reading the rows at the watermark and the
                # changed rows' older images would otherwise come twice
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                with conn.transaction():
                    page = bootstrap_page(
                        conn, rule, token.at.watermark, params, token.after, self.page_rows
                    )
            METRICS.rows_served.labels("bootstrap").inc(len(page.rows))
            if page.rows:
                yield b"\n".join(page.rows) + b"\n"
            if page.last_key is None:
                done = SyncToken(
                    "delta", ctx.org, ctx.view.user, meta.entity, token.rules, ctx.epoch, token.at
                )
                yield orjson.dumps({"$done": True, "token": encode(done, self.secret)}) + b"\n"
                return
            token = token.advance(page.last_key)
            yield orjson.dumps({"$cursor": encode(token, self.secret)}) + b"\n"


__all__ = ["EntityResult", "OrgContext", "SyncService"]
