"""The real services a benchmark run measures against, started once per ``python -m bench``.

By default an embedded PostgreSQL (fsync off: benchmarks measure the engine, not the disk) and
an embedded broker on free loopback ports in a temporary directory, removed afterwards.
``FIELDSYNC_BENCH_DSN`` (superuser DSN, ``wal_level=logical``) and ``FIELDSYNC_BENCH_BOOTSTRAP``
point a run at existing services instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from engine.runtime.embedded import EmbeddedBroker, EmbeddedPostgres, free_port

DSN_ENV = "FIELDSYNC_BENCH_DSN"
BOOTSTRAP_ENV = "FIELDSYNC_BENCH_BOOTSTRAP"


@dataclass(frozen=True)
class BenchServices:
    """Endpoints shared by every benchmark of a run."""

    pg_dsn: str
    bootstrap_servers: str
    embedded_postgres: bool
    embedded_broker: bool


@contextlib.contextmanager
def bench_services() -> Iterator[BenchServices]:
    """Start (or take from the environment) PostgreSQL and the broker; stop them on exit."""
    external_dsn = os.environ.get(DSN_ENV) or None
    external_bootstrap = os.environ.get(BOOTSTRAP_ENV) or None
    with contextlib.ExitStack() as stack:
        root: Path | None = None
        if external_dsn is None or external_bootstrap is None:
            root = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        dsn = external_dsn
        if dsn is None:
            assert root is not None
            postgres = EmbeddedPostgres(root / "pg", free_port(), fsync=False)
            stack.callback(postgres.stop, mode="immediate")  # also after a half-done start
            dsn = postgres.start()
        bootstrap = external_bootstrap
        if bootstrap is None:
            assert root is not None
            broker = EmbeddedBroker(free_port(), root / "broker.log")
            stack.callback(broker.stop)
            bootstrap = broker.start()
        yield BenchServices(
            pg_dsn=dsn,
            bootstrap_servers=bootstrap,
            embedded_postgres=external_dsn is None,
            embedded_broker=external_bootstrap is None,
        )


def _with_dbname(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@contextlib.contextmanager
def scratch_database(admin_dsn: str, prefix: str = "bench") -> Iterator[str]:
    """A new empty database for one benchmark, so runs never see each other's tables or slots.

    Yields its DSN; afterwards drops the replication slots of that database and the database.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            slots = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall()
            for (slot,) in slots:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
