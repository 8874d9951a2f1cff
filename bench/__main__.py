"""``python -m bench <name>|all|list [--quick]``: run benchmarks, print JSON lines, report.

One JSON object per result goes to stdout; progress and errors go to stderr. ``all`` also
writes latest.json, latest.md and plots to ``bench/results/``. The exit status is non-zero
whenever any benchmark (or benchmark module) failed, so a broken benchmark never looks green.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TextIO

from bench.harness import (
    REGISTRY,
    BenchContext,
    BenchOutcome,
    ImportFailure,
    Registry,
    RunSummary,
    Services,
    discover,
    import_outcomes,
    run_benchmarks,
)
from bench.report import RESULTS_DIR

ServicesFactory = Callable[[], AbstractContextManager[Services]]


def _default_services() -> AbstractContextManager[Services]:
    from bench.services import bench_services

    return bench_services()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", help="a benchmark name, 'all' (and write reports) or 'list'")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for smoke runs")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help=f"where 'all' writes (default {RESULTS_DIR})"
    )
    return parser


def _report_import_failures(failures: Sequence[ImportFailure], err: TextIO) -> None:
    for failure in failures:
        print(f"bench: module {failure.module} failed to import: {failure.error}", file=err)
        print(failure.traceback.rstrip(), file=err, flush=True)


def _services_description(services: Services) -> dict[str, Any]:
    """Server version and where the services came from, for latest.json/md."""
    described: dict[str, Any] = {
        "embedded_postgres": getattr(services, "embedded_postgres", None),
        "embedded_broker": getattr(services, "embedded_broker", None),
    }
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(services.pg_dsn, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            described["postgres"] = row[0] if row else None
    return described


def main(
    argv: Sequence[str] | None = None,
    *,
    registry: Registry = REGISTRY,
    package: str | None = "bench",
    services_factory: ServicesFactory = _default_services,
    results_dir: Path = RESULTS_DIR,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit status (0 all ok, 1 something failed, 2 usage)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = _parser().parse_args(argv)
    failures = discover(package) if package else []
    _report_import_failures(failures, err)

    if args.name == "list":
        for name in registry.names():
            print(name, file=out)
        return 1 if failures else 0

    names = registry.names() if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in registry:
        print(
            f"bench: unknown benchmark {args.name!r}; registered: {', '.join(registry.names())}"
            + (" (some modules failed to import, see above)" if failures else ""),
            file=err,
        )
        return 2

    summary = RunSummary(outcomes=import_outcomes(failures))
    services_info: dict[str, Any] = {}
    if names:
        try:
            with services_factory() as services:
                services_info = _services_description(services)
                ctx = BenchContext(quick=args.quick, services=services)
                ran = run_benchmarks(names, ctx, registry=registry, out=out, err=err)
                summary.outcomes += ran.outcomes
        except Exception as error:
            message = f"services failed: {type(error).__name__}: {error}"
            print(f"bench: {message}", file=err, flush=True)
            done = {o.name for o in summary.outcomes}
            summary.outcomes += [
                BenchOutcome(name, "failed", 0.0, error=message)
                for name in names
                if name not in done
            ]

    if args.name == "all":
        from bench.report import write_report

        written = write_report(
            summary, args.results_dir or results_dir, quick=args.quick, services=services_info
        )
        print(f"bench: wrote {', '.join(str(p) for p in written)}", file=err)
    if not summary.ok:
        print(f"bench: FAILED: {', '.join(summary.failed)}", file=err, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
