"""Sync gateway and device client against real PostgreSQL staging and a real HTTP server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.client import DeviceClient, SyncFailed
from device.store import LocalStore, parse_row, to_sqlite
from gateway.store import bump_epoch
from tests.gateway_helpers import (
    OFFLINE,
    TOKEN_SECRET,
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

OWNERS = ["u1", "u2", "team-a", "team-b"]


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def gateway(fresh_database: str, tmp_path: Path, clock: Clock) -> Iterator[str]:
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        from gateway.store import ensure_schema

        ensure_schema(conn)
    with running_gateway(settings_for(tmp_path), fresh_database, clock) as url:
        yield url


def new_world(dsn: str, clock: Clock) -> World:
    world = World(dsn, f"o{uuid.uuid4().hex[:8]}")
    world.now = clock.now
    world.upsert("account", 1, owner_id="u1", name="first")
    world.upsert("job", 1, **job("u1"))
    configure(dsn, world.org)
    return world


def device(url: str, world: World, user: str, path: Path, **options: Any) -> DeviceClient:
    roles, teams = USERS[user]
    token = mint(world.org, user, roles, teams=teams)
    return DeviceClient(url, world.org, token, path / f"{world.org}-{user}.sqlite", **options)


# -- the oracle ------------------------------------------------------------------------------


def local(store: LocalStore) -> dict[str, dict[int, dict[str, Any]]]:
    return {e: {r["id"]: r for r in store.rows(e)} for e in ("job", "account")}


class Recorder:
    """Wraps a device's store: every row and removal the gateway sent, per sync."""

    def __init__(self, client: DeviceClient) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.removed: list[tuple[str, dict[str, Any]]] = []
        store = client.store
        original_delta, original_page, original_finish = (
            store.apply_delta,
            store.add_bootstrap_page,
            store.finish_bootstrap,
        )

        def apply_delta(entity: str, upserts: Any, removes: Any, *rest: Any) -> None:
            self.sent += [(entity, r) for r in upserts]
            self.removed += [(entity, k) for k in removes]
            original_delta(entity, upserts, removes, *rest)

        def add_page(entity: str, rows: Any, cursor: str) -> None:
            self.sent += [(entity, r) for r in rows]
            original_page(entity, rows, cursor)

        def finish(entity: str, rows: Any, *rest: Any) -> None:
            self.sent += [(entity, r) for r in rows]
            original_finish(entity, rows, *rest)

        store.apply_delta = apply_delta  # type: ignore[method-assign]
        store.add_bootstrap_page = add_page  # type: ignore[method-assign]
        store.finish_bootstrap = finish  # type: ignore[method-assign]

    def reset(self) -> None:
        self.sent, self.removed = [], []


# -- property: every device converges to its view and never sees more ----------------------

operation = st.one_of(
    st.tuples(
        st.just("job"),
        st.integers(1, 10),
        st.sampled_from(OWNERS),
        st.sampled_from(["open", "open", "closed"]),
        st.integers(-10, 2),
        st.integers(1, 3),
    ),
    st.tuples(st.just("delete_job"), st.integers(1, 10)),
    st.tuples(st.just("account"), st.integers(1, 3), st.sampled_from(OWNERS)),
    st.tuples(st.just("delete_account"), st.integers(1, 3)),
    st.tuples(st.just("clock"), st.integers(1, 4)),
    st.tuples(st.just("sync"), st.sampled_from(sorted(USERS))),
    st.tuples(st.just("window"), st.sampled_from([3, 7])),  # the technicians' profile changes
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, min_size=5, max_size=40))
def test_devices_converge_to_their_view_and_never_see_more(
    gateway: str,
    fresh_database: str,
    clock: Clock,
    tmp_path: Path,
    operations: list[tuple[Any, ...]],
) -> None:
    world = new_world(fresh_database, clock)
    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    clients = {u: device(gateway, world, u, folder, page_rows=3) for u in USERS}
    recorders = {u: Recorder(c) for u, c in clients.items()}
    last_view: dict[str, Any] = {u: {"job": {}, "account": {}} for u in USERS}
    window = [7]

    def sync(user: str) -> None:
        recorder = recorders[user]
        recorder.reset()
        clients[user].sync()
        now_view = view(world, user, clock.now, window[0])
        for entity, row in recorder.sent:  # nothing outside the view at the new watermark
            stored = {c: to_sqlite(v) for c, v in row.items()}
            assert stored == now_view[entity].get(row["id"]), (user, entity, row)
        for entity, key in recorder.removed:  # a removal names only what was visible before
            assert key["id"] in last_view[user][entity], (user, entity, key)
        assert local(clients[user].store) == now_view, user
        last_view[user] = now_view

    try:
        for op in operations:
            kind = op[0]
            if kind == "job":
                _, key, owner, status, due, account = op
                world.upsert("job", key, **job(owner, status, due, account=account))
            elif kind == "delete_job" and op[1] in world.rows["job"]:
                world.delete("job", op[1])
            elif kind == "account":
                world.upsert("account", op[1], owner_id=op[2], name=f"name {op[1]}")
            elif kind == "delete_account" and op[1] in world.rows["account"]:
                world.delete("account", op[1])
            elif kind == "window" and op[1] != window[0]:
                window[0] = op[1]
                configure(fresh_database, world.org, with_window(op[1]))
            elif kind == "clock":
                clock.now += op[1] * 86400
                world.now = clock.now
            elif kind == "sync":
                sync(op[1])
        for user in USERS:  # after quiescence every device equals its view
            sync(user)
    finally:
        for client in clients.values():
            client.close()
        world.close()


# -- authentication and tokens ---------------------------------------------------------------


def test_tokens_that_must_not_pass(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    url = f"{gateway}/orgs/{world.org}/sync"

    def status(token: str | None, body: dict[str, Any] | None = None) -> tuple[int, str]:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        response = httpx.post(url, json=body or {}, headers=headers)
        return response.status_code, response.text

    good = mint(world.org, "u1", ["technician"])
    assert status(good)[0] == 200
    unsigned = jwt.encode(
        {"org": world.org, "sub": "u1", "roles": ["technician"], "aud": "fieldsync",
         "exp": int(time.time()) + 60},
        key=None,
        algorithm="none",
    )  # fmt: skip
    cases = {
        "no token": (None, 401),
        "expired": (mint(world.org, "u1", ["technician"], expires_in=-120), 401),
        "forged": (mint(world.org, "u1", ["technician"], secret="another-secret-" * 3), 401),
        "other audience": (mint(world.org, "u1", ["technician"], audience="other"), 401),
        "alg none": (unsigned, 401),
        "garbage": ("not.a.jwt", 401),
        "other org": (mint("someone_else", "u1", ["technician"]), 403),
        "no offline role": (mint(world.org, "u9", ["auditor"]), 403),
        "unknown role": (mint(world.org, "u9", ["nobody"]), 403),
    }
    for name, (token, expected) in cases.items():
        code, text = status(token)
        assert code == expected, (name, code, text)
        assert "Traceback" not in text and "error" in text

    client = device(gateway, world, "u1", tmp_path)
    client.sync()
    (job_token,) = [t for e, t in client.store.tokens().items() if e == "job"]
    assert job_token is not None
    tampered = job_token[:-4] + ("AAAA" if not job_token.endswith("AAAA") else "BBBB")
    code, text = status(good, {"tokens": {"job": tampered}})
    assert code == 400 and "bad_sync_token" in text
    # a token is bound to its user: u2 cannot use u1's
    code, text = status(mint(world.org, "u2", ["technician"]), {"tokens": {"job": job_token}})
    assert code == 400 and "another org, user or entity" in text
    # and to its entity
    code, text = status(good, {"tokens": {"account": job_token}})
    assert code == 400
    client.close()
    world.close()


def test_must_bootstrap_only_for_the_entity_concerned(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    client = device(gateway, world, "d1", tmp_path)
    client.sync()
    tokens = client.store.tokens()
    auth = {"authorization": f"Bearer {mint(world.org, 'd1', ['dispatcher'], teams=['team-a'])}"}

    def answer(tokens: dict[str, str | None]) -> dict[str, Any]:
        response = httpx.post(
            f"{gateway}/orgs/{world.org}/sync", json={"tokens": tokens}, headers=auth
        )
        assert response.status_code == 200, response.text
        return {r["entity"]: r for r in response.json()["entities"]}

    assert all(r["control"] is None for r in answer(tokens).values())
    # the job rules change (owner → custom filter): only job must re-bootstrap
    changed = {**OFFLINE, "profiles": {**OFFLINE["profiles"]}}
    changed["profiles"]["dispatch"] = {
        "items": [
            {"entity": "job", "distribution": "custom", "priority": 1,
             "filter": {"field": "status", "op": "eq", "value": "open"}},
            {"entity": "account", "distribution": "all", "priority": 5},
        ]
    }  # fmt: skip
    configure(fresh_database, world.org, changed)
    result = answer(tokens)
    job_result = (result["job"]["control"], result["job"]["reason"])
    assert job_result == ("must_bootstrap", "rules_changed")
    assert result["account"]["control"] is None
    # a new staging epoch (replay): every entity re-bootstraps
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        bump_epoch(conn, world.org)
    result = answer(tokens)
    assert {r["reason"] for r in result.values()} == {"staging_epoch_changed"}
    # the device handles it by itself and converges
    report = client.sync()
    assert sorted(report.bootstrapped) == ["account", "job"]
    assert local(client.store)["account"].keys() == world.rows["account"].keys()
    # below the retention horizon: must_bootstrap
    tokens = client.store.tokens()
    world.upsert("job", 1, status="closed")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            f"UPDATE org_{world.org}._fs_entities SET horizon_version = version"
            " WHERE entity = 'job'"
        )
    result = answer(tokens)
    assert result["job"]["reason"] == "below_retention_horizon"
    assert result["account"]["control"] is None
    client.close()
    world.close()


def test_entity_leaving_the_profile_is_removed_from_the_device(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    client = device(gateway, world, "d1", tmp_path)
    client.sync()
    assert set(client.store.models()) == {"job", "account"}
    changed = {**OFFLINE, "profiles": {**OFFLINE["profiles"]}}
    changed["profiles"]["dispatch"] = {"items": [{"entity": "job", "distribution": "team"}]}
    configure(fresh_database, world.org, changed)
    report = client.sync()
    assert set(client.store.models()) == {"job"}
    assert "account" not in {r[0] for r in client.store.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}  # fmt: skip
    assert report.dropped == ["account"] or report.dropped == []  # metadata may drop it first
    client.close()
    world.close()


# -- live updates, resumption, routing, metadata ---------------------------------------------


def test_long_poll_wakes_within_a_second_of_a_change(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    client = device(gateway, world, "u1", tmp_path)
    client.sync()
    tokens = client.store.tokens()
    auth = {"authorization": f"Bearer {mint(world.org, 'u1', ['technician'])}"}
    outcome: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        response = httpx.post(
            f"{gateway}/orgs/{world.org}/sync",
            json={"tokens": tokens, "wait": 20},
            headers=auth,
            timeout=30,
        )
        outcome["elapsed"] = time.monotonic() - started
        outcome["body"] = response.json()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(1.5)  # parked
    assert thread.is_alive()
    changed_at = time.monotonic()
    world.upsert("job", 2, **job("u1"))
    thread.join(15)
    woke_after = time.monotonic() - changed_at
    assert woke_after < 1.0, woke_after
    jobs = {e["entity"]: e for e in outcome["body"]["entities"]}["job"]
    assert [r["id"] for r in jobs["upserts"]] == [2]
    client.close()
    world.close()


def test_bootstrap_resumes_after_a_cut_connection(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    for key in range(2, 180):
        world.upsert("job", key, **job("team-a", due_days=-(key % 5)))
    client = device(gateway, world, "d1", tmp_path)
    client.refresh_metadata()
    client.store.begin_bootstrap("job")
    auth = client._headers()
    # read the header, two pages and their cursors, then drop the connection
    with httpx.stream("GET", f"{gateway}/orgs/{world.org}/bootstrap/job", headers=auth) as r:
        pages = 0
        rows: list[dict[str, Any]] = []
        for line in r.iter_lines():
            if line.startswith('{"$cursor"'):
                client.store.add_bootstrap_page("job", rows, parse_row(line)["$cursor"])
                rows, pages = [], pages + 1
                if pages == 2:
                    break
            elif not line.startswith('{"$'):
                rows.append(parse_row(line))
    assert client.store.cursor("job") is not None
    world.upsert("job", 5, status="closed", owner_id="u2")  # a change while cut off
    loaded = client.bootstrap("job")
    assert loaded == 178 - 2 * 50  # the rest, from the stored cursor
    report = client.sync()  # then deltas from the bootstrap's watermark
    assert report.removes == 1
    assert local(client.store)["job"] == view(world, "d1", clock.now)["job"]
    client.close()
    world.close()


def test_org_from_host_name_metadata_and_health(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    world = new_world(fresh_database, clock)
    with running_gateway(
        settings_for(tmp_path, gateway_domain="sync.example.test"), fresh_database, clock
    ) as url:
        auth = {"authorization": f"Bearer {mint(world.org, 'u1', ['technician'])}"}
        host = {"host": f"{world.org}.sync.example.test"}
        response = httpx.get(f"{url}/metadata", headers={**auth, **host})
        assert response.status_code == 200, response.text
        metadata = response.json()
        assert [e["name"] for e in metadata["entities"]] == ["job", "account"]  # by priority
        job_model = metadata["entities"][0]
        assert job_model["keys"] == ["id"]
        assert {"name": "amount", "type": "numeric(10,2)"} in job_model["columns"]
        assert metadata["entities"][1]["relationships"] == [
            {"column": "account_id", "from": "job", "to": "account"}
        ]
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        metrics = httpx.get(f"{url}/metrics").text
        assert "fieldsync_gateway_requests_total" in metrics
        assert "fieldsync_gateway_active_long_polls" in metrics
        # unknown org → 404, bad org name → 422, both without a trace
        other = mint("nope", "u1", ["technician"])
        missing = httpx.get(
            f"{url}/orgs/nope/metadata", headers={"authorization": f"Bearer {other}"}
        )
        assert missing.status_code == 404 and "not provisioned" in missing.text
        bad = httpx.get(f"{url}/orgs/NOPE!/metadata", headers=auth)
        assert bad.status_code == 422
    world.close()


# -- admin endpoint ------------------------------------------------------------------------------


def test_admin_validates_filters_and_reports_status(
    gateway: str, fresh_database: str, clock: Clock
) -> None:
    world = new_world(fresh_database, clock)
    admin = {"authorization": f"Bearer {mint(world.org, 'ops', [], scope='fieldsync:admin')}"}
    base = f"{gateway}/orgs/{world.org}/admin"

    def put_profile(items: list[dict[str, Any]]) -> httpx.Response:
        return httpx.put(f"{base}/offline/profiles/field", json={"items": items}, headers=admin)

    bad = {
        "no such column": (
            {"field": "colour", "op": "eq", "value": "red"},
            "field 'colour' does not exist",
        ),
        "unknown op": ({"field": "status", "op": "resembles", "value": "x"}, "unknown op"),
        "window on text": ({"field": "status", "op": "last_days", "value": 3}, "needs a date"),
        "wrong value type": ({"field": "amount", "op": "gt", "value": "lots"}, "not a number"),
        "unknown parameter": ({"field": "owner_id", "op": "eq", "value": "$boss"}, "$boss"),
        "bad combinator": ({"and": []}, "non-empty list"),
    }
    for name, (condition, message) in bad.items():
        response = put_profile([{"entity": "job", "distribution": "custom", "filter": condition}])
        assert response.status_code == 422, (name, response.text)
        assert message in response.json()["detail"], (name, response.text)
        assert "profiles.field.items[0].filter" in response.json()["detail"]
    ok = put_profile(
        [{"entity": "job", "distribution": "custom",
          "filter": {"or": [{"field": "status", "op": "in", "value": ["open", "late"]},
                            {"not": {"field": "amount", "op": "is_null"}}]}}]
    )  # fmt: skip
    assert ok.status_code == 200, ok.text
    # a role must point at a profile that exists; deleting a referenced profile is refused
    assert (
        httpx.put(f"{base}/offline/roles/x", json={"profile": "none"}, headers=admin).status_code
        == 422
    )
    refused = httpx.delete(f"{base}/offline/profiles/field", headers=admin)
    assert refused.status_code == 422 and "roles.technician.profile" in refused.text
    status = httpx.get(f"{base}/status", headers=admin).json()
    assert status["entities"]["job"]["watermark"] >= 1
    assert status["config_revision"] >= 2
    device_token = {"authorization": f"Bearer {mint(world.org, 'u1', ['technician'])}"}
    assert httpx.get(f"{base}/status", headers=device_token).status_code == 403
    world.close()


def test_device_client_reports_refusals(
    gateway: str, fresh_database: str, clock: Clock, tmp_path: Path
) -> None:
    world = new_world(fresh_database, clock)
    client = DeviceClient(
        gateway, world.org, mint(world.org, "u9", ["auditor"]), tmp_path / "d.sqlite"
    )
    with pytest.raises(SyncFailed) as refused:
        client.sync()
    assert refused.value.status == 403 and "no offline-enabled security role" in str(refused.value)
    client.close()
    world.close()


def test_sync_tokens_are_signed_with_the_deployment_secret() -> None:
    from gateway.tokens import BadToken, Position, SyncToken, decode, encode

    token = SyncToken("delta", "acme", "u1", "job", "r", "e", Position(5, 1.0, {"a": 2}))
    assert decode(encode(token, TOKEN_SECRET), TOKEN_SECRET) == token
    with pytest.raises(BadToken):
        decode(encode(token, "another-secret-of-enough-length-000"), TOKEN_SECRET)


# -- asymmetric keys and TLS ---------------------------------------------------------------------


def _rsa_and_ec_keys(folder: Path) -> tuple[Any, Any, Path]:
    """An RSA and an EC private key and a JWKS file with their public halves."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, algorithm, key in (
        ("r1", RSAAlgorithm, rsa_key),
        ("e1", ECAlgorithm, ec_key),
    ):
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
        jwk["kid"] = kid
        keys.append(jwk)
    path = folder / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return rsa_key, ec_key, path


def test_rs256_and_es256_tokens_from_a_jwks_file(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    from cryptography.hazmat.primitives import serialization

    world = new_world(fresh_database, clock)
    rsa_key, ec_key, jwks = _rsa_and_ec_keys(tmp_path)
    claims = {"org": world.org, "sub": "u1", "roles": ["technician"], "aud": "fieldsync",
              "exp": int(time.time()) + 600}  # fmt: skip
    settings = settings_for(tmp_path, gateway_jwt_secret=None, gateway_jwks=str(jwks))
    with running_gateway(settings, fresh_database, clock) as url:

        def status(token: str) -> int:
            response = httpx.get(
                f"{url}/orgs/{world.org}/metadata", headers={"authorization": f"Bearer {token}"}
            )
            return response.status_code

        assert status(jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "r1"})) == 200
        assert status(jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "e1"})) == 200
        # signed by a key that is not in the JWKS
        from cryptography.hazmat.primitives.asymmetric import rsa

        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assert status(jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "r1"})) == 401
        # HS256 "signed" with the RSA public key (algorithm confusion) is refused
        public_pem = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        import hashlib
        import hmac

        header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT","kid":"r1"}')
        body = jwt.utils.base64url_encode(
            jwt.api_jws.json.dumps(claims, separators=(",", ":")).encode()
        )
        signature = jwt.utils.base64url_encode(
            hmac.new(public_pem, header + b"." + body, hashlib.sha256).digest()
        )
        confused = (header + b"." + body + b"." + signature).decode()
        assert status(confused) == 401
    world.close()


def test_gateway_serves_tls_with_a_certificate_and_key(
    fresh_database: str, tmp_path: Path, clock: Clock
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    import ipaddress

    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    world = new_world(fresh_database, clock)
    settings = settings_for(tmp_path, gateway_tls_cert=cert_path, gateway_tls_key=key_path)
    with running_gateway(settings, fresh_database, clock) as url:
        secure = url.replace("http://", "https://")
        client = DeviceClient(
            secure,
            world.org,
            mint(world.org, "u1", ["technician"]),
            tmp_path / "tls.sqlite",
            verify=str(cert_path),
        )
        report = client.sync()
        assert sorted(report.bootstrapped) == ["account", "job"]
        assert local(client.store) == view(world, "u1", clock.now)
        client.close()
        with pytest.raises(httpx.ConnectError):  # an untrusted client does not get in
            httpx.get(f"{secure}/healthz")
    world.close()


def test_example_org_file_offers_what_the_demo_configures() -> None:
    """examples/demo-org.yaml documents the demo's offline section: the two must not drift."""
    from engine.demo_device import OFFLINE as DEMO_OFFLINE
    from engine.orgfile import load_capture_spec, load_offline_section
    from gateway.access import parse_config

    path = Path(__file__).parents[1] / "examples" / "demo-org.yaml"
    section = load_offline_section(path)
    assert section is not None
    assert parse_config(section) == parse_config(DEMO_OFFLINE)
    assert load_capture_spec(path).org == "demo"  # capture ignores the other sections
