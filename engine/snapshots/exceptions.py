"""Errors of snapshot building and storage."""

from __future__ import annotations

from engine.exceptions import FieldSyncError


class SnapshotError(FieldSyncError):
    """Root of the snapshot errors."""

    code = "snapshot_error"


class SnapshotSchemaError(SnapshotError):
    """A staging entity that cannot be written as an Avro record (e.g. a column name)."""

    code = "snapshot_schema"


class UnknownEntity(SnapshotError):
    """The org or entity has no staging (nothing was projected yet)."""

    code = "unknown_entity"


class SnapshotNotFound(SnapshotError):
    """No snapshot with that id in the store (pruned, or never built)."""

    code = "snapshot_not_found"
