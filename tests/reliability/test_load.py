"""Load: 22, 200 devices syncing while 1k changes/s flow through the whole pipeline for 5
minutes, and 23, devices reading at 1 KB/s do not slow the other devices down. Both run under
``make chaos`` (``FIELDSYNC_LOAD_SECONDS``, ``FIELDSYNC_LOAD_DEVICES``, ``FIELDSYNC_LOAD_RATE``;
``FIELDSYNC_SLOW_ROUNDS``, ``FIELDSYNC_SLOW_DEVICES`` change their size).

The pipeline runs as processes (:class:`~tests.reliability.harness.Pipeline`: capture, projector,
gateway) over the harness's source; :class:`SteadyLoad` writes to it. The devices:

* A **fleet** of lightweight devices in a process of its own (asyncio and httpx on uvloop, one
  connection each), so that its event loop never waits for this process's GIL (the load
  generator and the real devices run here). Each device is a user of its own — no two share a
  computation in the gateway — with one of :data:`BANDS` "band" roles: the profile gives the
  jobs whose amount lies in a 50.00-wide band (~5% of them; a technician's territory) and,
  related, their accounts. A device bootstraps both over NDJSON, then long-polls
  ``POST /orgs/<org>/sync`` with ``wait`` and its tokens (at once again while ``has_more``),
  keeping a digest of every row it holds by key.
* Two real :class:`~device.client.DeviceClient` devices with SQLite (``u1``, a technician, and
  ``d1``, a dispatcher), syncing in a loop through an HTTP transport that counts every transport
  error and non-2xx answer (the client itself would retry them silently).

Probes: once a second the fleet inserts one job per band (ids from :data:`PROBE_BASE`, which the
load never touches) and notes its commit time; each device of the band notes when a sync answer
brought it: source write → device latency through capture, broker, projector and gateway.

22 asserts: no error anywhere (every non-2xx answer and transport error of every device, load
errors, process exits: 0); after the load, staging equals the source, every change was applied
once, every fleet device reaches the final watermarks and holds exactly what a fresh bootstrap of
its band gives (whose keys equal the band's jobs and their accounts computed from the source),
the real devices equal their users' views; gateway and projector RSS at the end of the window at
most 1.5 x the warm RSS + 64 MB (see :data:`RSS_FACTOR`). Reported: p50/p99 of the sync requests
that returned changes (request → response, long-poll wait included), of the source write →
device latency, RSS idle/warm/end/max, the achieved change rate.

23: the fleet syncs (``wait=0``, every :data:`SLOW_PERIOD_S` per device; the source changes at
:data:`SLOW_LOAD_RATE` rows/s) while alternating
phases run without and with slow readers: raw sockets (receive buffer 4 KB) that send a bootstrap
or a sync request whose answer is far larger than a phase can read and read it at 1 KB/s, keeping
the connection open until the phase ends. Asserted: the median over the phases with slow readers
of the other devices' p99 request latency is at most 1.10 x the median over the phases without,
phases in ABBA order so that a drift of the machine's load weighs on both alike; no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import multiprocessing
import os
import random
import socket
import statistics
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg
import pytest

from gateway.store import put_config
from tests.capture_helpers import new_org
from tests.gateway_helpers import OFFLINE, mint
from tests.reliability.harness import (
    OWNERS,
    Device,
    Load,
    Pipeline,
    Proc,
    create_source,
    devices_converge,
    env_int,
)
from tests.reliability.report import record

ACCOUNTS, JOBS = 3_000, 3_000
BANDS, BAND_WIDTH = 20, 50  # job amounts are 0.00-999.99: twenty bands of 50.00
PROBE_BASE = 10_000_000
PROBE_INTERVAL_S = 1.0
WAIT_S = 5.0  # the harness's gateway allows at most 5 s of long-poll
BOOTSTRAP_CONCURRENCY = 16
MB = 2**20
# Bounded memory: RSS at the end of the window <= RSS_FACTOR x RSS once warm + RSS_SLACK. Warm
# is sampled once every device has bootstrapped and the load has run for a while (pools,
# threads, buffers of 200 connections, faust's and the broker client's buffers all allocated).
# The rest of the window serves ~100k requests and applies ~300k changes (5 minutes): a leak of
# 0.5 KB per change or per request would exceed the bound; +50 % and 64 MB leave room for the
# allocator's fragmentation and for more requests in flight at the end than when warm.
RSS_FACTOR, RSS_SLACK = 1.5, 64 * MB
SLOW_BOUND = 1.10  # 23: p99 with slow readers <= 1.10 x p99 without
SLOW_RATE = 1024  # bytes/s per slow reader
SLOW_CHUNK = 128
SLOW_PERIOD_S = 0.5
SETTLE_S = 1.0  # between phases: not measured
# 23 measures the gateway below saturation: every delta reads all the org's changes since its
# token, so a light change stream keeps each sync cheap and the p99 a matter of serving, not of
# queueing behind a saturated gateway (which a 2-core machine shared with other work would be)
SLOW_LOAD_RATE = 30


def band_role(band: int) -> str:
    return f"band{band:02d}"


def band_range(band: int) -> tuple[int, int | None]:
    """[low, high) of a band's amounts; the last band is open (amounts only grow past 999.99)."""
    low = band * BAND_WIDTH
    return low, (low + BAND_WIDTH if band < BANDS - 1 else None)


def load_config() -> dict[str, Any]:
    """The harness's offline configuration plus one role and profile per band."""
    document: dict[str, Any] = copy.deepcopy(dict(OFFLINE))
    for band in range(BANDS):
        low, high = band_range(band)
        conditions: list[dict[str, Any]] = [{"field": "amount", "op": "ge", "value": low}]
        if high is not None:
            conditions.append({"field": "amount", "op": "lt", "value": high})
        document["roles"][band_role(band)] = {"profile": band_role(band)}
        document["profiles"][band_role(band)] = {
            "items": [
                {
                    "entity": "job",
                    "distribution": "custom",
                    "priority": 1,
                    "filter": {"and": conditions},
                },
                {
                    "entity": "account",
                    "distribution": "related",
                    "related": {"entity": "job", "column": "account_id"},
                    "priority": 2,
                },
            ]
        }
    return document


class SteadyLoad(Load):
    """:class:`Load` (paced in row changes/s), except that its occasional multi-row update
    (``id % 211``, 3 % of the statements) keeps to the first :data:`JOBS` ids. Load's own touches
    every 211th job, and at 1k changes/s ~150 jobs are inserted a second: within 5 minutes it
    would grow from 14 to ~200 rows a statement and make most of the changes. Every other
    statement is Load's."""

    BULK = 0.97  # Load draws its statement with one rng.random(); from here on: the bulk update

    def _statement(self, rng: random.Random, cur: psycopg.Cursor[Any]) -> None:
        state = rng.getstate()
        if rng.random() < self.BULK:
            rng.setstate(state)
            super()._statement(rng, cur)
            return
        cur.execute(
            "UPDATE src.job SET amount = amount + 1"
            " WHERE id %% 211 = %s AND id <= %s AND amount < 9000",
            (rng.randint(0, 210), JOBS),
        )


# -- measuring ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def latency_summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values)) if values else math.nan,
    }


def rss(process: Proc) -> int:
    """Resident memory of a process and its children (bytes)."""
    assert process.popen is not None and process.alive, f"{process.name} is not running"
    root = psutil.Process(process.popen.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


class RssSampler:
    """RSS of the gateway and the projector every ``interval`` seconds in a thread."""

    def __init__(self, processes: list[Proc], interval: float = 2.0) -> None:
        self.processes, self.interval = processes, interval
        self.peak: dict[str, int] = {p.name: 0 for p in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> dict[str, int]:
        values = {p.name: rss(p) for p in self.processes}
        for name, value in values.items():
            self.peak[name] = max(self.peak[name], value)
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error, AssertionError):
                self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


class CountingTransport(httpx.BaseTransport):
    """An HTTP transport that notes every transport error (also while a body is read) and
    every answer outside 2xx of a real device, which its client would otherwise retry."""

    def __init__(self, errors: list[str]) -> None:
        self.inner = httpx.HTTPTransport()
        self.errors = errors

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        what = f"{request.method} {request.url.path}"
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as error:
            self.errors.append(f"{what}: {type(error).__name__}: {error}")
            raise
        if not 200 <= response.status_code < 300:
            self.errors.append(f"{what}: HTTP {response.status_code}")
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedStream(response.stream, what, self.errors),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


class _CountedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, what: str, errors: list[str]) -> None:
        self.inner, self.what, self.errors = inner, what, errors

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.inner
        except httpx.TransportError as error:
            self.errors.append(f"{self.what} (body): {type(error).__name__}: {error}")
            raise

    def close(self) -> None:
        self.inner.close()


# -- the fleet (runs in a process of its own) -----------------------------------------------------


@dataclass(frozen=True)
class FleetPlan:
    url: str
    org: str
    source_dsn: str
    devices: int
    mode: str  # "load": long-polls and probes (22) | "slow": paced syncs, slow-reader phases (23)
    rounds: int = 0  # slow: ABBA rounds, two phases each
    phase_s: float = 0.0
    slow_readers: int = 4


@dataclass
class Stats:
    errors: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)  # unexpected control answers
    requests: int = 0
    delta_latencies: list[float] = field(default_factory=list)  # syncs that brought changes
    rows: int = 0
    absent_removes: int = 0  # removals of keys the device did not hold
    # slow mode: (phase index, seconds) of every sync request, by the phase it started in
    phased: list[tuple[int, float]] = field(default_factory=list)
    phase: int = -1

    def error(self, text: str) -> None:
        self.errors.append(text)


def _digest(row: dict[str, Any]) -> int:
    return hash(orjson.dumps(row, option=orjson.OPT_SORT_KEYS))


JSON_HEADERS = {"content-type": "application/json"}


class FleetDevice:
    """One lightweight device: tokens, a digest of every row it holds, the probes it received."""

    def __init__(
        self,
        plan: FleetPlan,
        user: str,
        band: int,
        stats: Stats,
        *,
        roles: list[str] | None = None,
        teams: list[str] | None = None,
    ) -> None:
        self.plan, self.stats = plan, stats
        self.user, self.band = user, band
        roles = roles or [band_role(band)]
        jwt = mint(plan.org, user, roles, teams=teams, expires_in=20_000)
        self.http = httpx.AsyncClient(
            base_url=plan.url,
            headers={"authorization": f"Bearer {jwt}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(WAIT_S + 60, connect=30),
        )
        self.tokens: dict[str, str | None] = {}
        self.rows: dict[str, dict[int, int]] = {}
        self.watermarks: dict[str, int] = {}  # of completed deltas (not mid-page)
        self.probes: dict[int, float] = {}  # probe id → wall clock when an answer brought it
        self.paging = False

    async def close(self) -> None:
        await self.http.aclose()

    async def bootstrap(self, entity: str) -> None:
        """Load ``entity`` from its NDJSON stream (again after an error, counted)."""
        while True:
            rows: dict[int, int] = {}
            token: str | None = None
            watermark = -1
            try:
                path = f"/orgs/{self.plan.org}/bootstrap/{entity}"
                async with self.http.stream("GET", path) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self.stats.error(f"{self.user} bootstrap {entity}: {response.status_code}")
                    else:
                        async for line in response.aiter_lines():
                            if not line:
                                continue
                            item = orjson.loads(line)
                            if not line.startswith('{"$'):
                                rows[item["id"]] = _digest(item)
                            elif "$entity" in item:
                                watermark = int(item["watermark"])
                            elif "$done" in item:
                                token = item["token"]
                            elif "$must_bootstrap" in item:
                                self.stats.controls.append(f"{self.user} {entity}: {item}")
            except httpx.TransportError as error:
                self.stats.error(f"{self.user} bootstrap {entity}: {type(error).__name__}")
            if token is not None:
                self.rows[entity], self.tokens[entity] = rows, token
                self.watermarks[entity] = watermark
                self.stats.rows += len(rows)
                return
            await asyncio.sleep(0.5)

    async def sync(self, wait: float) -> bool:
        """One ``POST /sync``; True when the device should ask again at once (``has_more``, a
        bootstrap done). Errors are counted and answered with a pause, as a device would."""
        body = orjson.dumps({"tokens": self.tokens, "wait": wait})
        started = time.perf_counter()
        phase = self.stats.phase
        try:
            response = await self.http.post(
                f"/orgs/{self.plan.org}/sync", content=body, headers=JSON_HEADERS
            )
        except httpx.TransportError as error:
            self.stats.error(f"{self.user} sync: {type(error).__name__}: {error}")
            await asyncio.sleep(0.5)
            return True
        elapsed = time.perf_counter() - started
        received = time.time()
        self.stats.requests += 1
        if phase >= 0:
            self.stats.phased.append((phase, elapsed))
        if response.status_code != 200:
            self.stats.error(f"{self.user} sync: {response.status_code} {response.text[:200]}")
            await asyncio.sleep(0.5)
            return True
        again = changed = False
        for entry in orjson.loads(response.content)["entities"]:
            entity = entry["entity"]
            if entry["control"] is not None:
                if (entry["control"], entry["reason"]) != ("must_bootstrap", "no_token"):
                    self.stats.controls.append(f"{self.user} {entity}: {entry['control']}")
                if entry["control"] == "must_bootstrap":
                    await self.bootstrap(entity)
                else:
                    self.rows.pop(entity, None)
                    self.tokens.pop(entity, None)
                again = True
                continue
            rows = self.rows[entity]
            for row in entry["upserts"]:
                key = row["id"]
                rows[key] = _digest(row)
                if entity == "job" and key >= PROBE_BASE and key not in self.probes:
                    self.probes[key] = received
            for removed in entry["removes"]:
                if rows.pop(removed["id"], None) is None:
                    self.stats.absent_removes += 1
            changed = changed or bool(entry["upserts"] or entry["removes"])
            self.stats.rows += len(entry["upserts"]) + len(entry["removes"])
            self.tokens[entity] = entry["token"]
            if not entry["has_more"]:
                self.watermarks[entity] = int(entry["watermark"])
            again = again or entry["has_more"]
        if changed:
            self.stats.delta_latencies.append(elapsed)
        self.paging = again
        return again

    async def start(self) -> None:
        """Bootstrap every entity of the profile, then catch up."""
        while await self.sync(0):
            pass

    def reached(self, watermarks: dict[str, int]) -> bool:
        return not self.paging and all(
            self.watermarks.get(e, -1) >= w for e, w in watermarks.items()
        )

    async def long_poll(self) -> None:
        wait = WAIT_S
        while True:
            wait = 0 if await self.sync(wait) else WAIT_S

    async def paced(self, period: float) -> None:
        """A sync (and its following pages) every ``period`` seconds."""
        await asyncio.sleep(random.uniform(0, period))
        next_at = time.monotonic()
        while True:
            while await self.sync(0):
                pass
            next_at = max(next_at + period, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())


class Probes:
    """One job per band a second, committed from a thread; commit times by job id."""

    def __init__(self, dsn: str, base: datetime) -> None:
        self.dsn, self.base = dsn, base
        self.committed: dict[int, float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        key = PROBE_BASE
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.wait(PROBE_INTERVAL_S):
                    rows = []
                    for band in range(BANDS):
                        key += 1
                        amount = Decimal(band_range(band)[0]) + Decimal("0.50")
                        rows.append((key, "probe", "open", self.base, amount, None))
                    with conn.transaction(), conn.cursor() as cur:
                        cur.executemany("INSERT INTO src.job VALUES (%s, %s, %s, %s, %s, %s)", rows)
                    committed = time.time()
                    for row in rows:
                        self.committed[row[0]] = committed
        except psycopg.Error as error:
            self.errors.append(f"probe writer: {error}")


def source_bands(dsn: str) -> dict[int, dict[str, set[int]]]:
    """Per band: the keys of its jobs and of the accounts they reference, from the source."""
    out: dict[int, dict[str, set[int]]] = {}
    in_band = "amount >= %s AND (%s::int IS NULL OR amount < %s)"
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        for band in range(BANDS):
            low, high = band_range(band)
            jobs = {
                k
                for (k,) in conn.execute(
                    f"SELECT id FROM src.job WHERE {in_band}", (low, high, high)
                )
            }
            accounts = {
                k
                for (k,) in conn.execute(
                    "SELECT id FROM src.account WHERE id IN"
                    f" (SELECT account_id FROM src.job WHERE {in_band})",
                    (low, high, high),
                )
            }
            out[band] = {"job": jobs, "account": accounts}
    return out


class SlowReader:
    """A raw socket that sends one request and reads its answer at :data:`SLOW_RATE` bytes/s,
    with a small receive buffer so that the gateway, not the kernel, holds what is unread."""

    def __init__(self, url: str, request: bytes) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.request = request
        self.read = 0
        self.status = b""
        self.closed_early = False
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, self.address)
        await loop.sock_sendall(sock, self.request)
        self.sock = sock
        self.task = asyncio.create_task(self._read(loop, sock))

    async def _read(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        next_at = loop.time()
        while True:
            data = await loop.sock_recv(sock, SLOW_CHUNK)
            if not data:
                self.closed_early = True
                return
            if not self.status:
                self.status = data.split(b"\r\n", 1)[0]
            self.read += len(data)
            next_at += len(data) / SLOW_RATE
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.sock is not None:
            self.sock.close()


def _http_request(url: str, method: str, path: str, jwt: str, body: bytes | None = None) -> bytes:
    host = url.removeprefix("http://")
    lines = [
        f"{method} {path} HTTP/1.1",
        f"host: {host}",
        f"authorization: Bearer {jwt}",
        "accept-encoding: identity",
    ]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _slow_readers(plan: FleetPlan, stats: Stats) -> Callable[[], list[SlowReader]]:
    """A factory of the slow readers of one phase: a user who sees every job and account
    (a dispatcher of every owner) bootstraps each entity, and syncs both from tokens taken now,
    at the start (the page of changes since then is far larger than a phase can read)."""
    teams = list(OWNERS)
    device = FleetDevice(plan, "slow", 0, stats, roles=["dispatcher"], teams=teams)
    await device.start()
    await device.close()
    jwt = mint(plan.org, "slow", ["dispatcher"], teams=teams, expires_in=20_000)
    body = orjson.dumps({"tokens": device.tokens, "wait": 0, "limit": 100_000})
    requests = [
        _http_request(plan.url, "GET", f"/orgs/{plan.org}/bootstrap/job", jwt),
        _http_request(plan.url, "POST", f"/orgs/{plan.org}/sync", jwt, body),
        _http_request(plan.url, "GET", f"/orgs/{plan.org}/bootstrap/account", jwt),
        _http_request(plan.url, "POST", f"/orgs/{plan.org}/sync", jwt, body),
    ]

    def make() -> list[SlowReader]:
        return [SlowReader(plan.url, requests[i % len(requests)]) for i in range(plan.slow_readers)]

    return make


async def _recv(pipe: Connection) -> tuple[str, Any]:
    message: tuple[str, Any] = await asyncio.to_thread(pipe.recv)
    return message


async def run_fleet(plan: FleetPlan, pipe: Connection) -> dict[str, Any]:
    stats = Stats()
    devices = [FleetDevice(plan, f"t{i:03d}", i % BANDS, stats) for i in range(plan.devices)]
    started = time.monotonic()
    gate = asyncio.Semaphore(BOOTSTRAP_CONCURRENCY)

    async def start(device: FleetDevice) -> None:
        async with gate:
            await device.start()

    await asyncio.gather(*(start(d) for d in devices))
    slow = await _slow_readers(plan, stats) if plan.mode == "slow" else None
    pipe.send(("ready", {"bootstrap_s": round(time.monotonic() - started, 1), "rows": stats.rows}))
    kind, _ = await _recv(pipe)
    assert kind == "go", kind
    stats.delta_latencies.clear()
    stats.requests = 0
    result: dict[str, Any] = {}
    if plan.mode == "load":
        probes = Probes(plan.source_dsn, datetime.now(UTC))
        probes.start()
        tasks = [asyncio.create_task(d.long_poll()) for d in devices]
        kind, _ = await _recv(pipe)  # the load stopped
        assert kind == "quiet", kind
        await asyncio.to_thread(probes.stop)
        pipe.send(("quiet", len(probes.committed)))
        kind, watermarks = await _recv(pipe)  # staging converged: its final watermarks
        assert kind == "finish", kind
        caught_up = time.monotonic()
        while not all(d.reached(watermarks) for d in devices):
            if time.monotonic() - caught_up > 180:
                behind = [d.user for d in devices if not d.reached(watermarks)]
                stats.error(
                    f"{len(behind)} devices short of {watermarks} after 180 s: {behind[:5]}"
                )
                break
            await asyncio.sleep(0.2)
        result["catch_up_s"] = round(time.monotonic() - caught_up, 2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result["probe_latencies"] = [
            at - probes.committed[key]
            for d in devices
            for key, at in d.probes.items()
            if key in probes.committed
        ]
        result["probes"] = len(probes.committed)
        result["probe_deliveries_expected"] = len(probes.committed) // BANDS * plan.devices
        stats.errors += probes.errors
        result["mismatches"] = await _verify(plan, devices)
    else:
        assert slow is not None
        tasks = [asyncio.create_task(d.paced(SLOW_PERIOD_S)) for d in devices]
        await asyncio.sleep(2 * SLOW_PERIOD_S)  # every device in its rhythm
        order = [p for r in range(plan.rounds) for p in ("AB" if r % 2 == 0 else "BA")]
        phases: list[dict[str, Any]] = []
        for index, kind in enumerate(order):
            readers = slow() if kind == "B" else []
            for reader in readers:
                await reader.open()
            # measured once the readers' requests are served and they only read, slowly
            await asyncio.sleep(SETTLE_S)
            stats.phase = index
            await asyncio.sleep(plan.phase_s)
            stats.phase = -1
            for reader in readers:
                await reader.close()
            phases.append(
                {
                    "kind": kind,
                    "slow_read": [r.read for r in readers],
                    "slow_status": sorted({r.status.decode() for r in readers}),
                    "slow_closed_early": sum(r.closed_early for r in readers),
                }
            )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for index, phase in enumerate(phases):
            latencies = [s for i, s in stats.phased if i == index]
            phase.update(n=len(latencies), p50_s=percentile(latencies, 50))
            phase["p99_s"] = percentile(latencies, 99)
        result["phases"] = phases
    for device in devices:
        await device.close()
    result.update(
        errors=stats.errors,
        controls=stats.controls,
        requests=stats.requests,
        delta_latencies=stats.delta_latencies,
        absent_removes=stats.absent_removes,
    )
    return result


async def _verify(plan: FleetPlan, devices: list[FleetDevice]) -> list[str]:
    """Every device equals a fresh bootstrap of its band, whose keys equal the source's."""
    expected = await asyncio.to_thread(source_bands, plan.source_dsn)
    problems: list[str] = []
    stats = Stats()
    fresh: dict[int, FleetDevice] = {}
    for band in range(BANDS):
        reference = FleetDevice(plan, f"v{band:02d}", band, stats)
        await reference.start()
        await reference.close()
        fresh[band] = reference
        for entity in ("job", "account"):
            keys = set(reference.rows[entity])
            if keys != expected[band][entity]:
                missing = sorted(expected[band][entity] - keys)[:5]
                extra = sorted(keys - expected[band][entity])[:5]
                problems.append(f"band {band} {entity}: bootstrap≠source, -{missing} +{extra}")
    problems += [f"verify: {e}" for e in stats.errors + stats.controls]
    for device in devices:
        for entity in ("job", "account"):
            mine, theirs = device.rows.get(entity, {}), fresh[device.band].rows[entity]
            if mine != theirs:
                lost = sorted(set(theirs) - set(mine))[:5]
                kept = sorted(set(mine) - set(theirs))[:5]
                stale = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])[:5]
                problems.append(
                    f"{device.user} {entity}: lacks {lost}, extra {kept}, stale {stale}"
                )
    return problems


def fleet_main(plan: FleetPlan, pipe: Connection) -> None:
    """The fleet process: runs :func:`run_fleet` on uvloop and sends back its result."""
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_fleet(plan, pipe))
        pipe.send(("result", result))
    except BaseException:
        pipe.send(("failed", traceback.format_exc()))
    finally:
        pipe.close()


class Fleet:
    """The fleet process, seen from the test."""

    def __init__(self, plan: FleetPlan) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process = context.Process(target=fleet_main, args=(plan, child), daemon=True)
        self.process.start()
        child.close()

    def send(self, kind: str, payload: Any = None) -> None:
        self.pipe.send((kind, payload))

    def expect(self, kind: str, timeout: float) -> Any:
        if not self.pipe.poll(timeout):
            raise AssertionError(f"the fleet sent no {kind!r} within {timeout:.0f}s")
        got, payload = self.pipe.recv()
        if got == "failed":
            raise AssertionError(f"the fleet failed:\n{payload}")
        assert got == kind, (got, kind)
        return payload

    def close(self) -> None:
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()


# -- the pipeline ---------------------------------------------------------------------------------


@contextlib.contextmanager
def pipeline_for_load(database: str, broker: str, tmp: Path) -> Iterator[tuple[Pipeline, float]]:
    """The pipeline with the source's snapshot in staging and the band roles configured;
    yields it and the source's base time."""
    org = new_org()
    base = create_source(database, ACCOUNTS, JOBS)
    pipeline = Pipeline(tmp, source_dsn=database, staging_dsn=database, bootstrap=broker, org=org)
    try:
        pipeline.start()
        pipeline.wait_converged(180)
        with psycopg.connect(database, autocommit=True) as conn:
            put_config(conn, org, load_config())
        yield pipeline, base
    finally:
        pipeline.stop()


def staging_watermarks(dsn: str, org: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT entity, version FROM org_{org}._fs_entities").fetchall()
    return {str(e): int(v) for e, v in rows}


def assert_running(pipeline: Pipeline) -> None:
    stopped = {p.name: p.popen.returncode for p in pipeline.processes if not p.alive and p.popen}
    assert not stopped, f"processes exited during the run: {stopped}\n{pipeline.logs()}"


# -- 22 -------------------------------------------------------------------------------------------


def run_load(
    database: str, broker: str, tmp: Path, *, devices: int, seconds: float, rate: float
) -> None:
    started = time.monotonic()
    real_errors: list[str] = []
    with pipeline_for_load(database, broker, tmp) as (pipeline, base):
        http = httpx.Client(
            timeout=httpx.Timeout(30.0, read=120.0), transport=CountingTransport(real_errors)
        )
        real = [Device(pipeline.url, pipeline.org, u, tmp, http=http) for u in ("u1", "d1")]
        load = SteadyLoad(database, rate, base, ACCOUNTS, JOBS)
        fleet: Fleet | None = None
        try:
            for device in real:
                device.sync()
            idle = {p.name: rss(p) for p in (pipeline.gateway, pipeline.projectors[0])}
            plan = FleetPlan(pipeline.url, pipeline.org, database, devices, "load")
            fleet = Fleet(plan)
            ready = fleet.expect("ready", 300)
            with RssSampler([pipeline.gateway, pipeline.projectors[0]]) as sampler:
                load.start()
                for device in real:
                    device.start_loop(wait=WAIT_S, pause=0.1)
                fleet.send("go")
                window = time.monotonic()
                consumed_before = pipeline.consumed()
                changes_before = load.changes
                time.sleep(min(30.0, seconds * 0.2))
                warm = sampler.sample()
                warm_at = time.monotonic() - window
                time.sleep(max(0.0, seconds - (time.monotonic() - window)))
                end = sampler.sample()
                elapsed = time.monotonic() - window
                written = load.changes - changes_before
                projected = pipeline.consumed() - consumed_before
                load_average = os.getloadavg()
                assert_running(pipeline)
            load.stop()
            fleet.send("quiet")
            probes = fleet.expect("quiet", 60)
            converged = pipeline.wait_converged(300)
            fleet.send("finish", staging_watermarks(database, pipeline.org))
            result = fleet.expect("result", 600)
            for device in real:
                device.stop_loop()
            real_seconds = devices_converge(real, database, 120)
            assert_running(pipeline)
            pipeline.oracle.assert_applied_once()
        finally:
            load.stop()
            for device in real:
                device.stop_loop()
            if fleet is not None:
                fleet.close()
            for device in real:
                device.client.store.close()
            http.close()
    deltas = result["delta_latencies"]
    probe_latencies = result["probe_latencies"]
    numbers = {
        "devices": devices + len(real),
        "seconds": round(elapsed, 1),
        "source_changes_per_s": round(written / elapsed),
        "projected_changes_per_s": round(projected / elapsed),
        "load_errors": load.errors,
        "fleet_bootstrap": ready,
        "fleet_requests": result["requests"],
        "fleet_errors": len(result["errors"]),
        "fleet_error_kinds": dict(Counter(" ".join(e.split()[1:3]) for e in result["errors"])),
        "unexpected_controls": len(result["controls"]),
        "real_device_errors": len(real_errors) + sum(d.failures for d in real),
        "real_device_syncs": {d.user: d.syncs for d in real},
        "delta_latency": latency_summary(deltas),
        "write_to_device": latency_summary(probe_latencies),
        "probes": {"written": probes, "deliveries": len(probe_latencies)},
        "removes_of_absent_keys": result["absent_removes"],
        "catch_up_s": result["catch_up_s"],
        "staging_converged_s": round(converged, 2),
        "real_devices_converged_s": {u: round(s, 2) for u, s in real_seconds.items()},
        "rss_mb": {
            name: {
                "idle": round(idle[name] / MB),
                "warm": round(warm[name] / MB),
                "end": round(end[name] / MB),
                "max": round(sampler.peak[name] / MB),
            }
            for name in idle
        },
        "warm_at_s": round(warm_at, 1),
        "load_average": [round(v, 1) for v in load_average],
        "duration_s": round(time.monotonic() - started, 1),
    }
    record("load", **numbers)
    assert not result["errors"], f"fleet errors: {result['errors'][:10]}"
    assert not result["controls"], f"unexpected controls: {result['controls'][:10]}"
    assert not real_errors, f"real device errors: {real_errors[:10]}"
    assert all(d.failures == 0 for d in real), {d.user: d.failures for d in real}
    assert load.errors == 0, f"{load.errors} load errors"
    assert not result["mismatches"], f"devices differ from their views: {result['mismatches'][:10]}"
    assert deltas and len(probe_latencies) == result["probe_deliveries_expected"], (
        f"{len(probe_latencies)} probe deliveries of {result['probe_deliveries_expected']}"
    )
    for name in idle:
        bound = warm[name] * RSS_FACTOR + RSS_SLACK
        assert end[name] <= bound, (
            f"{name} RSS grew from {warm[name] / MB:.0f} MB (warm) to {end[name] / MB:.0f} MB"
            f" (bound {bound / MB:.0f} MB)"
        )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_load(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    run_load(
        fresh_database,
        fresh_broker,
        tmp_path,
        devices=env_int("FIELDSYNC_LOAD_DEVICES", 200),
        seconds=env_int("FIELDSYNC_LOAD_SECONDS", 300),
        rate=env_int("FIELDSYNC_LOAD_RATE", 1000),
    )


# -- 23 -------------------------------------------------------------------------------------------


def run_slow_readers(
    database: str, broker: str, tmp: Path, *, devices: int, rounds: int, phase_s: float
) -> None:
    started = time.monotonic()
    with pipeline_for_load(database, broker, tmp) as (pipeline, base):
        load = SteadyLoad(database, SLOW_LOAD_RATE, base, ACCOUNTS, JOBS)
        plan = FleetPlan(
            pipeline.url, pipeline.org, database, devices, "slow", rounds=rounds, phase_s=phase_s
        )
        fleet = Fleet(plan)
        try:
            fleet.expect("ready", 300)
            load.start()
            fleet.send("go")
            result = fleet.expect("result", 2 * rounds * phase_s + 300)
            load_average = os.getloadavg()
            assert_running(pipeline)
        finally:
            load.stop()
            fleet.close()
    phases = result["phases"]
    without = [p["p99_s"] for p in phases if p["kind"] == "A"]
    with_slow = [p["p99_s"] for p in phases if p["kind"] == "B"]
    ratio = statistics.median(with_slow) / statistics.median(without)
    record(
        "slow_reader",
        devices=devices,
        slow_readers=plan.slow_readers,
        rounds=rounds,
        phase_s=phase_s,
        requests=result["requests"],
        errors=len(result["errors"]),
        p99_without_ms=[ms(v) for v in without],
        p99_with_ms=[ms(v) for v in with_slow],
        median_p99_without_ms=ms(statistics.median(without)),
        median_p99_with_ms=ms(statistics.median(with_slow)),
        ratio=round(ratio, 3),
        requests_per_phase=statistics.median(p["n"] for p in phases),
        slow_bytes_read=[p["slow_read"] for p in phases if p["kind"] == "B"][:2],
        load_average=[round(v, 1) for v in load_average],
        duration_s=round(time.monotonic() - started, 1),
    )
    assert not result["errors"], f"errors: {result['errors'][:10]}"
    assert not result["controls"], f"unexpected controls: {result['controls'][:10]}"
    for phase in phases:
        if phase["kind"] == "B":
            assert phase["slow_status"] == ["HTTP/1.1 200 OK"], phase
            assert phase["slow_closed_early"] == 0, phase
            # each kept reading at ~1 KB/s: the gateway went on sending
            assert min(phase["slow_read"]) >= 0.8 * SLOW_RATE * phase_s, phase
    assert ratio <= SLOW_BOUND, (
        f"slow readers raised the other devices' p99 by {ratio - 1:.0%}:"
        f" {[ms(v) for v in with_slow]} vs {[ms(v) for v in without]} ms"
    )


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_slow_readers(fresh_database: str, fresh_broker: str, tmp_path: Path) -> None:
    run_slow_readers(
        fresh_database,
        fresh_broker,
        tmp_path,
        devices=env_int("FIELDSYNC_SLOW_DEVICES", 40),
        rounds=env_int("FIELDSYNC_SLOW_ROUNDS", 8),
        phase_s=15.0,
    )
