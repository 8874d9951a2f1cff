"""The benchmark contract: a registry, result records, and a runner that prints JSON lines.

Every benchmark is a function ``(ctx: BenchContext) -> Iterable[Result]`` registered with
``@benchmark("name")`` in any module of the ``bench`` package (found by :func:`discover`, so a
new benchmark only adds a file). The runner prints one JSON object per result line to stdout as
soon as it is measured. A benchmark that raises, yields something that is not a finite
measurement, or lives in a module that does not import is recorded as *failed*, never given a
made-up value, and makes the process exit non-zero.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TextIO

Number = int | float


class Services(Protocol):
    """What a benchmark may connect to (see :func:`bench.services.bench_services`)."""

    @property
    def pg_dsn(self) -> str: ...

    @property
    def bootstrap_servers(self) -> str: ...


def _finite(value: object, what: str) -> float:
    """A real measurement, or a ValueError: NaN/inf/None are never reported as numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Baseline:
    """The reference a value is compared with, measured in the same run (never a constant)."""

    name: str
    value: float

    def __post_init__(self) -> None:
        value = _finite(self.value, f"baseline {self.name!r} value")
        if value == 0:
            raise ValueError(f"baseline {self.name!r} is 0: a ratio against it means nothing")
        object.__setattr__(self, "value", value)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value}


@dataclass(frozen=True)
class Target:
    """A goal the result is judged against, e.g. ``Target(0.5)`` means ratio >= 0.5.

    ``of="value"`` judges the value itself (e.g. a p99 latency ``op="<="`` 50 ms).
    """

    value: float
    of: Literal["ratio", "value"] = "ratio"
    op: Literal[">=", "<="] = ">="

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _finite(self.value, "target value"))
        if self.of not in ("ratio", "value"):
            raise ValueError(f"target 'of' must be 'ratio' or 'value', got {self.of!r}")
        if self.op not in (">=", "<="):
            raise ValueError(f"target 'op' must be '>=' or '<=', got {self.op!r}")

    @property
    def label(self) -> str:
        return f"{self.of} {self.op} {self.value:g}"

    def met_by(self, observed: float) -> bool:
        return observed >= self.value if self.op == ">=" else observed <= self.value

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "of": self.of, "op": self.op}


@dataclass(frozen=True)
class Result:
    """One measured number of one benchmark, with its same-run baseline and optional target.

    ``samples`` (e.g. every latency measured) feed the histogram/CDF plot; ``details`` hold any
    JSON-serialisable extra information (sizes, settings, counts).
    """

    bench: str
    metric: str
    unit: str
    value: float
    baseline: Baseline | None = None
    target: Target | None = None
    details: dict[str, Any] = field(default_factory=dict)
    samples: Sequence[float] | None = None  # stored as a tuple

    def __post_init__(self) -> None:
        if not self.bench or not self.metric:
            raise ValueError("a result needs a bench and a metric name")
        object.__setattr__(self, "value", _finite(self.value, f"{self.bench}/{self.metric} value"))
        if self.baseline is not None and not isinstance(self.baseline, Baseline):
            raise TypeError(f"baseline must be a Baseline, got {self.baseline!r}")
        if self.target is not None:
            if not isinstance(self.target, Target):
                raise TypeError(f"target must be a Target, got {self.target!r}")
            if self.target.of == "ratio" and self.baseline is None:
                raise ValueError(f"{self.bench}/{self.metric}: a ratio target needs a baseline")
        if self.samples is not None:
            samples = tuple(_finite(s, f"{self.bench}/{self.metric} sample") for s in self.samples)
            if not samples:
                raise ValueError(f"{self.bench}/{self.metric}: samples given but empty")
            object.__setattr__(self, "samples", samples)

    @property
    def ratio(self) -> float | None:
        """value / baseline value, or None without a baseline."""
        return None if self.baseline is None else self.value / self.baseline.value

    @property
    def target_met(self) -> bool | None:
        if self.target is None:
            return None
        observed = self.ratio if self.target.of == "ratio" else self.value
        assert observed is not None  # a ratio target without baseline is refused above
        return self.target.met_by(observed)

    def to_dict(self) -> dict[str, Any]:
        """The record of the JSON-lines contract (plus target/details/samples when present)."""
        record: dict[str, Any] = {
            "bench": self.bench,
            "metric": self.metric,
            "unit": self.unit,
            "value": self.value,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "ratio": self.ratio,
        }
        if self.target is not None:
            record["target"] = self.target.to_dict()
            record["target_met"] = self.target_met
        if self.details:
            record["details"] = self.details
        if self.samples is not None:
            record["samples"] = list(self.samples)
        return record

    def to_json(self) -> str:
        """One line of JSON; raises if details are not JSON-serialisable or not finite."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True)
class BenchContext:
    """What a benchmark gets: the --quick flag and the services shared by the whole run."""

    quick: bool
    services: Services


BenchFn = Callable[[BenchContext], Iterable[Result]]


class Registry:
    """Benchmark name -> function; one module-level instance, separate ones in tests."""

    def __init__(self) -> None:
        self._benchmarks: dict[str, BenchFn] = {}

    def benchmark(self, name: str) -> Callable[[BenchFn], BenchFn]:
        """Decorator registering ``fn`` under ``name`` (names are unique across the package)."""
        if not name or name in ("all", "list") or not name.replace("_", "").isalnum():
            raise ValueError(f"invalid benchmark name {name!r} (letters, digits, _; not all/list)")

        def register(fn: BenchFn) -> BenchFn:
            known = self._benchmarks.get(name)
            if known is not None and known is not fn:
                where = f"{known.__module__}.{known.__qualname__}"
                raise ValueError(f"benchmark {name!r} is already registered by {where}")
            self._benchmarks[name] = fn
            return fn

        return register

    def names(self) -> list[str]:
        return list(self._benchmarks)

    def get(self, name: str) -> BenchFn | None:
        return self._benchmarks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._benchmarks


REGISTRY = Registry()
benchmark = REGISTRY.benchmark

# Infrastructure modules of the package: importing them registers nothing.
_NOT_BENCHMARKS = frozenset({"harness", "report", "services"})


@dataclass(frozen=True)
class ImportFailure:
    """A module of the package that could not be imported: its benchmarks are unknown."""

    module: str
    error: str
    traceback: str


def discover(package: str = "bench") -> list[ImportFailure]:
    """Import every module of ``package`` so their ``@benchmark`` decorators run.

    Scanning (rather than a fixed list) means a new benchmark is only a new file. Failures are
    returned, not raised, so the run can record them and still exit non-zero.
    """
    root = importlib.import_module(package)
    failures = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _NOT_BENCHMARKS:
            continue
        module = f"{package}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as error:
            failures.append(
                ImportFailure(module, f"{type(error).__name__}: {error}", traceback.format_exc())
            )
    return failures


@dataclass
class BenchOutcome:
    """How one benchmark (or one module import) ended, with every result it produced."""

    name: str
    status: Literal["ok", "failed"]
    elapsed_s: float
    results: list[Result] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    def records(self) -> list[dict[str, Any]]:
        """Result records for latest.json; a failure adds a record with no value at all."""
        records = [{**r.to_dict(), "status": "ok"} for r in self.results]
        if self.status == "failed":
            records.append(failure_record(self.name, self.error or "failed"))
        return records


def failure_record(name: str, error: str) -> dict[str, Any]:
    """The record of a benchmark that produced no (further) measurement."""
    return {
        "bench": name,
        "metric": None,
        "unit": None,
        "value": None,
        "baseline": None,
        "ratio": None,
        "status": "failed",
        "error": error,
    }


@dataclass
class RunSummary:
    """Everything one ``python -m bench`` invocation measured or failed at."""

    outcomes: list[BenchOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.status == "ok" for o in self.outcomes)

    @property
    def failed(self) -> list[str]:
        return [o.name for o in self.outcomes if o.status == "failed"]

    def records(self) -> list[dict[str, Any]]:
        return [record for outcome in self.outcomes for record in outcome.records()]


def import_outcomes(failures: Sequence[ImportFailure]) -> list[BenchOutcome]:
    """Import failures as failed outcomes named after the module, for the report."""
    return [
        BenchOutcome(
            name=f.module,
            status="failed",
            elapsed_s=0.0,
            error=f"import failed: {f.error}",
            traceback=f.traceback,
        )
        for f in failures
    ]


def _checked(name: str, produced: Iterable[Result]) -> Iterator[Result]:
    if isinstance(produced, Result) or not isinstance(produced, Iterable):
        raise TypeError(f"benchmark {name!r} must return or yield Results, got {produced!r}")
    for item in produced:
        if not isinstance(item, Result):
            raise TypeError(f"benchmark {name!r} produced {item!r}, not a Result")
        if item.bench != name:
            raise ValueError(
                f"benchmark {name!r} produced a result for bench {item.bench!r}; "
                "use the registered name"
            )
        yield item


def run_one(name: str, fn: BenchFn, ctx: BenchContext, *, out: TextIO, err: TextIO) -> BenchOutcome:
    """Run one benchmark, printing each result line to ``out`` as soon as it is measured."""
    print(f"bench: running {name}{' (quick)' if ctx.quick else ''}", file=err, flush=True)
    started = time.perf_counter()
    outcome = BenchOutcome(name=name, status="ok", elapsed_s=0.0)
    try:
        for result in _checked(name, fn(ctx)):
            line = result.to_json()
            outcome.results.append(result)
            print(line, file=out, flush=True)
    except Exception as error:
        outcome.status = "failed"
        outcome.error = f"{type(error).__name__}: {error}"
        outcome.traceback = traceback.format_exc()
        print(f"bench: {name} FAILED: {outcome.error}", file=err, flush=True)
        print(outcome.traceback.rstrip(), file=err, flush=True)
    outcome.elapsed_s = time.perf_counter() - started
    if outcome.status == "ok":
        print(f"bench: {name} done in {outcome.elapsed_s:.1f}s", file=err, flush=True)
    return outcome


def run_benchmarks(
    names: Sequence[str],
    ctx: BenchContext,
    *,
    registry: Registry = REGISTRY,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> RunSummary:
    """Run the named benchmarks in order; an unknown name counts as a failure."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    summary = RunSummary()
    for name in names:
        fn = registry.get(name)
        if fn is None:
            error = f"unknown benchmark {name!r} (registered: {', '.join(registry.names())})"
            print(f"bench: {error}", file=err, flush=True)
            summary.outcomes.append(BenchOutcome(name, "failed", 0.0, error=error))
            continue
        summary.outcomes.append(run_one(name, fn, ctx, out=out, err=err))
    return summary
