"""``gateway``: the sync gateway over real HTTP — deltas, a bootstrap and a long-poll wake-up.

One gateway process (``python -m bench.gateway serve``: :func:`gateway.app.run_gateway`, uvicorn
on uvloop, ``FIELDSYNC_GATEWAY_PAGE_ROWS=5000``) serves a scratch database; the measuring client
runs in the benchmark's own process, so client and server never share a GIL. Every request is
sent with ``accept-encoding: identity`` (no gzip), as a JSON/NDJSON body is the same work either
way and compression would only add server CPU.

Staging: the ``visit`` entity (bigint key + 9 value columns of a field-service table's mix) holds
1M rows (100k with ``--quick``). Writing a million rows through ``Staging.apply`` would take
minutes, so the table, its change log and its ``_fs_entities`` row are created by the real
``Staging.apply`` with a few events, then the other rows are bulk-loaded with one binary
``COPY`` into the staging table, each with the system columns the projector would have written
(``_fs_version`` = key, ``_fs_commit_lsn``/``_fs_lsn`` = 10 x key, ``_fs_changed_at``), and the
entity's watermark is raised to the highest version. Staging then holds exactly the state the
projector would have produced; only the change log lacks entries for those rows, and the log is
read only above the watermark a token starts from (the bootstrap's, which is above all of them).
Every later change goes through ``Staging.apply``, so those changes have their real log entries.

Roles: ``reader`` (profile: ``visit``, ``all`` records) and ``poller`` (profile: the one-row
``ping`` entity, so a long-poll wakes on ``ping`` changes only). Both are in the offline
configuration stored with the gateway's own ``put_config``; JWTs are HS256 minted here.

Measured, in this order, in the same run:

* ``bootstrap_rows_per_s``: one client streams ``GET /orgs/<org>/bootstrap/visit`` (NDJSON) to
  the end, counting row lines; its last line ``{"$done": …}`` carries the delta token used
  below. Baseline ``copy_to_stdout``: ``COPY (SELECT <the same columns> FROM <staging table>
  WHERE NOT _fs_deleted) TO STDOUT`` (text format) of the same rows, read by one psycopg
  connection; median of 3 runs, one before the bootstrap and two after. Target: ratio >= 0.3.
* ``delta_rows_per_s``: 50k rows (10k) of ``visit`` are then updated through ``Staging.apply`` in
  batches of 5000; 32 concurrent clients (asyncio + httpx, one connection each) each pull the
  whole delta from the bootstrap's token (``POST /orgs/<org>/sync``, following ``has_more``).
  Value: rows received by all clients / wall time; request latency p50/p99 in details. Baseline
  ``direct_sql``: the same 32 clients as threads, each with its own connection, reading the same
  changed rows with ``SELECT row_to_json(t) FROM (SELECT <columns> FROM <staging table> WHERE
  _fs_version > W) t`` — i.e. "gateway delta throughput vs reading the rows straight from
  PostgreSQL". No target. A request that fails with a transport error is sent again, as a
  device would (a page is a pure function of its token); every such retry is in the details.
* ``narrow_delta_changes_per_s``: the same changes pulled by one client through a narrow view
  (role ``narrow``: ``c01`` in the lowest twentieth of the rows or the highest twentieth of the
  values the changes wrote, so rows leave and enter it; bootstrapped before the changes) — changes
  covered per second — against one client pulling them through the ``all`` view (baseline
  ``all_view_one_client``). The upserts and removals received must equal those computed from
  staging. A narrow view should cost less than the whole delta: the gateway examines in full only
  the changed keys some log image of which passes the view's rules.
* ``wake_p99_s``: 1,000 devices (100), each with its own ``httpx.AsyncClient`` on one asyncio
  loop, ``POST /sync`` the ``ping`` token with ``wait=30`` (a device whose wait runs out before
  all are parked polls again, as a device does; counted in the details). Once the gateway's
  ``fieldsync_gateway_active_long_polls`` gauge says all are parked, ``ping`` is changed through
  ``Staging.apply``. Per device: seconds from the moment ``apply`` returned (its commit) to the
  response being read by the client; the samples are every device's. Target: p99 <= 1 s. No
  baseline (a latency target needs none); the gateway process's RSS (idle, parked, after the
  wake) is in the details. The devices share user and token, as many devices of one user would.

The clients run on uvloop, as the server does. Client, gateway and PostgreSQL share the
machine's cores, so the figures are those of the whole system on this machine; the 1-minute
load average is in the details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import random
import resource
import secrets
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg
from psycopg import sql

from bench.harness import Baseline, BenchContext, Result, Target, benchmark
from bench.services import scratch_database

BENCH = "gateway"
ENTITY = "visit"
PING = "ping"
PAGE_ROWS = 5000
DELTA_CLIENTS = 32
APPLY_BATCH = 5000
SEED_ROWS = 3  # rows written by Staging.apply before the bulk load
COPY_RUNS = 3
WAIT_S = 30.0
RETRIES = 3  # per request, after a transport error (see _post)
AUDIENCE = "fieldsync"
READER, POLLER = "bench-reader", "bench-poller"
GAUGE = "fieldsync_gateway_active_long_polls"
IDENTITY = {"accept-encoding": "identity"}
JSON = {"content-type": "application/json"}

# (name, staging type, binary COPY type) of the value columns after the bigint key ``id``: the
# types the projector's decoders give a field-service table's mix (a varchar arrives as text)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("c01", "integer", "int4"),
    ("c02", "bigint", "int8"),
    ("c03", "text", "text"),
    ("c04", "numeric(12,2)", "numeric"),
    ("c05", "timestamptz", "timestamptz"),
    ("c06", "boolean", "bool"),
    ("c07", "double precision", "float8"),
    ("c08", "text", "text"),
    ("c09", "date", "date"),
)
NAMES = ["id", *(name for name, _, _ in COLUMNS)]
_T0 = datetime(2024, 1, 1, tzinfo=UTC)
_D0 = date(2020, 1, 1)

NARROW_SHARE = 20  # the narrow view: 1/20 of the rows before the changes, 1/20 of the changes


def narrow_filter(rows: int, changes: int) -> dict[str, Any]:
    """A technician's territory: ``c01`` (the row's value number) in the lowest twentieth of the
    bulk-loaded rows or in the highest twentieth of the values the changes write, so the changes
    carry rows out of the view and into it."""
    return {
        "or": [
            {"field": "c01", "op": "lt", "value": rows // NARROW_SHARE},
            {"field": "c01", "op": "gt", "value": rows + changes - changes // NARROW_SHARE},
        ]
    }


def offline_config(rows: int, changes: int) -> dict[str, Any]:
    return {
        "entities": {ENTITY: {}, PING: {}},
        "roles": {
            "reader": {"profile": "everything"},
            "narrow": {"profile": "territory"},
            "poller": {"profile": "pings"},
        },
        "profiles": {
            "everything": {"items": [{"entity": ENTITY, "distribution": "all", "priority": 1}]},
            "territory": {
                "items": [
                    {
                        "entity": ENTITY,
                        "distribution": "custom",
                        "priority": 1,
                        "filter": narrow_filter(rows, changes),
                    }
                ]
            },
            "pings": {"items": [{"entity": PING, "distribution": "all", "priority": 1}]},
        },
        "users": {},
    }


def _values(v: int) -> tuple[Any, ...]:
    """The value columns of version ``v`` (deterministic)."""
    return (
        v % 2_000_000_000,
        v * 1000,
        f"visit note {v:012d} — checked pump, replaced seal",
        Decimal(v % 10_000_000).scaleb(-2),
        _T0 + timedelta(seconds=v),
        v % 2 == 0,
        v * 0.25,
        f"code-{v}",
        _D0 + timedelta(days=v % 3650),
    )


def _shapes() -> dict[str, Any]:
    from engine.projections.model import ColumnSpec, EntityShape

    visit = EntityShape(
        (ColumnSpec("id", "bigint", True), *(ColumnSpec(n, t, False) for n, t, _ in COLUMNS))
    )
    ping = EntityShape((ColumnSpec("id", "integer", True), ColumnSpec("note", "text", False)))
    return {ENTITY: visit, PING: ping}


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as the report computes it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every client (the URLs are plain http): httpx would otherwise load
    the CA bundle again for each client, ~0.1 s each."""
    return ssl.create_default_context()


# -- staging ----------------------------------------------------------------------------------


class Writer:
    """Changes through the projector's write path, ``Staging.apply``, in positions after
    everything already in staging."""

    def __init__(self, dsn: str, org: str) -> None:
        from engine.projections.staging import Staging

        self.org = org
        self.shapes = _shapes()
        self.conn = psycopg.connect(dsn)
        self.staging = Staging(self.conn)
        self.lsn = 0

    def close(self) -> None:
        self.conn.close()

    def apply(self, entity: str, changes: Sequence[tuple[str, int, dict[str, Any]]]) -> int:
        """Apply ``(op, key, row)`` changes in one transaction; returns the new watermark."""
        from engine.projections.model import ChangeEvent, Origin, Position

        events = []
        for op, key, row in changes:
            self.lsn += 10
            events.append(
                ChangeEvent(
                    org=self.org,
                    entity=entity,
                    op=op,
                    key={"id": key},
                    before=None,
                    after={"id": key, **row},
                    position=Position(self.lsn, self.lsn),
                    shape=self.shapes[entity],
                    source_ts_ms=int(time.time() * 1000),
                    origin=Origin(f"fieldsync.{self.org}.{entity}", 0, self.lsn),
                )
            )
        return self.staging.apply(self.org, entity, events).watermark


def _visit_row(v: int) -> dict[str, Any]:
    return dict(zip(NAMES[1:], _values(v), strict=True))


def build_staging(dsn: str, org: str, rows: int, changes: int) -> tuple[Writer, dict[str, float]]:
    """Staging of ``org`` with ``rows`` live ``visit`` rows and one ``ping`` row (see the module
    docstring); returns the writer for later changes and the seconds of each step."""
    from engine.projections.app import register_org
    from engine.projections.staging import org_schema
    from gateway.store import ensure_schema, put_config

    phases: dict[str, float] = {}
    started = time.perf_counter()
    register_org(dsn, org)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_schema(conn)
    writer = Writer(dsn, org)
    writer.apply(ENTITY, [("c", k, _visit_row(k)) for k in range(1, SEED_ROWS + 1)])
    writer.apply(PING, [("c", 1, {"note": "hello"})])
    phases["seed_apply"] = time.perf_counter() - started

    started = time.perf_counter()
    schema, table = sql.Identifier(org_schema(org)), sql.Identifier(ENTITY)
    system = ["_fs_version", "_fs_deleted", "_fs_commit_lsn", "_fs_lsn", "_fs_changed_at"]
    copy = sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT BINARY)").format(
        schema, table, sql.SQL(", ").join(map(sql.Identifier, [*NAMES, *system]))
    )
    types = ["int8", *(t for _, _, t in COLUMNS), "int8", "bool", "int8", "int8", "timestamptz"]
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur, cur.copy(copy) as out:
            out.set_types(types)
            for key in range(SEED_ROWS + 1, rows + 1):
                changed_at = _T0 + timedelta(milliseconds=key)
                out.write_row((key, *_values(key), key, False, key * 10, key * 10, changed_at))
        conn.execute(
            sql.SQL(
                "UPDATE {}._fs_entities SET version = %s, updated_at = now() WHERE entity = %s"
            ).format(schema),
            (rows, ENTITY),
        )
    phases["bulk_copy"] = time.perf_counter() - started
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}.{}").format(schema, table))
        put_config(conn, org, offline_config(rows, changes))
    phases["vacuum_analyze"] = time.perf_counter() - started
    writer.lsn = (rows + 1) * 10  # every later change is newer than the bulk-loaded rows
    return writer, phases


def change_rows(writer: Writer, rows: int, changes: int, seed: int = 11) -> tuple[int, float]:
    """Update ``changes`` distinct random keys through ``Staging.apply``, ``APPLY_BATCH`` per
    transaction; returns (the watermark before, seconds)."""
    keys = sorted(random.Random(seed).sample(range(1, rows + 1), changes))
    random.Random(seed + 1).shuffle(keys)
    with writer.conn.cursor() as cur:
        row = cur.execute(
            sql.SQL("SELECT version FROM {}._fs_entities WHERE entity = %s").format(
                sql.Identifier(f"org_{writer.org}")
            ),
            (ENTITY,),
        ).fetchone()
    writer.conn.commit()
    assert row is not None
    before = int(row[0])
    started = time.perf_counter()
    version = before
    for i in range(0, changes, APPLY_BATCH):
        batch = keys[i : i + APPLY_BATCH]
        version = writer.apply(
            ENTITY, [("u", k, _visit_row(rows + i + n + 1)) for n, k in enumerate(batch)]
        )
    elapsed = time.perf_counter() - started
    if version != before + changes:
        raise RuntimeError(f"watermark {version} after {changes} changes from {before}")
    return before, elapsed


# -- the gateway process ----------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _raise_fd_limit(needed: int) -> int:
    """Raise this process's soft open-file limit to at least ``needed`` (up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


@contextlib.contextmanager
def gateway_process(
    dsn: str, workdir: Path, jwt_secret: str, token_secret: str, *, timeout_s: float = 30
) -> Iterator[Gateway]:
    """``python -m bench.gateway serve`` on a free port, configured only by its environment."""
    from engine.runtime.embedded import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env.update(
        FIELDSYNC_STAGING_DSN=dsn,
        FIELDSYNC_DATA_DIR=str(workdir),
        FIELDSYNC_GATEWAY_HOST="127.0.0.1",
        FIELDSYNC_GATEWAY_PORT=str(port),
        FIELDSYNC_GATEWAY_JWT_SECRET=jwt_secret,
        FIELDSYNC_GATEWAY_TOKEN_SECRET=token_secret,
        FIELDSYNC_GATEWAY_PAGE_ROWS=str(PAGE_ROWS),
        FIELDSYNC_GATEWAY_MAX_WAIT_S=str(2 * WAIT_S),
        FIELDSYNC_GATEWAY_METRICS_ENABLED="true",  # the monitor reads the long-poll gauge
        FIELDSYNC_LOG_LEVEL="WARNING",
    )
    log = workdir / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.gateway", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    gateway = Gateway(url, process, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2, verify=_tls()).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready after {timeout_s}s:\n{gateway.tail()}")
            time.sleep(0.1)
        try:
            yield gateway
        except Exception as error:
            error.add_note(f"gateway log tail:\n{gateway.tail()}")
            raise
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.tail()}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _serve_main() -> None:
    """The gateway as shipped (``run_gateway``), settings from ``FIELDSYNC_*``."""
    from engine.config import load_settings
    from gateway.app import run_gateway

    _raise_fd_limit(8192)
    settings = load_settings()
    assert settings.staging_dsn is not None
    run_gateway(settings, settings.staging_dsn.get_secret_value())


def mint(org: str, user: str, roles: list[str], secret: str) -> str:
    import jwt

    claims = {"org": org, "sub": user, "roles": roles, "aud": AUDIENCE}
    return jwt.encode({**claims, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


def _auth(jwt: str) -> dict[str, str]:
    return {"authorization": f"Bearer {jwt}", **IDENTITY}


def _entity(body: bytes, entity: str) -> dict[str, Any]:
    results = [e for e in orjson.loads(body)["entities"] if e["entity"] == entity]
    if len(results) != 1:
        raise RuntimeError(f"sync response without exactly one {entity!r} entry: {body[:300]!r}")
    return results[0]  # type: ignore[no-any-return]


# -- bootstrap --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bootstrap:
    rows: int
    pages: int
    bytes: int
    elapsed_s: float
    token: str

    @property
    def rate(self) -> float:
        return self.rows / self.elapsed_s


def must_bootstrap(url: str, org: str, jwt: str, entity: str) -> str:
    """``POST /sync`` without a token: the gateway must answer ``must_bootstrap``."""
    body = orjson.dumps({"tokens": {entity: None}})
    response = httpx.post(
        f"{url}/orgs/{org}/sync",
        content=body,
        headers={**_auth(jwt), **JSON},
        timeout=30,
        verify=_tls(),
    )
    response.raise_for_status()
    result = _entity(response.content, entity)
    if result["control"] != "must_bootstrap":
        raise RuntimeError(f"a sync without token answered {result!r}, not must_bootstrap")
    return str(result["reason"])


def http_bootstrap(url: str, org: str, jwt: str, entity: str) -> Bootstrap:
    """Stream the whole NDJSON bootstrap; count row lines, keep the ``$done`` token."""
    rows = pages = size = 0
    token = None
    rest = b""
    timeout = httpx.Timeout(30, read=300)
    with httpx.Client(timeout=timeout, verify=_tls()) as client:
        started = time.perf_counter()
        path = f"{url}/orgs/{org}/bootstrap/{entity}"
        with client.stream("GET", path, headers=_auth(jwt)) as response:
            if response.status_code != 200:
                raise RuntimeError(f"bootstrap: {response.status_code} {response.read()[:300]!r}")
            for chunk in response.iter_raw():
                size += len(chunk)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if not line.startswith(b'{"$'):
                        rows += 1
                    elif line.startswith(b'{"$cursor"'):
                        pages += 1
                    elif line.startswith(b'{"$done"'):
                        token = orjson.loads(line)["token"]
                    elif not line.startswith(b'{"$entity"'):
                        raise RuntimeError(f"unexpected bootstrap line {line[:300]!r}")
        elapsed = time.perf_counter() - started
    if rest or token is None:
        raise RuntimeError(f"bootstrap stream ended without $done (tail {rest[-300:]!r})")
    return Bootstrap(rows, pages + 1, size, elapsed, token)


def copy_to_stdout(dsn: str, org: str) -> tuple[int, float]:
    """(rows, seconds) of ``COPY (SELECT <columns> … WHERE NOT _fs_deleted) TO STDOUT``."""
    query = sql.SQL("COPY (SELECT {} FROM {}.{} WHERE NOT _fs_deleted) TO STDOUT").format(
        sql.SQL(", ").join(map(sql.Identifier, NAMES)),
        sql.Identifier(f"org_{org}"),
        sql.Identifier(ENTITY),
    )
    rows = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(query) as copy:
            for block in copy:  # text format: newlines inside values are escaped
                rows += bytes(block).count(b"\n")
        return rows, time.perf_counter() - started


# -- deltas -----------------------------------------------------------------------------------


@dataclass
class DeltaRun:
    rows: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    per_client: list[int] = field(default_factory=list)
    retries: list[dict[str, Any]] = field(default_factory=list)
    removed: int = 0


async def _post(
    http: httpx.AsyncClient,
    path: str,
    content: bytes,
    retries: list[dict[str, Any]],
    idle_since: float,
) -> httpx.Response:
    """POST, sent again after a transport error (at most ``RETRIES`` times), each recorded.

    A sync answer is a pure function of its token, so a device simply asks again. Such errors
    are the server closing a kept-alive connection just as the client reuses it (see the
    details' ``transport_retries``: when and how long after the client's previous answer).
    """
    for attempt in range(RETRIES + 1):
        sent = time.perf_counter()
        try:
            return await http.post(path, content=content)
        except httpx.TransportError as error:
            retries.append(
                {
                    "error": type(error).__name__,
                    "after_s": round(time.perf_counter() - sent, 3),
                    "client_idle_before_s": round(sent - idle_since, 3),
                }
            )
            if attempt == RETRIES:
                raise
    raise AssertionError("unreachable")


async def pull_deltas(
    url: str, org: str, jwt: str, token: str, clients: int, *, removals: bool = False
) -> DeltaRun:
    """``clients`` concurrent clients each pull the whole delta from ``token`` (``removals``:
    the view may lose rows; else a removal is an error)."""
    run = DeltaRun()
    headers = {**_auth(jwt), **JSON}
    # one connection per client, reused at once: never idle long enough for the server to
    # close it (uvicorn's keep-alive timeout) while the client reuses it
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    https = [
        httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300, verify=_tls())
        for _ in range(clients)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for http in https:
            await stack.enter_async_context(http)

        async def client(http: httpx.AsyncClient) -> None:
            current, rows = token, 0
            answered = time.perf_counter()
            while True:
                started = time.perf_counter()
                content = orjson.dumps({"tokens": {ENTITY: current}})
                response = await _post(http, f"/orgs/{org}/sync", content, run.retries, answered)
                body = response.content
                answered = time.perf_counter()
                run.latencies.append(answered - started)
                if response.status_code != 200:
                    raise RuntimeError(f"sync: {response.status_code} {body[:300]!r}")
                result = _entity(body, ENTITY)
                if result["control"] is not None or (result["removes"] and not removals):
                    raise RuntimeError(f"unexpected delta answer {result['control']!r}")
                rows += len(result["upserts"])
                run.removed += len(result["removes"])
                run.requests += 1
                current = result["token"]
                if not result["has_more"]:
                    break
            run.per_client.append(rows)
            run.rows += rows

        started = time.perf_counter()
        await asyncio.gather(*(client(http) for http in https))
        run.elapsed_s = time.perf_counter() - started
    return run


def direct_sql(dsn: str, org: str, watermark: int, readers: int) -> tuple[int, float]:
    """(rows, seconds): ``readers`` threads, one connection each (opened before timing), each
    reading the rows changed above ``watermark`` as JSON."""
    query = sql.SQL(
        "SELECT row_to_json(t)::text FROM (SELECT {} FROM {}.{} WHERE _fs_version > %s) t"
    ).format(
        sql.SQL(", ").join(map(sql.Identifier, NAMES)),
        sql.Identifier(f"org_{org}"),
        sql.Identifier(ENTITY),
    )
    connections = [psycopg.connect(dsn, autocommit=True) for _ in range(readers)]
    try:

        def read(conn: psycopg.Connection[Any]) -> int:
            return len(conn.execute(query, (watermark,)).fetchall())

        with ThreadPoolExecutor(readers) as pool:
            started = time.perf_counter()
            rows = sum(pool.map(read, connections))
            elapsed = time.perf_counter() - started
    finally:
        for conn in connections:
            conn.close()
    return rows, elapsed


def narrow_changes(dsn: str, org: str, watermark: int, rows: int, changes: int) -> tuple[int, int]:
    """(rows the changes above ``watermark`` carried into the narrow view, rows they carried
    out of it), from staging: a changed row's value number before the change was its key."""
    low, high = rows // NARROW_SHARE, rows + changes - changes // NARROW_SHARE
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE c01 < %(low)s OR c01 > %(high)s),"
                " count(*) FILTER (WHERE id < %(low)s AND NOT (c01 < %(low)s OR c01 > %(high)s))"
                " FROM {}.{} WHERE _fs_version > %(w)s"
            ).format(sql.Identifier(f"org_{org}"), sql.Identifier(ENTITY)),
            {"low": low, "high": high, "w": watermark},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- long-polls -------------------------------------------------------------------------------


@dataclass
class Wake:
    latencies: list[float]
    park_s: float
    apply_s: float
    rss_before: int
    rss_parked: int
    rss_after: int
    fd_limit: int
    repolls: int
    retries: list[dict[str, Any]]


def _gauge(text: str) -> float:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == GAUGE:
            return float(value)
    raise RuntimeError(f"/metrics has no {GAUGE}")


async def wake_devices(
    gateway: Gateway,
    org: str,
    jwt: str,
    token: str,
    devices: int,
    change: Callable[[], None],
    *,
    park_timeout_s: float = 120,
) -> Wake:
    """``devices`` long-polls; once all are parked, ``change()`` commits; per-device latency
    from the commit to the response.

    Each device has its own ``httpx.AsyncClient`` (one connection), as a real device has: one
    client with a thousand connections spends O(connections x requests) in httpcore's pool
    bookkeeping (``_assign_requests_to_connections``), ~20 s of client CPU here for 1,000
    devices, which would be measured as wake-up latency.
    """
    fd_limit = _raise_fd_limit(devices + 1024)
    body = orjson.dumps({"tokens": {PING: token}, "wait": WAIT_S})
    headers = {**_auth(jwt), **JSON}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(WAIT_S + 60, connect=60)
    rss_before = gateway.rss
    async with contextlib.AsyncExitStack() as stack:
        monitor = await stack.enter_async_context(
            httpx.AsyncClient(base_url=gateway.url, timeout=30, verify=_tls())
        )
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=gateway.url,
                    headers=headers,
                    limits=limits,
                    timeout=timeout,
                    verify=_tls(),
                )
            )
            for _ in range(devices)
        ]

        repolls = 0
        retries: list[dict[str, Any]] = []

        async def device(http: httpx.AsyncClient) -> float:
            nonlocal repolls
            answered = time.perf_counter()
            while True:
                response = await _post(http, f"/orgs/{org}/sync", body, retries, answered)
                answered = time.perf_counter()
                if response.status_code != 200:
                    raise RuntimeError(
                        f"long-poll: {response.status_code} {response.content[:300]!r}"
                    )
                result = _entity(response.content, PING)
                if len(result["upserts"]) == 1:
                    return answered
                if result["control"] is not None or result["upserts"] or result["removes"]:
                    raise RuntimeError(f"long-poll answered {result!r}")
                repolls += 1  # the wait ran out before every device was parked: poll again

        started = time.perf_counter()
        tasks = [asyncio.create_task(device(http)) for http in clients]
        try:
            while True:
                parked = _gauge((await monitor.get("/metrics")).text)
                if parked >= devices:
                    break
                failed = [t for t in tasks if t.done()]
                if failed:
                    raise RuntimeError(f"a device failed before the change: {failed[0]!r}")
                if time.perf_counter() - started > park_timeout_s:
                    raise RuntimeError(f"only {parked:g} of {devices} long-polls parked")
                await asyncio.sleep(0.05)
            park_s = time.perf_counter() - started
            rss_parked = gateway.rss

            def commit() -> tuple[float, float]:
                before = time.perf_counter()
                change()
                return before, time.perf_counter()

            before, committed = await asyncio.to_thread(commit)
            answered = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        rss_after = gateway.rss
    return Wake(
        [t - committed for t in answered],
        park_s,
        committed - before,
        rss_before,
        rss_parked,
        rss_after,
        fd_limit,
        repolls,
        retries,
    )


# -- the benchmark ----------------------------------------------------------------------------


def _client_loop() -> asyncio.Runner:
    """The measuring clients' event loop: uvloop, as the server's, so the client adds little."""
    import uvloop

    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


@benchmark(BENCH)
def gateway_bench(ctx: BenchContext) -> Iterator[Result]:
    rows, changes, devices = (100_000, 10_000, 100) if ctx.quick else (1_000_000, 50_000, 1000)
    org = f"bench{uuid.uuid4().hex[:8]}"
    jwt_secret, token_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    reader = mint(org, READER, ["reader"], jwt_secret)
    narrow = mint(org, "bench-narrow", ["narrow"], jwt_secret)
    poller = mint(org, POLLER, ["poller"], jwt_secret)
    common: dict[str, Any] = {
        "rows": rows,
        "columns": len(NAMES),
        "page_rows": PAGE_ROWS,
        "encoding": "identity",
        "server": "one gateway process (run_gateway: uvicorn, uvloop)",
    }
    with (
        tempfile.TemporaryDirectory(prefix="fieldsync-bench-gateway-") as tmp,
        scratch_database(ctx.services.pg_dsn, "bench_gateway") as dsn,
    ):
        workdir = Path(tmp)
        writer, phases = build_staging(dsn, org, rows, changes)
        try:
            with gateway_process(dsn, workdir, jwt_secret, token_secret) as gateway:
                # (b) bootstrap of the whole entity, against COPY TO STDOUT
                reason = must_bootstrap(gateway.url, org, reader, ENTITY)
                copies = [copy_to_stdout(dsn, org)]  # one before, the others after
                boot = http_bootstrap(gateway.url, org, reader, ENTITY)
                if boot.rows != rows:
                    raise RuntimeError(f"bootstrap streamed {boot.rows} rows of {rows}")
                narrow_boot = http_bootstrap(gateway.url, org, narrow, ENTITY)
                if narrow_boot.rows != rows // NARROW_SHARE - 1:
                    raise RuntimeError(f"the narrow view bootstrapped {narrow_boot.rows} rows")
                copies += [copy_to_stdout(dsn, org) for _ in range(COPY_RUNS - 1)]
                if any(n != rows for n, _ in copies):
                    raise RuntimeError(f"COPY read {[n for n, _ in copies]} rows, not {rows}")
                copy_rate = statistics.median(n / s for n, s in copies)
                yield Result(
                    bench=BENCH,
                    metric="bootstrap_rows_per_s",
                    unit="rows/s",
                    value=boot.rate,
                    baseline=Baseline("copy_to_stdout", copy_rate),
                    target=Target(0.3),
                    details={
                        **common,
                        "bootstrap_s": round(boot.elapsed_s, 3),
                        "bootstrap_pages": boot.pages,
                        "bootstrap_mb": round(boot.bytes / 1e6, 1),
                        "bootstrap_mb_per_s": round(boot.bytes / 1e6 / boot.elapsed_s, 1),
                        "copy_runs_rows_per_s": [round(n / s, 1) for n, s in copies],
                        "sync_without_token": reason,
                        "staging_build_s": {k: round(v, 2) for k, v in phases.items()},
                        "load_average_1m": os.getloadavg()[0],
                    },
                )

                # (a) 32 clients pull the same delta, against direct SQL reads of its rows
                watermark, apply_s = change_rows(writer, rows, changes)
                with _client_loop() as runner:
                    delta = runner.run(
                        pull_deltas(gateway.url, org, reader, boot.token, DELTA_CLIENTS)
                    )
                if delta.per_client != [changes] * DELTA_CLIENTS:
                    raise RuntimeError(f"clients received {sorted(set(delta.per_client))} rows")
                sql_rows, sql_s = direct_sql(dsn, org, watermark, DELTA_CLIENTS)
                if sql_rows != changes * DELTA_CLIENTS:
                    raise RuntimeError(f"direct SQL read {sql_rows} rows")
                one_rows, one_s = direct_sql(dsn, org, watermark, 1)
                yield Result(
                    bench=BENCH,
                    metric="delta_rows_per_s",
                    unit="rows/s",
                    value=delta.rows / delta.elapsed_s,
                    baseline=Baseline("direct_sql", sql_rows / sql_s),
                    details={
                        **common,
                        "changed_rows": changes,
                        "clients": DELTA_CLIENTS,
                        "rows_served": delta.rows,
                        "requests": delta.requests,
                        "elapsed_s": round(delta.elapsed_s, 3),
                        "request_p50_s": round(_percentile(delta.latencies, 50), 4),
                        "request_p99_s": round(_percentile(delta.latencies, 99), 4),
                        "request_max_s": round(max(delta.latencies), 4),
                        "transport_retries": delta.retries,
                        "direct_sql_s": round(sql_s, 3),
                        "direct_sql_one_reader_rows_per_s": round(one_rows / one_s, 1),
                        "apply_changes_s": round(apply_s, 3),
                        "apply_batch": APPLY_BATCH,
                        "delta_from_watermark": watermark,
                        "load_average_1m": os.getloadavg()[0],
                    },
                )

                # (d) one client through a narrow view against one through the all view: the
                # same changes, of which the narrow view receives about a tenth
                with _client_loop() as runner:
                    everything = runner.run(pull_deltas(gateway.url, org, reader, boot.token, 1))
                    territory = runner.run(
                        pull_deltas(gateway.url, org, narrow, narrow_boot.token, 1, removals=True)
                    )
                entered, left = narrow_changes(dsn, org, watermark, rows, changes)
                if (territory.rows, territory.removed) != (entered, left):
                    raise RuntimeError(
                        f"narrow view: {territory.rows} upserts and {territory.removed} removals,"
                        f" expected {entered} and {left}"
                    )
                yield Result(
                    bench=BENCH,
                    metric="narrow_delta_changes_per_s",
                    unit="changes/s",
                    value=changes / territory.elapsed_s,
                    baseline=Baseline("all_view_one_client", changes / everything.elapsed_s),
                    details={
                        **common,
                        "changed_rows": changes,
                        "view_share": f"1/{NARROW_SHARE} of the rows before and of the changes",
                        "narrow_upserts": territory.rows,
                        "narrow_removals": territory.removed,
                        "narrow_requests": territory.requests,
                        "narrow_s": round(territory.elapsed_s, 3),
                        "all_view_rows": everything.rows,
                        "all_view_requests": everything.requests,
                        "all_view_s": round(everything.elapsed_s, 3),
                        "load_average_1m": os.getloadavg()[0],
                    },
                )

                # (c) devices long-polling one gateway, woken by one change
                must_bootstrap(gateway.url, org, poller, PING)
                ping = http_bootstrap(gateway.url, org, poller, PING)

                def change() -> None:
                    writer.apply(PING, [("u", 1, {"note": "wake up"})])

                with _client_loop() as runner:
                    wake = runner.run(
                        wake_devices(gateway, org, poller, ping.token, devices, change)
                    )
        finally:
            writer.close()
    latencies = wake.latencies
    yield Result(
        bench=BENCH,
        metric="wake_p99_s",
        unit="s",
        value=_percentile(latencies, 99),
        target=Target(1.0, of="value", op="<="),
        details={
            **common,
            "devices": devices,
            "wait_s": WAIT_S,
            "wake_p50_s": round(_percentile(latencies, 50), 4),
            "wake_p99_s": round(_percentile(latencies, 99), 4),
            "wake_min_s": round(min(latencies), 4),
            "wake_max_s": round(max(latencies), 4),
            "park_s": round(wake.park_s, 3),
            "change_apply_s": round(wake.apply_s, 4),
            "gateway_rss_mb_idle": round(wake.rss_before / 2**20, 1),
            "gateway_rss_mb_parked": round(wake.rss_parked / 2**20, 1),
            "gateway_rss_mb_after_wake": round(wake.rss_after / 2**20, 1),
            "client_fd_limit": wake.fd_limit,
            "repolls_before_change": wake.repolls,
            "transport_retries": wake.retries,
            "load_average_1m": os.getloadavg()[0],
        },
        samples=latencies,
    )


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("command", choices=["serve"], help="serve: the benchmark's gateway")
    parser.parse_args(argv)
    _serve_main()


if __name__ == "__main__":
    _main(sys.argv[1:])
