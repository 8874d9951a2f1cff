"""Prometheus metrics of the projector (served when FIELDSYNC_PROJECTOR_METRICS_PORT is set)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram


@dataclass(frozen=True)
class ProjectorMetrics:
    events: Counter
    batch_size: Histogram
    watermark: Gauge
    dead_lettered: Counter
    lag: Gauge


METRICS = ProjectorMetrics(
    events=Counter("fieldsync_projector_events", "Change messages consumed"),
    batch_size=Histogram(
        "fieldsync_projector_batch_size",
        "Messages per applied batch",
        buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
    ),
    watermark=Gauge(
        "fieldsync_projector_watermark", "Highest committed change version", ["org", "entity"]
    ),
    dead_lettered=Counter(
        "fieldsync_projector_dead_lettered",
        "Messages sent to a dead-letter topic",
        ["org", "reason"],
    ),
    lag=Gauge(
        "fieldsync_projector_lag",
        "Messages behind the end of the partition",
        ["topic", "partition"],
    ),
)
