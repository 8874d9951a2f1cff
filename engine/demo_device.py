"""The demo's last act: a field user's device syncs the user's offline view through a gateway,
then receives a change made on the source while it long-polls."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
from rich.console import Console

from engine.config import Settings
from engine.runtime.embedded import free_port
from engine.streams.capture import CaptureTask
from engine.streams.spec import CaptureSpec

ROLE = "field_sales"
OFFLINE: dict[str, Any] = {
    "entities": {"opportunity": {"owner_column": "owner_id"}, "account": {}},
    "roles": {ROLE: {"profile": "field_sales"}, "back_office": {"profile": None}},
    "profiles": {
        "field_sales": {
            "items": [
                {
                    "entity": "opportunity",
                    "distribution": "custom",
                    "priority": 1,
                    "filter": {
                        "and": [
                            {"field": "owner_id", "op": "eq", "value": "$user_id"},
                            {"field": "state_code", "op": "eq", "value": 0},
                        ]
                    },
                },
                {
                    "entity": "account",
                    "distribution": "related",
                    "priority": 2,
                    "related": {"entity": "opportunity", "column": "account_id"},
                },
            ]
        }
    },
}
VIEW_SQL = {  # the same view, straight from the source: what the device must end up with
    "opportunity": "SELECT opportunity_id::text FROM crm.opportunities"
    " WHERE owner_id = %(user)s AND state_code = 0",
    "account": "SELECT DISTINCT account_id::text FROM crm.opportunities"
    " WHERE owner_id = %(user)s AND state_code = 0",
}


@contextlib.contextmanager
def _gateway(settings: Settings, staging_dsn: str) -> Iterator[str]:
    import uvicorn

    from gateway.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, staging_dsn, embedded=True),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def _live_capture(settings: Settings, spec: CaptureSpec, bootstrap: str) -> Iterator[None]:
    """Capture streaming in a thread of its own (it resumes from the org's slot)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def stream() -> None:
        task = CaptureTask(spec, settings, bootstrap)
        try:
            await task.start()
            await task.run(stop)
        finally:
            await task.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(stream(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def _local_keys(client: Any) -> dict[str, set[str]]:
    return {
        "opportunity": {str(r["opportunity_id"]) for r in client.store.rows("opportunity")},
        "account": {str(r["account_id"]) for r in client.store.rows("account")},
    }


def run_device(
    settings: Settings,
    console: Console,
    spec: CaptureSpec,
    source_dsn: str,
    staging_dsn: str,
    bootstrap: str,
) -> None:
    from device.client import DeviceClient
    from gateway.app import dev_jwt_secret
    from gateway.store import ensure_schema, put_config

    with psycopg.connect(staging_dsn, autocommit=True) as conn:
        ensure_schema(conn)
        put_config(conn, spec.org, OFFLINE)
    with psycopg.connect(source_dsn) as conn:
        user, _ = conn.execute(  # type: ignore[misc]
            "SELECT owner_id::text, count(*) FROM crm.opportunities WHERE state_code = 0"
            " GROUP BY owner_id ORDER BY count(*) DESC, owner_id LIMIT 1"
        ).fetchone()
    token = jwt.encode(
        {"org": spec.org, "sub": user, "roles": [ROLE], "aud": settings.gateway_jwt_audience,
         "exp": int(time.time()) + 3600},
        dev_jwt_secret(settings),
        algorithm="HS256",
    )  # fmt: skip
    database = Path(tempfile.mkdtemp(prefix="fieldsync-demo-device-")) / "device.sqlite"
    with _gateway(settings, staging_dsn) as url, _live_capture(settings, spec, bootstrap):
        console.print(
            f"Gateway on {url}; device of user {user} (role {ROLE}: own open opportunities "
            "and the accounts they reference) syncing into SQLite…"
        )
        client = DeviceClient(url, spec.org, token, database)
        started = time.perf_counter()
        report = client.sync()
        console.print(
            f"Device bootstrapped {report.bootstrapped} ({report.bootstrap_rows} rows) in"
            f" {time.perf_counter() - started:.2f}s"
        )
        with psycopg.connect(source_dsn) as conn:
            expected = {
                e: {row[0] for row in conn.execute(q, {"user": user})} for e, q in VIEW_SQL.items()
            }
        if _local_keys(client) != expected:
            raise SystemExit(f"device differs from the user's view: {_local_keys(client)}")
        console.print(
            f"[green]✓[/] the device holds exactly the user's view: "
            f"{len(expected['opportunity'])} opportunities, {len(expected['account'])} accounts"
        )
        received: dict[str, float] = {}

        def watch() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "at" not in received:
                if client.sync(wait=10).upserts:
                    received["at"] = time.perf_counter()

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(1.0)  # the device is long-polling now
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            changed_at = time.perf_counter()
            conn.execute(
                "UPDATE crm.opportunities SET name = 'Renewal (changed in the demo)',"
                " modified_on = now() WHERE opportunity_id = (SELECT opportunity_id FROM"
                " crm.opportunities WHERE owner_id = %s AND state_code = 0"
                " ORDER BY opportunity_id LIMIT 1)",
                (user,),
            )
        watcher.join(40)
        client.close()
    if "at" not in received:
        raise SystemExit("the device did not receive the source change within 30s")
    console.print(
        f"[green]✓[/] a source UPDATE reached the long-polling device in "
        f"{(received['at'] - changed_at) * 1000:.0f} ms (capture → Kafka → projector → "
        f"staging → gateway → SQLite); device database: {database}"
    )
