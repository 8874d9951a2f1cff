"""The benchmark harness: JSON-lines contract, failures that cannot pass, reports and plots."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bench.__main__ import main
from bench.harness import (
    Baseline,
    BenchContext,
    BenchOutcome,
    Registry,
    Result,
    RunSummary,
    Target,
    discover,
    run_benchmarks,
)
from bench.raw_decode import make_update_workload, measure_raw_decode
from bench.report import write_report
from bench.services import BOOTSTRAP_ENV, DSN_ENV, bench_services, scratch_database

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class FakeServices:
    pg_dsn: str = "postgresql://postgres@127.0.0.1:1/postgres"
    bootstrap_servers: str = "127.0.0.1:1"


def fake_services() -> contextlib.AbstractContextManager[FakeServices]:
    return contextlib.nullcontext(FakeServices())


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_result_json_line_has_the_contract_keys_and_ratio() -> None:
    result = Result(
        bench="capture",
        metric="throughput",
        unit="changes/s",
        value=45_000,
        baseline=Baseline("raw_decode", 90_000),
        target=Target(0.4),
        details={"rows": 10},
    )
    record = json.loads(result.to_json())
    assert list(record)[:6] == ["bench", "metric", "unit", "value", "baseline", "ratio"]
    assert record["baseline"] == {"name": "raw_decode", "value": 90_000.0}
    assert record["ratio"] == pytest.approx(0.5)
    assert record["target"] == {"value": 0.4, "of": "ratio", "op": ">="}
    assert record["target_met"] is True
    assert record["details"] == {"rows": 10}
    assert "\n" not in result.to_json()


def test_result_without_baseline_has_null_baseline_and_ratio() -> None:
    record = json.loads(Result("raw_decode", "raw_decode", "changes/s", 1234.5).to_json())
    assert record["baseline"] is None and record["ratio"] is None
    assert "target" not in record and "samples" not in record


def test_value_targets_judge_the_value_itself() -> None:
    fast = Result("sync", "p99", "ms", 40.0, target=Target(50, of="value", op="<="))
    slow = Result("sync", "p99", "ms", 60.0, target=Target(50, of="value", op="<="))
    assert fast.target_met is True and slow.target_met is False


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: Result("b", "m", "u", math.nan), ValueError),
        (lambda: Result("b", "m", "u", math.inf), ValueError),
        (lambda: Result("b", "m", "u", None), TypeError),  # type: ignore[arg-type]
        (lambda: Result("b", "m", "u", True), TypeError),
        (lambda: Baseline("raw", 0.0), ValueError),
        (lambda: Baseline("raw", math.nan), ValueError),
        (lambda: Result("b", "m", "u", 1.0, target=Target(0.5)), ValueError),  # no baseline
        (lambda: Result("b", "m", "u", 1.0, samples=[1.0, math.nan]), ValueError),
        (lambda: Target(1.0, op="=="), ValueError),  # type: ignore[arg-type]
    ],
)
def test_no_fake_numbers_are_accepted(make: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()  # type: ignore[operator]


def test_registry_rejects_duplicates_and_reserved_names() -> None:
    registry = Registry()

    @registry.benchmark("one")
    def one(ctx: BenchContext) -> list[Result]:
        return []

    with pytest.raises(ValueError, match="already registered"):
        registry.benchmark("one")(lambda ctx: [])
    for bad in ("all", "list", "", "has space"):
        with pytest.raises(ValueError):
            registry.benchmark(bad)
    assert registry.names() == ["one"] and "one" in registry


def test_runner_prints_one_json_line_per_result_with_same_run_ratio() -> None:
    registry = Registry()

    @registry.benchmark("pair")
    def pair(ctx: BenchContext) -> Iterator[Result]:
        baseline = Baseline("reference", 200.0)
        yield Result("pair", "fast", "ops/s", 150.0, baseline=baseline)
        yield Result("pair", "slow", "ops/s", 50.0, baseline=baseline, details={"quick": ctx.quick})

    @registry.benchmark("plain")
    def plain(ctx: BenchContext) -> list[Result]:  # returning a list is as good as yielding
        return [Result("plain", "latency", "ms", 3.0)]

    out, err = io.StringIO(), io.StringIO()
    ctx = BenchContext(quick=True, services=FakeServices())
    summary = run_benchmarks(["pair", "plain"], ctx, registry=registry, out=out, err=err)
    assert summary.ok
    lines = _lines(out.getvalue())
    assert [(r["bench"], r["metric"], r["ratio"]) for r in lines] == [
        ("pair", "fast", 0.75),
        ("pair", "slow", 0.25),
        ("plain", "latency", None),
    ]
    assert lines[1]["details"] == {"quick": True}
    assert all(set(r) >= {"bench", "metric", "unit", "value", "baseline", "ratio"} for r in lines)


def _failing_registry() -> Registry:
    registry = Registry()

    @registry.benchmark("good")
    def good(ctx: BenchContext) -> Iterator[Result]:
        yield Result(
            "good", "speed", "ops/s", 10.0, baseline=Baseline("ref", 20.0), target=Target(1)
        )

    @registry.benchmark("boom")
    def boom(ctx: BenchContext) -> Iterator[Result]:
        yield Result("boom", "partial", "ops/s", 5.0)
        raise RuntimeError("server went away")

    @registry.benchmark("nan")
    def nan(ctx: BenchContext) -> Iterator[Result]:
        yield Result("nan", "speed", "ops/s", float("nan"))

    @registry.benchmark("wrong")  # type: ignore[arg-type]  # deliberately not Results
    def wrong(ctx: BenchContext) -> list[object]:
        return [{"value": 1}]

    return registry


def test_a_failing_benchmark_fails_the_run_and_is_recorded(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = main(
        ["all", "--quick"],
        registry=_failing_registry(),
        package=None,
        services_factory=fake_services,
        results_dir=tmp_path,
        out=out,
        err=err,
    )
    assert status == 1
    printed = _lines(out.getvalue())
    assert [(r["bench"], r["metric"]) for r in printed] == [("good", "speed"), ("boom", "partial")]
    assert "boom FAILED: RuntimeError: server went away" in err.getvalue()
    assert "nan FAILED" in err.getvalue() and "wrong FAILED" in err.getvalue()

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["ok"] is False and document["quick"] is True
    assert document["failed"] == ["boom", "nan", "wrong"]
    failed = [r for r in document["results"] if r["status"] == "failed"]
    assert {r["bench"] for r in failed} == {"boom", "nan", "wrong"}
    assert all(r["value"] is None and r["ratio"] is None for r in failed)
    statuses = {b["name"]: b["status"] for b in document["benchmarks"]}
    assert statuses == {"good": "ok", "boom": "failed", "nan": "failed", "wrong": "failed"}
    markdown = (tmp_path / "latest.md").read_text()
    assert "| boom | — | **FAILED** |" in markdown and "server went away" in markdown


def test_a_module_that_does_not_import_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pkg" / "brokenbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "fine.py").write_text("VALUE = 1\n")
    (package / "broken.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    try:
        failures = discover("brokenbench")
        assert [f.module for f in failures] == ["brokenbench.broken"]
        assert "does_not_exist_anywhere" in failures[0].error

        err = io.StringIO()
        status = main(
            ["all"],
            registry=Registry(),
            package="brokenbench",
            services_factory=fake_services,
            results_dir=tmp_path / "results",
            out=io.StringIO(),
            err=err,
        )
        assert status == 1
        assert "module brokenbench.broken failed to import" in err.getvalue()
        document = json.loads((tmp_path / "results" / "latest.json").read_text())
        assert document["failed"] == ["brokenbench.broken"]
        assert main(["list"], registry=Registry(), package="brokenbench", err=err) == 1
    finally:
        for name in [m for m in sys.modules if m.startswith("brokenbench")]:
            del sys.modules[name]


def test_unknown_benchmark_is_a_usage_error(tmp_path: Path) -> None:
    err = io.StringIO()
    status = main(
        ["nope"],
        registry=_failing_registry(),
        package=None,
        services_factory=fake_services,
        err=err,
    )
    assert status == 2 and "unknown benchmark 'nope'" in err.getvalue()


def test_single_benchmark_run_prints_lines_and_writes_no_report(tmp_path: Path) -> None:
    out = io.StringIO()
    status = main(
        ["good"],
        registry=_failing_registry(),
        package=None,
        services_factory=fake_services,
        results_dir=tmp_path,
        out=out,
        err=io.StringIO(),
    )
    assert status == 0
    assert [r["metric"] for r in _lines(out.getvalue())] == ["speed"]
    assert not list(tmp_path.iterdir())


def test_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    baseline = Baseline("raw_decode", 100_000.0)
    summary = RunSummary(
        outcomes=[
            BenchOutcome(
                "capture",
                "ok",
                12.5,
                results=[
                    Result("capture", "throughput", "changes/s", 60_000, baseline, Target(0.5)),
                    Result("capture", "snapshot", "rows/s", 30_000, Baseline("copy", 90_000)),
                    Result("capture", "lag_p99", "ms", 80, target=Target(100, "value", "<=")),
                ],
            ),
            BenchOutcome(
                "sync",
                "ok",
                3.0,
                results=[
                    Result(
                        "sync",
                        "delta_latency_p99",
                        "ms",
                        12.0,
                        baseline=Baseline("plain_select", 4.0),
                        target=Target(2.0, of="ratio", op="<="),
                        samples=[float(i % 17) for i in range(500)],
                    )
                ],
            ),
            BenchOutcome("broken", "failed", 0.1, error="RuntimeError: no | way"),
        ]
    )
    written = write_report(summary, tmp_path, quick=True, services={"postgres": "18.1"})
    names = {p.name for p in written}
    assert {"latest.json", "latest.md", "bench-capture.png", "bench-sync.png"} <= names
    assert "samples-sync-delta_latency_p99.png" in names
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.tmp"))

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["timestamp"].endswith("Z") and document["quick"] is True
    assert {"cores", "memory_bytes", "python", "platform"} <= set(document["machine"])
    assert len(document["results"]) == 5
    sampled = next(r for r in document["results"] if r["metric"] == "delta_latency_p99")
    assert len(sampled["samples"]) == 500 and sampled["ratio"] == 3.0
    assert sampled["target_met"] is False

    markdown = (tmp_path / "latest.md").read_text()
    assert "samples" not in markdown.split("## Plots")[0]
    assert (
        "| capture | throughput | 60,000 changes/s | raw_decode: 100,000 changes/s | 0.600 |"
        in (markdown)
    )
    assert "| ratio >= 0.5 | pass |" in markdown
    assert "| value <= 100 ms | pass |" in markdown
    assert "| ratio <= 2 | **FAIL** |" in markdown
    assert "no \\| way" in markdown
    assert "![bench-capture.png](bench-capture.png)" in markdown

    # A second run replaces stale plots instead of accumulating them.
    write_report(RunSummary(outcomes=summary.outcomes[:1]), tmp_path, quick=False)
    assert not (tmp_path / "bench-sync.png").exists()


def test_services_come_from_the_environment_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DSN_ENV, "postgresql://somewhere/postgres")
    monkeypatch.setenv(BOOTSTRAP_ENV, "somewhere:9092")
    with bench_services() as services:
        assert services.pg_dsn == "postgresql://somewhere/postgres"
        assert services.bootstrap_servers == "somewhere:9092"
        assert not services.embedded_postgres and not services.embedded_broker


def test_raw_decode_counts_only_row_changes_and_checks_them(pg_admin_dsn: str) -> None:
    with scratch_database(pg_admin_dsn, "bench_test") as dsn:

        def create_slot() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE PUBLICATION pub FOR TABLE visits")
                conn.execute("SELECT pg_create_logical_replication_slot('slot', 'pgoutput')")

        make_update_workload(
            dsn, "visits", rows=300, updates=1_050, txn_size=100, before_updates=create_slot
        )
        with psycopg.connect(dsn) as conn:
            types = conn.execute(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'visits' ORDER BY ordinal_position"
            ).fetchall()
            assert conn.execute("SELECT count(*) FROM visits").fetchone() == (300,)
        assert [t for (t,) in types] == [
            "bigint",
            "integer",
            "bigint",
            "text",
            "numeric",
            "timestamp with time zone",
            "boolean",
            "double precision",
            "character varying",
            "date",
        ]
        rate = measure_raw_decode(dsn, "slot", "pub", 1_050)  # the 300 inserts came before
        assert rate > 0 and math.isfinite(rate)
        with pytest.raises(RuntimeError, match="returned 1050 row changes, expected 1000"):
            measure_raw_decode(dsn, "slot", "pub", 1_000)
        database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(pg_admin_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (database,)
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = %s", (database,)
        ).fetchone() == (0,)


def test_python_m_bench_list_discovers_the_package() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "bench", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "raw_decode" in listed.stdout.split()


def test_services_that_do_not_start_fail_every_benchmark(tmp_path: Path) -> None:
    @contextlib.contextmanager
    def broken_services() -> Iterator[FakeServices]:
        raise RuntimeError("PostgreSQL did not start")
        yield FakeServices()

    err = io.StringIO()
    status = main(
        ["all"],
        registry=_failing_registry(),
        package=None,
        services_factory=broken_services,
        results_dir=tmp_path,
        out=io.StringIO(),
        err=err,
    )
    assert status == 1 and "PostgreSQL did not start" in err.getvalue()
    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["failed"] == ["good", "boom", "nan", "wrong"]
    assert not [r for r in document["results"] if r["status"] == "ok"]
