"""``fieldsync gateway``, ``fieldsync offline …``, ``fieldsync token`` and ``fieldsync client``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engine.config import get_settings
from engine.exceptions import ConfigError, FieldSyncError
from engine.runtime.endpoints import resolve_endpoints

console = Console()
offline_app = typer.Typer(
    help="Who may go offline with what: roles, profiles, filters.", no_args_is_help=True
)
client_app = typer.Typer(help="The reference device client (SQLite).", no_args_is_help=True)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error[/] {error}")
    return typer.Exit(code=2)


def _org_dsn(org: str) -> str:
    """The staging server the org is placed on."""
    from engine.runtime.placement import StagingServers

    settings = get_settings()
    return StagingServers.from_settings(settings, resolve_endpoints(settings).staging_dsn).dsn_for(
        org
    )


def apply_offline(org_file: Path) -> int:
    """Store an org file's ``offline:`` section; returns the new revision."""
    import psycopg

    from engine.orgfile import load_offline_section, load_org_registration
    from gateway.access import AccessError
    from gateway.store import UnknownOrg, ensure_schema, put_config

    org = load_org_registration(org_file).org
    section = load_offline_section(org_file)
    if section is None:
        raise ConfigError(f"org file {org_file}: no 'offline' section")
    with psycopg.connect(_org_dsn(org), autocommit=True) as conn:
        ensure_schema(conn)
        try:
            _, revision = put_config(conn, org, section)
        except AccessError as error:
            raise ConfigError(f"org file {org_file}: offline.{error}") from None
        except UnknownOrg:
            raise ConfigError(
                f"org {org} is not registered: start the projector with --org-file first"
            ) from None
    return revision


def gateway(
    org_file: Annotated[
        list[Path] | None,
        typer.Option("--org-file", "-o", help="Apply these org files' offline sections first."),
    ] = None,
) -> None:
    """Run a sync gateway (start several behind a load balancer; they share nothing)."""
    from gateway.app import run_gateway

    settings = get_settings()
    try:
        endpoints = resolve_endpoints(settings)
        for path in org_file or []:
            apply_offline(path)
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(
        f"gateway on {'https' if settings.gateway_tls_cert else 'http'}://"
        f"{settings.gateway_host}:{settings.gateway_port}"
    )
    run_gateway(
        settings,
        endpoints.staging_dsn,
        embedded=endpoints.embedded,
        bootstrap_servers=endpoints.bootstrap_servers,
    )


@offline_app.command("set")
def offline_set(org_file: Annotated[Path, typer.Argument(help="Org file (YAML/JSON).")]) -> None:
    """Validate an org file's offline section against staging and store it."""
    try:
        revision = apply_offline(org_file)
    except FieldSyncError as error:
        raise _fail(error) from None
    console.print(f"offline configuration stored (revision {revision})")


@offline_app.command("show")
def offline_show(org: str) -> None:
    """Print an org's offline configuration."""
    import orjson
    import psycopg

    from gateway.store import UnknownOrg, ensure_schema, org_state

    try:
        with psycopg.connect(_org_dsn(org)) as conn:
            ensure_schema(conn)
            _, config, revision = org_state(conn, org)
    except (FieldSyncError, UnknownOrg) as error:
        raise _fail(error) from None
    console.print(f"revision {revision}")
    console.print_json(orjson.dumps(config.model_dump(mode="json")).decode())


def token(
    org: str,
    user: str,
    role: Annotated[list[str] | None, typer.Option("--role", "-r", help="Security role.")] = None,
    team: Annotated[list[str] | None, typer.Option("--team", "-t", help="Team id.")] = None,
    admin: Annotated[bool, typer.Option(help="Add scope fieldsync:admin.")] = False,
    ttl: Annotated[
        int,
        typer.Option(
            help="Seconds until it expires (at most FIELDSYNC_GATEWAY_JWT_MAX_LIFETIME_S).",
            min=1,
        ),
    ] = 3600,
) -> None:
    """Mint an HS256 device (or admin) JWT with the gateway's secret — for development."""
    import jwt

    from gateway.app import dev_jwt_secret

    settings = get_settings()
    if settings.gateway_jwt_secret is not None:
        secret = settings.gateway_jwt_secret.get_secret_value()
    else:
        try:
            if not resolve_endpoints(settings).embedded:
                raise ConfigError("FIELDSYNC_GATEWAY_JWT_SECRET is not set")
        except FieldSyncError as error:
            raise _fail(error) from None
        secret = dev_jwt_secret(settings)
    claims: dict[str, object] = {
        "org": org,
        "sub": user,
        "roles": role or [],
        "teams": team or [],
        "aud": settings.gateway_jwt_audience,
        "iat": int(time.time()),
        "exp": int(time.time()) + ttl,
    }
    if settings.gateway_jwt_issuer:
        claims["iss"] = settings.gateway_jwt_issuer
    if admin:
        claims["scope"] = "fieldsync:admin"
    typer.echo(jwt.encode(claims, secret, algorithm="HS256"))


@client_app.command("sync")
def client_sync(
    org: Annotated[str, typer.Option(help="Organisation.")],
    jwt_token: Annotated[str, typer.Option("--token", help="Device JWT (fieldsync token …).")],
    database: Annotated[Path, typer.Option("--db", help="Local SQLite file.")],
    url: Annotated[str | None, typer.Option(help="Gateway URL.")] = None,
    watch: Annotated[bool, typer.Option(help="Keep syncing with long-polls.")] = False,
    wait: Annotated[float, typer.Option(help="Long-poll seconds with --watch.")] = 30,
) -> None:
    """Sync a device database: bootstrap what is missing, then deltas (and live with --watch)."""
    from device.client import DeviceClient, SyncFailed

    settings = get_settings()
    base = url or f"http://{settings.gateway_host}:{settings.gateway_port}"
    client = DeviceClient(base, org, jwt_token, database)
    try:
        while True:
            report = client.sync(wait=wait if watch else 0)
            counts = {e: len(client.store.rows(e)) for e in client.store.models()}
            console.print(
                f"synced: {report.upserts} upserts, {report.removes} removals, "
                f"bootstrapped {report.bootstrapped or 'nothing'}; local rows {counts}"
            )
            if not watch:
                break
    except SyncFailed as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def mount(app: typer.Typer) -> None:
    app.command()(gateway)
    app.command()(token)
    app.add_typer(offline_app, name="offline")
    app.add_typer(client_app, name="client")
