"""Live updates: one LISTEN connection per gateway process wakes every waiting long-poll.

The projector sends ``NOTIFY fieldsync_changes, '<org>.<entity>:<watermark>'`` in the transaction
that raises a watermark, so the notification arrives exactly when the change is readable. A
waiter takes the entity's current :class:`asyncio.Event` *before* it computes its (empty) delta,
so a change committed in between wakes it at once instead of being missed; a thousand idle
devices cost a thousand parked coroutines and nothing on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import psycopg

from engine.projections.staging import CHANGES_CHANNEL

log = logging.getLogger("fieldsync.gateway.live")


class LiveHub:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._events: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="fieldsync-live")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def events(self, org: str, entities: Iterable[str]) -> list[asyncio.Event]:
        """The events the next change of any of ``entities`` will set."""
        return [self._events.setdefault(f"{org}.{e}", asyncio.Event()) for e in entities]

    def _fire(self, name: str) -> None:
        event = self._events.pop(name, None)
        if event is not None:
            event.set()

    def _fire_all(self) -> None:
        """After a lost connection notifications may have been missed: wake everyone."""
        for name in list(self._events):
            self._fire(name)

    async def _listen(self) -> None:
        pause = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self.connected.set()
                    self._fire_all()
                    pause = 0.2
                    async for notify in conn.notifies():
                        self._fire(notify.payload.rpartition(":")[0])
            except asyncio.CancelledError:
                raise
            except psycopg.Error as error:
                log.warning("live updates: %s; reconnecting in %.1fs", error, pause)
            self.connected.clear()
            self._fire_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def wait_any(events: list[asyncio.Event], timeout: float) -> bool:
    """True when one of ``events`` was set within ``timeout`` seconds."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for waiter in waiters:
            waiter.cancel()


__all__ = ["LiveHub", "wait_any"]
