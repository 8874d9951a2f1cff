"""Live updates: one LISTEN connection per staging server wakes every waiting long-poll.

The projector sends ``NOTIFY fieldsync_changes, '<org>.<entity>:<watermark>'`` in the transaction
that raises a watermark, so the notification arrives exactly when the change is readable. A
waiter takes its org's :class:`asyncio.Event` *before* it reads its (empty) delta, so a change
committed in between wakes it at once instead of being missed. A thousand idle devices cost a
thousand parked coroutines and nothing on the database; after a lost connection every waiter is
woken (notifications may have been missed) and simply reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from engine.projections.staging import CHANGES_CHANNEL

log = logging.getLogger("fieldsync.gateway.live")


class LiveHub:
    def __init__(self, dsns: dict[str, str]) -> None:
        """``dsns``: every staging server by name (an org's changes come from its server)."""
        self._dsns = dsns
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected: dict[str, bool] = dict.fromkeys(dsns, False)

    @property
    def disconnected(self) -> list[str]:
        """Servers whose notifications this gateway does not receive right now."""
        return [server for server, up in self._connected.items() if not up]

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(server, dsn), name=f"fieldsync-live-{server}")
            for server, dsn in self._dsns.items()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def event(self, org: str) -> asyncio.Event:
        """The event the next change of any entity of ``org`` sets (waiters whose entities
        did not change read an empty delta and wait again: cheap, and never a missed wake)."""
        return self._events.setdefault(org, asyncio.Event())

    def _fire(self, org: str) -> None:
        event = self._events.pop(org, None)
        if event is not None:
            event.set()

    def _fire_all(self) -> None:
        """After a lost connection notifications may have been missed: wake everyone."""
        for name in list(self._events):
            self._fire(name)

    async def _listen(self, server: str, dsn: str) -> None:
        pause = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self._connected[server] = True
                    self._fire_all()
                    pause = 0.2
                    async for notify in conn.notifies():
                        self._fire(notify.payload.partition(".")[0])
            except asyncio.CancelledError:
                raise
            except psycopg.Error as error:
                log.warning("live updates from %s: %s; reconnecting in %.1fs", server, error, pause)
            self._connected[server] = False
            self._fire_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def wait_for(event: asyncio.Event, timeout: float) -> bool:
    """True when ``event`` was set within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False


__all__ = ["LiveHub", "wait_for"]
