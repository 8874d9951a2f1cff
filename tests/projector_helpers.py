"""Running projector workers as real processes, and comparing staging with the source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg


def projector_env(bootstrap: str, staging_dsn: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FIELDSYNC_BOOTSTRAP_SERVERS": bootstrap,
        "FIELDSYNC_STAGING_DSN": staging_dsn,
        "FIELDSYNC_PRODUCER_IDEMPOTENCE": "false",
        # the embedded broker waits out the rebalance timeout when a group forms
        "FIELDSYNC_BROKER_REBALANCE_TIMEOUT_S": "5",
        "FIELDSYNC_BROKER_SESSION_TIMEOUT_S": "10",
        "FIELDSYNC_BROKER_HEARTBEAT_INTERVAL_S": "1",
        "FIELDSYNC_PROJECTOR_TOPIC_REFRESH_S": "2",
        # a stalled consumer (engine/projections/watchdog.py) recovers well within a test's wait
        "FIELDSYNC_PROJECTOR_STALL_TIMEOUT_S": "20",
        **extra,
    }


_WRITERS: dict[Path, list[subprocess.Popen[bytes]]] = {}  # log → the processes writing it


def start_worker(
    command: str, env: dict[str, str], log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``fieldsync <command>`` as a process of its own, output appended to ``log``."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "fieldsync"), command, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _WRITERS.setdefault(log, []).append(process)
    return process


def stacks_of_writers(log: Path) -> str:
    """Every live process writing ``log`` dumps its stacks into it (SIGUSR1, see
    ``engine.cli``); returns their frames (not the locals faust's dump adds): where a stuck
    worker waits."""
    if not log.exists():
        return ""
    size = log.stat().st_size
    alive = [p for p in _WRITERS.get(log, []) if p.poll() is None]
    for process in alive:
        process.send_signal(signal.SIGUSR1)
    if alive:
        time.sleep(3)
    with log.open("rb") as read:
        read.seek(size)
        dump = read.read().decode(errors="replace")
    frames: list[str] = []
    for line in dump.splitlines():
        text = line.strip()
        if text.startswith(("THREAD", "Stack for", "File ", "Thread 0x", "Current thread")) or (
            frames and frames[-1].lstrip().startswith("File ")  # the frame's code line
        ):
            frames.append(line[:240])
    return "\n".join(frames)


def start_projector(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return start_worker("projector", env, log, *args)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            stacks = stacks_of_writers(log)[-30_000:] if log else ""
            raise AssertionError(
                f"timed out waiting for {what}\n{tail}\n--- stacks of its workers ---\n{stacks}"
            )
        time.sleep(0.25)


def live_rows(dsn: str, query: str) -> dict[Any, tuple[Any, ...]]:
    try:
        with psycopg.connect(dsn) as conn:
            return {row[0]: tuple(row[1:]) for row in conn.execute(query).fetchall()}
    except psycopg.errors.UndefinedTable:
        return {}


def staging_matches_source(dsn: str, org: str, table: str, columns: str) -> Callable[[], bool]:
    def check() -> bool:
        staging = live_rows(dsn, f"SELECT {columns} FROM org_{org}.{table} WHERE NOT _fs_deleted")
        source = live_rows(dsn, f"SELECT {columns} FROM public.{table}")
        return staging == source

    return check


def assert_change_log_sound(dsn: str, org: str, entity: str) -> int:
    """No change applied twice, and versions 1..watermark without a gap; returns the watermark."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT version FROM org_{org}._fs_entities WHERE entity = %s", (entity,)
        ).fetchone()
        assert row is not None
        watermark = int(row[0])
        versions = [
            v for (v,) in conn.execute(f"SELECT version FROM org_{org}.{entity}__log ORDER BY 1")
        ]
        twice = conn.execute(
            f"SELECT count(*) FROM (SELECT key, commit_lsn, lsn FROM org_{org}.{entity}__log"
            " GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
        ).fetchone()
    assert twice == (0,), "a change was applied twice"
    assert versions == list(range(1, watermark + 1)), "the change log has gaps or repeats"
    return watermark
