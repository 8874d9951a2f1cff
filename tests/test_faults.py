"""The fault-injection setting: parsed strictly, so a typo never silently disarms a scenario."""

from __future__ import annotations

import os

import pytest

from engine.config import ConfigError, load_settings
from engine.projections import faults


@pytest.mark.parametrize(
    "setting",
    [
        "before_db_commit:0",
        "nowhere:3",
        "before_db_commit:3:pause",
        "before_db_commit",
        "before_db_commit:1:stall",  # stall belongs to fetching alone
        "fetching:1:exit",
    ],
)
def test_bad_fault_points_are_refused_naming_the_choices(setting: str) -> None:
    with pytest.raises(ValueError, match=r"points .*before_db_commit.* actions .*stop"):
        faults.arm(setting)


def test_exit_and_stop_actions_arm_their_point() -> None:
    faults.arm("before_offset_commit:2")
    assert faults.armed("before_offset_commit") and not faults.armed("before_db_commit")
    faults.arm("before_db_commit:5:stop")
    assert faults.armed("before_db_commit") and not faults.armed("before_offset_commit")
    faults.reached("before_db_commit")  # 4 passes left: nothing happens yet
    faults.arm(None)
    assert not faults.armed("before_db_commit")


def test_the_stall_fires_once_and_is_not_passed_to_a_reexecuted_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIELDSYNC_FAULT_POINT", "fetching:2")
    faults.arm(load_settings().fault_point)
    assert faults.reached("fetching") is False  # the first pass: not yet
    assert faults.reached("fetching") is True  # the second: the caller stalls its consumer
    assert not faults.armed("fetching") and faults.reached("fetching") is False
    assert "FIELDSYNC_FAULT_POINT" not in os.environ


def test_the_setting_accepts_the_stop_action_and_names_itself_when_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FIELDSYNC_FAULT_POINT", "before_db_commit:3:stop")
    assert load_settings().fault_point == "before_db_commit:3:stop"
    monkeypatch.setenv("FIELDSYNC_FAULT_POINT", "before_db_commit:3:freeze")
    with pytest.raises(ConfigError, match="FIELDSYNC_FAULT_POINT"):
        load_settings()
