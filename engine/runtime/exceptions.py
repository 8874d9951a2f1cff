"""Failures of the embedded runtime and of endpoint discovery."""

from engine.exceptions import FieldSyncError


class RuntimeStartError(FieldSyncError):
    """An embedded service did not come up; the message quotes its log."""

    code = "runtime_start_failed"


class AlreadyRunning(FieldSyncError):
    """Another ``fieldsync up`` holds the data directory."""

    code = "runtime_already_running"


class NoRuntime(FieldSyncError):
    """Neither external endpoints are configured nor an embedded runtime is running."""

    code = "runtime_not_running"
