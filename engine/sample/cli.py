"""Shell commands for the sample CRM source: ``create``, ``fill`` and ``churn``.

A typer sub-app; the main CLI mounts it (and may give ``--dsn`` a default from the settings).
Each command prints a short rich summary so that a demo or benchmark log shows what was done.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import psycopg
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.exceptions import FieldSyncError
from engine.sample.generator import CHANGE_KINDS, ROW_OPS, ChurnStats, SampleCounts, create_source
from engine.sample.generator import churn as churn_source
from engine.sample.generator import fill as fill_source

app = typer.Typer(
    help="The sample CRM source (schema crm): create it, fill it, keep changing it.",
    no_args_is_help=True,
)
console = Console()

Dsn = Annotated[
    str, typer.Option("--dsn", help="PostgreSQL DSN of the source database.", show_default=False)
]
Seed = Annotated[int, typer.Option("--seed", help="Same seed, same rows / same changes.")]

R = TypeVar("R")


def _run(action: Callable[[], R]) -> R:
    """Run ``action``; a FieldSync or PostgreSQL error becomes one red line and exit code 1."""
    try:
        return action()
    except (FieldSyncError, psycopg.Error) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None


@contextmanager
def _ctrl_c_sets(stop: threading.Event) -> Iterator[None]:
    """While inside, Ctrl-C asks churn to stop after its current transaction."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command()
def create(dsn: Dsn) -> None:
    """Create schema crm and its tables if they are missing (safe to repeat)."""
    _run(lambda: create_source(dsn))
    console.print("[green]sample source ready[/green] (schema crm)")


@app.command()
def fill(
    dsn: Dsn,
    accounts: Annotated[
        int, typer.Option("--accounts", min=0, help="Scale: contacts, opportunities etc. follow.")
    ] = 1_000,
    seed: Seed = 0,
) -> None:
    """Create the source if needed and fill its empty tables deterministically."""
    started = time.monotonic()
    counts = _run(lambda: fill_source(dsn, accounts=accounts, seed=seed))
    elapsed = time.monotonic() - started
    console.print(_counts_table(counts))
    rate = counts.total / max(elapsed, 1e-9)
    console.print(f"{counts.total:,} rows in {elapsed:.1f} s ({rate:,.0f} rows/s), seed {seed}")


@app.command()
def churn(
    dsn: Dsn,
    rate: Annotated[float, typer.Option("--rate", min=0.01, help="Changes per second.")] = 50.0,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0, help="Seconds to run [default: until Ctrl-C]."),
    ] = None,
    max_changes: Annotated[
        int | None, typer.Option("--max-changes", min=1, help="Stop after this many changes.")
    ] = None,
    per_tx: Annotated[int, typer.Option("--per-tx", min=1, help="Changes per transaction.")] = 1,
    seed: Seed = 0,
) -> None:
    """Keep changing the source at a steady rate: inserts, updates, deletes, reassignments."""
    stop = threading.Event()
    with _ctrl_c_sets(stop):
        stats = _run(
            lambda: churn_source(
                dsn,
                rate_per_s=rate,
                duration_s=duration,
                max_changes=max_changes,
                seed=seed,
                changes_per_tx=per_tx,
                stop=stop,
            )
        )
    console.print(_churn_table(stats))
    line = (
        f"{stats.changes:,} changes in {stats.transactions:,} transactions,"
        f" {stats.elapsed_s:.1f} s: {stats.achieved_rate:,.1f}/s"
        f" (target {stats.target_rate:,.1f}/s)"
    )
    if stats.achieved_rate < 0.9 * stats.target_rate and stats.max_lag_s > 1.0:
        line += f" [yellow]- could not keep up, up to {stats.max_lag_s:.1f} s behind[/yellow]"
    console.print(line)


def _counts_table(counts: SampleCounts) -> Table:
    table = Table(title="sample source filled")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in counts.as_dict().items():
        table.add_row(f"crm.{name}", f"{rows:,}")
    return table


def _churn_table(stats: ChurnStats) -> Table:
    table = Table(title="changes made")
    table.add_column("table")
    for header in ("inserted", "updated", "deleted"):
        table.add_column(header, justify="right")
    for name, ops in stats.by_table.items():
        table.add_row(f"crm.{name}", *(f"{ops[op]:,}" for op in ROW_OPS))
    kinds = ", ".join(f"{kind} {stats.by_kind.get(kind, 0):,}" for kind in CHANGE_KINDS)
    table.caption = f"changes by kind: {kinds}"
    return table
