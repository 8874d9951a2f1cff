"""The ``fieldsync`` command: one entry point for every process and operator task."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.config import Settings, get_settings
from engine.exceptions import FieldSyncError
from engine.logs import configure_logging
from engine.runtime.embedded import EmbeddedRuntime
from engine.runtime.endpoints import resolve_bootstrap, resolve_endpoints

app = typer.Typer(
    name="fieldsync",
    help="FieldSync: PostgreSQL change capture → Kafka → staging → offline devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 120)


@app.callback()
def _every_command() -> None:
    """``kill -USR1 <pid>`` makes any FieldSync process write every thread's stack to stderr
    (faust workers replace this with mode's dump, which lists their asyncio tasks too): how a
    process that has stopped making progress tells where it waits."""
    # a stderr without a file descriptor (a captured one, when invoked in-process) has none
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def _settings() -> Settings:
    return get_settings()


def _fail(error: FieldSyncError) -> typer.Exit:
    console.print(f"[bold red]error[/] {error}")
    return typer.Exit(code=2)


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not received:
        signal.pause()


@app.command()
def up() -> None:
    """Start the embedded PostgreSQL and broker and keep them running until Ctrl-C."""
    try:
        settings = _settings()
        configure_logging(settings, "up", stream="stdout")
        runtime = EmbeddedRuntime(
            settings.data_dir,
            pg_port=settings.embedded_pg_port,
            broker_port=settings.embedded_broker_port,
        )
        info = runtime.start()
    except FieldSyncError as error:
        raise _fail(error) from None
    try:
        table = Table(title="FieldSync embedded runtime", show_header=False)
        table.add_row("PostgreSQL", info.postgres_dsn)
        table.add_row("Kafka broker", info.bootstrap_servers)
        table.add_row("data", str(settings.data_dir.resolve()))
        console.print(table)
        console.print("Running. Ctrl-C stops both services.")
        _wait_for_signal()
    finally:
        console.print("Stopping…")
        runtime.stop()
        console.print("Stopped.")


@app.command()
def capture(
    org_file: Annotated[
        list[Path],
        typer.Option("--org-file", "-o", help="Org file (YAML/JSON); repeat for more orgs."),
    ],
    source_dsn: Annotated[
        str | None, typer.Option(help="Source DSN, overriding the org file's (one org only).")
    ] = None,
    until_caught_up: Annotated[
        bool, typer.Option(help="Exit once everything committed so far is on the broker.")
    ] = False,
) -> None:
    """Capture the orgs' source databases into their change topics."""
    from engine.orgfile import load_capture_spec
    from engine.streams.capture import CaptureTask
    from engine.streams.supervisor import run_captures

    try:
        settings = _settings()
        configure_logging(settings, "capture", stream="stdout")
        if source_dsn is not None and len(org_file) != 1:
            raise FieldSyncError("--source-dsn applies to a single --org-file")
        specs = [load_capture_spec(path, source_dsn=source_dsn) for path in org_file]
        bootstrap = resolve_bootstrap(settings)
    except FieldSyncError as error:
        raise _fail(error) from None

    async def catch_up_all() -> None:
        for spec in specs:
            task = CaptureTask(spec, settings, bootstrap)
            try:
                stats = await task.catch_up()
                console.print(
                    f"org {spec.org}: {stats.snapshot_rows} snapshot rows, {stats.events} events"
                )
            finally:
                await task.close()

    async def run_forever() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        statuses = await run_captures(specs, settings, bootstrap, stop)
        failed = [s for s in statuses.values() if s.state == "failed"]
        for status in failed:
            console.print(f"[red]org {status.org} failed:[/] {status.error}")

    try:
        asyncio.run(catch_up_all() if until_caught_up else run_forever())
    except FieldSyncError as error:
        raise _fail(error) from None


@app.command()
def projector(
    org_file: Annotated[
        list[Path] | None,
        typer.Option("--org-file", "-o", help="Register these orgs first (YAML/JSON)."),
    ] = None,
) -> None:
    """Run a projector worker: change topics → staging (start more for more throughput)."""
    from engine.orgfile import load_org_registration
    from engine.projections.app import register_org, run_worker

    try:
        settings = _settings()
        configure_logging(settings)
        endpoints = resolve_endpoints(settings)
        for path in org_file or []:
            registration = load_org_registration(path)
            register_org(
                endpoints.staging_dsn,
                registration.org,
                retention_days=registration.retention_days,
                debezium_topics=registration.debezium_topics,
            )
    except FieldSyncError as error:
        raise _fail(error) from None
    run_worker(settings, endpoints.bootstrap_servers, endpoints.staging_dsn)


@app.command()
def demo(
    accounts: Annotated[int, typer.Option(help="Sample size: number of accounts.")] = 2_000,
    churn_seconds: Annotated[
        float, typer.Option(help="How long to keep changing the source.")
    ] = 5.0,
    rate: Annotated[float, typer.Option(help="Source changes per second while churning.")] = 200.0,
) -> None:
    """End to end on the embedded runtime: sample CRM source → capture → what landed where."""
    from engine.demo import run_demo

    try:
        settings = _settings()
        configure_logging(settings)
        run_demo(settings, console, accounts=accounts, churn_seconds=churn_seconds, rate=rate)
    except FieldSyncError as error:
        raise _fail(error) from None


@app.command("scale-demo")
def scale_demo(
    accounts: Annotated[int, typer.Option(help="Sample size: number of accounts.")] = 500,
    rate: Annotated[float, typer.Option(help="Source changes per second.")] = 100.0,
    seconds: Annotated[float, typer.Option(help="How long the device keeps syncing.")] = 40.0,
) -> None:
    """Scale-out on one machine: 2 projectors, 2 gateways, a projector killed mid-run.

    A device syncs through the gateways in turn while one projector is SIGKILLed and restarted;
    at the end staging must equal the source and the device its user's view."""
    from engine.scale_demo import run_scale_demo

    try:
        settings = _settings()
        configure_logging(settings)
        run_scale_demo(settings, console, accounts=accounts, rate=rate, seconds=seconds)
    except FieldSyncError as error:
        raise _fail(error) from None


@app.command()
def topics(
    topic: Annotated[
        str | None, typer.Argument(help="Show this topic's messages, decoded.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Messages to show.")] = 10,
) -> None:
    """List topics with their message counts, or show one topic's messages decoded."""
    from engine.inspect import print_topic, print_topics

    try:
        endpoints = resolve_endpoints(_settings())
        if topic is None:
            print_topics(console, endpoints.bootstrap_servers)
        else:
            asyncio.run(print_topic(console, endpoints.bootstrap_servers, topic, limit))
    except FieldSyncError as error:
        raise _fail(error) from None


@app.command()
def schemas(
    org_file: Annotated[Path, typer.Option("--org-file", "-o", help="Org file (YAML/JSON).")],
    out: Annotated[Path, typer.Option(help="Directory for the .avsc files.")] = Path(
        "docs/schemas"
    ),
    source_dsn: Annotated[
        str | None, typer.Option(help="Source DSN, overriding the org file's.")
    ] = None,
) -> None:
    """Write the org's published Avro schemas (keys, envelopes, transactions) as .avsc files."""
    from engine.orgfile import load_capture_spec
    from engine.streams.export import export_schemas

    try:
        spec = load_capture_spec(org_file, source_dsn=source_dsn)
        for path in asyncio.run(export_schemas(spec, out)):
            console.print(f"wrote {path}")
    except FieldSyncError as error:
        raise _fail(error) from None


@app.command()
def purge() -> None:
    """Move every org's retention horizon now: purge old change-log entries and deletes."""
    from engine.projections.retention import purge_all
    from engine.runtime.placement import StagingServers

    try:
        settings = _settings()
        servers = StagingServers.from_settings(settings, resolve_endpoints(settings).staging_dsn)
        reports = [r for dsn in servers.servers.values() for r in purge_all(dsn)]
    except FieldSyncError as error:
        raise _fail(error) from None
    table = Table(title="Retention purge")
    for column in ("org", "retention", "log entries purged", "deletes purged", "error"):
        table.add_column(column)
    for report in reports:
        table.add_row(
            report.org,
            str(report.retention),
            str(report.log_deleted),
            str(report.tombstones_deleted),
            report.error or "",
        )
    console.print(table)


dlq_app = typer.Typer(
    help="Dead letters: list them, replay them after a fix.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


def _dlq_topic(org: str | None) -> str:
    from engine.streams.topics import dead_letter_topic

    return dead_letter_topic(org)


@dlq_app.command("list")
def dlq_list(
    org: Annotated[
        str | None, typer.Option(help="The org's dead letters; without: fieldsync.dlq.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Letters to show.")] = 50,
) -> None:
    """Show dead letters with their reason and origin."""
    from engine.projections.dlq import list_dead_letters

    try:
        letters = list_dead_letters(resolve_bootstrap(_settings()), _dlq_topic(org))
    except FieldSyncError as error:
        raise _fail(error) from None
    table = Table(title=f"{_dlq_topic(org)}: {len(letters)} dead letters")
    for column in ("at", "reason", "from", "detail"):
        table.add_column(column)
    for letter in letters[:limit]:
        table.add_row(
            f"{letter.partition}@{letter.offset}",
            letter.reason,
            f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}",
            letter.detail,
        )
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(
    org: Annotated[
        str | None, typer.Option(help="The org's dead letters; without: fieldsync.dlq.")
    ] = None,
) -> None:
    """Send dead letters back to their topics (each once) after the cause was fixed."""
    from engine.projections.dlq import replay

    try:
        count = replay(resolve_bootstrap(_settings()), _dlq_topic(org))
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(f"replayed {count} dead letters from {_dlq_topic(org)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Run benchmarks (``fieldsync bench all``, ``fieldsync bench capture --quick``)."""
    raise typer.Exit(subprocess.call([sys.executable, "-m", "bench", *ctx.args]))


def main() -> None:
    app()


def _mount_sample() -> None:
    from engine.sample.cli import app as sample_app

    app.add_typer(sample_app, name="sample", help="Create, fill and churn the sample CRM source.")


_mount_sample()


def _mount_gateway() -> None:
    from engine.provisioning.cli import mount as mount_provisioning
    from gateway.cli import mount

    mount(app)
    mount_provisioning(app)


_mount_gateway()


def _mount_snapshots() -> None:
    from engine.snapshots.cli import app as snapshot_app

    app.add_typer(snapshot_app, name="snapshot", help="Compacted snapshots of staging entities.")


_mount_snapshots()


def _mount_replay() -> None:
    from engine.projections.replay import replay_command

    app.command("replay")(replay_command)


_mount_replay()
