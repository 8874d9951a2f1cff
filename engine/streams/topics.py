"""Topic names and their creation: the one place that knows how topics are called."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from engine.runtime.kafka import client_options
from engine.streams.framing import SCHEMA_TOPIC
from engine.streams.schemas import TOPIC_PREFIX


def change_topic(org: str, entity: str) -> str:
    return f"{TOPIC_PREFIX}.{org}.{entity}"


def transaction_topic(org: str) -> str:
    return f"{TOPIC_PREFIX}.{org}.transaction"


def dead_letter_topic(org: str | None) -> str:
    return f"{TOPIC_PREFIX}.{org}.dlq" if org else f"{TOPIC_PREFIX}.dlq"


class TopicAdmin:
    """Creates and inspects topics (kafka-python's admin client: low rate, simple API)."""

    def __init__(self, bootstrap_servers: str, *, partitions: int, replication_factor: int) -> None:
        self._admin = KafkaAdminClient(
            **client_options(), bootstrap_servers=bootstrap_servers, client_id="fieldsync-admin"
        )
        self.partitions = partitions
        self.replication_factor = replication_factor

    def existing(self) -> set[str]:
        return set(self._admin.list_topics())

    def ensure(
        self,
        topics: Iterable[str],
        *,
        compacted: Iterable[str] = (),
        partitions: dict[str, int] | None = None,
    ) -> None:
        """Create the topics that do not exist yet (compacted ones with cleanup.policy=compact)."""
        compact = set(compacted)
        wanted = set(topics) | compact
        missing = sorted(wanted - self.existing())
        if not missing:
            return
        new = [
            NewTopic(
                name,
                (partitions or {}).get(name, self.partitions),
                self.replication_factor,
                topic_configs={"cleanup.policy": "compact"} if name in compact else {},
            )
            for name in missing
        ]
        # created concurrently by another worker: fine
        with contextlib.suppress(TopicAlreadyExistsError):
            self._admin.create_topics(new)

    def delete(self, topics: Iterable[str]) -> None:
        present = sorted(set(topics) & self.existing())
        if present:
            self._admin.delete_topics(present)

    def close(self) -> None:
        self._admin.close()


def schema_topic_spec() -> tuple[str, int]:
    """The schema topic: compacted, one partition (readers want every schema in order)."""
    return SCHEMA_TOPIC, 1
