"""The `index` pipeline: crawl -> compare with the catalogue -> decode/encode in batches ->
write batches -> refresh the FAISS index."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.catalogue.schema import STATE_FAILED, STATE_INDEXED, STATE_MISSING, STATE_PENDING
from clipsearch.catalogue.store import Catalogue, StoredFile, WriterLock
from clipsearch.config import Settings
from clipsearch.crawler import FileInfo, ScanProblem, scan_directories
from clipsearch.encoder import Encoder, ModelInfo, load_encoder, resolve_spec
from clipsearch.errors import CatalogueError, ClipsearchError, ImageError, ModelMismatchError
from clipsearch.imaging import decode_image
from clipsearch.vector_index import (
    FILE_LAYOUT,
    KIND_IVFPQ,
    VectorIndex,
    build_index,
    choose_kind,
    id_digest,
    index_delta,
    load_index,
    read_index_header,
    save_index,
    update_index,
    wants_gpu,
)

from clipsearch.vector_store import (
    append_vectors,
    vector_file_path,
    vector_file_usable,
    write_vector_file,
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
    touched: int = 0
    """Files whose stat changed (touch, chmod, a restored copy) but not their content: read
    and hashed again, vector kept."""
    unchanged: int = 0
    moved: int = 0
    """Files at a new path whose content was at a path that is gone (moved or renamed)."""
    duplicates: int = 0
    retried: int = 0
    """Files that had failed before, unchanged, tried again (--retry-failed)."""
    """New files whose content is already catalogued at a path that still exists."""
    encoded: int = 0
    missing: int = 0
    """Catalogued files that are gone (deleted, not moved)."""
    changing: int = 0
    """Files that changed while being read: skipped this run, indexed by the next."""
    still_failed: int = 0
    """Unchanged files that failed in an earlier run and were not retried (of `unchanged`)."""
    failed: Counter[str] = field(default_factory=Counter)
    problems: list[ScanProblem] = field(default_factory=list)
    indexed_total: int = 0
    index_kind: str = ""
    seconds: float = 0.0
    interrupted: bool = False
    stage_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Time per stage: read+hash, decode, preprocess (summed over worker threads), encode,
    catalogue writes, index refresh, scan (wall time of the main thread)."""

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def reused(self) -> int:
        """Files whose vector was reused (moved, renamed or duplicated content)."""
        return self.moved + self.duplicates

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths shown with undecodable bytes escaped)."""
        from clipsearch.crawler import path_fields

        return {
            "model": self.model, "scanned": self.scanned, "new": self.new,
            "changed": self.changed, "touched": self.touched, "unchanged": self.unchanged,
            "moved": self.moved,
            "duplicates": self.duplicates, "moved_or_duplicate": self.reused,
            "retried": self.retried,
            "encoded": self.encoded, "missing": self.missing, "changing": self.changing,
            "still_failed": self.still_failed,
            "failed": dict(self.failed), "failed_total": self.failed_total,
            "indexed_total": self.indexed_total, "index_kind": self.index_kind,
            "seconds": round(self.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "problems": [{**path_fields(p.path), "reason": p.reason}
                         for p in self.problems],
        }


@dataclass
class _Work:
    """One file's result from the decode workers."""

    file: FileInfo
    kind: str  # "decoded" | "reused" | "failed" | "vanished" | "changing"
    content_hash: str | None = None
    pixels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def failure_kind(reason: str) -> str:
    """Group failure reasons for the summary (text before the first colon/parenthesis)."""
    return reason.split(":")[0].split("(")[0].strip()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


CHANGED_WHILE_READING = "changed while reading; will be indexed next run"
DELETED_WHILE_INDEXING = "deleted before it could be read"



class _LazyEncoder:
    """Load the model only when something needs encoding (unchanged re-runs never do)."""

    def __init__(self, spec: str, factory: EncoderFactory, expected_key: str | None) -> None:
        self.spec = spec
        self.factory = factory
        self.expected_key = expected_key
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def adopt(self, encoder: Encoder) -> None:
        """Use an encoder already loaded for this spec."""
        with self._lock:
            self._encoder = encoder

    def get(self) -> Encoder:
        with self._lock:  # decode threads ask for it too: load once
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
        info = ModelInfo.of(active)
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
    if not any(os.path.exists(r) for r in roots):
        from clipsearch.crawler import display_path

        # Before the catalogue is opened: a mistyped folder must not create an empty one.
        raise ClipsearchError("nothing to index: " + ("; ".join(
            f"{display_path(os.path.abspath(r))}: not found" for r in roots) or "no folders"))
    preloaded: Encoder | None = None
    if not settings.db_path.exists():
        from clipsearch.config import DEFAULT_MODEL

        # A new catalogue needs its model first: one that cannot load (offline, mistyped)
        # must not leave an empty catalogue behind.
        preloaded = factory(settings.model or DEFAULT_MODEL)
    catalogue = Catalogue(settings.db_path, create=True)
    try:
        if catalogue.readonly:
            raise CatalogueError(
                f"{settings.db_path} is read-only: cannot index",
                hint="searches still work; index into a writable --db",
            )
        with WriterLock(settings.lock_path, wait=options.wait_for_lock):
            lazy, model_id, info = _select_model(catalogue, settings.model, factory)
            if info is None and preloaded is not None:
                lazy.adopt(preloaded)
            if info is None:
                enc = lazy.get()
                info = enc.info
                model_id = catalogue.register_model(info.as_record())
                remember_fast_text(catalogue, enc)
            report.model = info.key if info.spec == info.key else f"{info.spec} ({info.key})"
            if on_model is not None:
                on_model(report.model)
            assert model_id is not None
            digest = _index_roots(catalogue, lazy, model_id, info, roots, options, report,
                                  progress, settings)
            t0 = time.perf_counter()
            report.index_kind, report.indexed_total = refresh_index(
                catalogue, settings, info, model_id, kind=options.index_kind, write=True,
                known_digest=digest,
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
) -> tuple[int, int, int] | None:
    """Sync the catalogue with the files under roots. Returns the catalogue's indexed-id
    digest when this run wrote nothing (so the index refresh need not scan for it again)."""
    abs_roots = [os.path.abspath(r) for r in roots]
    t0 = time.perf_counter()
    scan = scan_directories(abs_roots, options.include_hidden, options.include_system)
    report.stage_seconds["scan"] += time.perf_counter() - t0
    report.problems.extend(scan.problems)
    valid_roots = [r for r in abs_roots if os.path.exists(r)]  # run_index checked some exist
    catalogue.add_roots(valid_roots)
    stored = catalogue.files_under(valid_roots)
    report.scanned = len(scan.files)
    lost, digest = _ids_without_vector(catalogue, model_id, stored)
    todo: list[tuple[FileInfo, bool]] = []  # (file, is_change)
    adopt_ctimes: list[tuple[int, int]] = []  # unchanged rows catalogued without a ctime
    seen: set[str] = set()
    for f in scan.files:
        seen.add(f.path)
        old = stored.get(f.path)
        if old is not None and old.image_id in lost:
            todo.append((f, True))  # "indexed" but its vector row is gone: encode again
            continue
        same = old is not None and old.same_stat(f.size, f.mtime_ns, f.ctime_ns)
        if old is not None and same:
            if old.state == STATE_INDEXED or (old.state == STATE_FAILED and not options.retry_failed):
                report.unchanged += 1
                report.still_failed += old.state == STATE_FAILED
                if old.ctime_ns is None:
                    adopt_ctimes.append((old.image_id, f.ctime_ns))
                continue
        is_change = old is not None and old.state != STATE_MISSING and (
            not same or old.state == STATE_PENDING
        )
        todo.append((f, is_change))
    # Files under a folder this run could not read may still be there: not missing.
    unreadable = tuple(p.path.rstrip(os.sep) for p in scan.problems
                       if p.reason.startswith(("cannot read", "cannot stat")))
    gone_rows = [old for path, old in stored.items()
                 if path not in seen and old.state != STATE_MISSING
                 and not (unreadable and _under(path, unreadable))]
    catalogue.mark_missing([old.image_id for old in gone_rows])
    catalogue.record_ctimes(adopt_ctimes)
    report.missing = len(gone_rows)
    if not todo:
        return digest if not gone_rows else None
    # Content that left its old path this run: a new path holding it was moved or renamed.
    gone_hashes = Counter(old.content_hash for old in gone_rows
                          if old.content_hash and old.state == STATE_INDEXED)
    _process(catalogue, lazy, model_id, todo, stored, gone_hashes, report, progress, settings)
    return None


def _ids_without_vector(catalogue: Catalogue, model_id: int, stored: dict[str, StoredFile]
                        ) -> tuple[set[int], tuple[int, int, int]]:
    """Rows marked indexed whose vector is gone (two aggregate queries when there are none),
    and the indexed-id digest computed on the way."""
    digest = catalogue.indexed_id_digest(model_id)
    if catalogue.count_by_state().get(STATE_INDEXED, 0) == digest[0]:
        return set(), digest
    with_vector = set(catalogue.indexed_ids(model_id).tolist())
    return {s.image_id for s in stored.values()
            if s.state == STATE_INDEXED and s.image_id not in with_vector}, digest


def _under(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == f or path.startswith(f + os.sep) for f in folders)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size, b.st_mtime_ns, b.st_ctime_ns, b.st_ino)


def _prepare(
    f: FileInfo, catalogue: Catalogue, model_id: int, lazy: _LazyEncoder,
    restart_clock: Callable[[], None] = lambda: None,
) -> _Work:
    """Worker: read, hash, reuse a stored vector or decode + preprocess.

    A file that changes while it is read (still being copied in) is skipped, not failed."""
    t0 = time.perf_counter()
    try:
        before = os.stat(f.path)
        with open(f.path, "rb") as fh:
            data = fh.read()
            after = os.fstat(fh.fileno())
    except FileNotFoundError:
        return _Work(f, "vanished", reason=DELETED_WHILE_INDEXING)
    except OSError as err:
        return _Work(f, "failed", reason=f"cannot read: {err.strerror or err}",
                     size=f.size, mtime_ns=f.mtime_ns, ctime_ns=f.ctime_ns)
    if not _same_file(before, after) or len(data) != after.st_size:
        return _Work(f, "changing", reason=CHANGED_WHILE_READING)
    chash = content_hash(data)
    work = _Work(f, "failed", chash, size=len(data), mtime_ns=after.st_mtime_ns,
                 ctime_ns=after.st_ctime_ns)
    t1 = time.perf_counter()
    work.timings["read"] = t1 - t0
    reuse = catalogue.reusable(chash, model_id)
    if reuse is not None:
        work.kind = "reused"
        work.meta = reuse
        return work
    if not lazy.loaded:
        lazy.get()  # the first file that needs the model loads it (moves never do)
        restart_clock()  # loading the model is not this file's decode time
        t1 = time.perf_counter()
    encoder = lazy.get()
    try:
        decoded = decode_image(data, encoder.image_size)
        t2 = time.perf_counter()
        work.timings["decode"] = t2 - t1
        work.pixels = encoder.preprocess(decoded.image)
        work.timings["preprocess"] = time.perf_counter() - t2
    except ImageError as err:
        work.reason = err.message
        return work
    except ClipsearchError:
        raise
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


class _Job:
    """One file handed to a decode thread."""

    def __init__(self, file: FileInfo) -> None:
        self.file = file
        self.started: float | None = None
        self.done = threading.Event()
        self.result: _Work | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def restart_clock(self) -> None:
        self.started = time.monotonic()


class _DecodePool:
    """Daemon decode threads. A file that takes longer than the time limit is abandoned: its
    thread is replaced (and exits if the decode ever returns), and nothing ever waits for it,
    not even interpreter exit. (Pillow's C decoders cannot be interrupted.)"""

    def __init__(self, workers: int, fn: Callable[[FileInfo, _Job], _Work]) -> None:
        self._fn = fn
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closed:
                return
            job.thread = threading.current_thread()
            job.restart_clock()
            try:
                job.result = self._fn(job.file, job)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                job.error = err
            with job.lock:
                job.done.set()
                if job.abandoned:
                    return  # a replacement thread took this one's place

    def submit(self, f: FileInfo) -> _Job:
        job = _Job(f)
        self._jobs.put(job)
        return job

    def wait(self, job: _Job, limit_s: float) -> _Work:
        """The job's result, or a failure once it has run longer than limit_s."""
        while not job.done.wait(min(1.0, limit_s)):
            started = job.started
            if started is None or time.monotonic() - started <= limit_s:
                continue
            with job.lock:
                if job.done.is_set():
                    break
                job.abandoned = True
            if job.thread is not None:
                self._threads.discard(job.thread)
            self._spawn()
            return _Work(job.file, "failed",
                         reason=f"took longer than {limit_s:g} s to decode",
                         size=job.file.size, mtime_ns=job.file.mtime_ns,
                         ctime_ns=job.file.ctime_ns)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self, wait_s: float) -> None:
        """Drop the files not started yet and let the running decodes finish (up to wait_s
        each): a thread killed mid-decode by interpreter exit can crash the process."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in list(self._threads):
            thread.join(wait_s)
        self._threads.clear()


def _ordered(pool: _DecodePool, files: Sequence[FileInfo], window: int,
             limit_s: float) -> Iterator[_Work]:
    """Results in input order with at most `window` files in flight (bounded memory)."""
    pending: list[_Job] = []
    it = iter(files)
    for f in it:
        pending.append(pool.submit(f))
        if len(pending) >= window:
            break
    while pending:
        job = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(nxt))
        yield pool.wait(job, limit_s)


def _process(
    catalogue: Catalogue,
    lazy: _LazyEncoder,
    model_id: int,
    todo: list[tuple[FileInfo, bool]],
    stored: dict[str, StoredFile],
    gone_hashes: Counter[str],
    report: IndexReport,
    progress: ProgressFn | None,
    settings: Settings,
) -> None:
    workers = settings.workers or default_workers()
    batch_size = max(1, settings.batch_size)
    limit_s = settings.decode_timeout_s
    changed = {f.path for f, is_change in todo if is_change}
    files = [f for f, _ in todo]
    done = 0
    total = len(files)
    if progress:
        progress("index", 0, total)

    def prep(f: FileInfo, job: _Job) -> _Work:
        return _prepare(f, catalogue, model_id, lazy, job.restart_clock)

    batch: list[_Work] = []
    written: set[str] = set()  # content hashes whose vector this run already stored
    pool = _DecodePool(workers, prep)
    try:
        for work in _ordered(pool, files, batch_size * 2, limit_s):
            batch.append(work)
            if len(batch) >= batch_size:
                _flush(catalogue, lazy, model_id, batch, changed, stored, gone_hashes,
                       report, written)
                done += len(batch)
                batch = []
                if progress:
                    progress("index", done, total)
        if batch:
            _flush(catalogue, lazy, model_id, batch, changed, stored, gone_hashes, report,
                   written)
            done += len(batch)
            if progress:
                progress("index", done, total)
    finally:
        pool.close(limit_s)
    if lazy.loaded:
        remember_fast_text(catalogue, lazy.get())


def _flush(
    catalogue: Catalogue,
    lazy: _LazyEncoder,
    model_id: int,
    batch: list[_Work],
    changed: set[str],
    stored: dict[str, StoredFile],
    gone_hashes: Counter[str],
    report: IndexReport,
    written: set[str],
) -> None:
    """Encode the decoded images of one batch and write the whole batch in one transaction.

    Content seen earlier in this run (``written``) or earlier in this batch is encoded once:
    later copies are duplicates that share its vector, even when a worker decoded them
    before the first copy reached the catalogue."""
    to_encode: dict[str, np.ndarray] = {}
    copies: set[int] = set()  # positions in batch that are copies of earlier content
    for position, w in enumerate(batch):
        if w.kind != "decoded" or not w.content_hash:
            continue
        if w.content_hash in written or w.content_hash in to_encode:
            copies.add(position)
        else:
            assert w.pixels is not None
            to_encode[w.content_hash] = w.pixels
    vectors: dict[str, np.ndarray] = {}
    if to_encode:
        hashes = list(to_encode)
        t0 = time.perf_counter()
        out = lazy.get().encode_images(np.stack([to_encode[h] for h in hashes]))
        report.stage_seconds["encode"] += time.perf_counter() - t0
        vectors = {h: out[i] for i, h in enumerate(hashes)}
        report.encoded += len(hashes)
    written.update(to_encode)
    rows: list[dict[str, Any]] = []
    vanished: list[str] = []
    for position, w in enumerate(batch):
        path = w.file.path
        if w.kind == "vanished":
            vanished.append(path)
            report.problems.append(ScanProblem(path, w.reason))
            continue
        if w.kind == "changing":
            report.changing += 1
            report.problems.append(ScanProblem(path, w.reason))
            continue
        row: dict[str, Any] = {
            "path": path,
            "size": w.size,
            "mtime_ns": w.mtime_ns,
            "ctime_ns": w.ctime_ns,
            "content_hash": w.content_hash,
        }
        old = stored.get(path)
        attempts = old.attempts if old is not None else 0
        if path in changed:
            if (w.kind in ("decoded", "reused") and old is not None
                    and old.state == STATE_INDEXED and w.content_hash == old.content_hash):
                report.touched += 1  # re-read after a touch or chmod: the same content
            else:
                report.changed += 1
        elif w.kind == "reused" and w.content_hash and gone_hashes[w.content_hash] > 0:
            gone_hashes[w.content_hash] -= 1
            report.moved += 1
            report.missing -= 1  # its old path is not a deletion
        elif w.kind == "reused" or position in copies:
            report.duplicates += 1
        elif attempts > 0:
            report.retried += 1  # failed before and unchanged: not a new file
        else:
            report.new += 1
        if w.kind in ("decoded", "reused"):
            row.update(w.meta)
            row.update(state=STATE_INDEXED, error=None, attempts=0)
        else:
            report.failed[failure_kind(w.reason)] += 1
            row.update(state=STATE_FAILED, error=w.reason, attempts=attempts + 1)
        rows.append(row)
    for w in batch:
        for stage, seconds in w.timings.items():
            report.stage_seconds[stage] += seconds
    t0 = time.perf_counter()
    catalogue.write_batch(rows, vectors, model_id)
    report.stage_seconds["write"] += time.perf_counter() - t0
    if vanished:
        stored = catalogue.files_under(vanished)
        live = [s.image_id for s in stored.values() if s.state != STATE_MISSING]
        catalogue.mark_missing(live)
        report.missing += len(live)


def refresh_index(
    catalogue: Catalogue,
    settings: Settings,
    info: ModelInfo,
    model_id: int,
    kind: str = "auto",
    write: bool = True,
    known_digest: tuple[int, int, int] | None = None,
) -> tuple[str, int]:
    """Bring the FAISS file up to date with the catalogue. Returns (kind, count).
    `known_digest`: the catalogue's indexed-id digest, if the caller has it current."""
    header = read_index_header(settings.index_path)
    if (
        header is not None
        and header.get("model_key") == info.key
        and header.get("layout") == FILE_LAYOUT
        and header.get("generation") == catalogue.generation()
        and kind in ("auto", header.get("kind"))
        and tuple(header.get("id_digest") or ()) == (
            known_digest or catalogue.indexed_id_digest(model_id))
        and (not write or header.get("kind") != KIND_IVFPQ or _vector_file_ok(
            settings, str(header.get("vector_token", "")), int(header["dim"]),
            int(header.get("vector_rows", 0))))
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
    rebuild: bool = False,
    verify_ids_up_to: int | None = None,
) -> VectorIndex:
    """Load the index; apply the catalogue's changes or rebuild it when missing or stale.

    `verify_ids_up_to`: compare id digests only for indexes of at most this many images
    (the digest scans every catalogue row: ~0.9 s at 1M); None always compares.

    Stale means: another generation, or another set of ids than the catalogue's indexed
    images (compared by digest, so a lost vector row is caught even when the generation
    counter agrees). A stale index is updated by ids and content fingerprints, so a file
    whose content changed under its image id gets its new vector, also when the catalogue
    was restored from a copy. `rebuild` builds it afresh from the catalogue whatever the
    file says."""
    generation = catalogue.generation()
    vi = None if rebuild else load_index(settings.index_path)
    if vi is not None and (vi.model_key != info.key or vi.dim != info.dim):
        vi = None
    if (
        vi is not None
        and vi.generation == generation
        and kind in ("auto", vi.kind)
        and (
            (verify_ids_up_to is not None and vi.count > verify_ids_up_to)
            or id_digest(vi.ids) == catalogue.indexed_id_digest(model_id)
        )
    ):
        if write:
            _keep_vector_file(vi, catalogue, settings, info, model_id)
        return vi
    ids_now, fps_now = catalogue.indexed_fingerprints(model_id)
    wanted = choose_kind(ids_now.size) if kind == "auto" else kind
    if vi is not None and vi.kind == wanted:
        add, remove = index_delta(vi, ids_now, fps_now)
        # A large delta on a trained IVF-PQ degrades its clustering, and its dead entries
        # (update_index) take candidate slots: past a fifth, rebuild instead.
        if (add.size + remove.size + vi.dead <= max(1000, ids_now.size // 5)
                or vi.kind == "flat"):
            add_ids, add_vecs = catalogue.vectors_by_ids(add.tolist(), model_id, info.dim)
            pos = np.searchsorted(ids_now, add_ids).clip(max=max(ids_now.size - 1, 0))
            # An id indexed since ids_now was read gets fingerprint 0: the next update
            # compares it as changed and adds it again with its real one.
            add_fps = np.where(ids_now[pos] == add_ids, fps_now[pos], 0) if ids_now.size else (
                np.zeros(add_ids.size, np.int64))
            add_rows = None
            if write and vi.kind == KIND_IVFPQ and vi.vector_token and add_ids.size:
                first = append_vectors(vector_file_path(settings.index_path),
                                       vi.vector_token, info.dim, add_vecs, vi.vector_rows)
                if first is not None:
                    add_rows = np.arange(first, first + add_ids.size)
                    vi.vector_rows = first + add_ids.size
            update_index(vi, add_ids, add_vecs, remove, generation, add_fps, add_rows)
            if write:
                if not _keep_vector_file(vi, catalogue, settings, info, model_id):
                    save_index(vi, settings.index_path)
            return vi
    ids, vecs, fps = catalogue.indexed_vectors_and_fingerprints(model_id, info.dim)
    vi = build_index(ids, vecs, info.key, generation, kind=wanted,
                     use_gpu=wants_gpu(settings.device), fingerprints=fps)
    if write:
        if vi.kind == KIND_IVFPQ:
            write_vector_file_for(vi, vecs, settings)
        else:
            vector_file_path(settings.index_path).unlink(missing_ok=True)
        save_index(vi, settings.index_path)
        _remove_legacy_index(settings)
    return vi


def _remove_legacy_index(settings: Settings) -> None:
    """Delete the index file an older clipsearch kept as <stem>.faiss (now <name>.faiss), if
    it is one (by its header): derived data that nothing reads any more."""
    legacy = settings.db_path.with_name(settings.db_path.stem + ".faiss")
    if legacy in (settings.db_path, settings.index_path) or read_index_header(legacy) is None:
        return
    try:
        legacy.unlink()
    except OSError:
        pass


def _vector_file_ok(settings: Settings, token: str, dim: int, rows: int) -> bool:
    return vector_file_usable(vector_file_path(settings.index_path), token, dim, rows)


def vector_file_complete(vi: VectorIndex, settings: Settings) -> bool:
    """Whether every id of this index has a row in a usable re-rank vector file."""
    assert vi.rows is not None
    return bool(vi.vector_token) and bool((vi.rows >= 0).all()) and _vector_file_ok(
        settings, vi.vector_token, vi.dim, vi.vector_rows)


def write_vector_file_for(vi: VectorIndex, vectors: np.ndarray, settings: Settings) -> None:
    """A fresh re-rank vector file holding `vectors` (in vi.ids order) for an index about
    to be saved; on a write error the index keeps no rows (searches read the catalogue)."""
    try:
        vi.vector_token = write_vector_file(vector_file_path(settings.index_path), vectors)
        vi.rows = np.arange(vi.ids.size, dtype=np.int64)
        vi.vector_rows = vi.ids.size
    except OSError:
        vi.vector_token, vi.rows = "", np.full(vi.ids.size, -1, np.int64)
        vi.vector_rows = 0


def _keep_vector_file(vi: VectorIndex, catalogue: Catalogue, settings: Settings,
                      info: ModelInfo, model_id: int) -> bool:
    """Write the re-rank vector file of an IVF-PQ index anew when it is missing, damaged,
    foreign or lacks rows (then save the index, which refers to it). True if it did."""
    if vi.kind != KIND_IVFPQ or vector_file_complete(vi, settings):
        return False
    ids, vecs, _ = catalogue.indexed_vectors_and_fingerprints(model_id, info.dim)
    if not np.array_equal(ids, vi.ids):  # the catalogue moved on meanwhile: next time
        return False
    write_vector_file_for(vi, vecs, settings)
    save_index(vi, settings.index_path)
    return True
