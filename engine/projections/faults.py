"""Fault injection for the reliability suite: ``FIELDSYNC_FAULT_POINT=<point>:<n>`` makes a
projector worker exit abruptly (``os._exit``, as a crash would) the ``n``-th time it reaches
``<point>``. Unset in production. The points (``docs/reliability.md``, crash-point matrix):

* ``before_db_commit``: a batch's rows are written, its staging transaction not committed;
* ``before_offset_commit``: the batch is committed to staging, its offsets not acknowledged;
* ``after_offset_commit``: the previous batches' offsets are committed to the broker.
"""

from __future__ import annotations

import logging
import os
import sys

POINTS = ("before_db_commit", "before_offset_commit", "after_offset_commit")
EXIT_CODE = 86

log = logging.getLogger("fieldsync.projector")
_armed: dict[str, int] = {}  # point → hits left before the crash


def arm(setting: str | None) -> None:
    """Arm ``<point>:<n>`` (a bad value raises ValueError naming the points)."""
    _armed.clear()
    if not setting:
        return
    point, _, count = setting.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"fault point {setting!r}: expected <point>:<n>, points {POINTS}")
    _armed[point] = int(count)


def armed(point: str) -> bool:
    return point in _armed


def reached(point: str) -> None:
    """Count a pass through ``point``; exit at the armed count."""
    if point not in _armed:
        return
    _armed[point] -= 1
    if _armed[point] == 0:
        log.warning("fault point %s reached: exiting", point)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
