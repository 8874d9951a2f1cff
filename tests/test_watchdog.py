"""The stall rule of a projector worker (engine/projections/watchdog.py), step by step in time."""

from __future__ import annotations

from engine.projections.watchdog import StallWatch


def idle_watch(timeout: float = 60.0) -> StallWatch[str]:
    watch: StallWatch[str] = StallWatch(timeout)
    watch.batch_begins(now=0.0)
    watch.batch_ends(now=1.0)  # the last batch ended at t=1
    return watch


def test_a_partition_behind_at_one_position_while_the_agent_idles_is_a_stall() -> None:
    watch = idle_watch()
    assert not watch.worth_checking(now=20.0)  # idle for less than half the timeout
    assert watch.worth_checking(now=31.0)
    assert watch.stalled({"t[0]": 5, "t[1]": 9}, {"t[0]": 8, "t[1]": 9}, now=31.0) == {}
    assert watch.stalled({"t[0]": 5, "t[1]": 9}, {"t[0]": 8, "t[1]": 9}, now=50.0) == {}
    # behind at offset 5 since t=31: half the timeout later it is a stall; t[1] is at its end
    assert watch.stalled({"t[0]": 5, "t[1]": 9}, {"t[0]": 9, "t[1]": 9}, now=61.0) == {
        "t[0]": (5, 9)
    }


def test_a_moving_position_or_a_handled_batch_starts_the_count_again() -> None:
    watch = idle_watch()
    assert watch.stalled({"p": 5}, {"p": 8}, now=31.0) == {}
    assert watch.stalled({"p": 6}, {"p": 8}, now=61.0) == {}  # it moved: counted from t=61
    assert watch.stalled({"p": 6}, {"p": 8}, now=90.0) == {}
    watch.batch_begins(now=90.5)
    assert not watch.worth_checking(now=91.0)  # busy: never checked
    watch.batch_ends(now=91.0)
    assert not watch.worth_checking(now=100.0)
    assert watch.stalled({"p": 6}, {"p": 8}, now=121.0) == {}  # the batch reset the count
    assert watch.stalled({"p": 6}, {"p": 8}, now=151.0) == {"p": (6, 8)}


def test_a_partition_that_catches_up_is_forgotten_and_unknown_positions_never_count() -> None:
    watch = idle_watch()
    assert watch.stalled({"p": 5, "q": None}, {"p": 8, "q": 4}, now=31.0) == {}
    assert watch.stalled({"p": 8, "q": None}, {"p": 8, "q": 4}, now=45.0) == {}
    assert watch.stalled({"p": 8, "q": None}, {"p": 9, "q": 4}, now=70.0) == {}  # new since 70
    assert watch.stalled({"p": 8, "q": None}, {"p": 9, "q": 4}, now=100.0) == {"p": (8, 9)}


def test_a_long_batch_is_reported_once_and_a_zero_timeout_turns_everything_off() -> None:
    watch: StallWatch[str] = StallWatch(10.0)
    watch.batch_begins(now=0.0)
    assert watch.long_batch(now=5.0) is None
    assert watch.long_batch(now=12.0) == 12.0
    assert watch.long_batch(now=30.0) is None  # once per batch
    watch.batch_ends(now=31.0)
    watch.batch_begins(now=32.0)
    assert watch.long_batch(now=43.0) == 11.0
    off: StallWatch[str] = StallWatch(0.0)
    off.batch_begins(now=0.0)
    off.batch_ends(now=0.0)
    assert not off.worth_checking(now=1e9) and off.long_batch(now=1e9) is None
