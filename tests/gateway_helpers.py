"""A staging world written by the real :class:`Staging`, a real gateway on loopback, JWTs.

:class:`World` keeps its own model of the source rows (the oracle) and applies every change to
staging through ``Staging.apply`` — the projector's own write path — so the gateway reads exactly
what a projector would have written.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import jwt
import psycopg
import uvicorn

from engine.config import Settings, load_settings
from engine.projections.app import register_org
from engine.projections.model import ChangeEvent, ColumnSpec, EntityShape, Origin, Position
from engine.projections.staging import Staging
from engine.runtime.embedded import free_port
from gateway.app import create_app
from gateway.store import ensure_schema, put_config

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
TOKEN_SECRET = "test-sync-token-secret-0123456789abcdef"
T0 = datetime(2026, 1, 1, tzinfo=UTC)

SHAPES: dict[str, EntityShape] = {
    "account": EntityShape(
        (
            ColumnSpec("id", "integer", True),
            ColumnSpec("owner_id", "text", False),
            ColumnSpec("name", "text", False),
        )
    ),
    "job": EntityShape(
        (
            ColumnSpec("id", "integer", True),
            ColumnSpec("owner_id", "text", False),
            ColumnSpec("status", "text", False),
            ColumnSpec("due", "timestamptz", False),
            ColumnSpec("amount", "numeric(10,2)", False),
            ColumnSpec("account_id", "integer", False),
        )
    ),
}


@dataclass
class World:
    """Source rows (the oracle) mirrored into staging, one change per ``Staging.apply``."""

    dsn: str
    org: str
    rows: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {e: {} for e in SHAPES}
    )
    lsn: int = 0
    now: float = T0.timestamp()

    def __post_init__(self) -> None:
        register_org(self.dsn, self.org)
        self._conn = psycopg.connect(self.dsn)
        self._staging = Staging(self._conn)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            ensure_schema(conn)

    def close(self) -> None:
        self._conn.close()

    def clock(self) -> float:
        return self.now

    def _apply(self, entity: str, op: str, key: int, image: dict[str, Any] | None) -> None:
        self.lsn += 10
        event = ChangeEvent(
            org=self.org,
            entity=entity,
            op=op,
            key={"id": key},
            before=image if op == "d" else None,
            after=None if op == "d" else image,
            position=Position(self.lsn, self.lsn),
            shape=SHAPES[entity],
            source_ts_ms=int(self.now * 1000),
            origin=Origin(f"fieldsync.{self.org}.{entity}", 0, self.lsn),
        )
        self._staging.apply(self.org, entity, [event])

    def upsert(self, entity: str, key: int, **values: Any) -> None:
        existing = self.rows[entity].get(key)
        row = {c.name: None for c in SHAPES[entity].columns} | (existing or {}) | values
        row["id"] = key
        self.rows[entity][key] = row
        self._apply(entity, "u" if existing else "c", key, dict(row))

    def delete(self, entity: str, key: int) -> None:
        row = self.rows[entity].pop(key)
        self._apply(entity, "d", key, dict(row))


def job(
    owner: str, status: str = "open", due_days: float = 0, amount: str = "1.00", account: int = 1
) -> dict[str, Any]:
    return {
        "owner_id": owner,
        "status": status,
        "due": T0 + timedelta(days=due_days),
        "amount": Decimal(amount),
        "account_id": account,
    }


def settings_for(tmp: Any, **overrides: Any) -> Settings:
    values = {
        "data_dir": tmp,
        "gateway_jwt_secret": JWT_SECRET,
        "gateway_token_secret": TOKEN_SECRET,
        "gateway_page_rows": 50,
    }
    return load_settings(**(values | overrides))


@contextlib.contextmanager
def running_gateway(
    settings: Settings, dsn: str, clock: Callable[[], float] = time.time
) -> Iterator[str]:
    """A real uvicorn server on a free loopback port; yields its base URL. The admin API and
    ``/metrics`` are served unless ``settings`` set ``gateway_admin_enabled`` /
    ``gateway_metrics_enabled`` themselves."""
    switches = ("gateway_admin_enabled", "gateway_metrics_enabled")
    settings = settings.model_copy(
        update={name: True for name in switches if name not in settings.model_fields_set}
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, dsn, clock=clock),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        loop="asyncio",
        lifespan="on",
        ssl_certfile=str(settings.gateway_tls_cert) if settings.gateway_tls_cert else None,
        ssl_keyfile=str(settings.gateway_tls_key) if settings.gateway_tls_key else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def mint(
    org: str,
    user: str,
    roles: list[str],
    *,
    teams: list[str] | None = None,
    secret: str = JWT_SECRET,
    audience: str = "fieldsync",
    expires_in: float = 3600,
    scope: str | None = None,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {
        "org": org,
        "sub": user,
        "roles": roles,
        "aud": audience,
        "exp": int(time.time() + expires_in),
        **claims,
    }
    if teams is not None:
        payload["teams"] = teams
    if scope:
        payload["scope"] = scope
    return jwt.encode(payload, secret, algorithm=algorithm)


OFFLINE: Mapping[str, Any] = {
    "entities": {"account": {"owner_column": "owner_id"}, "job": {"owner_column": "owner_id"}},
    "roles": {
        "technician": {"profile": "field"},
        "dispatcher": {"profile": "dispatch"},
        "auditor": {"profile": None},
    },
    "profiles": {
        "field": {
            "items": [
                {
                    "entity": "job",
                    "distribution": "custom",
                    "priority": 1,
                    "filter": {
                        "and": [
                            {"field": "owner_id", "op": "eq", "value": "$user_id"},
                            {"field": "status", "op": "ne", "value": "closed"},
                            {"field": "due", "op": "last_days", "value": 7},
                        ]
                    },
                },
                {
                    "entity": "account",
                    "distribution": "related",
                    "related": {"entity": "job", "column": "account_id"},
                    "priority": 2,
                },
            ]
        },
        "dispatch": {
            "items": [
                {"entity": "job", "distribution": "team", "priority": 1},
                {"entity": "account", "distribution": "all", "priority": 5},
            ]
        },
    },
    "users": {},
}


def with_window(days: int) -> dict[str, Any]:
    """OFFLINE with the technicians' job window set to ``days``."""
    import copy

    document = copy.deepcopy(dict(OFFLINE))
    for condition in document["profiles"]["field"]["items"][0]["filter"]["and"]:
        if condition["op"] == "last_days":
            condition["value"] = days
    return document


def configure(dsn: str, org: str, document: Mapping[str, Any] = OFFLINE) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        put_config(conn, org, dict(document))


# -- the oracle: who sees what, computed in Python from the source rows -------------------------

USERS = {  # user → (roles, teams)
    "u1": (["technician"], []),
    "u2": (["technician"], []),
    "d1": (["dispatcher"], ["team-a"]),
}


class Clock:
    """The gateway's clock for time windows, moved by the tests."""

    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


def json_value(value: Any) -> Any:
    """A source value as the gateway sends it (after ``to_sqlite``)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def view_of(
    world: World,
    user: str,
    roles: Sequence[str],
    teams: Sequence[str],
    now: float,
    window_days: int = 7,
) -> dict[str, dict[int, dict[str, Any]]]:
    """What ``user`` with ``roles`` and ``teams`` may see under :data:`OFFLINE` (with the
    technicians' window ``window_days``), computed from the source rows independently of SQL.
    Roles add up: a row is visible if any role's rule admits it."""
    jobs, accounts = world.rows["job"], world.rows["account"]
    seen_jobs: dict[int, dict[str, Any]] = {}
    seen_accounts: dict[int, dict[str, Any]] = {}
    if "technician" in roles:
        since = datetime.fromtimestamp(now, UTC) - timedelta(days=window_days)
        own = {
            k: r
            for k, r in jobs.items()
            if r["owner_id"] == user and r["status"] != "closed" and r["due"] >= since
        }
        seen_jobs |= own
        referenced = {r["account_id"] for r in own.values()}
        seen_accounts |= {k: r for k, r in accounts.items() if k in referenced}
    if "dispatcher" in roles:
        seen_jobs |= {k: r for k, r in jobs.items() if r["owner_id"] in teams}
        seen_accounts |= accounts
    return {
        "job": {k: {c: json_value(v) for c, v in r.items()} for k, r in seen_jobs.items()},
        "account": {k: dict(r) for k, r in seen_accounts.items()},
    }


def view(
    world: World, user: str, now: float, window_days: int = 7
) -> dict[str, dict[int, dict[str, Any]]]:
    """What ``user`` of :data:`USERS` may see."""
    roles, teams = USERS[user]
    return view_of(world, user, roles, teams, now, window_days)
