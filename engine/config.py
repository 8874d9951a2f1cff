"""Settings, read once at start-up from ``FIELDSYNC_*`` environment variables and ``.env``.

One frozen object is built by :func:`load_settings`; nothing else reads ``os.environ``.
A bad value fails at boot with a message naming the setting (see :class:`ConfigError`).
Left unset, the broker and staging settings mean "use the embedded runtime" (``fieldsync up``).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.exceptions import ConfigError

ENV_PREFIX = "FIELDSYNC_"


class Settings(BaseSettings):
    """Every tunable of a FieldSync process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    data_dir: Path = Field(
        default=Path(".fieldsync"),
        description="Embedded PostgreSQL data, runtime state, logs and snapshot files.",
    )
    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers (host:port[,host:port]); unset = embedded broker.",
    )
    staging_dsn: SecretStr | None = Field(
        default=None,
        description="PostgreSQL DSN of the staging/control database; unset = embedded PostgreSQL.",
    )
    staging_servers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="More staging PostgreSQL servers as JSON {name: dsn}; each new org is placed "
        "on the server (this one or the main one, named 'main') holding the fewest orgs.",
    )
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible schema registry; set = Confluent wire format, "
        "unset = Avro single-object encoding with schemas on the schema topic.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How every Kafka client connects to the brokers."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="SCRAM-SHA-512", description="SASL mechanism (with SASL_* protocols)."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (or from a file: FIELDSYNC_SECRETS_DIR)."
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle that signs the brokers' certificates (SSL)."
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="Client certificate for mutual TLS (with the key file)."
    )
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client private key.")
    producer_idempotence: bool | None = Field(
        default=None,
        description="Idempotent producer; unset = on for an external broker, off for the "
        "embedded one (it does not implement InitProducerId).",
    )
    producer_linger_ms: int = Field(default=5, ge=0, le=10_000)
    producer_max_batch_bytes: int = Field(default=256 * 1024, ge=1024)
    topic_partitions: int = Field(default=3, ge=1, le=1024)
    topic_replication_factor: int = Field(default=1, ge=1, le=16)

    embedded_pg_port: int = Field(default=54329, ge=1, le=65535)
    embedded_broker_port: int = Field(default=19092, ge=1, le=65535)

    capture_batch_changes: int = Field(
        default=20_000, ge=1, description="Changes decoded per logical-decoding call."
    )
    capture_poll_interval_s: float = Field(default=0.2, gt=0, le=60)
    capture_heartbeat_interval_s: float = Field(default=10.0, gt=0)
    snapshot_chunk_rows: int = Field(default=5_000, ge=1)

    projector_group: str = Field(
        default="fieldsync-projector", description="Consumer group of projector workers."
    )
    projector_batch_size: int = Field(default=2_000, ge=1, le=100_000)
    projector_batch_within_s: float = Field(default=0.2, gt=0, le=60)
    projector_topic_refresh_s: float = Field(default=5.0, gt=0)
    projector_max_message_bytes: int = Field(default=1_048_576, ge=1024)
    retention_purge_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="How often each projector worker purges below the horizon.",
    )
    fault_point: str | None = Field(
        default=None,
        pattern=r"^[a-z_]+:[1-9][0-9]*(:stop)?$",
        description="Testing only: the projector exits (or stops) at <point>:<n>[:stop] "
        "(engine/projections/faults.py); unset in production.",
    )
    projector_uvloop: bool = Field(
        default=True, description="Run the projector worker on uvloop (about 30% more events/s)."
    )
    projector_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    projector_metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the projector's metrics listener binds (0.0.0.0: every interface, "
        "for a Prometheus in another container or host).",
    )
    projector_breaker_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Error-rate breaker: when more than this share of an org's latest events "
        "fail (would be dead-lettered), the projector stops the org (error_rate_exceeded) "
        "instead; 1 turns the breaker off.",
    )
    projector_breaker_window: int = Field(
        default=1000, ge=1, description="Events per org (the latest) the breaker measures."
    )
    projector_breaker_min_events: int = Field(
        default=100,
        ge=1,
        description="Events an org's window must hold before the breaker may stop it.",
    )
    projector_stall_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="A worker whose agent has handled nothing this long while its partitions "
        "stay behind the broker's end restarts itself (faust's consumer can stop fetching "
        "silently); 0 = never.",
    )
    projector_idle_transaction_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A projector's staging transaction idle this long is ended by PostgreSQL, "
        "releasing its locks: a worker paused mid-batch (a zombie) cannot hold the entities of "
        "the partitions the group gave to others.",
    )
    broker_rebalance_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Consumer-group rebalance timeout (the embedded broker waits it out: use ~5).",
    )
    consumer_fetch_max_wait_ms: int = Field(
        default=1500,
        ge=1,
        le=60_000,
        description="Longest a worker's fetch waits on the broker for data (Kafka's "
        "fetch.max.wait.ms). Kafka answers a waiting fetch as data arrives; a broker that "
        "answers only when the wait runs out adds up to this much latency per hop (the e2e "
        "figures were measured with 100).",
    )
    broker_session_timeout_s: float = Field(default=30.0, gt=0)
    broker_heartbeat_interval_s: float = Field(default=3.0, gt=0)

    provisioning_partitions: int = Field(
        default=6,
        ge=1,
        le=1024,
        description="Partitions of fieldsync.provisioning (orgs are keys).",
    )
    provisioner_group: str = Field(
        default="fieldsync-provisioner", min_length=1, description="Provisioner consumer group."
    )
    provisioner_reconcile_s: float = Field(
        default=2.0, gt=0, le=600, description="How often a provisioner reconciles its captures."
    )
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway binds.")
    gateway_port: int = Field(default=8765, ge=1, le=65535)
    gateway_domain: str | None = Field(
        default=None,
        description="Devices reach <org>.<domain> (DNS routing by org); unset = /orgs/<org>/ only.",
    )
    gateway_jwt_secret: SecretStr | None = Field(
        default=None, description="Shared HS256 secret that signs device and admin JWTs."
    )
    gateway_jwks: str | None = Field(
        default=None,
        description="JWKS file path or https URL with the RS256/ES256 keys that sign JWTs.",
    )
    gateway_jwt_audience: str = Field(default="fieldsync", min_length=1)
    gateway_jwt_issuer: str | None = Field(default=None)
    gateway_jwt_max_lifetime_s: float = Field(
        default=86_400.0,
        gt=0,
        description="Longest JWT lifetime accepted: exp - iat, or exp - now without iat.",
    )
    gateway_jwks_cache_s: float = Field(
        default=300.0,
        gt=0,
        description="Keys of a JWKS URL are fetched again when older than this; a key removed "
        "from the JWKS is refused after it.",
    )
    gateway_jwks_min_refetch_s: float = Field(
        default=60.0,
        ge=0,
        description="Least time between two fetches of a JWKS URL (an unknown kid fetches "
        "early, at most this often).",
    )
    gateway_admin_enabled: bool = Field(
        default=False,
        description="Serve the admin API (/admin/…, /orgs/<org>/admin/…) on the gateway's "
        "listener; off = those routes do not exist there.",
    )
    gateway_metrics_enabled: bool = Field(
        default=False, description="Serve Prometheus /metrics on the gateway's listener."
    )
    gateway_token_secret: SecretStr | None = Field(
        default=None,
        description="Signs sync tokens; every gateway of a deployment needs the same one. "
        "Unset = a random secret kept in the data directory.",
    )
    gateway_page_rows: int = Field(default=1000, ge=1, le=100_000)
    gateway_max_wait_s: float = Field(default=60.0, gt=0, le=3600)
    gateway_tls_cert: Path | None = Field(default=None)
    gateway_tls_key: Path | None = Field(default=None)

    snapshot_dir: Path | None = Field(
        default=None, description="Staging snapshot files; unset = <data_dir>/snapshots."
    )
    snapshot_interval_s: float | None = Field(
        default=None, gt=0, description="`fieldsync snapshot schedule` period; unset = none."
    )
    snapshot_keep: int = Field(default=3, ge=1, description="Snapshots kept per entity.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="Console log lines: readable text or one JSON object each."
    )
    log_dir: Path | None = Field(
        default=None,
        description="Rotating JSON log files of the long-running processes; unset = "
        "<data_dir>/logs.",
    )
    log_file_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="Rotate at.")
    log_file_count: int = Field(default=5, ge=1, description="Rotated files kept per process.")

    @field_validator("bootstrap_servers", "schema_registry_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {server.strip()!r}")
        return value

    @field_validator("staging_servers")
    @classmethod
    def _server_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in value:
            if name == "main" or not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", name):
                raise ValueError(
                    f"server name {name!r}: expected a lowercase identifier other than 'main'"
                )
        return value

    @field_validator("gateway_jwks", "gateway_domain", "gateway_jwt_issuer")
    @classmethod
    def _blank_gateway_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"FIELDSYNC_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "FIELDSYNC_KAFKA_SASL_USERNAME and FIELDSYNC_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError(
                "FIELDSYNC_KAFKA_SSL_CERTFILE and FIELDSYNC_KAFKA_SSL_KEYFILE go together"
            )
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: no such file {path}")
        return self

    @property
    def uses_embedded_broker(self) -> bool:
        return self.bootstrap_servers is None

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.staging_dsn is None

    @property
    def effective_idempotence(self) -> bool:
        if self.producer_idempotence is not None:
            return self.producer_idempotence
        return not self.uses_embedded_broker


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        if not problem["loc"]:  # a check across settings: its message names them
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
            continue
        name = ENV_PREFIX + "_".join(str(p) for p in problem["loc"]).upper()
        lines.append(f"{name}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Build the settings once; a bad value raises :class:`ConfigError` naming the variable.

    ``FIELDSYNC_SECRETS_DIR`` names a directory of secret files (Docker/Kubernetes secrets): a
    file named after a variable, e.g. ``fieldsync_staging_dsn``, provides its value."""
    secrets_dir = os.environ.get(f"{ENV_PREFIX}SECRETS_DIR")
    if secrets_dir and not Path(secrets_dir).is_dir():
        raise ConfigError(f"{ENV_PREFIX}SECRETS_DIR: no such directory {secrets_dir}")
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[arg-type,call-arg]
    except ValidationError as error:
        raise ConfigError(f"invalid configuration: {_describe(error)}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read on first use, then frozen)."""
    return load_settings()
