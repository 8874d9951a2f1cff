"""The capture's producer: acks=all, ordered per key, and a flush that proves delivery.

Messages are appended to one open record batch per topic partition (aiokafka's batch API)
and partitioned like the Java client (murmur2 of the key bytes), which spares aiokafka's
per-message future and bookkeeping; a full batch is handed to the sender at once, the rest at
:meth:`ChangeProducer.flush`. aiokafka keeps one batch per partition in flight, so per-key
order holds.

Idempotence is a setting (on for a real Kafka; the embedded broker lacks InitProducerId).
Correctness never depends on it: redelivered events carry the same source position and the
projector applies by position.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from engine.runtime.kafka import client_options
from engine.streams.exceptions import CaptureError

Headers = Sequence[tuple[str, bytes]]


class DeliveryFailed(CaptureError):
    """The broker did not acknowledge a message; the batch is re-sent from the slot."""

    code = "delivery_failed"
    retryable = True


class ChangeProducer:
    """Sends messages and remembers, per topic partition, the highest acknowledged offset."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        idempotent: bool,
        linger_ms: int,
        max_batch_bytes: int,
        client_id: str,
    ) -> None:
        self._options: dict[str, Any] = {
            **client_options(),
            "bootstrap_servers": bootstrap_servers,
            "acks": "all",
            "enable_idempotence": idempotent,
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_bytes,
            "max_request_size": max(max_batch_bytes, 1024 * 1024),
            "client_id": client_id,
            "request_timeout_ms": 30_000,
        }
        self._producer: AIOKafkaProducer | None = None  # made in start(): it binds the loop
        self._pending: list[tuple[asyncio.Future[Any], str, int, int]] = []
        self._open: dict[tuple[str, int], BatchBuilder] = {}
        self._partition_counts: dict[str, int] = {}
        self._round_robin = 0
        self.high_offsets: dict[tuple[str, int], int] = {}
        self.sent = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**self._options)
        try:
            await self._producer.start()
        except KafkaError as error:
            hint = (
                "; the broker may not support idempotent producers (InitProducerId): "
                "set FIELDSYNC_PRODUCER_IDEMPOTENCE=false for such brokers"
                if self._options["enable_idempotence"]
                else ""
            )
            raise DeliveryFailed(
                f"cannot start producing to {self._options['bootstrap_servers']}: {error}{hint}"
            ) from None

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Append to the partition's open batch; the broker has it only after :meth:`flush`."""
        if partition is None:
            count = self._partition_counts.get(topic) or await self._count_partitions(topic)
            if key is None:
                self._round_robin += 1
                partition = self._round_robin % count
            else:
                partition = (murmur2(key) & 0x7FFFFFFF) % count
        slot = (topic, partition)
        builder = self._open.get(slot)
        if builder is None:
            builder = self._open[slot] = self._batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            await self._submit(slot, builder)  # full: hand it over, start the next one
            builder = self._open[slot] = self._batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
                raise DeliveryFailed(
                    f"message of {len(value or b'')} bytes exceeds the batch size ({topic})"
                )
        self.sent += 1

    def _batch(self) -> BatchBuilder:
        assert self._producer is not None, "start() first"
        return self._producer.create_batch()

    async def _count_partitions(self, topic: str) -> int:
        count = len(await self.partitions(topic))
        self._partition_counts[topic] = count
        return count

    async def _submit(self, slot: tuple[str, int], builder: BatchBuilder) -> None:
        assert self._producer is not None
        del self._open[slot]
        count = builder._relative_offset
        builder.close()
        try:
            future = await self._producer.send_batch(builder, slot[0], partition=slot[1])
        except KafkaError as error:
            raise DeliveryFailed(f"cannot send to {slot[0]}[{slot[1]}]: {error}") from None
        self._pending.append((future, slot[0], slot[1], count))

    async def send_and_wait(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        await self.send(topic, key, value)
        await self.flush()

    async def partitions(self, topic: str) -> list[int]:
        assert self._producer is not None, "start() first"
        return sorted(await self._producer.partitions_for(topic))

    async def flush(self) -> None:
        """Wait until the broker acknowledged every message sent so far; raise if any failed."""
        for slot, builder in list(self._open.items()):
            await self._submit(slot, builder)
        pending, self._pending = self._pending, []
        if not pending:
            return
        results = await asyncio.gather(*(future for future, *_ in pending), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self._partition_counts.clear()
            raise DeliveryFailed(
                f"{len(failures)} of {len(results)} batches not acknowledged: {failures[0]!r}"
            )
        marks = self.high_offsets
        for metadata, (_future, topic, partition, count) in zip(results, pending, strict=True):
            assert not isinstance(metadata, BaseException)  # failures were raised above
            last = metadata.offset + count - 1
            if last > marks.get((topic, partition), -1):
                marks[(topic, partition)] = last
