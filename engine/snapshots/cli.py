"""``fieldsync snapshot build|schedule|prune|list``."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.config import get_settings
from engine.exceptions import ConfigError, FieldSyncError

console = Console()
app = typer.Typer(
    help="Compacted snapshots of staging entities (Avro files + manifests).",
    no_args_is_help=True,
)

OrgOption = Annotated[str, typer.Option(help="Organisation.")]
EntityOption = Annotated[
    str | None, typer.Option(help="One entity; without: every entity of the org.")
]


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error[/] {error}")
    return typer.Exit(code=2)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)


@app.command("build")
def build(org: OrgOption, entity: EntityOption = None) -> None:
    """Snapshot an org's entities at their current watermark; prune to FIELDSYNC_SNAPSHOT_KEEP."""
    from engine.runtime.endpoints import resolve_endpoints
    from engine.runtime.placement import StagingServers
    from engine.snapshots.build import build_snapshot, staging_entities
    from engine.snapshots.store import default_store

    settings = get_settings()
    try:
        endpoints = resolve_endpoints(settings)
        dsn = StagingServers.from_settings(settings, endpoints.staging_dsn).dsn_for(org)
        store = default_store(settings)
        targets = [(org, entity)] if entity else staging_entities(dsn, org)
        if not targets:
            raise ConfigError(f"org {org} has no staging entities yet")
        table = Table(title=f"snapshots of {org} in {store.root}")
        for column in ("entity", "snapshot", "rows", "size", "", "pruned"):
            table.add_column(column)
        for name, target in targets:
            result = build_snapshot(
                dsn,
                name,
                target,
                store,
                group=settings.projector_group,
                bootstrap_servers=endpoints.bootstrap_servers,
                keep=settings.snapshot_keep,
            )
            manifest = result.manifest
            table.add_row(
                target,
                manifest.id,
                str(manifest.rows),
                _size(manifest.size),
                "built" if result.built else "unchanged",
                str(len(result.pruned)),
            )
            if manifest.kafka.note:
                console.print(f"[yellow]{target}:[/] {manifest.kafka.note}")
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(table)


@app.command("schedule")
def schedule(
    org: Annotated[str | None, typer.Option(help="Only this org.")] = None,
    interval: Annotated[
        float | None,
        typer.Option(help="Seconds between rounds; default FIELDSYNC_SNAPSHOT_INTERVAL_S."),
    ] = None,
) -> None:
    """Build snapshots of every staging entity on a schedule, until SIGINT/SIGTERM."""
    from engine.logs import configure_logging
    from engine.runtime.endpoints import resolve_endpoints
    from engine.runtime.placement import StagingServers
    from engine.snapshots.schedule import run_schedule
    from engine.snapshots.store import default_store

    settings = get_settings()
    configure_logging(settings, "snapshots", stream="stdout")
    period = interval or settings.snapshot_interval_s
    try:
        if period is None:
            raise ConfigError("FIELDSYNC_SNAPSHOT_INTERVAL_S is not set (nor --interval)")
        endpoints = resolve_endpoints(settings)
    except FieldSyncError as error:
        raise _fail(error) from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    store = default_store(settings)
    console.print(f"snapshots every {period:g}s into {store.root}; Ctrl-C stops")
    built = run_schedule(
        list(StagingServers.from_settings(settings, endpoints.staging_dsn).servers.values()),
        store,
        period,
        group=settings.projector_group,
        keep=settings.snapshot_keep,
        bootstrap_servers=endpoints.bootstrap_servers,
        org=org,
        stop=stop,
    )
    console.print(f"stopped after building {built} snapshots")


@app.command("prune")
def prune_command(
    org: Annotated[str | None, typer.Option(help="Only this org.")] = None,
    entity: EntityOption = None,
    keep: Annotated[
        int | None, typer.Option(min=1, help="Keep this many; default FIELDSYNC_SNAPSHOT_KEEP.")
    ] = None,
) -> None:
    """Delete all but the newest snapshots of each entity."""
    from engine.snapshots.store import default_store, prune

    settings = get_settings()
    store = default_store(settings)
    count = keep or settings.snapshot_keep
    deleted = 0
    try:
        for name, target in store.entities():
            if (org is None or name == org) and (entity is None or target == entity):
                deleted += len(prune(store, name, target, count))
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(f"pruned {deleted} snapshots (keeping {count} per entity) in {store.root}")


@app.command("list")
def list_command(
    org: Annotated[str | None, typer.Option(help="Only this org.")] = None,
    entity: EntityOption = None,
) -> None:
    """The stored snapshots, newest first per entity."""
    from engine.snapshots.store import default_store

    store = default_store(get_settings())
    table = Table(title=f"snapshots in {store.root}")
    for column in ("org", "entity", "snapshot", "watermark", "rows", "size", "created"):
        table.add_column(column)
    for name, target in store.entities():
        if (org is None or name == org) and (entity is None or target == entity):
            for manifest in store.list(name, target):
                table.add_row(
                    name,
                    target,
                    manifest.id,
                    str(manifest.watermark),
                    str(manifest.rows),
                    _size(manifest.size),
                    manifest.created_at.isoformat(timespec="seconds"),
                )
    console.print(table)


__all__ = ["app"]
