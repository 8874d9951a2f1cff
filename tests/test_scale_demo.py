"""`make scale-demo` as a test: two projector and two gateway processes on loopback, a projector
SIGKILLed and restarted while a device syncs through the gateways in turn; staging equals the
source row for row and the device holds exactly its user's view."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from engine.config import load_settings
from engine.runtime.embedded import free_port
from engine.scale_demo import run_scale_demo


def test_scale_out_converges_with_a_projector_killed(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, embedded_pg_port=free_port(), embedded_broker_port=free_port()
    )
    console = Console(record=True, width=120)
    measured = run_scale_demo(settings, console, accounts=100, rate=40, seconds=16)
    assert len(measured["gateways"]) == 2 and min(measured["gateways"].values()) >= 2
    killed, restarted = measured["kills"]
    assert killed is not None and restarted is not None and restarted > killed
    assert measured["source_changes"] > 50
    assert measured["entities"] == 8 and measured["device_rows"]["opportunity"] > 0
    assert "converged" in console.export_text()
