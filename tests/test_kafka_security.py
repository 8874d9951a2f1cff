"""Connections to a secured broker: settings checked at start-up, secrets from files and never
shown, and every client kind (kafka-python admin, aiokafka producer, faust worker) over TLS to a
real broker behind a TLS-terminating proxy (the embedded broker speaks plaintext only)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from engine.config import load_settings
from engine.exceptions import ConfigError
from engine.runtime.embedded import EmbeddedBroker, free_port
from engine.runtime.kafka import client_options, faust_options
from tests.projector_helpers import projector_env, start_projector, wait_until


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldsync test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "broker.pem", directory / "broker.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TlsProxy:
    """Terminates TLS on ``port`` and forwards the bytes to a plaintext broker."""

    def __init__(self, port: int, upstream: int, cert: Path, key: Path) -> None:
        self.port, self.upstream = port, upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.context)
        )
        self.ready.set()
        self.loop.run_forever()
        server.close()

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture()
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(bootstrap servers speaking TLS only, the CA file that signs them)."""
    ca, cert, key = _certificates(tmp_path)
    proxy_port = free_port()
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log", advertised_port=proxy_port)
    broker.start()
    try:
        with TlsProxy(proxy_port, broker.port, cert, key):
            yield broker.bootstrap_servers, ca
    finally:
        broker.stop()


def test_security_settings_fail_at_start_up_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FIELDSYNC_KAFKA_SASL_USERNAME"):
        load_settings(kafka_security_protocol="SASL_SSL")
    with pytest.raises(ConfigError, match="FIELDSYNC_KAFKA_SSL_KEYFILE"):
        load_settings(kafka_security_protocol="SSL", kafka_ssl_certfile=tmp_path)
    with pytest.raises(ConfigError, match="FIELDSYNC_KAFKA_SSL_CAFILE: no such file"):
        load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="FIELDSYNC_KAFKA_SECURITY_PROTOCOL"):
        load_settings(kafka_security_protocol="TLS")


def test_secrets_come_from_files_and_are_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "fieldsync_kafka_sasl_password").write_text("pa55-from-file")
    (secrets / "fieldsync_staging_dsn").write_text("postgresql://app:db-s3cret@db/staging")
    monkeypatch.setenv("FIELDSYNC_SECRETS_DIR", str(secrets))
    settings = load_settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc")
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "pa55-from-file"
    assert (
        settings.staging_dsn is not None and "db-s3cret" in settings.staging_dsn.get_secret_value()
    )
    shown = repr(settings) + str(settings.model_dump())
    assert "pa55-from-file" not in shown and "db-s3cret" not in shown
    options = client_options(settings)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_username"] == "svc"
    credentials = faust_options(settings)["broker_credentials"]
    assert credentials.protocol.value == "SASL_PLAINTEXT" and "pa55" not in repr(credentials)
    monkeypatch.setenv("FIELDSYNC_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="FIELDSYNC_SECRETS_DIR"):
        load_settings()


def _fieldsync(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "fieldsync"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_client_kind_works_over_tls(
    tls_broker: tuple[str, Path], fresh_database: str, tmp_path: Path
) -> None:
    """Capture (kafka-python admin, aiokafka producer), a projector worker (faust) and the
    topic listing, as processes configured only through FIELDSYNC_* variables."""
    bootstrap, ca = tls_broker
    org = f"tls{uuid.uuid4().hex[:6]}"
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.t (id int PRIMARY KEY, v text);"
            "INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 25) g"
        )
    org_file = tmp_path / "org.yaml"
    org_file.write_text(f"org: {org}\nsource_dsn: {fresh_database}\nentities:\n  t: public.t\n")
    plain = projector_env(bootstrap, fresh_database, FIELDSYNC_DATA_DIR=str(tmp_path))
    secure = {
        **plain,
        "FIELDSYNC_KAFKA_SECURITY_PROTOCOL": "SSL",
        "FIELDSYNC_KAFKA_SSL_CAFILE": str(ca),
    }
    for refused in (load_settings(), load_settings(kafka_security_protocol="SSL")):
        with pytest.raises(KafkaError):  # plaintext to TLS, and TLS to an unknown CA: no
            KafkaAdminClient(
                **client_options(refused), bootstrap_servers=bootstrap, bootstrap_timeout_ms=3000
            )

    captured = _fieldsync("capture", "--org-file", str(org_file), "--until-caught-up", env=secure)
    assert captured.returncode == 0, captured.stdout + captured.stderr
    assert "25 snapshot rows" in captured.stdout
    log = tmp_path / "projector.log"
    projector = start_projector(secure, log, "--org-file", str(org_file))
    try:

        def rows() -> int:
            try:
                with psycopg.connect(fresh_database) as conn:
                    found = conn.execute(f'SELECT count(*) FROM "org_{org}".t').fetchone()
                    return int(found[0]) if found else 0
            except psycopg.errors.UndefinedTable:
                return 0

        wait_until(lambda: rows() == 25, 90, "rows projected over TLS", log)
    finally:
        projector.terminate()
        projector.wait(30)
    listed = _fieldsync("topics", env=secure)
    assert listed.returncode == 0, listed.stderr
    assert f"fieldsync.{org}.t" in listed.stdout
