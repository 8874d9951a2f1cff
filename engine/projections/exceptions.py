"""Projection failures.

The projector separates two kinds: a message that can never be applied (a :class:`DecodeError`,
which goes to the dead-letter topic with its ``reason`` as a header, so the partition keeps
moving) and a failure of something the projector depends on (retryable: the message is fine,
try again later, never dead-letter it).
"""

from __future__ import annotations

from typing import Final

from engine.exceptions import FieldSyncError
from engine.projections.model import Origin


class ProjectionError(FieldSyncError):
    """Base of projection failures."""

    code = "projection_error"


#: Every ``DecodeError.reason``; stable strings, used as dead-letter headers and metric labels.
DECODE_REASONS: Final = frozenset(
    {
        "bad_magic",  # the bytes are in no framing we read
        "unknown_schema",  # fingerprint / registry id not found
        "undecodable",  # Avro or JSON that does not parse, or a value of the wrong type
        "missing_op",  # envelope without "op"
        "bad_op",  # "op" that is not c, u, d, r or t
        "missing_key",  # a non-truncate change without a key
        "bad_envelope",  # before/after missing where the op needs it, no source or position
        "type_overflow",  # a value outside its declared type (int16, int32, dates...)
        "oversized",  # larger than the configured maximum
        "unknown_org",  # topic that routes to no organisation/entity
        "bad_value",  # a value its staging column cannot hold (NUL in text, JSON that does
        # not parse, a uuid that is none); staging's refusals of this kind too
    }
)


class DecodeError(ProjectionError):
    """A message that cannot become a change event; retrying will not help.

    ``reason`` is one of :data:`DECODE_REASONS` (for machines: the dead-letter header);
    the message names topic, partition and offset (for people).
    """

    code = "undecodable_message"

    def __init__(self, reason: str, detail: str, origin: Origin | None = None) -> None:
        if reason not in DECODE_REASONS:  # pragma: no cover - programming error
            raise ValueError(f"unknown decode reason {reason!r}")
        where = (
            f"{origin.topic} partition {origin.partition} offset {origin.offset}: "
            if origin is not None
            else ""
        )
        super().__init__(f"{where}{detail} ({reason})", retryable=False)
        self.reason = reason
        self.detail = detail
        self.origin = origin


class SchemaUnavailable(ProjectionError):
    """The schema registry could not be asked (down, 5xx): the message may be fine; retry."""

    code = "schema_registry_unavailable"
    retryable = True
