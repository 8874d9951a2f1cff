"""Fault 10: resumable deltas and bootstraps. A TCP proxy between devices and the gateway cuts
the connection after a random number of bytes of random ``/sync`` and ``/bootstrap`` answers;
the device retries with the same token (or resumes the bootstrap from its last cursor).

Checked for every cut: the retried ``/sync`` request is the same request and its answer is
byte-identical to the answer that was cut; a resumed bootstrap stream is byte-identical to the
rest of the cut stream after the cursor it resumed from. After every round of source changes
every device equals its user's view. Staging is written by the projector's own write path
(:class:`tests.gateway_helpers.World`); changes happen between syncs and the gateway's clock
stands still, so every page is a pure function of its token.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest

from device.client import DeviceClient
from gateway.store import ensure_schema
from tests.gateway_helpers import (
    USERS,
    Clock,
    World,
    configure,
    job,
    mint,
    running_gateway,
    settings_for,
    view,
    with_window,
)
from tests.reliability.harness import env_int
from tests.reliability.oracle import device_rows, view_diff
from tests.reliability.report import record

PAGE_ROWS = 7


@dataclass
class Exchange:
    request: bytes
    response: bytes  # the whole answer the gateway sent
    cut: int | None  # bytes passed on to the device, when cut

    @property
    def target(self) -> str:
        return self.request.split(b"\r\n", 1)[0].split(b" ")[1].decode()

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def request_body(self) -> bytes:
        return self.request.split(b"\r\n\r\n", 1)[1]

    @property
    def body(self) -> bytes:
        head, _, body = self.response.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            return _dechunk(body)
        return body

    @property
    def lines(self) -> list[bytes]:
        return self.body.splitlines()


def _dechunk(data: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class CuttingProxy:
    """Forwards one request per connection (the devices send ``Connection: close``), reads the
    gateway's whole answer, and passes on only its first N bytes to a chosen share of them."""

    def __init__(self, upstream: str, rng: random.Random, share: float) -> None:
        self.upstream = urlsplit(upstream)
        self.rng, self.share = rng, share
        self.exchanges: list[Exchange] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.close()

    @property
    def cuts(self) -> int:
        return sum(1 for e in self.exchanges if e.cut is not None)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self._serve(client)  # one at a time: the exchanges keep the devices' order

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection((self.upstream.hostname, self.upstream.port)) as up:
            request = _read_request(client)
            up.sendall(request)
            response = b""
            while chunk := up.recv(65536):
                response += chunk
            path = request.split(b" ", 2)[1].split(b"?")[0]
            cut = None
            if (
                (path.endswith(b"/sync") or b"/bootstrap/" in path)
                and len(response) > 1
                and self.rng.random() < self.share
            ):
                cut = self.rng.randint(1, len(response) - 1)
            self.exchanges.append(Exchange(request, response, cut))
            with contextlib.suppress(OSError):
                client.sendall(response if cut is None else response[:cut])


def _cursor_of(exchange: Exchange) -> str | None:
    values = parse_qs(urlsplit(exchange.target).query).get("cursor")
    return values[0] if values else None


def check_retries(exchanges: list[Exchange]) -> tuple[int, int]:
    """Every cut answer was asked again and answered identically; returns (sync pages,
    bootstrap pages) checked."""
    cursors: dict[str, tuple[Exchange, int]] = {}  # cursor → (stream, line of its $cursor)
    syncs = bootstraps = 0
    exchanges = [e for e in exchanges if e.path.endswith("/sync") or "/bootstrap/" in e.path]
    for index, exchange in enumerate(exchanges):
        if "/bootstrap/" in exchange.path:
            for at, line in enumerate(exchange.lines):
                if line.startswith(b'{"$cursor"'):
                    cursors[line[len(b'{"$cursor":"') : -2].decode()] = (exchange, at)
        if exchange.cut is None:
            continue
        retry = exchanges[index + 1] if index + 1 < len(exchanges) else None
        if exchange.path.endswith("/sync"):
            assert retry is not None and retry.path == exchange.path, "a cut sync was not retried"
            assert retry.request_body == exchange.request_body, "the retry sent other tokens"
            assert retry.body == exchange.body, (
                f"retried page differs:\n{exchange.body[:500]!r}\n{retry.body[:500]!r}"
            )
            syncs += 1
            continue
        delivered = exchange.response[: exchange.cut]
        if retry is None or retry.path != exchange.path:
            assert b'"$done"' in delivered, "a cut bootstrap was not resumed"
            continue
        cursor = _cursor_of(retry)
        if cursor is None:
            expected = exchange.lines
        else:
            stream, at = cursors[cursor]
            expected = [stream.lines[0], *stream.lines[at + 1 :]]
        assert retry.lines == expected, "the resumed bootstrap differs from the cut stream"
        bootstraps += 1
    return syncs, bootstraps


def _change(world: World, rng: random.Random, clock: Clock, window: list[int]) -> None:
    for _ in range(rng.randint(5, 40)):
        roll = rng.random()
        if roll < 0.6:
            world.upsert(
                "job",
                rng.randint(1, 400),
                **job(
                    rng.choice(["u1", "u2", "team-a", "team-b"]),
                    rng.choice(["open", "open", "closed"]),
                    rng.randint(-10, 2),
                    f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}",
                    rng.randint(1, 40),
                ),
            )
        elif roll < 0.75 and world.rows["job"]:
            world.delete("job", rng.choice(sorted(world.rows["job"])))
        elif roll < 0.95:
            key = rng.randint(1, 40)
            world.upsert("account", key, owner_id="u1", name=f"name {rng.randint(0, 10**6)}")
        elif world.rows["account"]:
            world.delete("account", rng.choice(sorted(world.rows["account"])))
    if rng.random() < 0.1:
        clock.now += 86_400
        world.now = clock.now
    if rng.random() < 0.1:  # the technicians' profile changes: they re-bootstrap their jobs
        window[0] = 10 - window[0]
        configure(world.dsn, world.org, with_window(window[0]))


@pytest.fixture()
def world_gateway(fresh_database: str, tmp_path: Path) -> Iterator[tuple[World, Clock, str]]:
    clock = Clock()
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        ensure_schema(conn)
    world = World(fresh_database, f"o{uuid.uuid4().hex[:8]}")
    world.now = clock.now
    world.upsert("account", 1, owner_id="u1", name="first")
    world.upsert("job", 1, **job("u1"))
    configure(fresh_database, world.org)
    settings = settings_for(tmp_path, gateway_page_rows=PAGE_ROWS)
    with running_gateway(settings, fresh_database, clock) as url:
        yield world, clock, url
    world.close()


def run_cut_pages(world: World, clock: Clock, url: str, tmp: Path, *, cuts: int, seed: int) -> None:
    rng = random.Random(seed)
    proxy = CuttingProxy(url, random.Random(seed + 1), share=0.35)
    http = httpx.Client(
        headers={"connection": "close"},
        limits=httpx.Limits(max_keepalive_connections=0),
        timeout=30,
    )
    clients = {}
    for user, (roles, teams) in USERS.items():
        token = mint(world.org, user, roles, teams=teams)
        clients[user] = DeviceClient(
            proxy.url, world.org, token, tmp / f"{user}.sqlite", http=http, gzip=False
        )
    rounds = failures = 0
    window = [7]
    try:
        while proxy.cuts < cuts:
            _change(world, rng, clock, window)
            for user, client in clients.items():
                for _attempt in range(20):
                    try:
                        client.sync()
                        break
                    except httpx.TransportError:
                        failures += 1  # five cut answers in a row: sync again
                else:
                    raise AssertionError(f"device {user} could not sync")
                wanted = view(world, user, clock.now, window[0])
                local = device_rows(client.store)
                assert local == wanted, f"{user}: {view_diff(local, wanted)}"
            rounds += 1
        syncs, bootstraps = check_retries(proxy.exchanges)
    finally:
        for client in clients.values():
            client.store.close()
        http.close()
        proxy.close()
    assert syncs + bootstraps >= cuts * 0.9, (syncs, bootstraps)
    record(
        "cut_pages",
        cut_pages=proxy.cuts,
        retried_sync_pages_identical=syncs,
        resumed_bootstrap_streams_identical=bootstraps,
        requests=len(proxy.exchanges),
        rounds=rounds,
        syncs_given_up_after_five_cuts=failures,
    )


def test_cut_pages_retry_identically(
    world_gateway: tuple[World, Clock, str], tmp_path: Path
) -> None:
    world, clock, url = world_gateway
    run_cut_pages(world, clock, url, tmp_path, cuts=40, seed=21)


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_500_cut_pages(world_gateway: tuple[World, Clock, str], tmp_path: Path) -> None:
    world, clock, url = world_gateway
    run_cut_pages(world, clock, url, tmp_path, cuts=env_int("FIELDSYNC_CHAOS_CUTS", 500), seed=22)
