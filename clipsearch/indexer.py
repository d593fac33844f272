"""The `index` pipeline: crawl -> compare with the catalogue -> decode/encode in batches ->
write batches -> refresh the FAISS index."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.catalogue.models import STATE_FAILED, STATE_INDEXED, STATE_MISSING
from clipsearch.catalogue.store import Catalogue, WriterLock
from clipsearch.config import Settings
from clipsearch.crawler import FileInfo, ScanProblem, scan_directories
from clipsearch.encoder import Encoder, ModelInfo, load_encoder, resolve_spec
from clipsearch.errors import CatalogueError, ClipsearchError, ImageError, ModelMismatchError
from clipsearch.imaging import decode_image
from clipsearch.vector_index import (
    VectorIndex,
    build_index,
    choose_kind,
    load_index,
    read_index_header,
    save_index,
    update_index,
)

EncoderFactory = Callable[[str | None], Encoder]
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class IndexOptions:
    """What an index run should do besides the defaults."""

    include_hidden: bool = False
    include_system: bool = False
    retry_failed: bool = False
    wait_for_lock: bool = False
    index_kind: str = "auto"


@dataclass
class IndexReport:
    """What one index run did, for the summary."""

    model: str = ""
    scanned: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    reused: int = 0
    encoded: int = 0
    missing: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    problems: list[ScanProblem] = field(default_factory=list)
    indexed_total: int = 0
    index_kind: str = ""
    seconds: float = 0.0
    interrupted: bool = False
    stage_seconds: Counter[str] = field(default_factory=Counter)
    """Time per stage: read+hash, decode, preprocess (summed over worker threads), encode,
    catalogue writes, index refresh, scan (wall time of the main thread)."""

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths shown with undecodable bytes escaped)."""
        from clipsearch.crawler import display_path

        return {
            "model": self.model, "scanned": self.scanned, "new": self.new,
            "changed": self.changed, "unchanged": self.unchanged, "moved_or_duplicate":
            self.reused, "encoded": self.encoded, "missing": self.missing,
            "failed": dict(self.failed), "failed_total": self.failed_total,
            "indexed_total": self.indexed_total, "index_kind": self.index_kind,
            "seconds": round(self.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "problems": [{"path": display_path(p.path), "reason": p.reason}
                         for p in self.problems],
        }


@dataclass
class _Work:
    """One file's result from the decode workers."""

    file: FileInfo
    kind: str  # "decoded" | "reused" | "failed" | "vanished"
    content_hash: str | None = None
    pixels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    size: int = 0
    mtime_ns: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def failure_kind(reason: str) -> str:
    """Group failure reasons for the summary (text before the first colon/parenthesis)."""
    return reason.split(":")[0].split("(")[0].strip()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _LazyEncoder:
    """Load the model only when something needs encoding (unchanged re-runs never do)."""

    def __init__(self, spec: str, factory: EncoderFactory, expected_key: str | None) -> None:
        self.spec = spec
        self.factory = factory
        self.expected_key = expected_key
        self._encoder: Encoder | None = None

    def get(self) -> Encoder:
        if self._encoder is None:
            enc = self.factory(self.spec)
            if self.expected_key is not None and enc.info.key != self.expected_key:
                raise ModelMismatchError(
                    f"model {self.spec} now loads as {enc.info.key}, but this catalogue's "
                    f"vectors come from {self.expected_key}",
                    hint="restore the original weights, or index into a new --db",
                )
            self._encoder = enc
        return self._encoder


FAST_TEXT_META = "fast_text:"


def remember_fast_text(catalogue: Catalogue, encoder: Encoder) -> None:
    """Record where the text tower's weights are, so searches can skip torch."""
    from clipsearch.text_tower import fast_text_record

    if catalogue.readonly:
        return
    try:
        record = fast_text_record(getattr(encoder, "weights_file", None),
                                  getattr(encoder, "text_tower", None))
    except OSError:
        record = None
    if record is not None:
        catalogue.set_meta(FAST_TEXT_META + encoder.info.key, record)


def _select_model(
    catalogue: Catalogue, requested: str | None, factory: EncoderFactory
) -> tuple[_LazyEncoder, int | None, ModelInfo | None]:
    from clipsearch.config import DEFAULT_MODEL

    active = catalogue.active_model()
    if active is not None:
        if requested is not None and requested != active.spec:
            try:
                same = resolve_spec(requested).spec == active.spec
            except ClipsearchError:
                same = False
            if not same:
                raise ModelMismatchError(
                    f"this catalogue was built with {active.spec} ({active.key}); "
                    f"it will not mix in vectors from {requested}",
                    hint="drop --model to keep using its model, or use a new --db for "
                    "another model",
                )
        info = ModelInfo(
            active.key, active.spec, active.arch, active.pretrained, active.checkpoint_hash,
            active.open_clip_version, active.dim,
        )
        return _LazyEncoder(active.spec, factory, active.key), active.id, info
    return _LazyEncoder(requested or DEFAULT_MODEL, factory, None), None, None


def run_index(
    settings: Settings,
    roots: Sequence[str],
    options: IndexOptions = IndexOptions(),
    progress: ProgressFn | None = None,
    encoder_factory: EncoderFactory | None = None,
    on_model: Callable[[str], None] | None = None,
) -> IndexReport:
    """Index (or update) the catalogue with every image under `roots`."""
    started = time.perf_counter()
    factory = encoder_factory or (lambda spec: load_encoder(spec, settings.device))
    report = IndexReport()
    catalogue = Catalogue(settings.db_path, create=True)
    try:
        if catalogue.readonly:
            raise CatalogueError(
                f"{settings.db_path} is read-only: cannot index",
                hint="searches still work; index into a writable --db",
            )
        with WriterLock(settings.lock_path, wait=options.wait_for_lock):
            lazy, model_id, info = _select_model(catalogue, settings.model, factory)
            if info is None:
                enc = lazy.get()
                info = enc.info
                model_id = catalogue.register_model(info.as_record())
                remember_fast_text(catalogue, enc)
            report.model = info.key if info.spec == info.key else f"{info.spec} ({info.key})"
            if on_model is not None:
                on_model(report.model)
            assert model_id is not None
            _index_roots(catalogue, lazy, model_id, info, roots, options, report, progress,
                         settings)
            t0 = time.perf_counter()
            report.index_kind, report.indexed_total = refresh_index(
                catalogue, settings, info, model_id, kind=options.index_kind, write=True
            )
            report.stage_seconds["index"] += time.perf_counter() - t0
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        report.seconds = time.perf_counter() - started
        catalogue.close()
    return report


def _index_roots(
    catalogue: Catalogue,
    lazy: _LazyEncoder,
    model_id: int,
    info: ModelInfo,
    roots: Sequence[str],
    options: IndexOptions,
    report: IndexReport,
    progress: ProgressFn | None,
    settings: Settings,
) -> None:
    abs_roots = [os.path.abspath(r) for r in roots]
    t0 = time.perf_counter()
    scan = scan_directories(abs_roots, options.include_hidden, options.include_system)
    report.stage_seconds["scan"] += time.perf_counter() - t0
    report.problems.extend(scan.problems)
    valid_roots = [r for r in abs_roots if os.path.exists(r)]
    if not valid_roots:
        raise ClipsearchError(
            "nothing to index: " + "; ".join(f"{p.path}: {p.reason}" for p in scan.problems)
        )
    catalogue.add_roots(valid_roots)
    stored = catalogue.files_under(valid_roots)
    report.scanned = len(scan.files)
    todo: list[tuple[FileInfo, bool]] = []  # (file, is_change)
    seen: set[str] = set()
    for f in scan.files:
        seen.add(f.path)
        old = stored.get(f.path)
        if old is not None and old.size == f.size and old.mtime_ns == f.mtime_ns:
            if old.state == STATE_INDEXED or (old.state == STATE_FAILED and not options.retry_failed):
                report.unchanged += 1
                continue
        is_change = old is not None and old.state != STATE_MISSING and (
            old.size != f.size or old.mtime_ns != f.mtime_ns
        )
        todo.append((f, is_change))
    gone = [old.image_id for path, old in stored.items()
            if path not in seen and old.state != STATE_MISSING]
    catalogue.mark_missing(gone)
    report.missing = len(gone)
    if not todo:
        return
    attempts = {p: s.attempts for p, s in stored.items()}
    _process(catalogue, lazy, model_id, todo, attempts, report, progress, settings)


def _prepare(
    f: FileInfo, catalogue: Catalogue, model_id: int, target: int,
    preprocess: Callable[[Any], np.ndarray] | None,
) -> _Work:
    """Worker: read, hash, reuse a stored vector or decode + preprocess."""
    t0 = time.perf_counter()
    try:
        with open(f.path, "rb") as fh:
            data = fh.read()
        st = os.stat(f.path)
    except FileNotFoundError:
        return _Work(f, "vanished", reason="deleted while indexing")
    except OSError as err:
        return _Work(f, "failed", reason=f"cannot read: {err.strerror or err}",
                     size=f.size, mtime_ns=f.mtime_ns)
    chash = content_hash(data)
    work = _Work(f, "failed", chash, size=len(data), mtime_ns=st.st_mtime_ns)
    t1 = time.perf_counter()
    work.timings["read"] = t1 - t0
    reuse = catalogue.reusable(chash, model_id)
    if reuse is not None:
        work.kind = "reused"
        work.meta = reuse
        return work
    if preprocess is None:
        work.kind = "decode-needed"
        return work
    try:
        decoded = decode_image(data, target)
        t2 = time.perf_counter()
        work.timings["decode"] = t2 - t1
        work.pixels = preprocess(decoded.image)
        work.timings["preprocess"] = time.perf_counter() - t2
    except ImageError as err:
        work.reason = err.message
        return work
    except Exception as err:  # noqa: BLE001 - one bad file never stops a run
        work.reason = f"cannot decode: {type(err).__name__}: {err}"[:300]
        return work
    work.kind = "decoded"
    work.meta = {
        "width": decoded.width,
        "height": decoded.height,
        "format": decoded.format,
        "captured_at": decoded.captured_at,
    }
    return work


def _ordered(executor: ThreadPoolExecutor, fn: Callable[[FileInfo], _Work],
             files: Sequence[FileInfo], window: int) -> Iterator[_Work]:
    """Results in input order with at most `window` files in flight (bounded memory)."""
    pending: list[Future[_Work]] = []
    it = iter(files)
    for f in it:
        pending.append(executor.submit(fn, f))
        if len(pending) >= window:
            break
    while pending:
        fut = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(executor.submit(fn, nxt))
        yield fut.result()


def _process(
    catalogue: Catalogue,
    lazy: _LazyEncoder,
    model_id: int,
    todo: list[tuple[FileInfo, bool]],
    attempts: dict[str, int],
    report: IndexReport,
    progress: ProgressFn | None,
    settings: Settings,
) -> None:
    encoder = lazy.get()
    remember_fast_text(catalogue, encoder)
    target = encoder.image_size
    workers = settings.workers or default_workers()
    batch_size = max(1, settings.batch_size)
    changed = {f.path for f, is_change in todo if is_change}
    files = [f for f, _ in todo]
    done = 0
    total = len(files)
    if progress:
        progress("index", 0, total)

    def prep(f: FileInfo) -> _Work:
        return _prepare(f, catalogue, model_id, target, encoder.preprocess)

    batch: list[_Work] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        for work in _ordered(pool, prep, files, window=batch_size * 2):
            batch.append(work)
            if len(batch) >= batch_size:
                _flush(catalogue, encoder, model_id, batch, changed, attempts, report)
                done += len(batch)
                batch = []
                if progress:
                    progress("index", done, total)
        if batch:
            _flush(catalogue, encoder, model_id, batch, changed, attempts, report)
            done += len(batch)
            if progress:
                progress("index", done, total)


def _flush(
    catalogue: Catalogue,
    encoder: Encoder,
    model_id: int,
    batch: list[_Work],
    changed: set[str],
    attempts: dict[str, int],
    report: IndexReport,
) -> None:
    """Encode the decoded images of one batch and write the whole batch in one transaction."""
    to_encode: dict[str, np.ndarray] = {}
    for w in batch:
        if w.kind == "decoded" and w.content_hash and w.content_hash not in to_encode:
            assert w.pixels is not None
            to_encode[w.content_hash] = w.pixels
    vectors: dict[str, np.ndarray] = {}
    if to_encode:
        hashes = list(to_encode)
        t0 = time.perf_counter()
        out = encoder.encode_images(np.stack([to_encode[h] for h in hashes]))
        report.stage_seconds["encode"] += time.perf_counter() - t0
        vectors = {h: out[i] for i, h in enumerate(hashes)}
        report.encoded += len(hashes)
    rows: list[dict[str, Any]] = []
    vanished: list[str] = []
    for w in batch:
        path = w.file.path
        if w.kind == "vanished":
            vanished.append(path)
            continue
        if path in changed:
            report.changed += 1
        else:
            report.new += 1
        row: dict[str, Any] = {
            "path": path,
            "size": w.size,
            "mtime_ns": w.mtime_ns,
            "content_hash": w.content_hash,
        }
        if w.kind in ("decoded", "reused"):
            if w.kind == "reused":
                report.reused += 1
            row.update(w.meta)
            row.update(state=STATE_INDEXED, error=None, attempts=0)
        else:
            report.failed[failure_kind(w.reason)] += 1
            row.update(state=STATE_FAILED, error=w.reason, attempts=attempts.get(path, 0) + 1)
        rows.append(row)
    for w in batch:
        report.stage_seconds.update(w.timings)
    t0 = time.perf_counter()
    catalogue.write_batch(rows, vectors, model_id)
    report.stage_seconds["write"] += time.perf_counter() - t0
    if vanished:
        stored = catalogue.files_under(vanished)
        catalogue.mark_missing([s.image_id for s in stored.values()])
        report.missing += len(stored)


def refresh_index(
    catalogue: Catalogue,
    settings: Settings,
    info: ModelInfo,
    model_id: int,
    kind: str = "auto",
    write: bool = True,
) -> tuple[str, int]:
    """Bring the FAISS file up to date with the catalogue. Returns (kind, count)."""
    header = read_index_header(settings.index_path)
    if (
        header is not None
        and header.get("model_key") == info.key
        and header.get("generation") == catalogue.generation()
        and kind in ("auto", header.get("kind"))
    ):
        return str(header["kind"]), int(header["count"])
    vi = ensure_index(catalogue, settings, info, model_id, kind=kind, write=write)
    return vi.kind, vi.count


def ensure_index(
    catalogue: Catalogue,
    settings: Settings,
    info: ModelInfo,
    model_id: int,
    kind: str = "auto",
    write: bool = True,
) -> VectorIndex:
    """Load the index; apply the catalogue's changes or rebuild it when missing or stale."""
    generation = catalogue.generation()
    vi = load_index(settings.index_path)
    if vi is not None and (vi.model_key != info.key or vi.dim != info.dim):
        vi = None
    if vi is not None and vi.generation == generation and (kind in ("auto", vi.kind)):
        return vi
    ids_now = catalogue.indexed_ids(model_id)
    wanted = choose_kind(ids_now.size) if kind == "auto" else kind
    if vi is not None and vi.kind == wanted:
        add = np.setdiff1d(ids_now, vi.ids)
        remove = np.setdiff1d(vi.ids, ids_now)
        # A large delta on a trained IVF-PQ degrades its clustering: rebuild instead.
        if add.size + remove.size <= max(1000, ids_now.size // 5) or vi.kind == "flat":
            add_ids, add_vecs = catalogue.vectors_by_ids(add, model_id, info.dim)
            update_index(vi, add_ids, add_vecs, remove, generation)
            if write:
                save_index(vi, settings.index_path)
            return vi
    ids, vecs = catalogue.indexed_vectors(model_id, info.dim)
    vi = build_index(ids, vecs, info.key, generation, kind=wanted)
    if write:
        save_index(vi, settings.index_path)
    return vi
