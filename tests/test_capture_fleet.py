"""The provisioner's capture fleet: commands and reconciliations take turns (a reconciliation
in the middle of a decommission restarted the org's capture, which re-created its topics)."""

from __future__ import annotations

import asyncio

from engine.config import load_settings
from engine.provisioning.commands import Command
from engine.provisioning.worker import CaptureFleet, _Running
from engine.streams.supervisor import OrgStatus


def test_a_reconciliation_waits_for_the_command_in_progress_and_decommission_stops_first(
    fresh_database: str,
) -> None:
    order: list[str] = []

    async def scenario() -> None:
        fleet = CaptureFleet(load_settings(), "127.0.0.1:9", fresh_database)
        stop = asyncio.Event()

        async def capture() -> None:  # stands for the org's running capture task
            await stop.wait()
            order.append("capture stopped")

        fleet.running["acme"] = _Running(
            "{}", stop, asyncio.create_task(capture()), OrgStatus("acme")
        )
        release = asyncio.Event()

        async def apply() -> None:
            order.append("command applies")
            await release.wait()
            order.append("command applied")

        async def reconcile() -> None:
            await fleet.reconcile(set())  # owns no partition: reads staging, starts nothing
            order.append("reconciled")

        command = asyncio.create_task(
            fleet.command(Command(kind="decommission", org="acme"), apply, set())
        )
        while "command applies" not in order:
            await asyncio.sleep(0.01)
        reconciliation = asyncio.create_task(reconcile())
        await asyncio.sleep(0.5)
        assert not reconciliation.done()  # it waits for the command
        release.set()
        await asyncio.gather(command, reconciliation)
        assert fleet.running == {}

    asyncio.run(scenario())
    assert order == ["capture stopped", "command applies", "command applied", "reconciled"]
