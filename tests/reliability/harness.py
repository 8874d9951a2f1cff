"""A whole pipeline as real processes — ``fieldsync capture``, ``fieldsync projector``,
``fieldsync gateway`` — over a small CRM-like source, with a load generator and devices.

The source has two tables shaped like the gateway tests' entities (``account``, ``job``), so the
offline configuration :data:`tests.gateway_helpers.OFFLINE` and its Python view oracle apply to
it unchanged. Scenarios kill, pause and restart the processes; :class:`Pipeline` restarts a
process that exited on its own, as a process supervisor (systemd, Kubernetes) would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg

from device.client import DeviceClient
from engine.projections.app import register_org
from engine.runtime.embedded import free_port
from gateway.store import ensure_schema, put_config
from tests.gateway_helpers import JWT_SECRET, OFFLINE, TOKEN_SECRET, USERS, mint
from tests.projector_helpers import projector_env
from tests.reliability.oracle import Oracle, device_rows, source_view, view_diff

log = logging.getLogger("fieldsync.tests.reliability")

TABLES: dict[str, str] = {"account": "src.account", "job": "src.job"}
OWNERS = ["u1", "u2", "team-a", "team-b"]
DUE_DAYS = [-30, -3, -1, 1]  # far from the technicians' 7-day window edge: views stay put

SOURCE_DDL = """
CREATE SCHEMA IF NOT EXISTS src;
CREATE TABLE src.account (id integer PRIMARY KEY, owner_id text, name text);
CREATE TABLE src.job (
    id integer PRIMARY KEY, owner_id text, status text, due timestamptz,
    amount numeric(10,2), account_id integer
);
"""


def env_int(name: str, default: int) -> int:
    """A round count a chaos run may raise (``FIELDSYNC_CHAOS_ROUNDS=20``)."""
    return int(os.environ.get(name, default))


def fieldsync_bin() -> str:
    return str(Path(sys.executable).parent / "fieldsync")


def chaos_rounds(default: int) -> int:
    return env_int("FIELDSYNC_CHAOS_ROUNDS", default)


def create_source(dsn: str, accounts: int, jobs: int, seed: int = 1) -> float:
    """The source tables with ``accounts`` accounts and ``jobs`` jobs; returns the base time
    the jobs' due dates are relative to."""
    base = datetime.now(UTC).replace(microsecond=0)
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        conn.execute(
            "INSERT INTO src.account SELECT i, (ARRAY['u1','u2','team-a','team-b'])[1 + i %% 4],"
            " 'account ' || i FROM generate_series(1, %s) i",
            (accounts,),
        )
        with conn.cursor() as cur, cur.copy("COPY src.job FROM STDIN") as copy:
            for key in range(1, jobs + 1):
                copy.write_row(_job_row(rng, key, base, accounts))
    return base.timestamp()


def _job_row(rng: random.Random, key: int, base: datetime, accounts: int) -> tuple[Any, ...]:
    return (
        key,
        rng.choice(OWNERS),
        "closed" if rng.random() < 0.2 else "open",
        base + timedelta(days=rng.choice(DUE_DAYS)),
        Decimal(rng.randint(0, 99_999)) / 100,
        rng.randint(1, accounts),
    )


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Inserts, updates and deletes of jobs and accounts at ``rate`` row changes/s, in
    transactions of 1-20 statements, until stopped (``spread``: rows a job update touches)."""

    dsn: str
    rate: float
    base: float
    accounts: int
    jobs: int
    seed: int = 2
    spread: int = 1
    changes: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the load generator did not stop"

    def _statement(self, rng: random.Random, cur: psycopg.Cursor[Any]) -> None:
        base = datetime.fromtimestamp(self.base, UTC)
        roll = rng.random()
        if roll < 0.40:
            cur.execute(
                "UPDATE src.job SET status = %s, amount = %s, owner_id = coalesce(%s, owner_id)"
                " WHERE id = ANY(%s)",
                (
                    "closed" if rng.random() < 0.2 else "open",
                    Decimal(rng.randint(0, 99_999)) / 100,
                    rng.choice(OWNERS) if rng.random() < 0.15 else None,
                    [rng.randint(1, self.jobs) for _ in range(self.spread)],
                ),
            )
        elif roll < 0.55:
            self.jobs += 1
            cur.execute(
                "INSERT INTO src.job VALUES (%s, %s, %s, %s, %s, %s)",
                _job_row(rng, self.jobs, base, self.accounts),
            )
        elif roll < 0.65:
            cur.execute("DELETE FROM src.job WHERE id = %s", (rng.randint(1, self.jobs),))
        elif roll < 0.85:
            cur.execute(
                "UPDATE src.account SET name = %s, owner_id = coalesce(%s, owner_id) WHERE id = %s",
                (
                    f"name {rng.randint(0, 10**6)}",
                    rng.choice(OWNERS) if rng.random() < 0.1 else None,
                    rng.randint(1, self.accounts),
                ),
            )
        elif roll < 0.92:
            self.accounts += 1
            cur.execute(
                "INSERT INTO src.account VALUES (%s, %s, %s)",
                (self.accounts, rng.choice(OWNERS), f"account {self.accounts}"),
            )
        elif roll < 0.97:
            cur.execute("DELETE FROM src.account WHERE id = %s", (rng.randint(1, self.accounts),))
        else:  # a few rows at once
            cur.execute(
                "UPDATE src.job SET amount = amount + 1 WHERE id %% 211 = %s AND amount < 9000",
                (rng.randint(0, 210),),
            )

    def _run(self) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=3)
                size = 0
                with conn.transaction(), conn.cursor() as cur:
                    for _ in range(rng.randint(1, 20)):
                        self._statement(rng, cur)
                        size += max(cur.rowcount, 0)
                self.changes += size
            except psycopg.OperationalError:  # a scenario cut the source: try again shortly
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.2)
                continue
            ahead = self.changes / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self._stop.wait(ahead)
        if conn is not None:
            conn.close()


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    """One supervised process: restarted by :meth:`Pipeline.supervise` when it exits."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: int = 0  # exits the test did not cause

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGCONT)
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Pipeline:
    """Capture, projector(s) and gateway of one org as processes, plus their oracle."""

    def __init__(
        self,
        tmp: Path,
        *,
        source_dsn: str,
        staging_dsn: str,
        bootstrap: str,
        org: str,
        projector_env_extra: Mapping[str, str] | None = None,
        page_rows: int = 200,
        tables: Mapping[str, str] = TABLES,
        gateway: bool = True,
    ) -> None:
        """``tables``: entity → source table; ``gateway=False``: no gateway process (nor
        offline configuration)."""
        self.tmp, self.org, self.tables, self.with_gateway = tmp, org, dict(tables), gateway
        self.source_dsn, self.staging_dsn, self.bootstrap = source_dsn, staging_dsn, bootstrap
        self.org_file = tmp / "org.yaml"
        entities = "".join(f"  {e}: {t}\n" for e, t in self.tables.items())
        self.org_file.write_text(f"org: {org}\nsource_dsn: '{source_dsn}'\nentities:\n{entities}")
        self.gateway_port = free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        common = {
            **os.environ,
            "FIELDSYNC_BOOTSTRAP_SERVERS": bootstrap,
            "FIELDSYNC_STAGING_DSN": staging_dsn,
            "FIELDSYNC_DATA_DIR": str(tmp / "data"),
            "FIELDSYNC_PRODUCER_IDEMPOTENCE": "false",
            "FIELDSYNC_LOG_LEVEL": "INFO",
        }
        self.capture = Proc(
            "capture",
            [fieldsync_bin(), "capture", "--org-file", str(self.org_file)],
            {
                **common,
                "FIELDSYNC_TOPIC_PARTITIONS": "3",
                "FIELDSYNC_CAPTURE_BATCH_CHANGES": "2000",
                "FIELDSYNC_CAPTURE_HEARTBEAT_INTERVAL_S": "0.5",
            },
            tmp / "capture.log",
        )
        self.projector_env = projector_env(
            bootstrap,
            staging_dsn,
            FIELDSYNC_DATA_DIR=str(tmp / "data"),
            **{
                "FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S": "3",
                "FIELDSYNC_BROKER_SESSION_TIMEOUT_S": "6",
                "FIELDSYNC_PROJECTOR_BATCH_SIZE": "1000",
                **dict(projector_env_extra or {}),
            },
        )
        self.projectors = [self._projector(0)]
        self.gateway = Proc(
            "gateway",
            [fieldsync_bin(), "gateway"],
            {
                **common,
                "FIELDSYNC_GATEWAY_PORT": str(self.gateway_port),
                "FIELDSYNC_GATEWAY_JWT_SECRET": JWT_SECRET,
                "FIELDSYNC_GATEWAY_TOKEN_SECRET": TOKEN_SECRET,
                "FIELDSYNC_GATEWAY_PAGE_ROWS": str(page_rows),
                "FIELDSYNC_GATEWAY_MAX_WAIT_S": "5",
            },
            tmp / "gateway.log",
        )
        self.oracle = Oracle(source_dsn, staging_dsn, org, self.tables)
        self._supervising = True
        self.lock = threading.Lock()  # the supervisor and a scenario never restart at once

    def _projector(self, index: int, env_extra: Mapping[str, str] | None = None) -> Proc:
        return Proc(
            f"projector-{index}",
            [fieldsync_bin(), "projector"],
            {**self.projector_env, **dict(env_extra or {})},
            self.tmp / f"projector-{index}.log",
        )

    @property
    def processes(self) -> list[Proc]:
        return [self.capture, *self.projectors, *([self.gateway] if self.with_gateway else [])]

    def by_name(self, name: str) -> Proc:
        return next(p for p in self.processes if p.name == name)

    def register(self) -> None:
        """The org known to the projector, the gateway's control tables and offline config."""
        register_org(self.staging_dsn, self.org)
        if not self.with_gateway:
            return
        with psycopg.connect(self.staging_dsn, autocommit=True) as conn:
            ensure_schema(conn)
            put_config(conn, self.org, dict(OFFLINE), pending=True)

    def start(self) -> None:
        self.register()
        for process in self.processes:
            process.start()
        if self.with_gateway:
            self.wait_gateway_ready(180)

    def add_projector(self, env_extra: Mapping[str, str] | None = None) -> Proc:
        process = self._projector(len(self.projectors), env_extra)
        self.projectors.append(process)
        process.start()
        return process

    def supervise(self) -> list[str]:
        """Restart every process that exited on its own; returns their names."""
        restarted: list[str] = []
        with self.lock:
            if not self._supervising:
                return restarted
            for process in self.processes:
                if process.popen is not None and process.popen.poll() is not None:
                    process.exits += 1
                    process.start()
                    restarted.append(process.name)
        return restarted

    @contextlib.contextmanager
    def supervisor(self, interval: float = 0.5) -> Iterator[None]:
        """Restart exited processes in the background while the block runs."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                self.supervise()

        thread = threading.Thread(target=run, name="supervisor", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    def restart(self, process: Proc) -> None:
        """SIGKILL ``process`` and start it again at once."""
        with self.lock:
            process.kill()
            process.start()

    def stop(self) -> None:
        with self.lock:
            self._supervising = False
        for process in self.processes:
            process.stop(15)

    def gateway_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_gateway_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while not self.gateway_ready():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"gateway not ready in {timeout}s\n{self.gateway.tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def consumed(self) -> int:
        try:
            with psycopg.connect(self.staging_dsn, connect_timeout=3) as conn:
                row = conn.execute(
                    "SELECT coalesce(sum(consumed), 0) FROM fieldsync_control.projection_counts"
                    " WHERE org = %s",
                    (self.org,),
                ).fetchone()
                return int(row[0]) if row else 0
        except psycopg.Error:
            return -1

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in self.processes)

    def wait_converged(self, timeout: float) -> float:
        return self.oracle.wait_converged(timeout, self.logs())


# -- devices ---------------------------------------------------------------------------------------


class Device:
    """A device of one of :data:`tests.gateway_helpers.USERS` syncing through the gateway,
    optionally in a background loop that rides out a dead gateway."""

    def __init__(
        self,
        url: str,
        org: str,
        user: str,
        path: Path,
        *,
        http: httpx.Client | None = None,
        page_rows: int | None = None,
    ) -> None:
        roles, teams = USERS[user]
        self.user = user
        self.client = DeviceClient(
            url,
            org,
            mint(org, user, roles, teams=teams, expires_in=20_000),
            path / f"{user}.sqlite",
            http=http,
            page_rows=page_rows,
        )
        self.syncs = 0
        self.failures = 0
        self.controls: list[tuple[str, str | None]] = []  # (entity, must_bootstrap reason)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self, wait: float = 0) -> None:
        report = self.client.sync(wait=wait)
        self.syncs += 1
        self.controls += [(e, None) for e in report.bootstrapped]

    def start_loop(self, wait: float = 1.0, pause: float = 0.3) -> Device:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.sync(wait)
                except Exception as error:  # the gateway is being killed: try again
                    self.failures += 1
                    log.debug("device %s: sync failed: %s", self.user, error)
                    self._stop.wait(0.5)
                self._stop.wait(pause)

        self._thread = threading.Thread(target=run, name=f"device-{self.user}", daemon=True)
        self._thread.start()
        return self

    def stop_loop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(90)
            assert not self._thread.is_alive(), f"device {self.user} did not stop"

    def converge(
        self, view: Callable[[], dict[str, dict[int, dict[str, Any]]]], timeout: float
    ) -> float:
        """Seconds of syncing until the device equals ``view()`` (the source must be quiet)."""
        started = time.monotonic()
        detail = ""
        while time.monotonic() - started < timeout:
            try:
                self.sync()
            except Exception as error:
                detail = f"sync failed: {error}"
                time.sleep(0.5)
                continue
            wanted = view()
            local = device_rows(self.client.store)
            if local == wanted:
                return time.monotonic() - started
            detail = view_diff(local, wanted)
            time.sleep(0.5)
        raise AssertionError(f"device {self.user} did not converge in {timeout}s: {detail}")

    def close(self) -> None:
        self.stop_loop()
        self.client.close()


def devices_converge(devices: list[Device], source_dsn: str, timeout: float) -> dict[str, float]:
    """Every device equals its user's view of the (quiet) source; seconds per device."""
    return {
        d.user: d.converge(lambda d=d: source_view(source_dsn, TABLES, d.user), timeout)  # type: ignore[misc]
        for d in devices
    }
