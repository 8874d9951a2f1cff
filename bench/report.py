"""What ``python -m bench all`` leaves behind: latest.json, latest.md and PNG plots.

latest.json keeps every record (samples included) with the machine it ran on, for tools;
latest.md is the table a reader scans (no samples); the plots show each benchmark's ratios
against its same-run baselines with the target marked, the distribution of any record
carrying ``samples``, and, for throughput records listing their pipeline's stages
(``details.stages_per_s``), each stage's rate next to the others of the same run. Plots use
matplotlib's Agg canvas directly, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import RunSummary

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PLOT_PREFIXES = ("bench-", "samples-", "stages-")
_MAX_VALUE_PANELS = 8


def machine_info() -> dict[str, Any]:
    """Enough about the machine to tell whether two result files are comparable."""
    memory = psutil.virtual_memory().total
    return {
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "memory_gib": round(memory / 2**30, 1),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(
    summary: RunSummary,
    results_dir: Path = RESULTS_DIR,
    *,
    quick: bool,
    machine: dict[str, Any] | None = None,
    services: dict[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> list[Path]:
    """Write latest.json, latest.md and the plots into ``results_dir``; return the paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    when = (timestamp or datetime.now(UTC)).astimezone(UTC)
    records = summary.records()
    document = {
        "timestamp": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": machine if machine is not None else machine_info(),
        "services": services or {},
        "quick": quick,
        "ok": summary.ok,
        "failed": summary.failed,
        "benchmarks": [
            {
                "name": o.name,
                "status": o.status,
                "elapsed_s": round(o.elapsed_s, 3),
                "results": len(o.results),
                "error": o.error,
                "traceback": o.traceback,
            }
            for o in summary.outcomes
        ],
        "results": records,
    }
    json_path = results_dir / "latest.json"
    _write_atomic(json_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    for stale in results_dir.glob("*.png"):
        if stale.name.startswith(_PLOT_PREFIXES):
            stale.unlink()
    plots = write_plots(records, results_dir)
    md_path = results_dir / "latest.md"
    _write_atomic(md_path, render_markdown(document, [p.name for p in plots]))
    return [json_path, md_path, *plots]


def _write_atomic(path: Path, text: str) -> None:
    """Readers never see half a file (``*.tmp`` is git-ignored in bench/results)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- markdown -----------------------------------------------------------------------------


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:,.2f}"
    return f"{value:.3g}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _target_text(record: dict[str, Any]) -> tuple[str, str]:
    target = record.get("target")
    if not target:
        return "", ""
    label = f"{target['of']} {target['op']} {target['value']:g}"
    if target["of"] == "value":
        label += f" {record['unit']}"
    met = record.get("target_met")
    return label, ("pass" if met else "**FAIL**") if met is not None else ""


def render_markdown(document: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The results table (samples left out: they are in latest.json and the plots)."""
    machine = document["machine"]
    lines = [
        "# FieldSync benchmarks",
        "",
        f"- run: {document['timestamp']}{' (quick)' if document['quick'] else ''}",
        f"- machine: {machine.get('cores')} cores, {machine.get('memory_gib')} GiB, "
        f"{machine.get('cpu')}, Python {machine.get('python')}, {machine.get('platform')}",
    ]
    if document.get("services"):
        described = ", ".join(f"{k}: {v}" for k, v in document["services"].items())
        lines.append(f"- services: {described}")
    lines.append(
        f"- status: {'ok' if document['ok'] else 'FAILED: ' + ', '.join(document['failed'])}"
    )
    lines += [
        "",
        "| Bench | Metric | Value | Baseline | Ratio | Target | Pass |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for record in document["results"]:
        if record.get("status") == "failed":
            lines.append(
                f"| {_cell(record['bench'])} | — | **FAILED** | | | | {_cell(record['error'])} |"
            )
            continue
        value = f"{_number(record['value'])} {record['unit']}"
        baseline = record.get("baseline")
        base = (
            f"{baseline['name']}: {_number(baseline['value'])} {record['unit']}" if baseline else ""
        )
        ratio = f"{record['ratio']:.3f}" if record.get("ratio") is not None else ""
        target, passed = _target_text(record)
        cells = [record["bench"], record["metric"], value, base, ratio, target, passed]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    failures = [b for b in document["benchmarks"] if b["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- `{b['name']}`: {_cell(b['error'])}" for b in failures]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


# --- plots --------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def write_plots(records: Sequence[dict[str, Any]], results_dir: Path) -> list[Path]:
    """One bar chart per benchmark with results, one distribution plot per sampled record."""
    measured = [r for r in records if r.get("status", "ok") == "ok"]
    paths = []
    for bench in dict.fromkeys(r["bench"] for r in measured):
        paths.append(_bench_chart(bench, [r for r in measured if r["bench"] == bench], results_dir))
    for record in measured:
        if record.get("samples"):
            paths.append(_samples_chart(record, results_dir))
    staged = [r for r in measured if r.get("baseline") and _stages(r)]
    for bench in dict.fromkeys(r["bench"] for r in staged):
        paths.append(_stages_chart(bench, [r for r in staged if r["bench"] == bench], results_dir))
    return paths


def _stages(record: dict[str, Any]) -> dict[str, float]:
    stages = (record.get("details") or {}).get("stages_per_s")
    if not isinstance(stages, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in stages.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def _ratio_target(record: dict[str, Any]) -> float | None:
    """The target expressed as a ratio to the baseline, to draw it on the ratio axis."""
    target, baseline = record.get("target"), record.get("baseline")
    if not target:
        return None
    if target["of"] == "ratio":
        return float(target["value"])
    return float(target["value"]) / float(baseline["value"]) if baseline else None


def _bar_colour(record: dict[str, Any]) -> str:
    met = record.get("target_met")
    return "tab:blue" if met is None else ("tab:green" if met else "tab:red")


def _bench_chart(bench: str, records: list[dict[str, Any]], results_dir: Path) -> Path:
    """Ratios vs the baselines (1.0 line, target ticks) plus absolute values without one."""
    with_ratio = [r for r in records if r.get("ratio") is not None]
    without = [r for r in records if r.get("ratio") is None][:_MAX_VALUE_PANELS]
    panels = (1 if with_ratio else 0) + len(without)
    ratio_width = max(4.0, 1.2 * len(with_ratio) + 2) if with_ratio else 0.0
    figure = _new_figure(ratio_width + 3.0 * len(without), 4.5)
    widths = ([ratio_width] if with_ratio else []) + [3.0] * len(without)
    axes = figure.subplots(1, panels, squeeze=False, width_ratios=widths)[0]
    index = 0
    if with_ratio:
        ax = axes[0]
        index = 1
        xs = list(range(len(with_ratio)))
        ratios = [r["ratio"] for r in with_ratio]
        bars = ax.bar(xs, ratios, color=[_bar_colour(r) for r in with_ratio], width=0.6)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in ratios], padding=2)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="baseline = 1.0")
        targets = [(x, _ratio_target(r)) for x, r in zip(xs, with_ratio, strict=True)]
        drawn = [(x, t) for x, t in targets if t is not None]
        if drawn:
            ax.hlines(
                [t for _, t in drawn],
                [x - 0.4 for x, _ in drawn],
                [x + 0.4 for x, _ in drawn],
                colors="black",
                linewidth=3,
                label="target",
            )
        top = max([*ratios, *(t for _, t in drawn), 1.0])
        ax.set_ylim(0, top * 1.2)
        ax.set_xticks(xs, [f"{r['metric']}\nvs {r['baseline']['name']}" for r in with_ratio])
        ax.set_ylabel("ratio to baseline (same run)")
        ax.set_title(f"{bench}: ratio vs baseline")
        ax.legend(loc="upper right", fontsize="small")
    for record, ax in zip(without, axes[index:], strict=True):
        bars = ax.bar([0], [record["value"]], color=_bar_colour(record), width=0.5)
        ax.bar_label(bars, labels=[_number(record["value"])], padding=2)
        target = record.get("target")
        top = record["value"]
        if target and target["of"] == "value":
            ax.axhline(target["value"], color="black", linewidth=3, label=f"target {target['op']}")
            ax.legend(loc="upper right", fontsize="small")
            top = max(top, target["value"])
        ax.set_ylim(0, top * 1.2 if top > 0 else 1)
        ax.set_xticks([0], [record["metric"]])
        ax.set_xlim(-1, 1)
        ax.set_ylabel(record["unit"])
        ax.set_title(f"{bench}: {record['metric']}\n(no baseline)", fontsize="medium")
    return _save(figure, results_dir / f"bench-{_slug(bench)}.png")


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _samples_chart(record: dict[str, Any], results_dir: Path) -> Path:
    """Histogram and empirical CDF of the samples, with p50/p95/p99 and the target marked."""
    samples = sorted(float(s) for s in record["samples"])
    n = len(samples)
    figure = _new_figure(11, 4.2)
    hist_ax, cdf_ax = figure.subplots(1, 2)
    hist_ax.hist(samples, bins=min(60, max(5, n // 20)), color="tab:blue", alpha=0.8)
    hist_ax.set_xlabel(record["unit"])
    hist_ax.set_ylabel("count")
    hist_ax.set_title(f"{record['bench']}: {record['metric']} (n={n})")
    cdf_ax.plot(samples, [(i + 1) / n for i in range(n)], color="tab:blue", drawstyle="steps-post")
    cdf_ax.set_xlabel(record["unit"])
    cdf_ax.set_ylabel("fraction of samples ≤ x")
    cdf_ax.set_ylim(0, 1.02)
    cdf_ax.set_title("CDF")
    for q, style in ((50, ":"), (95, "--"), (99, "-.")):
        value = _percentile(samples, q)
        for ax in (hist_ax, cdf_ax):
            ax.axvline(value, color="gray", linestyle=style, linewidth=1)
        cdf_ax.annotate(
            f"p{q} {_number(value)}",
            (value, q / 100),
            fontsize="small",
            xytext=(4, -12),
            textcoords="offset points",
        )
    target = record.get("target")
    if target and target["of"] == "value":
        for ax in (hist_ax, cdf_ax):
            ax.axvline(target["value"], color="black", linewidth=2, label=f"target {target['op']}")
        cdf_ax.legend(loc="lower right", fontsize="small")
    name = f"samples-{_slug(record['bench'])}-{_slug(record['metric'])}.png"
    return _save(figure, results_dir / name)


def _stages_chart(bench: str, records: list[dict[str, Any]], results_dir: Path) -> Path:
    """Grouped bars: per throughput record, the rate of each stage of its pipeline (the first
    stage offers what the next ones can at most pass on)."""
    names = list(dict.fromkeys(stage for r in records for stage in _stages(r)))
    figure = _new_figure(max(6.0, 1.4 * len(records) * max(1, len(names)) / 3 + 2), 4.5)
    ax = figure.subplots()
    width = 0.8 / max(1, len(names))
    xs = list(range(len(records)))
    for i, stage in enumerate(names):
        values = [_stages(r).get(stage, 0.0) for r in records]
        bars = ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], values, width, label=stage)
        ax.bar_label(bars, labels=[_number(v) for v in values], fontsize="x-small", rotation=90)
    ax.set_xticks(xs, [r["metric"] for r in records], fontsize="small")
    ax.set_ylabel(records[0]["unit"])
    top = max((v for r in records for v in _stages(r).values()), default=1.0)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    ax.set_title(f"{bench}: rate of each stage (same run)")
    ax.legend(loc="upper left", fontsize="small", ncols=len(names))
    return _save(figure, results_dir / f"stages-{_slug(bench)}.png")
