"""Where the broker and the staging PostgreSQL are: configured, or the running embedded runtime."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Settings
from engine.runtime.embedded import RuntimeInfo
from engine.runtime.exceptions import NoRuntime


def resolve_bootstrap(settings: Settings) -> str:
    """The broker alone (capture needs no staging database)."""
    if settings.bootstrap_servers is not None:
        return settings.bootstrap_servers
    info = RuntimeInfo.read(settings.data_dir.resolve())
    if info is None:
        raise NoRuntime(
            "FIELDSYNC_BOOTSTRAP_SERVERS not set and no embedded runtime is running on "
            f"{settings.data_dir}: start one with `fieldsync up` (or `make up`) or set it"
        )
    return info.bootstrap_servers


@dataclass(frozen=True)
class Endpoints:
    """Resolved addresses every component connects to."""

    staging_dsn: str
    bootstrap_servers: str
    embedded: bool


def resolve_endpoints(settings: Settings) -> Endpoints:
    """Configured endpoints win; otherwise those of the ``fieldsync up`` holding the data dir."""
    info = None
    if settings.uses_embedded_broker or settings.uses_embedded_postgres:
        info = RuntimeInfo.read(settings.data_dir.resolve())
        if info is None:
            missing = [
                name
                for name, unset in (
                    ("FIELDSYNC_BOOTSTRAP_SERVERS", settings.uses_embedded_broker),
                    ("FIELDSYNC_STAGING_DSN", settings.uses_embedded_postgres),
                )
                if unset
            ]
            raise NoRuntime(
                f"{' and '.join(missing)} not set and no embedded runtime is running on "
                f"{settings.data_dir}: start one with `fieldsync up` (or `make up`) or set them"
            )
    staging = (
        settings.staging_dsn.get_secret_value()
        if settings.staging_dsn is not None
        else info.postgres_dsn.rsplit("/", 1)[0] + "/postgres"  # type: ignore[union-attr]
    )
    bootstrap = settings.bootstrap_servers or info.bootstrap_servers  # type: ignore[union-attr]
    return Endpoints(staging_dsn=staging, bootstrap_servers=bootstrap, embedded=info is not None)
