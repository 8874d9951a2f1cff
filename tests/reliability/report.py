"""Scenario numbers: printed, and appended as JSON lines to ``FIELDSYNC_RELIABILITY_REPORT``
when set (what ``docs/reliability.md``'s table is filled from)."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def record(scenario: str, **numbers: Any) -> None:
    line = {"scenario": scenario, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **numbers}
    print(json.dumps(line, default=str))
    path = os.environ.get("FIELDSYNC_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line, default=str) + "\n")


def summary(values: list[float]) -> dict[str, float]:
    """max / mean of recovery times (seconds, rounded)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "max_s": round(max(values), 2),
        "mean_s": round(sum(values) / len(values), 2),
    }
