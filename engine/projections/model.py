"""The projector's input, independent of the wire format it came in.

Every accepted input — FieldSync's own change topics (Avro single-object), Debezium's Avro in
Confluent wire format, Debezium's JSON converter with or without embedded schemas — is decoded
into :class:`ChangeEvent`: values already in the Python types psycopg writes (``Decimal``,
``datetime``, ``date``, ``time``, ``bytes``, lists, JSON as text), the row's shape as staging
column types, and a :class:`Position` that totally orders an org's changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class Unavailable:
    """Debezium's ``__debezium_unavailable_value``: the source did not send this column
    (unchanged TOASTed value); staging keeps what it has."""

    _instance: Unavailable | None = None

    def __new__(cls) -> Unavailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = Unavailable()


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Source position: (commit LSN, change LSN). Larger is newer; equal is the same change."""

    commit_lsn: int
    lsn: int


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A staging column: name, PostgreSQL type (e.g. ``numeric(12,2)``, ``text[]``), key flag."""

    name: str
    pg_type: str
    is_key: bool


@dataclass(frozen=True, slots=True)
class EntityShape:
    """The columns of one entity as one event describes them (one schema version)."""

    columns: tuple[ColumnSpec, ...]

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the message was read: what a dead letter or an error names."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One decoded change.

    ``op`` is ``c``, ``u``, ``d``, ``r`` or ``t``. ``key`` holds the key columns (None for a
    truncate); ``before``/``after`` hold whole rows as the source sent them, values possibly
    :data:`UNAVAILABLE`. ``epoch`` is the capture epoch header when the producer set one.
    """

    org: str
    entity: str
    op: str
    key: dict[str, Any] | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    position: Position
    shape: EntityShape
    source_ts_ms: int
    origin: Origin
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A Kafka tombstone (null value): compaction's business, nothing to apply."""

    origin: Origin
