"""``fieldsync scale-demo``: the scaled-out topology on one machine, with a worker killed.

Embedded PostgreSQL and broker; the sample CRM source changing all the time; one capture
process; two projector processes in one consumer group; two gateway processes sharing nothing
but their token secret (a load balancer would alternate between them). A field user's device
syncs through the gateways in turn while one projector is SIGKILLed and later restarted. At the
end the device must hold exactly the user's view, and every staging table must equal its source
table (a digest of every row).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import psycopg
import yaml
from psycopg import sql
from rich.console import Console
from rich.table import Table

from engine.config import Settings
from engine.demo import _fresh_source, _runtime
from engine.demo_device import OFFLINE, ROLE, VIEW_SQL
from engine.exceptions import FieldSyncError
from engine.orgfile import SAMPLE_ENTITIES
from engine.projections.staging import org_schema
from engine.runtime.embedded import free_port
from engine.runtime.endpoints import Endpoints
from engine.sample.generator import churn, fill

ORG = "scale"
DATABASE = "crm_scale"


class ScaleDemoFailed(FieldSyncError):
    code = "scale_demo_failed"


@dataclass
class Workers:
    """The processes of the topology, by name, with their log files."""

    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, **env: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "engine", *args],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def check(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ScaleDemoFailed(f"{name} exited with {process.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


def digests(dsn: str, schema_of: dict[str, str], columns: dict[str, list[str]]) -> dict[str, str]:
    """Per entity, an md5 over every row's columns as text, rows sorted (deleted staging rows
    left out): equal digests mean equal tables."""
    found = {}
    with psycopg.connect(dsn) as conn:
        for entity, table in schema_of.items():
            schema, name = table.split(".")
            cols = columns[entity]
            row = sql.SQL(" || '|' || ").join(
                sql.SQL("coalesce({}::text, '∅')").format(sql.Identifier(c)) for c in cols
            )
            deleted = sql.SQL("WHERE NOT _fs_deleted") if schema == org_schema(ORG) else sql.SQL("")
            query = sql.SQL(
                "SELECT md5(string_agg(r, E'\\n' ORDER BY r)) FROM"
                " (SELECT {} AS r FROM {}.{} {}) rows"
            ).format(row, sql.Identifier(schema), sql.Identifier(name), deleted)
            (digest,) = conn.execute(query).fetchone() or (None,)
            found[entity] = digest or "empty"
    return found


def _source_columns(dsn: str) -> dict[str, list[str]]:
    """Each sample table's columns."""
    columns = {}
    with psycopg.connect(dsn) as conn:
        for entity, table in SAMPLE_ENTITIES.items():
            schema, name = table.split(".")
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                    (schema, name),
                )
            ]
            columns[entity] = names
    return columns


@contextlib.contextmanager
def _churning(source_dsn: str, rate: float) -> Iterator[dict[str, int]]:
    stop = threading.Event()
    made: dict[str, int] = {}

    def run() -> None:
        made["changes"] = churn(source_dsn, rate_per_s=rate, seed=5, stop=stop).changes

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(30)


def run_scale_demo(
    settings: Settings,
    console: Console,
    *,
    accounts: int = 500,
    rate: float = 100.0,
    seconds: float = 40.0,
) -> dict[str, Any]:
    """Run the scenario (see the module docstring); returns what it measured."""
    with _runtime(settings, console) as endpoints:
        return _scenario(settings, console, endpoints, accounts, rate, seconds)


def _scenario(
    settings: Settings,
    console: Console,
    endpoints: Endpoints,
    accounts: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    from device.client import DeviceClient

    source_dsn = _fresh_source(endpoints.staging_dsn)
    with psycopg.connect(endpoints.staging_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"org_{ORG}"))
        )
    fill(source_dsn, accounts=accounts, seed=3)
    work = settings.data_dir.resolve() / "scale-demo"
    work.mkdir(parents=True, exist_ok=True)
    org_file = work / "org.yaml"
    org_file.write_text(
        yaml.safe_dump(
            {"org": ORG, "source_dsn": source_dsn, "entities": SAMPLE_ENTITIES, "offline": OFFLINE}
        )
    )
    jwt_secret = secrets.token_urlsafe(32)
    ports = [free_port(), free_port()]
    workers = Workers(
        {
            **os.environ,
            "FIELDSYNC_BOOTSTRAP_SERVERS": endpoints.bootstrap_servers,
            "FIELDSYNC_STAGING_DSN": endpoints.staging_dsn,
            "FIELDSYNC_DATA_DIR": str(work),
            "FIELDSYNC_PROJECTOR_GROUP": f"fieldsync-scale-{secrets.token_hex(4)}",
            "FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S": "5",
            "FIELDSYNC_BROKER_SESSION_TIMEOUT_S": "10",
            "FIELDSYNC_BROKER_HEARTBEAT_INTERVAL_S": "1",
            "FIELDSYNC_PRODUCER_IDEMPOTENCE": "false",
            "FIELDSYNC_GATEWAY_JWT_SECRET": jwt_secret,
            "FIELDSYNC_GATEWAY_TOKEN_SECRET": secrets.token_urlsafe(32),
        },
        work,
    )
    measured: dict[str, Any] = {"gateways": {}, "kills": []}
    columns = _source_columns(source_dsn)
    try:
        workers.start("capture", "capture", "--org-file", str(org_file))
        for n in (1, 2):
            workers.start(f"projector-{n}", "projector", "--org-file", str(org_file))
        # a gateway validates the offline section against staging: wait for the first rows
        _wait_for_tables(workers, endpoints.staging_dsn, ["opportunity", "account"])
        for n, port in enumerate(ports, 1):
            workers.start(
                f"gateway-{n}", "gateway", "--org-file", str(org_file),
                FIELDSYNC_GATEWAY_PORT=str(port),
            )  # fmt: skip
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        console.print(
            f"capture, 2 projectors (one consumer group), 2 gateways ({', '.join(urls)});"
            f" logs in {work}"
        )
        _wait_ready(workers, urls)
        with psycopg.connect(source_dsn) as conn:
            user = conn.execute(  # the field user with most open opportunities
                "SELECT owner_id::text FROM crm.opportunities WHERE state_code = 0"
                " GROUP BY owner_id ORDER BY count(*) DESC, owner_id LIMIT 1"
            ).fetchone()[0]  # type: ignore[index]
        token = jwt.encode(
            {"org": ORG, "sub": user, "roles": [ROLE], "aud": settings.gateway_jwt_audience,
             "exp": int(time.time()) + 3600},
            jwt_secret,
            algorithm="HS256",
        )  # fmt: skip
        device = DeviceClient(urls[0], ORG, token, work / "device.sqlite")
        started = time.monotonic()
        with _churning(source_dsn, rate) as made:
            rounds = 0
            killed_at = restarted_at = None
            while time.monotonic() - started < seconds:
                url = urls[rounds % 2]
                device.base = f"{url}/orgs/{ORG}"  # the balancer's choice this time
                try:
                    device.sync()
                except Exception as error:
                    console.print(f"[yellow]sync through {url} failed:[/] {error}")
                measured["gateways"][url] = measured["gateways"].get(url, 0) + 1
                rounds += 1
                elapsed = time.monotonic() - started
                if killed_at is None and elapsed > seconds * 0.25:
                    workers.kill("projector-1")
                    killed_at = elapsed
                    console.print(f"[red]SIGKILL projector-1[/] at {elapsed:.1f}s")
                elif killed_at is not None and restarted_at is None and elapsed > seconds * 0.5:
                    workers.start("projector-1", "projector")
                    restarted_at = elapsed
                    console.print(f"[green]restarted projector-1[/] at {elapsed:.1f}s")
                workers.check()
                time.sleep(0.5)
        measured["kills"] = [killed_at, restarted_at]
        measured["source_changes"] = made.get("changes", 0)
        converge_started = time.monotonic()
        source_digest = digests(source_dsn, SAMPLE_ENTITIES, columns)
        staging_tables = {e: f"{org_schema(ORG)}.{e}" for e in SAMPLE_ENTITIES}
        deadline = time.monotonic() + 180
        while (staged := digests(endpoints.staging_dsn, staging_tables, columns)) != source_digest:
            workers.check()
            if time.monotonic() > deadline:
                differ = sorted(e for e in staged if staged[e] != source_digest[e])
                raise ScaleDemoFailed(f"staging did not converge to the source: {differ}")
            time.sleep(1)
        measured["converged_s"] = round(time.monotonic() - converge_started, 1)
        for url in urls:  # both gateways serve the same final state
            device.base = f"{url}/orgs/{ORG}"
            device.sync()
        with psycopg.connect(source_dsn) as conn:
            expected = {
                e: {r[0] for r in conn.execute(q, {"user": user})} for e, q in VIEW_SQL.items()
            }
        local = {
            "opportunity": {str(r["opportunity_id"]) for r in device.store.rows("opportunity")},
            "account": {str(r["account_id"]) for r in device.store.rows("account")},
        }
        device.close()
        if local != expected:
            raise ScaleDemoFailed("the device does not hold exactly the user's view")
        measured["device_rows"] = {e: len(v) for e, v in local.items()}
        measured["entities"] = len(source_digest)
    finally:
        workers.stop_all()
    _report(console, measured)
    return measured


def _wait_for_tables(workers: Workers, dsn: str, entities: list[str]) -> None:
    deadline = time.monotonic() + 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not all(
            conn.execute("SELECT to_regclass(%s)", (f"{org_schema(ORG)}.{e}",)).fetchone()
            != (None,)
            for e in entities
        ):
            workers.check()
            if time.monotonic() > deadline:
                raise ScaleDemoFailed(f"staging tables {entities} not created within 120s")
            time.sleep(0.3)


def _wait_ready(workers: Workers, urls: list[str]) -> None:
    import httpx

    deadline = time.monotonic() + 120
    for url in urls:
        while True:
            workers.check()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ScaleDemoFailed(f"gateway {url} not ready within 120s")
            time.sleep(0.3)


def _report(console: Console, measured: dict[str, Any]) -> None:
    table = Table(title="Scale-out on one machine")
    table.add_column("")
    table.add_column("")
    for url, count in measured["gateways"].items():
        table.add_row(f"device syncs through {url}", str(count))
    killed, restarted = measured["kills"]
    table.add_row("projector-1 SIGKILLed / restarted", f"at {killed:.1f}s / {restarted:.1f}s")
    table.add_row("source changes while running", str(measured["source_changes"]))
    table.add_row("staging = source (row digests)", f"{measured['entities']} entities, "
                  f"{measured['converged_s']}s after the source stopped")  # fmt: skip
    table.add_row(
        "device = user's view", ", ".join(f"{e} {n}" for e, n in measured["device_rows"].items())
    )
    console.print(table)
    console.print("[green]✓[/] converged with a projector killed and the gateways alternating")


__all__ = ["ScaleDemoFailed", "digests", "run_scale_demo"]
