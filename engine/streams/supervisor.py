"""Runs the capture tasks of several orgs side by side; one org's failure never stops another.

Retryable failures (source or broker unreachable, delivery failed) restart the task after a
growing pause; the rest (misconfiguration, unsupported table) park that org with its error,
logged with its code, until the operator fixes it and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import psycopg

from engine.config import Settings
from engine.exceptions import FieldSyncError
from engine.logs import log_context
from engine.streams.capture import CaptureTask
from engine.streams.spec import CaptureSpec

log = logging.getLogger("fieldsync.capture")


@dataclass
class OrgStatus:
    org: str
    state: str = "starting"  # starting | streaming | retrying | failed | stopped
    error: str | None = None
    restarts: int = 0
    events: int = field(default=0)


async def supervise(
    spec: CaptureSpec,
    settings: Settings,
    bootstrap_servers: str,
    stop: asyncio.Event,
    status: OrgStatus,
) -> None:
    """Keep one org's capture running until ``stop``; park it on a non-retryable error."""
    with log_context(org=spec.org):  # this task's records (and its children's) name the org
        await _supervise(spec, settings, bootstrap_servers, stop, status)


async def _supervise(
    spec: CaptureSpec,
    settings: Settings,
    bootstrap_servers: str,
    stop: asyncio.Event,
    status: OrgStatus,
) -> None:
    pause = 0.5
    while not stop.is_set():
        task = CaptureTask(spec, settings, bootstrap_servers)
        try:
            await task.start()
            status.state, status.error, pause = "streaming", None, 0.5
            await task.run(stop)
            status.state = "stopped"
        except FieldSyncError as error:
            status.error = str(error)
            if not error.retryable:
                status.state = "failed"
                log.error("org %s: capture stopped: %s", spec.org, error)
                return
            status.state = "retrying"
            status.restarts += 1
            log.warning("org %s: %s; retrying in %.1fs", spec.org, error, pause)
        except (OSError, psycopg.OperationalError) as error:
            status.state, status.error = "retrying", f"[io_error] {error}"
            status.restarts += 1
            log.warning("org %s: %s; retrying in %.1fs", spec.org, error, pause)
        except Exception as error:  # a bug must not take the other orgs down with it
            status.state, status.error = (
                "failed",
                f"[internal_error] {type(error).__name__}: {error}",
            )
            log.exception("org %s: capture stopped by an unexpected error", spec.org)
            return
        finally:
            status.events += task.stats.events
            await task.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        pause = min(pause * 2, 4.0)  # streaming again within seconds of the source's return


async def run_captures(
    specs: list[CaptureSpec], settings: Settings, bootstrap_servers: str, stop: asyncio.Event
) -> dict[str, OrgStatus]:
    statuses = {spec.org: OrgStatus(spec.org) for spec in specs}
    await asyncio.gather(
        *(supervise(spec, settings, bootstrap_servers, stop, statuses[spec.org]) for spec in specs)
    )
    return statuses
