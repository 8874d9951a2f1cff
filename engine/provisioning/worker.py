"""The provisioner: a faust app that applies provisioning commands and runs the orgs' capture.

Workers started with the same ``FIELDSYNC_PROVISIONER_GROUP`` share the partitions of
``fieldsync.provisioning``. Orgs are the keys of that topic, so each org belongs to one
partition and thereby to one worker: that worker applies the org's commands *and* runs its
capture. More workers serve more orgs; a worker that dies hands its partitions — its orgs — to
the others at the next rebalance, whose reconciler starts their capture (resuming from the
orgs' slots). A command's offset is committed only after it was applied, so a crash in the
middle of provisioning re-applies it on restart, and the idempotent steps complete it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import psycopg
from kafka import KafkaProducer

from engine.config import Settings
from engine.exceptions import FieldSyncError
from engine.logs import logging_config
from engine.provisioning.commands import PROVISIONING_TOPIC, Command, CommandError
from engine.provisioning.lifecycle import (
    OrgLifecycle,
    Provisioner,
    ensure_lifecycle_schema,
    read_lifecycle,
    record_state,
)
from engine.runtime.faust_app import faust_app
from engine.runtime.kafka import client_options
from engine.streams.spec import CaptureSpec
from engine.streams.supervisor import OrgStatus, supervise
from engine.streams.topics import TopicAdmin, dead_letter_topic

log = logging.getLogger("fieldsync.provisioning")


def ensure_provisioning_topic(settings: Settings, bootstrap_servers: str) -> None:
    admin = TopicAdmin(
        bootstrap_servers,
        partitions=settings.provisioning_partitions,
        replication_factor=settings.topic_replication_factor,
    )
    try:  # compacted: the last command of an org is its whole desired state
        admin.ensure([], compacted=[PROVISIONING_TOPIC])
    finally:
        admin.close()


def publish(settings: Settings, bootstrap_servers: str, commands: Sequence[Command]) -> None:
    """Send commands (keyed by org) and wait until the broker acknowledged them."""
    ensure_provisioning_topic(settings, bootstrap_servers)
    producer = KafkaProducer(
        **client_options(settings), bootstrap_servers=bootstrap_servers, acks="all", linger_ms=0
    )
    try:
        futures = [
            producer.send(PROVISIONING_TOPIC, key=c.org.encode(), value=c.to_bytes())
            for c in commands
        ]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


@dataclass
class _Running:
    spec: str  # the spec it runs with (JSON), to notice updates
    stop: asyncio.Event
    task: asyncio.Task[None]
    status: OrgStatus


@dataclass
class CaptureFleet:
    """The capture tasks of the orgs this worker owns, reconciled with the control schema."""

    settings: Settings
    bootstrap: str
    staging_dsn: str
    running: dict[str, _Running] = field(default_factory=dict)
    # a command and a reconciliation take turns: a reconciliation between a decommission's
    # stopping the org's capture and its recording `decommissioning` would start the capture
    # again (the org still reads `active`), and its start re-creates the topics being deleted
    turns: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _desired(self, partitions: set[int]) -> dict[str, OrgLifecycle]:
        with psycopg.connect(self.staging_dsn, autocommit=True) as conn:
            ensure_lifecycle_schema(conn)
            rows = read_lifecycle(conn)
        return {
            r.org: r
            for r in rows
            if r.state == "active" and r.spec is not None and r.partition in partitions
        }

    async def command(
        self, command: Command, apply: Callable[[], Awaitable[None]], partitions: set[int]
    ) -> None:
        """Apply ``command`` (``apply``) and reconcile, no reconciliation in between; a
        decommissioned org's capture stops first, before its slot is dropped."""
        async with self.turns:
            if command.kind == "decommission" and command.org in self.running:
                await self.stop(command.org)
            await apply()
            await self._reconcile(partitions)

    async def reconcile(self, partitions: set[int]) -> None:
        """Run the capture of exactly the active orgs of ``partitions`` (after any command in
        progress)."""
        async with self.turns:
            await self._reconcile(partitions)

    async def _reconcile(self, partitions: set[int]) -> None:
        desired = await asyncio.to_thread(self._desired, partitions)
        for org, running in list(self.running.items()):
            target = desired.get(org)
            if (
                target is None
                or target.spec is None
                or target.spec.model_dump_json() != running.spec
            ):
                await self.stop(org)
        for org, target in desired.items():
            if org not in self.running and target.spec is not None:
                try:
                    spec: CaptureSpec = target.spec.capture_spec(org)
                except (FieldSyncError, ValueError) as error:
                    log.error("org %s: cannot start capture: %s", org, error)
                    continue
                stop = asyncio.Event()
                status = OrgStatus(org)
                task = asyncio.create_task(
                    supervise(spec, self.settings, self.bootstrap, stop, status),
                    name=f"capture-{org}",
                )
                self.running[org] = _Running(target.spec.model_dump_json(), stop, task, status)
                log.info("org %s: capture started on this worker", org)

    async def stop(self, org: str) -> None:
        running = self.running.pop(org)
        running.stop.set()
        try:
            await asyncio.wait_for(running.task, 30)
        except TimeoutError:
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.task
        log.info("org %s: capture stopped on this worker", org)

    async def stop_all(self) -> None:
        for org in list(self.running):
            await self.stop(org)


def build_app(settings: Settings, bootstrap_servers: str, staging_dsn: str) -> faust.App:
    ensure_provisioning_topic(settings, bootstrap_servers)
    app = faust_app(settings, settings.provisioner_group, bootstrap_servers, broker_commit_every=1)
    commands = app.topic(PROVISIONING_TOPIC, key_serializer="raw", value_serializer="raw")
    dead = app.topic(dead_letter_topic(None), key_serializer="raw", value_serializer="raw")
    provisioner = Provisioner(settings, bootstrap_servers, staging_dsn)
    fleet = CaptureFleet(settings, bootstrap_servers, staging_dsn)

    def owned() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == PROVISIONING_TOPIC}

    @app.agent(commands, concurrency=1)
    async def apply_commands(stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            message = event.message
            try:
                command = Command.from_bytes(message.value)
            except CommandError as error:
                log.error("partition %d offset %d: %s", message.partition, message.offset, error)
                await dead.send(
                    key=message.key,
                    value=message.value,
                    headers=[
                        ("fieldsync.dlq.reason", b"bad_command"),
                        ("fieldsync.dlq.detail", str(error).encode()),
                        ("fieldsync.dlq.topic", PROVISIONING_TOPIC.encode()),
                        ("fieldsync.dlq.partition", str(message.partition).encode()),
                        ("fieldsync.dlq.offset", str(message.offset).encode()),
                    ],
                )
                continue
            apply = functools.partial(_apply_until_done, provisioner, command, message.partition)
            await fleet.command(command, apply, owned())

    # faust's App.timer() is annotated as returning a bare Callable
    @app.timer(settings.provisioner_reconcile_s)  # type: ignore[untyped-decorator]
    async def reconcile_captures() -> None:
        await fleet.reconcile(owned())

    async def stop_captures(sender: Any, *_: Any, **__: Any) -> None:
        await fleet.stop_all()

    app.on_before_shutdown.connect(stop_captures)  # type: ignore[arg-type]  # faust: sync typing

    return app


async def _apply_until_done(provisioner: Provisioner, command: Command, partition: int) -> None:
    """Retry while staging or the broker are unreachable; a command that fails for another
    reason is recorded as ``failed`` with its reason (and stays visible in status)."""
    pause = 0.5
    while True:
        try:
            state = await asyncio.to_thread(provisioner.apply, command, partition)
            log.info("org %s: %s → %s", command.org, command.kind, state)
            return
        except psycopg.OperationalError as error:
            log.warning("org %s: staging unavailable (%s); retrying", command.org, error)
        except FieldSyncError as error:
            await asyncio.to_thread(_record_failure, provisioner, command, partition, str(error))
            return
        except Exception as error:
            if "NoBrokersAvailable" in type(error).__name__ or "Kafka" in type(error).__name__:
                log.warning("org %s: broker unavailable (%s); retrying", command.org, error)
            else:
                log.exception("org %s: %s failed", command.org, command.kind)
                await asyncio.to_thread(
                    _record_failure,
                    provisioner,
                    command,
                    partition,
                    f"{type(error).__name__}: {error}",
                )
                return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 10.0)


def _record_failure(
    provisioner: Provisioner, command: Command, partition: int, reason: str
) -> None:
    with psycopg.connect(provisioner.dsn, autocommit=True) as conn:
        record_state(conn, command, "failed", partition=partition, reason=reason)


def run_worker(settings: Settings, bootstrap_servers: str, staging_dsn: str) -> None:
    """Run one provisioner worker until SIGTERM/SIGINT."""
    if settings.projector_uvloop and sys.platform != "win32":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = build_app(settings, bootstrap_servers, staging_dsn)
    faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=logging_config(settings, "provisioner", stream="stdout"),
    ).execute_from_commandline()


__all__ = ["CaptureFleet", "build_app", "ensure_provisioning_topic", "publish", "run_worker"]
