"""The faust App settings every FieldSync worker shares (projector, provisioner)."""

from __future__ import annotations

from typing import Any

import faust

from engine.config import Settings
from engine.runtime.kafka import faust_options


def faust_app(settings: Settings, group: str, bootstrap_servers: str, **extra: Any) -> faust.App:
    """Raw bytes in and out, no tables, no web server, topics never declared by faust (they are
    created by FieldSync with their own settings), reads from the start of a new group, and the
    configured rebalance timings (short ones with the embedded broker). faust's own data
    directory goes under the data directory, not the working directory."""
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    return faust.App(
        group,
        broker=";".join(f"kafka://{server}" for server in bootstrap_servers.split(",")),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        datadir=str(settings.data_dir / "faust" / group),
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        **faust_options(settings),
        **extra,
    )


__all__ = ["faust_app"]
