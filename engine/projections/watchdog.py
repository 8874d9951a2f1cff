"""Noticing a projector worker whose consumer has stopped fetching.

faust's consumer can hold partitions without fetching from them, silently: no error, no log,
messages waiting at the broker and an idle agent (faust-streaming issues #175 and #471 describe
it; the test suite met it too). Nothing recovers from that but a restart, and the committed
offsets make a restart safe. :class:`StallWatch` is the rule for when to restart, kept apart from
the worker so that it can be reasoned about on its own:

* only while the agent is idle: a worker busy with a batch (a long one, or one retrying while
  staging is away) is not stalled, whatever its partitions show;
* only for a partition that stays behind the broker's end at the same position for half the
  timeout, after the agent has handled no batch for half the timeout: a partition that was
  behind for a moment (a fetch on its way) never counts, and a batch handled meanwhile starts
  the count again. A worker that keeps applying batches is never restarted by this rule, however
  far behind it is.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

TP = TypeVar("TP", bound=Hashable)  # a topic partition


@dataclass
class StallWatch(Generic[TP]):
    """The stall rule for one worker; ``timeout_s`` 0 turns it off."""

    timeout_s: float
    batch_started: float | None = None
    last_progress: float = field(default_factory=time.monotonic)  # a batch ended, or a rebalance
    _behind: dict[TP, tuple[int, float]] = field(default_factory=dict)
    _reported: float | None = None  # the start of the batch last reported as long

    def batch_begins(self, now: float | None = None) -> None:
        self.batch_started = time.monotonic() if now is None else now

    def batch_ends(self, now: float | None = None) -> None:
        self.batch_started = None
        self.moved(now)

    def moved(self, now: float | None = None) -> None:
        """Progress, or a reason to wait (a rebalance): every partition's count starts again."""
        self.last_progress = time.monotonic() if now is None else now
        self._behind.clear()

    def long_batch(self, now: float | None = None) -> float | None:
        """Seconds the current batch has been running, the first time that exceeds the timeout
        (a batch waiting on something: worth a look at where); None otherwise."""
        if self.batch_started is None or self.timeout_s <= 0:
            return None
        running = (time.monotonic() if now is None else now) - self.batch_started
        if running <= self.timeout_s or self._reported == self.batch_started:
            return None
        self._reported = self.batch_started
        return running

    def worth_checking(self, now: float | None = None) -> bool:
        """Whether the positions are worth reading: the agent idle for half the timeout."""
        now = time.monotonic() if now is None else now
        return (
            self.timeout_s > 0
            and self.batch_started is None
            and now - self.last_progress >= self.timeout_s / 2
        )

    def stalled(
        self,
        positions: Mapping[TP, int | None],
        ends: Mapping[TP, int],
        now: float | None = None,
    ) -> dict[TP, tuple[int, int]]:
        """The partitions (→ (position, end)) behind the broker's end at an unchanged position
        for half the timeout while the agent handled nothing; call when :meth:`worth_checking`."""
        now = time.monotonic() if now is None else now
        behind = {
            tp: position
            for tp, position in positions.items()
            if position is not None and ends.get(tp, 0) > position
        }
        self._behind = {
            tp: (position, since)
            for tp, (position, since) in self._behind.items()
            if behind.get(tp) == position
        }
        for tp, position in behind.items():
            self._behind.setdefault(tp, (position, now))
        return {
            tp: (position, ends[tp])
            for tp, (position, since) in self._behind.items()
            if now - since >= self.timeout_s / 2
        }


__all__ = ["StallWatch"]
