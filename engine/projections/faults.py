"""Fault injection for the reliability suite: ``FIELDSYNC_FAULT_POINT=<point>:<n>`` makes a
projector worker exit abruptly (``os._exit``, as a crash would) the ``n``-th time it reaches
``<point>``; ``<point>:<n>:stop`` instead stops it there (``SIGSTOP``, as a VM pause or a long
GC would) until something sends ``SIGCONT`` — a zombie in the middle of a batch. Unset in
production. The points (``docs/reliability.md``, crash-point matrix):

* ``before_db_commit``: a batch's rows are written, its staging transaction not committed;
* ``before_offset_commit``: the batch is committed to staging, its offsets not acknowledged;
* ``after_offset_commit``: the previous batches' offsets are committed to the broker;
* ``fetching``: the worker holds partitions (passed at each stall check,
  ``engine/projections/watchdog.py``).

The action ``stall`` (for ``fetching``) makes the consumer stop fetching, silently, as faust's
consumer sometimes does; it fires once per worker, re-executions included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

POINTS = ("before_db_commit", "before_offset_commit", "after_offset_commit", "fetching")
EXIT_CODE = 86

log = logging.getLogger("fieldsync.projector")
ACTIONS = ("exit", "stop", "stall")
_armed: dict[str, int] = {}  # point → hits left before the fault
_action: dict[str, str] = {}  # point → what happens there


def arm(setting: str | None) -> None:
    """Arm ``<point>:<n>[:<action>]`` (a bad value raises ValueError naming the points)."""
    _armed.clear()
    _action.clear()
    if not setting:
        return
    point, _, rest = setting.partition(":")
    count, _, action = rest.partition(":")
    action = action or ("stall" if point == "fetching" else "exit")
    if (
        point not in POINTS
        or not count.isdigit()
        or int(count) < 1
        or action not in ACTIONS
        or (action == "stall") != (point == "fetching")
    ):
        raise ValueError(
            f"fault point {setting!r}: expected <point>:<n>[:<action>], points {POINTS},"
            f" actions {ACTIONS} (stall is fetching's only action)"
        )
    _armed[point] = int(count)
    _action[point] = action


def armed(point: str) -> bool:
    return point in _armed


def reached(point: str) -> bool:
    """Count a pass through ``point``; exit (or stop) at the armed count. True when the caller
    is to act out the fault itself (``stall``)."""
    if point not in _armed:
        return False
    _armed[point] -= 1
    if _armed[point] != 0:
        return False
    if _action[point] == "stall":
        log.warning("fault point %s reached: the consumer stops fetching", point)
        del _armed[point]
        os.environ.pop("FIELDSYNC_FAULT_POINT", None)  # a re-executed worker fetches again
        return True
    if _action[point] == "stop":
        log.warning("fault point %s reached: stopping until SIGCONT", point)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(1.0)  # some kernels stop the calling thread only at its next kernel entry
        log.warning("fault point %s: continued", point)
        return False
    log.warning("fault point %s reached: exiting", point)
    sys.stderr.flush()
    os._exit(EXIT_CODE)
