"""Decoder of PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1).

Input is the ``data`` column of ``pg_logical_slot_peek_binary_changes(..., 'proto_version',
'1', 'publication_names', ...)``: one message per row. The message formats are those of the
PostgreSQL documentation, "Logical Replication Message Formats". Column values arrive in text
form; turning them into typed values is the job of :mod:`engine.streams.pgtypes`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from engine.streams.exceptions import ProtocolError

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_INT8 = struct.Struct("!q")
_INT32 = struct.Struct("!i")
_INT16 = struct.Struct("!h")
_BEGIN = struct.Struct("!qqi")
_COMMIT = struct.Struct("!bqqq")
_COLUMN_TAIL = struct.Struct("!ii")


class Unchanged:
    """An unchanged TOASTed value the WAL does not carry (update with REPLICA IDENTITY DEFAULT)."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = Unchanged()

#: A tuple's values in column order: text bytes, None for NULL, or UNCHANGED_TOAST.
TupleValues = list[bytes | Unchanged | None]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the transaction's commit LSN
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: TupleValues


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    old: TupleValues | None  # key columns ('K') or whole row ('O'), when the WAL has them
    old_is_key_only: bool
    new: TupleValues


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: TupleValues
    old_is_key_only: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Ignored:
    """Origin and Type messages: nothing capture acts on."""

    kind: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | LogicalMessage | Ignored


def pg_timestamp(micros: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=micros)


def _cstring(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(0, offset)
    return data[offset:end].decode(), end + 1


def _tuple(data: bytes, offset: int) -> tuple[TupleValues, int]:
    (count,) = _INT16.unpack_from(data, offset)
    offset += 2
    values: TupleValues = []
    append = values.append
    for _ in range(count):
        kind = data[offset]
        offset += 1
        if kind == 0x74 or kind == 0x62:  # 't' text / 'b' binary
            (length,) = _INT32.unpack_from(data, offset)
            offset += 4
            append(data[offset : offset + length])
            offset += length
        elif kind == 0x6E:  # 'n'
            append(None)
        elif kind == 0x75:  # 'u'
            append(UNCHANGED_TOAST)
        else:
            raise ProtocolError(f"unknown tuple column kind {chr(kind)!r}")
    return values, offset


def decode(data: bytes) -> Message:
    """Decode one pgoutput message."""
    kind = data[0]
    if kind == 0x49:  # 'I'
        (relation_id,) = _INT32.unpack_from(data, 1)
        if data[5] != 0x4E:
            raise ProtocolError(f"insert without new tuple (marker {chr(data[5])!r})")
        new, _ = _tuple(data, 6)
        return Insert(relation_id, new)
    if kind == 0x55:  # 'U'
        (relation_id,) = _INT32.unpack_from(data, 1)
        marker = data[5]
        old: TupleValues | None = None
        offset = 6
        if marker in (0x4B, 0x4F):  # 'K' / 'O'
            old, offset = _tuple(data, offset)
            marker = data[offset]
            offset += 1
        if marker != 0x4E:
            raise ProtocolError(f"update without new tuple (marker {chr(marker)!r})")
        new, _ = _tuple(data, offset)
        return Update(relation_id, old, data[5] == 0x4B, new)
    if kind == 0x44:  # 'D'
        (relation_id,) = _INT32.unpack_from(data, 1)
        marker = data[5]
        if marker not in (0x4B, 0x4F):
            raise ProtocolError(f"delete without old tuple (marker {chr(marker)!r})")
        old, _ = _tuple(data, 6)
        return Delete(relation_id, old, marker == 0x4B)
    if kind == 0x42:  # 'B'
        final_lsn, commit_ts, xid = _BEGIN.unpack_from(data, 1)
        return Begin(final_lsn, pg_timestamp(commit_ts), xid & 0xFFFFFFFF)
    if kind == 0x43:  # 'C'
        _flags, commit_lsn, end_lsn, commit_ts = _COMMIT.unpack_from(data, 1)
        return Commit(commit_lsn, end_lsn, pg_timestamp(commit_ts))
    if kind == 0x52:  # 'R'
        return _relation(data)
    if kind == 0x54:  # 'T'
        (count,) = _INT32.unpack_from(data, 1)
        options = data[5]
        ids = struct.unpack_from(f"!{count}i", data, 6)
        return Truncate(tuple(ids), bool(options & 1), bool(options & 2))
    if kind == 0x4D:  # 'M'
        flags = data[1]
        (lsn,) = _INT8.unpack_from(data, 2)
        prefix, offset = _cstring(data, 10)
        (length,) = _INT32.unpack_from(data, offset)
        content = data[offset + 4 : offset + 4 + length]
        return LogicalMessage(bool(flags & 1), lsn, prefix, bytes(content))
    if kind in (0x4F, 0x59):  # 'O' origin, 'Y' type
        return Ignored(chr(kind))
    raise ProtocolError(f"unknown pgoutput message {chr(kind)!r}")


def _relation(data: bytes) -> Relation:
    (relation_id,) = _INT32.unpack_from(data, 1)
    namespace, offset = _cstring(data, 5)
    name, offset = _cstring(data, offset)
    identity = chr(data[offset])
    (count,) = _INT16.unpack_from(data, offset + 1)
    offset += 3
    columns = []
    for _ in range(count):
        flags = data[offset]
        column_name, offset = _cstring(data, offset + 1)
        type_oid, modifier = _COLUMN_TAIL.unpack_from(data, offset)
        offset += 8
        columns.append(Column(column_name, type_oid, modifier, bool(flags & 1)))
    return Relation(relation_id, namespace or "pg_catalog", name, identity, tuple(columns))


def format_lsn(lsn: int) -> str:
    """The ``X/Y`` text form PostgreSQL uses for an LSN."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)
