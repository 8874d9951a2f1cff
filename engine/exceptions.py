"""The project's root exception and the retryable/not-retryable split every package follows.

Each subsystem has its own ``exceptions.py`` deriving from :class:`FieldSyncError`. An error
says whether retrying may fix it (a closed connection may; ``wal_level`` not logical will not),
carries a stable ``code`` clients and operators can branch on, and names what it concerns.
"""

from __future__ import annotations


class FieldSyncError(Exception):
    """Root of every error FieldSync raises on purpose."""

    code: str = "fieldsync_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return f"[{self.code}] {self.args[0]}"


class ConfigError(FieldSyncError):
    """Configuration that cannot work; raised at start-up, naming the setting."""

    code = "bad_config"
