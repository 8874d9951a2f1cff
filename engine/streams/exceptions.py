"""Capture failures. Each names the organisation and, where it applies, the entity and column."""

from __future__ import annotations

from engine.exceptions import FieldSyncError


class CaptureError(FieldSyncError):
    """Base of capture failures."""

    code = "capture_error"


class SourceUnreachable(CaptureError):
    """The source PostgreSQL refused or dropped the connection; retrying may fix it."""

    code = "source_unreachable"
    retryable = True


class SourceMisconfigured(CaptureError):
    """The source cannot do logical decoding (wal_level, permissions); an operator must act."""

    code = "source_misconfigured"


class SlotMissing(CaptureError):
    """The replication slot vanished after capture had started: changes may have been lost."""

    code = "slot_missing"


class UnsupportedTable(CaptureError):
    """A table cannot be captured as it is (no primary key, unsupported column type)."""

    code = "unsupported_table"


class ProtocolError(CaptureError):
    """The logical decoding stream held something the decoder does not understand."""

    code = "pgoutput_protocol_error"
