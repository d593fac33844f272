"""Terminal output: progress and messages on stderr; results (table / JSON / paths) on stdout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from clipsearch.indexer import IndexReport
    from clipsearch.search import SearchResponse

err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped or redirected tables keep whole lines (rich would otherwise fold them at 80 columns).
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout.isatty() else 10_000)


def shown(path: str) -> str:
    """A printable, markup-safe path (undecodable bytes as \\xNN)."""
    from clipsearch.crawler import display_path

    return escape(display_path(path))


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}")


def notice(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


@contextmanager
def index_progress(enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar with images/s and ETA; yields a callback(stage, done, total)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not enabled:
        yield None
        return

    class Rate(TextColumn):
        def render(self, task: Any) -> Any:  # images/s
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:6.1f} img/s" if speed else "   -- img/s", style="cyan")

    progress = Progress(
        TextColumn("[bold]indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        Rate(""),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()  # not before: a run that fails first would print an empty bar line
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


def index_summary(report: IndexReport) -> None:
    table = Table(title="index summary", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("new", report.new),
        ("changed", report.changed),
        ("unchanged", report.unchanged),
        ("touched (same content, vector kept)", report.touched),
        ("moved or renamed (vector reused)", report.moved),
        ("duplicates (vector reused)", report.duplicates),
        ("missing (deleted)", report.missing),
        ("failed", report.failed_total),
    ]
    if report.retried:
        rows.insert(1, ("retried (failed before)", report.retried))
    if report.changing:
        rows.append(("changing while read (next run)", report.changing))
    if report.still_failed:
        rows.insert(rows.index(("unchanged", report.unchanged)) + 1,
                    ("  of which failed before (--retry-failed)", report.still_failed))
    for name, n in rows:
        table.add_row(name, str(n))
    for reason, n in sorted(report.failed.items()):
        table.add_row(f"  failed: {escape(reason)}", str(n))
    table.add_row("indexed in catalogue", str(report.indexed_total))
    err.print(table)
    for p in report.problems:
        err.print(f"[yellow]skipped:[/] {shown(p.path)}: {escape(p.reason)}")
    err.print(
        f"model {escape(report.model)}; index {report.index_kind}; "
        f"{report.seconds:.1f} s"
    )


def _date(ts: float, with_time: bool = True) -> str:
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        return "?"


def search_results(resp: SearchResponse, fmt: str, nul: bool = False) -> None:
    from clipsearch.crawler import path_fields

    for n in resp.notices:
        notice(n)
    if not resp.results and fmt != "table":
        err.print("no results")  # stdout stays empty for the pipe
    if fmt == "json":
        for r in resp.results:
            sys.stdout.write(
                json.dumps(
                    {
                        "rank": r.rank,
                        "score": round(r.score, 6),
                        **path_fields(r.path),
                        "date": _date(r.date),
                        "format": r.format,
                        "width": r.width,
                        "height": r.height,
                        "image_id": r.image_id,
                    }
                )
                + "\n"
            )
        sys.stdout.flush()
        return
    if fmt == "paths":
        end = "\0" if nul else "\n"
        buf = sys.stdout.buffer
        for r in resp.results:
            buf.write(r.path.encode(sys.getfilesystemencoding(), "surrogateescape") + end.encode())
        buf.flush()
        return
    err.print(f"[dim]model {escape(resp.model)}[/]")
    if not resp.results:
        err.print("no results")
        return
    # Narrow terminals: lighter borders, dates without times and paths under the current
    # folder shown relative to it, so that paths fold less often.
    narrow = out.width < 120
    table = Table(box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("path", overflow="fold", ratio=1)
    table.add_column("date", no_wrap=True)
    for r in resp.results:
        path = _relative_if_under_cwd(r.path) if narrow else r.path
        table.add_row(str(r.rank), f"{r.score:.3f}", shown(path), _date(r.date, not narrow))
    out.print(table)


def _relative_if_under_cwd(path: str) -> str:
    try:
        cwd = os.getcwd()
    except OSError:
        return path
    if path.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, cwd)
    return path


def status_report(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title=f"catalogue {escape(data['catalogue'])}", show_header=False,
                  title_justify="left")
    table.add_column("key")
    table.add_column("value")
    model = data["model"]
    table.add_row("model", "none" if not model else escape(
        model["spec"] if model["spec"] == model["key"] else f"{model['spec']} ({model['key']})"
    ))
    shown_states = {"missing": "missing (deleted or moved away)"}
    for state, n in data["counts"].items():
        table.add_row(shown_states.get(state, state), str(n))
    table.add_row("index", f"{data['index']['kind']} ({data['index']['count']} vectors, "
                           f"{'fresh' if data['index']['fresh'] else 'stale: rebuilt on next use'})")
    table.add_row("roots", escape(", ".join(r["path"] for r in data["roots"]) or "none"))
    out.print(table)
    if data["failures"]:
        ft = Table(title="failures")
        ft.add_column("path", overflow="fold")
        ft.add_column("reason")
        ft.add_column("attempts", justify="right")
        for f in data["failures"]:
            ft.add_row(escape(f["path"]), escape(f["reason"]), str(f["attempts"]))
        out.print(ft)


def check_report(report: Any) -> None:
    codecs = ", ".join(f"{k} {'yes' if v else 'no (pip install pillow-heif)' if k == 'HEIF' else 'no'}"
                       for k, v in report.codecs.items())
    out.print(f"optional codecs: {codecs}")
    out.print(f"indexed images: {report.indexed}")
    if not report.problems:
        out.print("[green]no problems found[/]")
    for p in report.problems:
        out.print(f"[yellow]problem:[/] {escape(p)}")
    for h in getattr(report, "hints", []):
        out.print(f"hint: {escape(h)}")
    for r in report.repaired:
        out.print(f"[green]repaired:[/] {escape(r)}")
    remaining = getattr(report, "remaining", None)
    if remaining is not None:
        for p in remaining:
            out.print(f"[red]still wrong:[/] {escape(p)}")
        if not remaining:
            out.print("[green]no problems remain[/]")


def classifications(results: Any, as_json: bool) -> None:
    from clipsearch.crawler import path_fields

    if as_json:
        for c in results:
            sys.stdout.write(json.dumps({**path_fields(c.path), "label": c.label,
                                         "confidence": round(c.confidence, 4),
                                         "scores": {k: round(v, 4) for k, v in c.scores.items()}})
                             + "\n")
        return
    table = Table()
    table.add_column("path", overflow="fold")
    table.add_column("label")
    table.add_column("confidence", justify="right")
    for c in results:
        table.add_row(shown(c.path), escape(c.label), f"{c.confidence:.2f}")
    out.print(table)
    counts: dict[str, int] = {}
    for c in results:
        counts[c.label] = counts.get(c.label, 0) + 1
    err.print(", ".join(f"{escape(k)}: {v}" for k, v in sorted(counts.items())) or "no images")


def eval_report(report: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
        return
    table = Table(title=f"evaluation of {escape(report.model)}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report.metrics.items():
        table.add_row(name, "n/a" if value is None else f"{value:.3f}")
    for name, n in report.counts.items():
        table.add_row(f"[dim]{name}[/]", str(n))
    out.print(table)
    for f in report.failed:
        err.print(f"[yellow]skipped:[/] {escape(f)}")


@contextmanager
def train_progress() -> Iterator[Any]:
    """Progress with loss and pairs/s; validation metrics printed as they come."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"),
                        TextColumn("{task.fields[rate]:.0f} pairs/s"), TimeRemainingColumn(),
                        console=err)
    task: list[Any] = []

    def on_step(step: int, total: int, loss: float, rate: float) -> None:
        if not task:
            task.append(progress.add_task("train", total=total, loss=loss, rate=rate))
        progress.update(task[0], completed=step, loss=loss, rate=rate)

    def on_validate(step: int, metrics: dict[str, Any]) -> None:
        shown_metrics = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
        progress.console.print(f"[cyan]step {step} validation:[/] {shown_metrics}")

    with progress:
        yield on_step, on_validate
