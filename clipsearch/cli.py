"""Typer CLI: parse -> call the library -> render; maps ClipsearchError to exit code 1."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipsearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, DEFAULT_TOP_K

app = typer.Typer(
    help="Find pictures by meaning: index photo folders, then search them by text or example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[env: ...]" must not be read as markup
)

def _show_version(value: bool) -> None:
    if value:
        from clipsearch import __version__

        sys.stdout.write(f"clipsearch {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version,
                                          is_eager=True, help="Print the version and exit")
                       ] = False,
) -> None:
    """Find pictures by meaning: index photo folders, then search them by text or example."""


DbOpt = Annotated[
    Optional[Path],
    typer.Option("--db", help="Catalogue file or folder [env: CLIPSEARCH_DB; default: "
                 "$CLIPSEARCH_HOME or $XDG_DATA_HOME/clipsearch]"),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help=f"ARCH:PRETRAINED, a bundled model name, or a local "
                 f"checkpoint folder [env: CLIPSEARCH_MODEL; default for a new catalogue: "
                 f"{DEFAULT_MODEL}; later: the catalogue's own]"),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks for bugs")]


def _run(fn: Any, verbose: bool,
         interrupted: str = "interrupted; nothing was changed") -> Any:
    from clipsearch import console
    from clipsearch.errors import ClipsearchError

    try:
        return fn()
    except ClipsearchError as err:
        console.error(err.message, err.hint)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.error(interrupted)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise  # a nested _run (settings inside a command) has already said why
    except Exception as err:  # noqa: BLE001 - last resort: one line unless --verbose
        if verbose:
            raise
        console.error(f"unexpected {type(err).__name__}: {err}",
                      "rerun with --verbose for a traceback, and please report it")
        raise typer.Exit(2) from None


def _settings(db: Path | None, model: str | None = None, device: str | None = None,
              batch_size: int | None = None, workers: int | None = None) -> Any:
    from clipsearch.config import resolve_settings

    return _run(lambda: resolve_settings(db=db, model=model, device=device,
                                         batch_size=batch_size, workers=workers), False)


@app.command()
def index(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or files) to index")],
    db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per model batch", min=1)
                          ] = DEFAULT_BATCH_SIZE,
    workers: Annotated[int, typer.Option(help="Decode threads (0: one per core)", min=0)] = 0,
    include_hidden: Annotated[bool, typer.Option(help="Also index hidden files/folders")] = False,
    include_system: Annotated[
        bool, typer.Option(help="Also index OS metadata (._*, .Trashes, thumbnail caches)")
    ] = False,
    retry_failed: Annotated[bool, typer.Option(help="Retry files that failed before")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another index run instead of refusing")
                    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (with --json: "
                                        "no summary table either)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build or update the catalogue with every image under FOLDERS."""
    from clipsearch import console
    from clipsearch.crawler import display_path
    from clipsearch.indexer import IndexOptions, run_index

    settings = _settings(db, model, device, batch_size, workers)
    opts = IndexOptions(include_hidden, include_system, retry_failed, wait)

    def go() -> Any:
        with console.index_progress(enabled=not quiet) as progress:
            return run_index(
                settings,
                [str(f) for f in folders],
                opts,
                progress=progress,
                on_model=lambda m: console.notice(
                    f"model {m}; catalogue {display_path(str(settings.db_path))}"),
            )

    report = _run(go, verbose, "interrupted; finished batches are saved, the next run resumes")
    if as_json:
        import json

        sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    if not (as_json and quiet):
        console.index_summary(report)
    if report.failed_total and not (report.encoded or report.reused):
        # The whole command failed: every file it tried to index could not be (reasons above).
        console.error(f"none of the {report.failed_total} files this run tried could be "
                      "indexed", "`clipsearch status` lists each file with its reason")
        raise typer.Exit(1)
    absent = [str(f) for f in folders if not os.path.lexists(f)]
    if absent:  # run_index refused when none exists: here the others were indexed
        console.error(f"not found: {', '.join(absent)} (the other "
                      f"{'folder was' if len(folders) - len(absent) == 1 else 'folders were'} "
                      "indexed)", "check the spelling, or whether a drive is unplugged")
        raise typer.Exit(1)


def _search_opts(top: int, folder: Path | None, since: str | None, until: str | None,
                 fmt: list[str] | None, sort: str, margin: float | None,
                 label: str | None = None) -> Any:
    import math

    from clipsearch.crawler import FORMAT_ALIASES, KNOWN_FORMATS
    from clipsearch.errors import UsageError
    from clipsearch.search import SearchOptions, parse_date

    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise UsageError(f"--margin {margin}: must be a score difference of 0 or more")
    if folder is not None and not folder.is_dir():
        raise UsageError(f"--folder {folder}: no such folder")
    formats = tuple(FORMAT_ALIASES.get(f.upper(), f.upper()) for f in (fmt or []))
    unknown = [f for f in formats if f not in KNOWN_FORMATS]
    if unknown:
        raise UsageError(f"--format {unknown[0]}: unknown format",
                         hint=f"one of {', '.join(sorted(KNOWN_FORMATS))}")
    date_from, date_to = parse_date(since), parse_date(until, end=True)
    if date_from is not None and date_to is not None and date_to < date_from:
        raise UsageError(f"--until {until} is before --since {since}")
    return SearchOptions(
        top_k=top,
        folder=str(folder) if folder else None,
        date_from=date_from,
        date_to=date_to,
        formats=formats,
        sort=sort,
        margin=margin,
        label=label,
    )


TopOpt = Annotated[int, typer.Option("--top", "-k", help="How many results")]
FolderOpt = Annotated[Optional[Path], typer.Option("--folder", help="Only images under this folder")]
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="From date (YYYY[-MM[-DD]]; EXIF date, else mtime)")]
UntilOpt = Annotated[Optional[str], typer.Option("--until", help="Until date, inclusive")]
FormatOpt = Annotated[Optional[list[str]], typer.Option("--format", help="Only this format (JPEG, PNG, ...); repeatable")]
SortOpt = Annotated[str, typer.Option("--sort", help="score or date (dates of the top results)")]
MarginOpt = Annotated[Optional[float], typer.Option("--margin", help="Keep results within this score of the best")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per result")]
PathsOpt = Annotated[bool, typer.Option("--paths", help="Paths only, one per line")]
NulOpt = Annotated[bool, typer.Option("-0", "--null", help="With --paths: NUL-separated")]
LabelOpt = Annotated[Optional[str], typer.Option("--label", help="Only images `classify` gave this label")]


def _one_blas_thread_for_queries() -> None:
    """A query multiplies one short token sequence through the numpy text tower: hundreds of
    small matrix products, which OpenBLAS's worker threads make ~6x slower on 2 cores (1.7 s
    instead of 0.3 s per query, measured in benchmarks/RESULTS.md). Takes effect only before
    numpy loads, so the query commands call it first; an explicit setting wins."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _render(resp: Any, as_json: bool, paths: bool, nul: bool) -> None:
    from clipsearch import console

    console.search_results(resp, "json" if as_json else "paths" if paths or nul else "table", nul)


@app.command(context_settings={"ignore_unknown_options": True})
def search(
    query: Annotated[list[str], typer.Argument(
        help="Words and/or image paths; `-word` subtracts, `2:word` weighs (quote the query "
             "or put it after --)")],
    top: TopOpt = DEFAULT_TOP_K,
    folder: FolderOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    fmt: FormatOpt = None,
    sort: SortOpt = "score",
    margin: MarginOpt = None,
    label: LabelOpt = None,
    as_json: JsonOpt = False,
    paths: PathsOpt = False,
    nul: NulOpt = False,
    db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Rank indexed images by similarity to a text (or image) query."""
    _one_blas_thread_for_queries()
    from clipsearch.search import search as run_search

    def go() -> Any:
        opts = _search_opts(top, folder, since, until, fmt, sort, margin, label)
        return run_search(_settings(db, model, device), query, opts)

    _render(_run(go, verbose), as_json, paths, nul)


@app.command()
def similar(
    image: Annotated[Path, typer.Argument(help="An image file, indexed or not")],
    top: TopOpt = DEFAULT_TOP_K,
    folder: FolderOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    fmt: FormatOpt = None,
    sort: SortOpt = "score",
    margin: MarginOpt = None,
    as_json: JsonOpt = False,
    paths: PathsOpt = False,
    nul: NulOpt = False,
    db: DbOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Images most like IMAGE (the image itself is left out)."""
    _one_blas_thread_for_queries()
    from clipsearch.search import similar as run_similar

    def go() -> Any:
        opts = _search_opts(top, folder, since, until, fmt, sort, margin)
        return run_similar(_settings(db, None, device), str(image), opts)

    _render(_run(go, verbose), as_json, paths, nul)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as one JSON "
                                          "object")] = False,
    db: DbOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Counts per state, model, index and failures of a catalogue."""
    from clipsearch import console
    from clipsearch.status import catalogue_status

    data = _run(lambda: catalogue_status(_settings(db)), verbose)
    console.status_report(data, as_json)


@app.command()
def classify(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Images to classify (default: every indexed image)")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", "-l",
                                                  help="Comma-separated labels")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(
        "--labels-file", help="One label per line")] = None,
    none_margin: Annotated[float, typer.Option(
        help="A label must beat generic prompts by this cosine margin, else 'none of these'")
    ] = 0.0,
    no_store: Annotated[bool, typer.Option("--no-store", help="Do not save labels")] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Zero-shot classification: give every image one of your labels, with a confidence."""
    from clipsearch import console
    from clipsearch.classify import classify as run_classify
    from clipsearch.classify import parse_labels

    failed: list[str] = []  # given files that could not be read: "path: reason"

    def go() -> Any:
        names = parse_labels(labels, str(labels_file) if labels_file else None)
        return run_classify(_settings(db, None, device), names,
                            [str(p) for p in paths or []], none_margin, not no_store,
                            failed=failed)

    console.classifications(_run(go, verbose), as_json)
    for reason in failed:
        console.error(reason)
    if failed:
        raise typer.Exit(1)


@app.command("eval")
def eval_(
    folder: Annotated[Path, typer.Argument(help="Folder of labelled images")],
    captions: Annotated[Path, typer.Option(
        "--captions", "-c", help="CSV or JSON lines: path, caption[, concept][, category]")],
    model: ModelOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure a model: text->image and image->image recall, zero-shot accuracy, P@10."""
    from clipsearch import console
    from clipsearch.config import DEFAULT_MODEL
    from clipsearch.encoder import load_encoder
    from clipsearch.evaluation import evaluate, read_labelled

    def go() -> Any:
        items = read_labelled(captions)
        encoder = load_encoder(model or DEFAULT_MODEL, device or "auto")
        return evaluate(encoder, folder, items)

    console.eval_report(_run(go, verbose), as_json)


@app.command()
def train(
    folder: Annotated[Path, typer.Argument(help="Folder of training images")],
    captions: Annotated[Path, typer.Option("--captions", "-c", help="CSV (path,caption[,group]) "
                                           "or JSON lines; several captions per image allowed")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write "
                                      "(then `--model OUT` loads it); resumes if present")],
    init: Annotated[Optional[Path], typer.Option(
        "--from", help="Fine-tune this checkpoint folder (or bundled model, e.g. emoji-mini) "
        "instead of training from scratch")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="open_clip model config JSON for training from scratch "
        "[default: the emoji-mini architecture]")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps", min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(help="Image-caption pairs per step", min=2)] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed (same seed + data = same model)")] = 0,
    freeze_image: Annotated[bool, typer.Option(help="Lock the image tower (LiT-style)")] = False,
    freeze_text: Annotated[bool, typer.Option(help="Lock the text tower")] = False,
    val_folder: Annotated[Optional[Path], typer.Option(help="Labelled folder to validate on")
                          ] = None,
    val_captions: Annotated[Optional[Path], typer.Option(help="Its captions (as for eval)")
                            ] = None,
    val_every: Annotated[int, typer.Option(help="Validate every N steps (0: at the end)")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Train or fine-tune a CLIP model contrastively on image-caption pairs."""
    import json

    from clipsearch import console
    from clipsearch.errors import UsageError
    from clipsearch.training import TrainConfig, TrainingError, run_training

    def go() -> Any:
        from clipsearch.encoder import BUNDLED_MODELS_DIR, bundled_models

        model_cfg = None
        start = init
        if start is not None and not start.exists() and str(start) in bundled_models():
            start = BUNDLED_MODELS_DIR / str(start)
        if config is not None:
            try:
                raw = json.loads(config.read_text())
            except (OSError, ValueError) as err:
                raise UsageError(f"{config}: unreadable model config ({err})") from err
            model_cfg = raw.get("model_cfg", raw)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed,
                          freeze_image_tower=freeze_image, freeze_text_tower=freeze_text,
                          warmup_steps=min(100, steps // 10))
        try:
            with console.train_progress() as (on_step, on_validate):
                return run_training(folder, captions, out, cfg, model_cfg=model_cfg,
                                    init_checkpoint=start, val_dir=val_folder,
                                    val_captions=val_captions, val_every=val_every,
                                    on_step=on_step, on_validate=on_validate)
        except TrainingError as err:
            raise UsageError(str(err)) from err

    result, metrics = _run(go, verbose, f"interrupted; {out} keeps the last resume point "
                           "written (if any): run the same command again to continue")
    console.notice(f"wrote {out} after {result.steps} steps (final loss {result.final_loss:.4f}); "
                   f"use it with --model {out}")


@app.command()
def check(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed")] = False,
    db: DbOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Verify catalogue, index and files against each other; --repair fixes what it can."""
    from clipsearch import console
    from clipsearch.doctor import check_catalogue

    report = _run(lambda: check_catalogue(_settings(db), repair=repair), verbose,
                  "interrupted; repairs already made are kept: run check --repair again"
                  if repair else "interrupted; nothing was changed")
    console.check_report(report)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Console entry: Ctrl-C anywhere exits without a traceback (130 once a command runs);
    a reader that stops early (`clipsearch search cat --json | head -1`) ends the process
    with SIGPIPE, like other Unix tools, not with an error status."""
    import signal
    import warnings

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    # Damaged files make Pillow warn; their failures are recorded per file instead.
    warnings.filterwarnings("ignore", module="PIL")
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except OSError as err:  # results could not be written (`> /dev/full`, a full disk)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        sys.stderr.write(f"error: cannot write the output: {err.strerror}\n")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush at exit
        sys.exit(1)


if __name__ == "__main__":
    main()
