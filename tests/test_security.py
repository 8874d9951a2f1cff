"""Security of the gateway against real PostgreSQL staging and a real HTTP server (issue 6,
items 15 to 21): JWT refusals, JWKS rotation, tenant isolation, request scope, route inventory,
revocation and fuzzing.

Bounded for ``make test``: the isolation property runs ``FIELDSYNC_TEST_ISOLATION_EXAMPLES``
generated step lists (default 100, about 400 requests over three orgs) and schemathesis
``FIELDSYNC_TEST_FUZZ_EXAMPLES`` cases (default 200). ``make chaos`` runs both at length:
``FIELDSYNC_TEST_ISOLATION_CHAOS_EXAMPLES`` (default 2800, the issue's 10k requests) and
``FIELDSYNC_TEST_FUZZ_CHAOS_EXAMPLES`` (default 5000).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from device.client import DeviceClient, SyncFailed
from device.store import to_sqlite
from gateway.auth import JwksCache, KeysUnavailable
from tests.gateway_helpers import (
    JWT_SECRET,
    OFFLINE,
    Clock,
    World,
    configure,
    job,
    json_value,
    running_gateway,
    settings_for,
    view_of,
    with_window,
)

ISSUER = "https://idp.example.test"
ERROR_KEYS = {"error", "detail"}


# -- keys, tokens and a JWKS server --------------------------------------------------------------


class Keys:
    """Signing keys: two RSA keys (r1, r2), one EC key (e1), and a stranger's RSA key."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {
            "r1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "r2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "e1": ec.generate_private_key(ec.SECP256R1()),
            "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        }

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.private[kid]
        algorithm = ECAlgorithm if kid.startswith("e") else RSAAlgorithm
        document: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
        return document | {"kid": kid}

    def public_pem(self, kid: str) -> bytes:
        return bytes(
            self.private[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


class JwksServer:
    """A JWKS document on loopback HTTP; ``fetches`` counts the GETs, ``status`` != 200 fails
    them."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [keys.jwk("r1"), keys.jwk("e1")]
    try:
        yield server
    finally:
        server.close()


def claims(
    org: str, user: str = "u1", roles: tuple[str, ...] = ("technician",), **more: Any
) -> dict[str, Any]:
    """Claims that pass (aud, iss, exp in an hour); ``more`` overrides, a None value removes."""
    base: dict[str, Any] = {
        "org": org,
        "sub": user,
        "roles": list(roles),
        "aud": "fieldsync",
        "iss": ISSUER,
        "exp": int(time.time()) + 3600,
    }
    merged = base | more
    return {k: v for k, v in merged.items() if v is not None}


def without(payload: dict[str, Any], claim: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != claim}


def sign(payload: dict[str, Any], key: Any = JWT_SECRET, alg: str = "HS256", **header: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=header or None)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def hs256_with(secret: bytes, payload: dict[str, Any], kid: str | None = None) -> str:
    """An HS256 token MAC-ed with raw bytes (PyJWT refuses PEM keys as HMAC secrets)."""
    import hashlib
    import hmac

    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    signing_input = (
        jwt.utils.base64url_encode(json.dumps(header).encode())
        + b"."
        + jwt.utils.base64url_encode(json.dumps(payload).encode())
    )
    mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()


def new_world(dsn: str, clock: Clock, org: str | None = None) -> World:
    world = World(dsn, org or f"s{uuid.uuid4().hex[:8]}")
    world.now = clock.now
    world.upsert("account", 1, owner_id="u1", name="first")
    world.upsert("account", 2, owner_id="team-a", name="second")
    world.upsert("job", 1, **job("u1"))
    world.upsert("job", 2, **job("team-a", account=2))
    configure(dsn, world.org)
    return world


def assert_refusal(response: httpx.Response, status: int, code: str) -> None:
    """``status`` with exactly the error JSON ``code``: no data, no trace."""
    assert response.status_code == status, (code, response.status_code, response.text)
    body = response.json()
    assert set(body) == ERROR_KEYS and body["error"] == code, (code, response.text)
    assert isinstance(body["detail"], str) and "Traceback" not in body["detail"]
    assert response.headers["content-type"] == "application/json"
    assert response.content == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


# -- 15: JWT negative matrix ---------------------------------------------------------------------


def test_jwt_refusals_are_coded_401s_without_data(
    fresh_database: str, tmp_path: Path, clock: Clock, keys: Keys, jwks_server: JwksServer
) -> None:
    world = new_world(fresh_database, clock)
    org = world.org
    settings = settings_for(
        tmp_path,
        gateway_jwks=jwks_server.url,
        gateway_jwt_issuer=ISSUER,
        gateway_jwt_max_lifetime_s=3600,
    )
    now = int(time.time())
    good = claims(org)
    r1, e1 = keys.private["r1"], keys.private["e1"]
    tampered = sign(good).split(".")
    tampered[1] = jwt.utils.base64url_encode(
        json.dumps(good | {"roles": ["dispatcher"]}).encode()
    ).decode()
    matrix: dict[str, tuple[str | None, str]] = {
        "no header": (None, "missing_token"),
        "basic scheme": ("Basic dTE6cHc=", "missing_token"),
        "not a jwt": ("Bearer not.a.jwt", "malformed_token"),
        "alg none": (
            "Bearer " + jwt.encode(good, key=None, algorithm="none"),
            "bad_algorithm",
        ),
        "alg none with kid": (
            "Bearer " + jwt.encode(good, key=None, algorithm="none", headers={"kid": "r1"}),
            "bad_algorithm",
        ),
        "HS256 signed with the RSA public key": (
            "Bearer " + hs256_with(keys.public_pem("r1"), good, kid="r1"),
            "bad_signature",
        ),
        "HS384": ("Bearer " + sign(good, JWT_SECRET * 2, "HS384"), "bad_algorithm"),
        "RS256 by a stranger under kid r1": (
            "Bearer " + sign(good, keys.private["stranger"], "RS256", kid="r1"),
            "bad_signature",
        ),
        "RS256 naming the EC key": ("Bearer " + sign(good, r1, "RS256", kid="e1"), "bad_algorithm"),
        "ES256 naming the RSA key": (
            "Bearer " + sign(good, e1, "ES256", kid="r1"),
            "bad_algorithm",
        ),
        "RS384": ("Bearer " + sign(good, r1, "RS384", kid="r1"), "bad_algorithm"),
        "unknown kid": ("Bearer " + sign(good, r1, "RS256", kid="r9"), "unknown_key"),
        "no kid, several keys": ("Bearer " + sign(good, r1, "RS256"), "unknown_key"),
        "tampered payload": ("Bearer " + ".".join(tampered), "bad_signature"),
        "forged secret": ("Bearer " + sign(good, "another-secret-" * 3), "bad_signature"),
        "expired": ("Bearer " + sign(good | {"exp": now - 120}), "token_expired"),
        "nbf in the future": ("Bearer " + sign(good | {"nbf": now + 600}), "token_not_yet_valid"),
        "iat in the future": ("Bearer " + sign(good | {"iat": now + 600}), "token_not_yet_valid"),
        "wrong audience": ("Bearer " + sign(good | {"aud": "other"}), "bad_audience"),
        "no audience": ("Bearer " + sign(without(good, "aud")), "missing_claim"),
        "wrong issuer": ("Bearer " + sign(good | {"iss": "https://evil.test"}), "bad_issuer"),
        "no issuer": ("Bearer " + sign(without(good, "iss")), "missing_claim"),
        "no sub": ("Bearer " + sign(without(good, "sub")), "missing_claim"),
        "no org": ("Bearer " + sign(without(good, "org")), "missing_claim"),
        "no exp": ("Bearer " + sign(without(good, "exp")), "missing_claim"),
        "org not a name": ("Bearer " + sign(good | {"org": [org]}), "bad_claim"),
        "roles not a list": ("Bearer " + sign(good | {"roles": "technician"}), "bad_claim"),
        "lifetime beyond the maximum (iat)": (
            "Bearer " + sign(good | {"iat": now, "exp": now + 7200}),
            "lifetime_too_long",
        ),
        "lifetime beyond the maximum (no iat)": (
            "Bearer " + sign(good | {"exp": now + 7200}),
            "lifetime_too_long",
        ),
        "RS256 lifetime beyond the maximum": (
            "Bearer " + sign(good | {"exp": now + 86_400 * 365}, r1, "RS256", kid="r1"),
            "lifetime_too_long",
        ),
    }
    requests = [
        ("GET", f"/orgs/{org}/metadata", None),
        ("POST", f"/orgs/{org}/sync", {"tokens": {"job": None}}),
        ("GET", f"/orgs/{org}/bootstrap/job", None),
        ("GET", f"/orgs/{org}/snapshots/account", None),
        ("GET", f"/orgs/{org}/admin/offline", None),
    ]
    with (
        running_gateway(settings, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):
        accepted = [
            sign(good),
            sign(good | {"iat": now, "exp": now + 3600}),
            sign(good, r1, "RS256", kid="r1"),
            sign(good, e1, "ES256", kid="e1"),
        ]
        for token in accepted:
            response = http.get(f"/orgs/{org}/metadata", headers=bearer(token))
            assert response.status_code == 200, response.text
        for name, (authorization, code) in matrix.items():
            headers = {"authorization": authorization} if authorization else {}
            for method, path, body in requests:
                response = http.request(method, path, json=body, headers=headers)
                assert_refusal(response, 401, code)
                assert response.headers["www-authenticate"].startswith("Bearer"), name
                assert "first" not in response.text and "team-a" not in response.text, name
    world.close()


# -- 16: JWKS rotation and unknown-kid floods ----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_jwks_cache_rotation_and_refetch_limit(keys: Keys, jwks_server: JwksServer) -> None:
    """Against a real JWKS server, on a simulated clock: TTL 300 s, refetch at most once a
    minute."""
    clock = FakeClock()
    cache = JwksCache(jwks_server.url, ttl_s=300, min_refetch_s=60, clock=clock)

    def kids(kid: str | None) -> set[str | None]:
        return {key.key_id for key in cache.keys(kid)}

    assert kids("r1") == {"r1", "e1"} and jwks_server.fetches == 1
    jwks_server.keys = [keys.jwk("r1"), keys.jwk("r2"), keys.jwk("e1")]  # r2 published
    clock.now += 10
    assert "r2" not in kids("r2") and jwks_server.fetches == 1  # too soon after the last fetch
    clock.now += 51
    assert "r2" in kids("r2") and jwks_server.fetches == 2  # 61 s: well within the TTL
    fetched_at = clock.now
    jwks_server.keys = [keys.jwk("r2"), keys.jwk("e1")]  # r1 withdrawn
    clock.now += 200
    assert "r1" in kids("r1") and jwks_server.fetches == 2  # a known kid: no early fetch
    clock.now = fetched_at + 300
    assert "r1" not in kids("r1") and jwks_server.fetches == 3  # refused once the TTL is over
    # a flood of made-up kids for 10 simulated minutes, 20 a second
    fetch_times = [clock.now]
    for step in range(12_000):
        clock.now += 0.05
        before = jwks_server.fetches
        kids(f"bogus-{step}")
        if jwks_server.fetches != before:
            fetch_times.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(fetch_times)]
    assert gaps and min(gaps) >= 60 - 1e-6, gaps
    assert len(gaps) <= 10
    # the key server fails: the keys known so far stay in use, fetches stay rate-limited
    jwks_server.status = 500
    clock.now += 400
    attempts = jwks_server.fetches
    assert "r2" in kids("r2") and jwks_server.fetches == attempts + 1
    assert "r2" in kids("r2") and jwks_server.fetches == attempts + 1
    # no keys ever read: 503, not 401
    broken = JwksCache(jwks_server.url, ttl_s=300, min_refetch_s=60, clock=clock)
    with pytest.raises(KeysUnavailable):
        broken.keys("r1")


def test_jwks_rotation_through_the_gateway(
    fresh_database: str, tmp_path: Path, clock: Clock, keys: Keys, jwks_server: JwksServer
) -> None:
    """Real time, TTL 1 s: a new key is accepted within it, a withdrawn one refused after it;
    with a JWKS only, HS256 tokens (even MAC-ed with the public key) are refused."""
    world = new_world(fresh_database, clock)
    settings = settings_for(
        tmp_path,
        gateway_jwt_secret=None,
        gateway_jwks=jwks_server.url,
        gateway_jwks_cache_s=1.0,
        gateway_jwks_min_refetch_s=0.5,
    )
    payload = claims(world.org, iss=None)
    r1 = sign(payload, keys.private["r1"], "RS256", kid="r1")
    r2 = sign(payload, keys.private["r2"], "RS256", kid="r2")
    with (
        running_gateway(settings, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):

        def metadata(token: str) -> httpx.Response:
            return http.get(f"/orgs/{world.org}/metadata", headers=bearer(token))

        def until(token: str, status: int, limit: float) -> float:
            started = time.monotonic()
            while metadata(token).status_code != status:
                assert time.monotonic() - started < limit, f"still not {status}"
                time.sleep(0.05)
            return time.monotonic() - started

        assert metadata(r1).status_code == 200
        assert_refusal(metadata(r2), 401, "unknown_key")
        jwks_server.keys = [keys.jwk("r1"), keys.jwk("r2")]
        assert until(r2, 200, 1.5) <= 1.5
        jwks_server.keys = [keys.jwk("r2")]
        until(r1, 401, 1.5)
        assert_refusal(metadata(r1), 401, "unknown_key")
        assert metadata(r2).status_code == 200
        confused = hs256_with(keys.public_pem("r2"), payload, kid="r2")
        assert_refusal(metadata(confused), 401, "bad_algorithm")
        assert_refusal(metadata(sign(payload)), 401, "bad_algorithm")
    world.close()


def test_unknown_kid_flood_fetches_the_jwks_at_most_once_a_minute(
    fresh_database: str, tmp_path: Path, clock: Clock, keys: Keys, jwks_server: JwksServer
) -> None:
    world = new_world(fresh_database, clock)
    settings = settings_for(tmp_path, gateway_jwt_secret=None, gateway_jwks=jwks_server.url)
    payload = claims(world.org, iss=None)
    stranger = keys.private["stranger"]
    with running_gateway(settings, fresh_database, clock) as url:
        good = sign(payload, keys.private["r1"], "RS256", kid="r1")
        assert httpx.get(f"{url}/orgs/{world.org}/metadata", headers=bearer(good)).is_success
        fetched = jwks_server.fetches
        refused: list[int] = []

        def flood(worker: int) -> None:
            with httpx.Client(base_url=url) as http:
                for n in range(50):
                    token = sign(payload, stranger, "RS256", kid=f"k-{worker}-{n}")
                    refused.append(
                        http.get(f"/orgs/{world.org}/metadata", headers=bearer(token)).status_code
                    )

        threads = [threading.Thread(target=flood, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert refused == [401] * 300
        assert jwks_server.fetches - fetched <= 1, jwks_server.fetches
    world.close()


# -- 17: tenant isolation, property-based --------------------------------------------------------

ISOLATION_EXAMPLES = int(os.environ.get("FIELDSYNC_TEST_ISOLATION_EXAMPLES", "100"))
CHAOS_EXAMPLES = int(os.environ.get("FIELDSYNC_TEST_ISOLATION_CHAOS_EXAMPLES", "2800"))
PEOPLE = ["u1", "u2", "d1", "d2"]
TEAMS = ["team-a", "team-b", "team-c"]


def urgent_config() -> dict[str, Any]:
    """OFFLINE, but dispatchers also see every 'urgent' job of the org."""
    document = copy.deepcopy(dict(OFFLINE))
    document["profiles"]["dispatch"]["items"][0] = {
        "entity": "job",
        "distribution": "custom",
        "priority": 1,
        "filter": {
            "or": [
                {"field": "owner_id", "op": "in", "value": "$team_ids"},
                {"field": "status", "op": "eq", "value": "urgent"},
            ]
        },
    }
    return document


class Tenants:
    """Three orgs in one staging database, rows that name their org, three rule variants."""

    def __init__(self, dsn: str, clock: Clock) -> None:
        tag = uuid.uuid4().hex[:6]
        self.worlds = [new_world(dsn, clock, f"t{tag}_{n}") for n in range(3)]
        self.window = [7, 3, 7]
        self.urgent = [False, False, True]
        configure(dsn, self.worlds[1].org, with_window(3))
        configure(dsn, self.worlds[2].org, urgent_config())
        rng = random.Random(6)
        for n, world in enumerate(self.worlds):
            for key in range(1, 5):
                world.upsert("account", key, owner_id=rng.choice(TEAMS), name=f"{world.org}/{key}")
            for key in range(1, 13):
                self.write_job(n, key, rng)
        self.clock = clock

    def write_job(self, n: int, key: int, rng: random.Random) -> None:
        values = job(
            rng.choice(PEOPLE[:2] + TEAMS),
            rng.choice(["open", "closed", "urgent"]),
            rng.randint(-10, 2),
            f"{n + 1}{key:03d}.{rng.randint(0, 99):02d}",  # the leading digit names the org
            rng.randint(1, 4),
        )
        self.worlds[n].upsert("job", key, **values)

    def view(self, n: int, user: str, roles: list[str], teams: list[str]) -> dict[str, Any]:
        world = self.worlds[n]
        seen = view_of(world, user, roles, teams, self.clock.now, self.window[n])
        if self.urgent[n] and "dispatcher" in roles:
            for key, row in world.rows["job"].items():
                if row["status"] == "urgent":
                    seen["job"][key] = {c: json_value(v) for c, v in row.items()}
        return seen


def _row(line: str | bytes) -> dict[str, Any]:
    return dict(json.loads(line, parse_float=Decimal))


step = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["sync"] * 3 + ["bootstrap"] * 3 + ["metadata", "snapshot"]),
            "org": st.integers(0, 2),
            "token_org": st.sampled_from(["same"] * 5 + ["other", "*"]),
            "user": st.sampled_from(PEOPLE),
            "roles": st.sampled_from(
                [["technician"], ["dispatcher"], ["technician", "dispatcher"]] * 2
                + [["auditor"], [], ["nobody", "dispatcher"]]
            ),
            "teams": st.sampled_from([[], ["team-a"], ["team-a", "team-b"], ["team-c"]]),
            "admin": st.booleans(),
            "entity": st.sampled_from(["job", "account"] * 4 + ["contact"]),
            "limit": st.integers(1, 5),
            "tokens": st.sampled_from(["fresh", "kept", "kept", "kept", "stolen"]),
        }
    ),
    st.fixed_dictionaries({"kind": st.just("write"), "org": st.integers(0, 2)}),
)


class Isolation:
    """One gateway over :class:`Tenants`; plays generated steps and checks every answer."""

    def __init__(self, tenants: Tenants, http: httpx.Client) -> None:
        self.tenants = tenants
        self.http = http
        self.counts: Counter[str] = Counter()

    def request(self, method: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
        response = self.http.request(method, path, headers=headers, **kw)
        self.counts["requests"] += 1
        self.counts[str(response.status_code)] += 1
        return response

    def play(self, steps: list[dict[str, Any]], rng: random.Random) -> None:
        self.counts["examples"] += 1
        kept: dict[tuple[Any, ...], dict[str, str]] = {}  # principal → entity → delta token
        for s in steps:
            if s["kind"] == "write":
                self.tenants.write_job(s["org"], rng.randint(1, 14), rng)
            else:
                self.step(s, rng, kept)

    def step(
        self, s: dict[str, Any], rng: random.Random, kept: dict[tuple[Any, ...], dict[str, str]]
    ) -> None:
        n = s["org"]
        world = self.tenants.worlds[n]
        token_org = {
            "same": world.org,
            "other": self.tenants.worlds[(n + 1) % 3].org,
            "*": "*",
        }[s["token_org"]]
        roles, teams, user = s["roles"], s["teams"], s["user"]
        payload = claims(token_org, user, tuple(roles), teams=teams, iss=None)
        if s["admin"]:
            payload["scope"] = "fieldsync:admin"
        headers = bearer(sign(payload))
        # a sync token binds the org of the path and the user first
        principal = (world.org, user, tuple(sorted(roles)), tuple(sorted(teams)), token_org)
        allowed_org = token_org == world.org or (token_org == "*" and s["admin"])
        offline = bool({"technician", "dispatcher"} & set(roles))
        expected = 200 if allowed_org and offline else 403
        seen = self.tenants.view(n, user, roles, teams) if expected == 200 else {}

        def check(entity: str, row: dict[str, Any]) -> None:
            self.counts["rows"] += 1
            stored = {c: to_sqlite(v) for c, v in row.items()}
            assert stored == seen[entity].get(row["id"]), (world.org, principal, entity, row)

        base = f"/orgs/{world.org}"
        if s["kind"] == "metadata":
            response = self.request("GET", f"{base}/metadata", headers)
            assert response.status_code == expected, response.text
            if expected == 200:
                assert {e["name"] for e in response.json()["entities"]} <= set(seen)
        elif s["kind"] == "snapshot":
            response = self.request("GET", f"{base}/snapshots/{s['entity']}", headers)
            # no snapshot was taken: 404 where the profile gives the entity with 'all'
            assert response.status_code in ((403, 404) if expected == 200 else (403,))
            assert set(response.json()) == ERROR_KEYS, response.text
        elif s["kind"] == "bootstrap":
            response = self.request("GET", f"{base}/bootstrap/{s['entity']}", headers)
            assert response.status_code == (expected if s["entity"] in seen else 403)
            if response.status_code == 200:
                lines = [_row(line) for line in response.text.splitlines()]
                for row in lines:
                    if not any(k.startswith("$") for k in row):
                        check(s["entity"], row)
                assert lines[-1].get("$done") is True
                kept.setdefault(principal, {})[s["entity"]] = lines[-1]["token"]
        else:
            self.sync(s, rng, kept, principal, expected, seen, check)

    def sync(
        self,
        s: dict[str, Any],
        rng: random.Random,
        kept: dict[tuple[Any, ...], dict[str, str]],
        principal: tuple[Any, ...],
        expected: int,
        seen: dict[str, Any],
        check: Any,
    ) -> None:
        """Sync pages until the delta is complete (no write in between)."""
        org, user, roles, teams, token_org = principal
        payload = claims(token_org, user, roles, teams=list(teams), iss=None)
        if s["admin"]:
            payload["scope"] = "fieldsync:admin"
        headers = bearer(sign(payload))
        stolen = s["tokens"] == "stolen"
        if stolen:
            others = [p for p, t in kept.items() if t and p[:2] != principal[:2]]
            if not others:
                return
            tokens: dict[str, str | None] = dict(kept[rng.choice(others)])
        elif s["tokens"] == "kept":
            tokens = dict(kept.get(principal, {}))
        else:
            tokens = {s["entity"]: None}
        for _ in range(200):
            body = {"tokens": tokens, "limit": s["limit"]}
            response = self.request("POST", f"/orgs/{org}/sync", headers, json=body)
            if stolen and expected == 200:  # another user's or org's token
                assert response.status_code == 400, response.text
                assert response.json()["error"] == "bad_sync_token"
                return
            assert response.status_code == expected, response.text
            if expected != 200:
                assert set(response.json()) == ERROR_KEYS
                return
            answer = response.json()
            assert answer["org"] == org
            for result in answer["entities"]:
                entity = result["entity"]
                if result["control"] is not None:
                    assert not result["upserts"] and not result["removes"]
                    continue
                for row in result["upserts"]:
                    check(entity, row)
                for key in result["removes"]:
                    assert set(key) == {"id"}
                tokens[entity] = result["token"]
            kept[principal] = {e: t for e, t in tokens.items() if t is not None and e in seen}
            if not any(r["has_more"] for r in answer["entities"]):
                return
        pytest.fail("a delta never finished")


@pytest.fixture()
def isolation(fresh_database: str, tmp_path: Path, clock: Clock) -> Iterator[Isolation]:
    tenants = Tenants(fresh_database, clock)
    settings = settings_for(tmp_path, gateway_page_rows=3)
    with (
        running_gateway(settings, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):
        run = Isolation(tenants, http)
        yield run
    print(f"isolation: {dict(run.counts)}")
    for world in tenants.worlds:
        world.close()


def isolation_property(examples: int) -> Any:
    """The property, with ``examples`` generated step lists."""

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(steps=st.lists(step, min_size=4, max_size=16), seed=st.integers(0, 2**16))
    def check(isolation: Isolation, steps: list[dict[str, Any]], seed: int) -> None:
        isolation.play(steps, random.Random(seed))

    return check


test_no_request_reaches_another_org_or_outside_the_view = isolation_property(ISOLATION_EXAMPLES)
test_isolation_at_the_issue_scale = pytest.mark.chaos(isolation_property(CHAOS_EXAMPLES))


# -- 18: request parameters never widen scope ----------------------------------------------------


def test_request_parameters_never_widen_scope(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    world = new_world(fresh_database, clock)
    other = new_world(fresh_database, clock)
    org = world.org
    u1 = bearer(sign(claims(org, iss=None)))
    d1 = bearer(sign(claims(org, "d1", ("dispatcher",), teams=["team-a"], iss=None)))
    admin = bearer(sign(claims(org, "ops", (), scope="fieldsync:admin", iss=None)))
    config = settings_for(tmp_path)
    with (
        running_gateway(config, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):
        # the org of the path against the org of the token
        for method, path, body in [
            ("GET", f"/orgs/{other.org}/metadata", None),
            ("POST", f"/orgs/{other.org}/sync", {"tokens": {"job": None}}),
            ("GET", f"/orgs/{other.org}/bootstrap/job", None),
            ("GET", f"/orgs/{other.org}/snapshots/account", None),
            ("GET", f"/orgs/{other.org}/admin/offline", None),
            ("GET", f"/orgs/{other.org}/admin/status", None),
        ]:
            for headers in (u1, admin):
                response = http.request(method, path, json=body, headers=headers)
                assert_refusal(response, 403, "forbidden")
                assert (
                    f"not {other.org!r}" in response.json()["detail"]
                    or "admin" in (response.json()["detail"])
                )
        assert http.get("/admin/orgs", headers=admin).json() == [org]
        # '*' is an org only for administrators
        star = bearer(sign(claims("*", iss=None)))
        assert_refusal(http.get(f"/orgs/{org}/metadata", headers=star), 403, "forbidden")
        # an entity outside the user's view: 403 (bootstrap, snapshot) or 'removed' (sync)
        outside = http.get(f"/orgs/{org}/bootstrap/contact", headers=u1)
        assert_refusal(outside, 403, "forbidden")
        assert "'contact' is not in this user's offline profile" in outside.json()["detail"]
        assert_refusal(http.get(f"/orgs/{org}/snapshots/job", headers=d1), 403, "forbidden")
        answer = http.post(f"/orgs/{org}/sync", json={"tokens": {"contact": None}}, headers=u1)
        removed = {r["entity"]: r for r in answer.json()["entities"]}["contact"]
        assert removed["control"] == "removed" and removed["upserts"] == []
        # injection strings in identifiers: 422 naming the parameter
        identifiers = [
            ("GET", f"/orgs/{org}%27%20OR%201=1--/metadata", None, "org"),
            ("GET", f"/orgs/{org}/bootstrap/job%3B%20DROP%20TABLE%20job", None, "entity"),
            ("GET", f"/orgs/{org}/bootstrap/JOB", None, "entity"),
            ("GET", f"/orgs/{org}/snapshots/job%22--", None, "entity"),
            (
                "POST",
                f"/orgs/{org}/sync",
                {"tokens": {"job' OR '1'='1": None}},
                "tokens.job' OR '1'='1",
            ),
            ("POST", f"/orgs/{org}/sync", {"tokens": {"job": None}, "limit": 0}, "limit"),
            ("POST", f"/orgs/{org}/sync", {"tokens": {"job": None}, "wait": -1}, "wait"),
            ("PUT", f"/orgs/{org}/admin/offline/tables/x", {}, "section"),
        ]
        for method, path, body, where in identifiers:
            response = http.request(method, path, json=body, headers=admin)
            assert_refusal(response, 422, "invalid_request")
            assert where in response.json()["detail"], response.text
        # tokens, cursors and snapshot ids that are not ours: 400 / 404, never SQL
        for cursor in ["' OR 1=1--", "a.b.c", "x" * 5000]:
            response = http.get(f"/orgs/{org}/bootstrap/job", params={"cursor": cursor}, headers=u1)
            assert_refusal(response, 400, "bad_sync_token")
        forged = http.post(
            f"/orgs/{org}/sync", json={"tokens": {"job": "'; DROP TABLE x; --"}}, headers=u1
        )
        assert_refusal(forged, 400, "bad_sync_token")
        for snapshot in ["../../../etc/passwd", "1' OR '1'='1"]:
            response = http.get(
                f"/orgs/{org}/snapshots/account/file", params={"id": snapshot}, headers=d1
            )
            assert_refusal(response, 404, "no_snapshot")
            assert "not a snapshot id" in response.json()["detail"]
        # byte ranges of a snapshot file: refused in the error format, not in plain text
        from engine.snapshots.build import build_snapshot
        from engine.snapshots.store import default_store

        build_snapshot(fresh_database, org, "account", default_store(config), group="scope")
        file = f"/orgs/{org}/snapshots/account/file"
        for value in ["pages=0-9", "bytes=9-2", "bytes", ";AG1 I2>xs"]:
            assert_refusal(http.get(file, headers=d1 | {"range": value}), 400, "bad_range")
        beyond = http.get(file, headers=d1 | {"range": "bytes=99999999-"})
        assert_refusal(beyond, 416, "range_not_satisfiable")
        assert beyond.headers["content-range"].startswith("bytes */")
        assert http.get(file, headers=d1 | {"range": "bytes=0-9"}).status_code == 206
        # injection strings in configured filters and identifiers: 422 naming the path
        base = f"/orgs/{org}/admin/offline"

        def put_profile(item: dict[str, Any]) -> httpx.Response:
            return http.put(f"{base}/profiles/dispatch", json={"items": [item]}, headers=admin)

        custom = {"entity": "job", "distribution": "custom"}
        rejected = {
            "column name": (
                custom | {"filter": {"field": "status = status OR 1", "op": "eq", "value": "x"}},
                "profiles.dispatch.items[0].filter: field 'status = status OR 1' does not exist",
            ),
            "operator": (
                custom | {"filter": {"field": "status", "op": "= 'x' OR", "value": "x"}},
                "unknown op \"= 'x' OR\"",
            ),
            "parameter": (
                custom | {"filter": {"field": "owner_id", "op": "eq", "value": "$user_id; --"}},
                "unknown parameter '$user_id; --'",
            ),
            "entity": (
                {"entity": "job; DROP TABLE job", "distribution": "all"},
                "profiles.dispatch.items.0.entity",
            ),
            "related column": (
                {
                    "entity": "account",
                    "distribution": "related",
                    "related": {"entity": "job", "column": "account_id) OR (true"},
                },
                "related.column",
            ),
        }
        for name, (item, message) in rejected.items():
            response = put_profile(item)
            assert_refusal(response, 422, "invalid_offline_config")
            assert message in response.json()["detail"], (name, response.text)
        for section, name, body, message in [
            ("entities", "job; --", {"owner_column": "owner_id"}, "entities.job; --"),
            ("entities", "job", {"owner_column": "owner_id OR 1"}, "owner_column"),
        ]:
            response = http.put(f"{base}/{section}/{name}", json=body, headers=admin)
            assert_refusal(response, 422, "invalid_offline_config")
            assert message in response.json()["detail"], response.text
        # an injection string as a filter *value* is only ever a value: it matches nothing
        accepted = put_profile(
            custom | {"filter": {"field": "status", "op": "eq", "value": "open' OR '1'='1"}}
        )
        assert accepted.status_code == 200, accepted.text
        rows = http.get(f"/orgs/{org}/bootstrap/job", headers=d1).text.splitlines()
        assert [json.loads(line) for line in rows if not line.startswith('{"$')] == []
    world.close()
    other.close()


# -- 19: route inventory -------------------------------------------------------------------------

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
DEVICE_ROUTES = {
    ("GET", "/orgs/{org}/metadata"),
    ("POST", "/orgs/{org}/sync"),
    ("GET", "/orgs/{org}/bootstrap/{entity}"),
    ("GET", "/orgs/{org}/snapshots/{entity}"),
    ("GET", "/orgs/{org}/snapshots/{entity}/file"),
}
ADMIN_ROUTES = {
    ("GET", "/admin/orgs"),
    ("GET", "/orgs/{org}/admin/status"),
    ("GET", "/orgs/{org}/admin/lifecycle"),
    ("GET", "/orgs/{org}/admin/offline"),
    ("PUT", "/orgs/{org}/admin/offline"),
    ("PUT", "/orgs/{org}/admin/offline/{section}/{name}"),
    ("DELETE", "/orgs/{org}/admin/offline/{section}/{name}"),
}


def inventory(settings: Any, dsn: str) -> set[tuple[str, str]]:
    """(method, path) of every route of the app these settings make."""
    from gateway.app import create_app

    app = create_app(settings, dsn)
    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any]) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI's included routers
            if included is not None or hasattr(route, "routes"):
                walk((included or route).routes)
            for method in getattr(route, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, route.path))

    walk(app.routes)
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= found
    return found


def concrete(path: str, org: str) -> str:
    values = {"org": org, "entity": "job", "section": "roles", "name": "technician"}
    return path.format(**values)


@pytest.mark.parametrize("operations", [True, False], ids=["admin+metrics", "device-only"])
def test_every_route_but_health_needs_credentials(
    fresh_database: str, tmp_path: Path, clock: Clock, operations: bool
) -> None:
    world = new_world(fresh_database, clock)
    settings = settings_for(
        tmp_path, gateway_admin_enabled=operations, gateway_metrics_enabled=operations
    )
    routes = inventory(settings, fresh_database)
    public = {("GET", p) for p in PUBLIC} | ({("GET", "/metrics")} if operations else set())
    assert routes == DEVICE_ROUTES | public | (ADMIN_ROUTES if operations else set()), routes
    admin = bearer(sign(claims("*", "ops", (), scope="fieldsync:admin", iss=None)))
    no_credentials: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer garbage"},
        {"authorization": "Basic b3BzOnNlY3JldA=="},
        {"authorization": f"Bearer {sign(claims(world.org, iss=None, exp=1))}"},
    ]
    with (
        running_gateway(settings, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):
        for method, path in sorted(routes - public):
            target = concrete(path, world.org)
            for headers in no_credentials:
                for content in (None, b"{}", b"{not json", b"[" * 10_000):
                    response = http.request(method, target, headers=headers, content=content)
                    assert response.status_code == 401, (method, path, headers, response.text)
                    assert set(response.json()) == ERROR_KEYS
        for _, path in sorted(public):
            assert http.get(path).status_code == 200, path
        hidden = [("GET", "/metrics"), *sorted(ADMIN_ROUTES)]
        for method, path in hidden:
            response = http.request(method, concrete(path, world.org), headers=admin, json={})
            if operations:  # served (an org without a lifecycle row is unknown_org there)
                assert '"not_found"' not in response.text, (method, path)
            else:
                assert_refusal(response, 404, "not_found")
        openapi = http.get("/openapi.json").json()
        assert any("/admin/" in p for p in openapi["paths"]) is operations
        # a device token on the admin API: 403
        if operations:
            device_token = bearer(sign(claims(world.org, iss=None)))
            response = http.get(f"/orgs/{world.org}/admin/offline", headers=device_token)
            assert_refusal(response, 403, "forbidden")
    world.close()


# -- 20: revocation ------------------------------------------------------------------------------


def test_a_removed_role_gets_403_or_removals_on_the_next_sync(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    world = new_world(fresh_database, clock)
    org = world.org
    for key in range(3, 9):  # u5's own jobs; team-a's jobs
        world.upsert("job", key, **job("u5" if key % 2 else "team-a", account=1 + key % 2))
    document = copy.deepcopy(dict(OFFLINE))
    document["users"] = {
        "u5": {"roles": ["technician"]},  # a role granted only by the configuration
        "d5": {"roles": ["technician"]},  # and one on top of the token's dispatcher
    }
    configure(fresh_database, org, document)
    admin = bearer(sign(claims(org, "ops", (), scope="fieldsync:admin", iss=None)))
    settings = settings_for(tmp_path, gateway_page_rows=2)
    with (
        running_gateway(settings, fresh_database, clock) as url,
        httpx.Client(base_url=url) as http,
    ):
        u5 = DeviceClient(url, org, sign(claims(org, "u5", (), iss=None)), tmp_path / "u5.db")
        d5 = DeviceClient(
            url,
            org,
            sign(claims(org, "d5", ("dispatcher",), teams=["team-a"], iss=None)),
            tmp_path / "d5.db",
        )
        u5.sync()
        assert {r["id"] for r in u5.store.rows("job")} == {3, 5, 7}
        # a bootstrap cut after its first page, to be resumed after the revocation
        u5_headers = bearer(sign(claims(org, "u5", (), iss=None)))
        with http.stream("GET", f"/orgs/{org}/bootstrap/job", headers=u5_headers) as stream:
            lines = (json.loads(line) for line in stream.iter_lines())
            cursor = next(line["$cursor"] for line in lines if "$cursor" in line)
        d5.sync()
        both = view_of(world, "d5", ["technician", "dispatcher"], ["team-a"], clock.now)
        assert {r["id"] for r in d5.store.rows("job")} == set(both["job"])

        # u5 loses its only offline role: 403 on the next sync, bootstrap and metadata
        revoked = http.delete(f"/orgs/{org}/admin/offline/users/u5", headers=admin)
        assert revoked.status_code == 200, revoked.text
        with pytest.raises(SyncFailed) as refused:
            u5.sync()
        assert refused.value.status == 403
        for path, params in [
            (f"/orgs/{org}/metadata", {}),
            (f"/orgs/{org}/bootstrap/job", {}),
            (f"/orgs/{org}/bootstrap/job", {"cursor": cursor}),
        ]:
            response = http.get(path, params=params, headers=u5_headers)
            assert_refusal(response, 403, "forbidden")
            assert "no offline-enabled security role" in response.json()["detail"]

        # d5 keeps dispatcher but loses technician: what only technician gave is removed
        changed = http.put(f"/orgs/{org}/admin/offline/users/d5", json={"roles": []}, headers=admin)
        assert changed.status_code == 200, changed.text
        d5.sync()
        dispatcher = view_of(world, "d5", ["dispatcher"], ["team-a"], clock.now)
        assert {r["id"] for r in d5.store.rows("job")} == set(dispatcher["job"])
        assert not {3, 5, 7} & {r["id"] for r in d5.store.rows("job")}

        # a role that stops allowing offline use: its holders get 403
        u1 = DeviceClient(url, org, sign(claims(org, "u1", iss=None)), tmp_path / "u1.db")
        u1.sync()
        offline_off = http.put(
            f"/orgs/{org}/admin/offline/roles/technician", json={"profile": None}, headers=admin
        )
        assert offline_off.status_code == 200, offline_off.text
        with pytest.raises(SyncFailed) as refused:
            u1.sync()
        assert refused.value.status == 403
        for client in (u5, d5, u1):
            client.close()
    world.close()


# -- 21: fuzzing the OpenAPI description ---------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("FIELDSYNC_TEST_FUZZ_EXAMPLES", "200"))
CHAOS_FUZZ_EXAMPLES = int(os.environ.get("FIELDSYNC_TEST_FUZZ_CHAOS_EXAMPLES", "5000"))


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    fuzz_gateway(fresh_database, tmp_path, clock, FUZZ_EXAMPLES)


@pytest.mark.chaos
def test_schemathesis_at_length(fresh_database: str, tmp_path: Path, clock: Clock) -> None:
    fuzz_gateway(fresh_database, tmp_path, clock, CHAOS_FUZZ_EXAMPLES)


def fuzz_gateway(dsn: str, tmp_path: Path, clock: Clock, examples: int) -> None:
    """Schemathesis' checks (5xx, status codes, content types, response schemas,
    ignored authentication, …) over positive and negative cases; the explicit credentials are
    an admin's of the org (who also holds a dispatcher role), some cases carry a device's or
    another org's token instead, and schemathesis itself tries each without and with
    invalid credentials."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    from engine.snapshots.build import build_snapshot
    from engine.snapshots.store import default_store

    world = new_world(dsn, clock)
    org = world.org
    config = settings_for(tmp_path, gateway_max_wait_s=0.2, gateway_page_rows=2)
    build_snapshot(dsn, org, "account", default_store(config), group="fuzz")  # files to serve
    principal = claims(org, "d1", ("dispatcher",), teams=["team-a"], iss=None)
    tokens = {
        "admin": sign(principal | {"scope": "fieldsync:admin"}),
        "device": sign(principal),
        "other org": sign(principal | {"org": "elsewhere", "scope": "fieldsync:admin"}),
    }
    seen: Counter[str] = Counter()
    with running_gateway(config, dsn, clock) as url:
        schema = schemathesis.openapi.from_dict(
            httpx.get(f"{url}/openapi.json").json(),
            config=schemathesis.Config.from_dict(
                {
                    "auth": {"openapi": {"bearer": {"bearer": tokens["admin"]}}},
                    # unknown query parameters are ignored, as HTTP APIs do
                    "generation": {"allow-extra-parameters": False},
                }
            ),
        )
        cases = st.one_of(
            schema.as_strategy(GenerationMode.POSITIVE).map(lambda case: (case, True)),
            schema.as_strategy(GenerationMode.NEGATIVE).map(lambda case: (case, False)),
        )

        @settings(max_examples=examples, deadline=None, database=None)
        @given(
            generated=cases,
            token=st.sampled_from(["admin"] * 3 + ["device", "other org"]),
            ours=st.integers(0, 3),
            entity=st.sampled_from(["job", "account"]),
        )
        def fuzz(generated: tuple[Any, bool], token: str, ours: int, entity: str) -> None:
            case, positive = generated
            if positive and ours and case.path_parameters:  # mostly the org and entities there are
                case.path_parameters |= {
                    name: value
                    for name, value in (("org", org), ("entity", entity))
                    if name in case.path_parameters
                }
            if case.headers and "Authorization" in case.headers:
                case.headers["Authorization"] = f"Bearer {tokens[token]}"
            # a schema-valid offline configuration may still not fit staging (422 naming the
            # problem), so "positive data is accepted" is not a property of this API
            response = case.call_and_validate(
                base_url=url, timeout=10, excluded_checks=[positive_data_acceptance]
            )
            seen[f"{case.method} {case.operation.path} {response.status_code}"] += 1
            if case.method in ("PUT", "DELETE") and response.status_code == 200:
                configure(dsn, org)  # a random configuration would lock the principal out

        fuzz()
    print(f"fuzz: {sum(seen.values())} requests", dict(sorted(seen.items())))
    world.close()
