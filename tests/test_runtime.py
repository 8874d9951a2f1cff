"""The embedded runtime: real servers, an exclusive lock, clear configuration errors."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from engine.config import load_settings
from engine.exceptions import ConfigError
from engine.runtime.embedded import EmbeddedRuntime, RuntimeInfo, free_port
from engine.runtime.endpoints import resolve_endpoints
from engine.runtime.exceptions import AlreadyRunning, NoRuntime


def test_postgres_has_logical_wal(pg_admin_dsn: str) -> None:
    with psycopg.connect(pg_admin_dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.info.server_version >= 180000


def test_broker_creates_compacted_topics(bootstrap_servers: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics(
            [NewTopic("runtime-check", 2, 1, topic_configs={"cleanup.policy": "compact"})]
        )
        assert "runtime-check" in admin.list_topics()
        admin.delete_topics(["runtime-check"])
    finally:
        admin.close()


def test_second_runtime_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = EmbeddedRuntime(tmp_path, pg_port=free_port(), broker_port=free_port(), fsync=False)
    with first:
        info = RuntimeInfo.read(tmp_path)
        assert info is not None and info.bootstrap_servers == first.broker.bootstrap_servers
        second = EmbeddedRuntime(tmp_path, pg_port=free_port(), broker_port=free_port())
        with pytest.raises(AlreadyRunning, match="already running"):
            second.start()
        endpoints = resolve_endpoints(load_settings(data_dir=tmp_path))
        assert endpoints.embedded and endpoints.bootstrap_servers == first.broker.bootstrap_servers
        with psycopg.connect(endpoints.staging_dsn) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS survives (x int)")
            conn.execute("INSERT INTO survives VALUES (1)")
    assert RuntimeInfo.read(tmp_path) is None
    with (
        EmbeddedRuntime(
            tmp_path, pg_port=free_port(), broker_port=free_port(), fsync=False
        ) as again,
        psycopg.connect(again.postgres.dsn()) as conn,
    ):
        assert conn.execute("SELECT count(*) FROM survives").fetchone() == (1,)


def test_no_runtime_and_no_endpoints_names_the_settings(tmp_path: Path) -> None:
    with pytest.raises(NoRuntime, match="FIELDSYNC_BOOTSTRAP_SERVERS and FIELDSYNC_STAGING_DSN"):
        resolve_endpoints(load_settings(data_dir=tmp_path))


def test_bad_setting_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDSYNC_TOPIC_PARTITIONS", "zero")
    with pytest.raises(ConfigError, match="FIELDSYNC_TOPIC_PARTITIONS"):
        load_settings()
    monkeypatch.setenv("FIELDSYNC_TOPIC_PARTITIONS", "3")
    monkeypatch.setenv("FIELDSYNC_BOOTSTRAP_SERVERS", "kafka-without-port")
    with pytest.raises(ConfigError, match="FIELDSYNC_BOOTSTRAP_SERVERS"):
        load_settings()


def test_fieldsync_up_refuses_a_second_instance_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "FIELDSYNC_DATA_DIR": str(tmp_path),
        "FIELDSYNC_EMBEDDED_PG_PORT": str(free_port()),
        "FIELDSYNC_EMBEDDED_BROKER_PORT": str(free_port()),
    }
    fieldsync = str(Path(sys.executable).parent / "fieldsync")
    first = subprocess.Popen(
        [fieldsync, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while RuntimeInfo.read(tmp_path) is None:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(
            [fieldsync, "up"], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2
        assert "already running" in second.stdout
        dsn = RuntimeInfo.read(tmp_path).postgres_dsn  # type: ignore[union-attr]
    finally:
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=60)
    assert first.returncode == 0, output
    assert "Stopped." in output
    assert RuntimeInfo.read(tmp_path) is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
