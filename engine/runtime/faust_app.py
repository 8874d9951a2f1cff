"""The faust App settings every FieldSync worker shares (projector, provisioner)."""

from __future__ import annotations

from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TransportT

from engine.config import Settings
from engine.runtime.kafka import faust_options


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust fixes fetch.max.wait.ms at 1,500; a broker that answers a waiting fetch only
        # when the wait runs out (the embedded one does, half-way) then adds that much latency
        wait = cast("FieldSyncApp", self.app).fetch_max_wait_ms
        consumer._fetch_max_wait_ms = wait  # read when the consumer starts
        return consumer


class _Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(aiokafka_driver.Transport):
    Consumer = _Consumer


class FieldSyncApp(faust.App):
    """A faust App whose worker consumer uses the configured fetch wait."""

    fetch_max_wait_ms: int = 1500

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)


def faust_app(settings: Settings, group: str, bootstrap_servers: str, **extra: Any) -> faust.App:
    """Raw bytes in and out, no tables, no web server, topics never declared by faust (they are
    created by FieldSync with their own settings), reads from the start of a new group, and the
    configured rebalance timings (short ones with the embedded broker). faust's own data
    directory goes under the data directory, not the working directory; the consumer waits at
    most ``consumer_fetch_max_wait_ms`` for a fetch."""
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = FieldSyncApp(
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
    app.fetch_max_wait_ms = settings.consumer_fetch_max_wait_ms
    return app


__all__ = ["FieldSyncApp", "faust_app"]
