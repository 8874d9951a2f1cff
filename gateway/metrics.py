"""Prometheus metrics of the gateway (served on ``/metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "fieldsync_gateway_requests",
            "Requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fieldsync_gateway_request_seconds",
            "Request latency (a long-poll's wait included).",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.rows_served = Counter(
            "fieldsync_gateway_rows_served",
            "Rows sent to devices, by kind (delta, bootstrap).",
            ["kind"],
            registry=self.registry,
        )
        self.long_polls = Gauge(
            "fieldsync_gateway_active_long_polls",
            "Sync requests waiting for a change.",
            registry=self.registry,
        )


METRICS = GatewayMetrics()
