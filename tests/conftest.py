"""Session-wide real services: the embedded PostgreSQL and broker, started by the test session.

Set ``FIELDSYNC_TEST_DSN`` (a superuser DSN of a PostgreSQL with ``wal_level=logical``) and/or
``FIELDSYNC_TEST_BOOTSTRAP`` to run against existing services instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import psycopg
import pytest

from engine.runtime.embedded import EmbeddedBroker, EmbeddedPostgres, free_port

# tests assert behaviour, not timings: a loaded CI machine must not fail a property on a deadline
hypothesis.settings.register_profile("fieldsync", deadline=None)
hypothesis.settings.load_profile("fieldsync")


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """Superuser DSN (database ``postgres``) of a real PostgreSQL with ``wal_level=logical``."""
    external = os.environ.get("FIELDSYNC_TEST_DSN")
    if external:
        yield external
        return
    root = Path(tempfile.mkdtemp(prefix="fieldsync-test-pg-"))
    server = EmbeddedPostgres(root / "pg", free_port(), fsync=False)
    server.start()
    try:
        yield server.dsn()
    finally:
        server.stop(mode="immediate")


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker | None]:
    """The session's embedded broker (None when FIELDSYNC_TEST_BOOTSTRAP names another)."""
    if os.environ.get("FIELDSYNC_TEST_BOOTSTRAP"):
        yield None
        return
    broker = EmbeddedBroker(
        free_port(), Path(tempfile.mkdtemp(prefix="fieldsync-test-kafka-")) / "broker.log"
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def bootstrap_servers(embedded_broker: EmbeddedBroker | None) -> str:
    return os.environ.get("FIELDSYNC_TEST_BOOTSTRAP") or embedded_broker.bootstrap_servers  # type: ignore[union-attr]


def _replace_dbname(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@contextlib.contextmanager
def _database(pg_admin_dsn: str) -> Iterator[str]:
    """A new empty database; dropped (with its replication slots) afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _replace_dbname(pg_admin_dsn, name)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            for (slot,) in conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall():
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def fresh_database(pg_admin_dsn: str) -> Iterator[str]:
    """A new empty database for one test."""
    with _database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture()
def second_database(pg_admin_dsn: str) -> Iterator[str]:
    """Another one, standing for a second staging server."""
    with _database(pg_admin_dsn) as dsn:
        yield dsn


@pytest.fixture()
def fresh_broker(embedded_broker: EmbeddedBroker | None) -> Iterator[str]:
    """A broker of this test's own: projectors subscribe to every change topic on their broker,
    and the session broker holds every earlier test's topics."""
    if embedded_broker is None:  # FIELDSYNC_TEST_BOOTSTRAP names an external broker: share it
        yield os.environ["FIELDSYNC_TEST_BOOTSTRAP"]
        return
    broker = EmbeddedBroker(
        free_port(), Path(tempfile.mkdtemp(prefix="fieldsync-test-kafka-")) / "broker.log"
    )
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
