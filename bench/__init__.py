"""FieldSync benchmarks: ``python -m bench <name>|all|list [--quick]`` (see :mod:`bench.harness`).

Benchmark modules are the other files of this package; they are found by scanning, so adding a
benchmark means adding one module with a ``@benchmark("name")`` function.
"""

from bench.harness import (
    Baseline,
    BenchContext,
    Result,
    Target,
    benchmark,
)

__all__ = ["Baseline", "BenchContext", "Result", "Target", "benchmark"]
