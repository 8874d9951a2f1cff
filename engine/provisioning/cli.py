"""``fieldsync org provision|update|decommission|status|resume`` and ``fieldsync provisioner``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.config import get_settings
from engine.exceptions import FieldSyncError
from engine.runtime.endpoints import resolve_endpoints

console = Console()
org_app = typer.Typer(
    help="Organisations: provision, update, decommission (commands on fieldsync.provisioning).",
    no_args_is_help=True,
)
DONE = {"provision": "active", "update": "active", "decommission": "decommissioned"}


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error[/] {error}")
    return typer.Exit(code=2)


def _send(kind: str, org_file: Path | None, org: str | None, wait: float) -> None:
    import psycopg

    from engine.provisioning.commands import command_from_document, command_from_file
    from engine.provisioning.lifecycle import ensure_lifecycle_schema, read_lifecycle
    from engine.provisioning.worker import publish

    settings = get_settings()
    try:
        endpoints = resolve_endpoints(settings)
        if org_file is not None:
            command = command_from_file(kind, org_file)  # type: ignore[arg-type]
        else:
            command = command_from_document(kind, {}, org)  # type: ignore[arg-type]
        publish(settings, endpoints.bootstrap_servers, [command])
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(f"{kind} {command.org}: command {command.id} sent")
    deadline = time.monotonic() + wait
    while wait > 0:
        with psycopg.connect(endpoints.staging_dsn, autocommit=True) as conn:
            ensure_lifecycle_schema(conn)
            state = next(iter(read_lifecycle(conn, command.org)), None)
        if state is not None and state.command_id == command.id:
            if state.state == DONE[kind]:
                console.print(f"[green]✓[/] {command.org} is {state.state}")
                return
            if state.state == "failed":
                raise _fail(FieldSyncError(f"{command.org} failed: {state.reason}"))
        if time.monotonic() > deadline:
            raise _fail(FieldSyncError(f"{command.org}: not applied within {wait:.0f}s"))
        time.sleep(0.3)


WAIT = Annotated[
    float, typer.Option(help="Seconds to wait for a provisioner to apply it (0: don't wait).")
]


@org_app.command("provision")
def provision(org_file: Path, wait: WAIT = 60) -> None:
    """Provision an org from its org file (source secret reference, entities, offline)."""
    _send("provision", org_file, None, wait)


@org_app.command("update")
def update(org_file: Path, wait: WAIT = 60) -> None:
    """Apply a changed org file (entities added or removed, offline configuration)."""
    _send("update", org_file, None, wait)


@org_app.command("decommission")
def decommission(org: str, wait: WAIT = 60) -> None:
    """Remove everything of an org: topics, staging, slot, publication, snapshots, tokens."""
    _send("decommission", None, org, wait)


@org_app.command("status")
def status(org: Annotated[str | None, typer.Argument()] = None) -> None:
    """Each org's lifecycle state, reason, entities and owning partition."""
    import psycopg

    from engine.provisioning.lifecycle import ensure_lifecycle_schema, read_lifecycle
    from engine.runtime.placement import StagingServers

    try:
        settings = get_settings()
        servers = StagingServers.from_settings(settings, resolve_endpoints(settings).staging_dsn)
    except FieldSyncError as error:
        raise _fail(error) from None
    with psycopg.connect(servers.main_dsn, autocommit=True) as conn:
        ensure_lifecycle_schema(conn)
        rows = read_lifecycle(conn, org)
    placements = servers.placements()
    table = Table(title="organisations")
    for column in ("org", "state", "entities", "staging server", "partition", "reason"):
        table.add_column(column)
    for row in rows:
        entities = ", ".join(sorted(row.spec.entities)) if row.spec else ""
        table.add_row(
            row.org,
            row.state,
            entities,
            placements.get(row.org, ""),
            str(row.partition),
            row.reason or "",
        )
    console.print(table)


@org_app.command("resume")
def resume(
    org: str,
    entity: Annotated[str | None, typer.Option(help="Resume this entity only.")] = None,
    dead_letter_for: Annotated[
        float,
        typer.Option(
            help="Seconds during which the org's failing messages go to the dead-letter topic "
            "instead of stopping it again (for messages no fix will make readable)."
        ),
    ] = 0,
) -> None:
    """Clear a projector stop (error_rate_exceeded, incompatible_schema): projector workers
    subscribe again within FIELDSYNC_PROJECTOR_TOPIC_REFRESH_S and continue from the committed
    offsets."""
    from engine.projections.stops import resume_org
    from engine.runtime.placement import StagingServers

    try:
        settings = get_settings()
        servers = StagingServers.from_settings(settings, resolve_endpoints(settings).staging_dsn)
        cleared = resume_org(servers, org, entity, dead_letter_for)
    except FieldSyncError as error:
        raise _fail(error) from None
    for stop in cleared:
        console.print(f"[green]✓[/] resumed {stop.describe()}")
    if not cleared:
        console.print(f"{org}{f', entity {entity}' if entity else ''}: nothing was stopped")


def provisioner() -> None:
    """Run a provisioner worker: applies org commands and captures the orgs it owns."""
    from engine.provisioning.worker import run_worker

    settings = get_settings()
    try:
        endpoints = resolve_endpoints(settings)
    except FieldSyncError as error:
        raise _fail(error) from None
    run_worker(settings, endpoints.bootstrap_servers, endpoints.staging_dsn)


def mount(app: typer.Typer) -> None:
    app.add_typer(org_app, name="org")
    app.command()(provisioner)
