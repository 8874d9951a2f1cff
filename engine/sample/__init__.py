"""The sample CRM source (schema ``crm``) that the demo, the tests and the benchmarks run on.

:func:`create_source` creates it, :func:`fill` loads it deterministically at a given scale, and
:func:`churn` / :class:`ChangeGenerator` keep changing it at a paced rate.
"""

from engine.sample.generator import (
    CHANGE_KINDS,
    PRIMARY_KEYS,
    RECORD_TABLES,
    SCHEMA,
    TABLES,
    Change,
    ChangeGenerator,
    ChangeMix,
    ChurnStats,
    SampleCounts,
    SampleSourceError,
    churn,
    create_source,
    fill,
    scale,
    schema_sql,
)

__all__ = [
    "CHANGE_KINDS",
    "PRIMARY_KEYS",
    "RECORD_TABLES",
    "SCHEMA",
    "TABLES",
    "Change",
    "ChangeGenerator",
    "ChangeMix",
    "ChurnStats",
    "SampleCounts",
    "SampleSourceError",
    "churn",
    "create_source",
    "fill",
    "scale",
    "schema_sql",
]
