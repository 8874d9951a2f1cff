"""DDL of the ``fieldsync_control`` schema, serialised.

Workers that start together (two projectors, a provisioner, a gateway) all run the same
``CREATE SCHEMA/TABLE … IF NOT EXISTS``, which PostgreSQL does not make safe against a concurrent
creator (a unique violation on the catalog). One advisory lock, held to the end of the
transaction that creates, turns the race into a queue.
"""

from __future__ import annotations

from typing import Any

import psycopg

LOCK = "fieldsync_control.ddl"


def run_control_ddl(conn: psycopg.Connection[Any], *ddl: str) -> None:
    """Run ``ddl`` under the control-schema lock, in a transaction of its own (a savepoint when
    one is open: the lock is then held until that transaction ends)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOCK,))
        for statement in ddl:
            conn.execute(statement)  # module constants, never input


__all__ = ["LOCK", "run_control_ddl"]
