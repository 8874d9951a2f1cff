"""The capture's producer: acks=all, ordered per key, and a flush that proves delivery.

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
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
            max_request_size=max(max_batch_bytes, 1024 * 1024),
            client_id=client_id,
            request_timeout_ms=30_000,
        )
        self._pending: list[asyncio.Future[Any]] = []
        self.high_offsets: dict[tuple[str, int], int] = {}
        self.sent = 0

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as error:
            raise DeliveryFailed(f"broker unreachable: {error}") from None

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        try:
            future = await self._producer.send(
                topic, value=value, key=key, partition=partition, headers=list(headers) if headers else None
            )
        except KafkaError as error:
            raise DeliveryFailed(f"cannot send to {topic}: {error}") from None
        self._pending.append(future)
        self.sent += 1

    async def send_and_wait(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        await self.send(topic, key, value)
        await self.flush()

    async def partitions(self, topic: str) -> list[int]:
        return sorted(await self._producer.partitions_for(topic))

    async def flush(self) -> None:
        """Wait until the broker acknowledged every message sent so far; raise if any failed."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        results = await asyncio.gather(*pending, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise DeliveryFailed(f"{len(failures)} of {len(results)} messages not acknowledged: {failures[0]!r}")
        marks = self.high_offsets
        for metadata in results:
            mark = (metadata.topic, metadata.partition)
            if metadata.offset > marks.get(mark, -1):
                marks[mark] = metadata.offset
