"""Queries: parse terms, embed them, ANN search, exact re-rank, filters, sorting."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timedelta

import numpy as np

from clipsearch.catalogue.schema import STATE_INDEXED
from clipsearch.catalogue.store import Catalogue, ImageRow, WriterLock
from clipsearch.config import Settings
from clipsearch.encoder import Encoder, ModelInfo, load_encoder, resolve_spec
from clipsearch.errors import (
    CatalogueBusyError,
    CatalogueError,
    ClipsearchError,
    ImageError,
    IndexError_,
    ModelError,
    ModelMismatchError,
    UsageError,
)
from clipsearch.crawler import some_paths
from clipsearch.imaging import decode_file
from clipsearch.indexer import ensure_index
from clipsearch.vector_index import (
    candidate_count,
    gpu_count,
    search_index,
    to_gpu,
    wants_gpu,
)
from clipsearch.vector_store import VectorFile, vector_file_path

SEARCH_VERIFY_IDS_MAX_IMAGES = 200_000
"""Searches re-check the index's id set against the catalogue up to this size (a full scan,
~0.2 s at 200k); above it they trust the change counter, and `index`, `status` and `check`
still compare the ids every time."""

EncoderFactory = Callable[[str | None], Encoder]
MIN_TERM_WEIGHT = 1e-6
"""Smaller weights are read as 0 (the term would have no effect): a usage error."""
_WEIGHT = re.compile(r"^(\d+(?:\.\d+)?):(.*)$")


@dataclass(frozen=True)
class QueryTerm:
    """One part of a query: text or an image file, with a signed weight."""

    weight: float
    text: str | None = None
    image_path: str | None = None


@dataclass(frozen=True)
class SearchOptions:
    """Result count, filters and ordering."""

    top_k: int = 10
    folder: str | None = None
    date_from: float | None = None
    date_to: float | None = None
    formats: tuple[str, ...] = ()
    sort: str = "score"
    margin: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float
    path: str
    date: float
    image_id: int
    format: str | None
    width: int | None
    height: int | None


@dataclass
class SearchResponse:
    results: list[SearchResult]
    model: str
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: embed (query vector), ann (index load if needed + search), rerank
    (candidate vectors from the catalogue, exact scores), lookup (result rows)."""


def parse_query(parts: Sequence[str]) -> list[QueryTerm]:
    """Split arguments into weighted terms.

    Within one argument, words join into one term until a word starting with `+`, `-` or
    `W:` (a weight) starts the next one: `beach -people 2:sunset`. An existing file path
    is an image term.
    """
    terms: list[QueryTerm] = []
    for part in parts:
        if not part.strip():
            continue
        if os.path.isfile(part):
            terms.append(QueryTerm(1.0, image_path=part))
            continue
        current: list[str] = []
        weight = 1.0

        def close() -> None:
            text = " ".join(current).strip()
            if text:
                if os.path.isfile(text):
                    terms.append(QueryTerm(weight, image_path=text))
                else:
                    terms.append(QueryTerm(weight, text=text))

        for word in part.split():
            sign = 0.0
            if word[0] in "+-" and len(word) > 1:
                sign = -1.0 if word[0] == "-" else 1.0
                word = word[1:]
            m = _WEIGHT.match(word)
            if sign or m:
                close()
                current = []
                weight = sign or 1.0
                if m:
                    weight *= float(m.group(1))
                    if not math.isfinite(weight):
                        raise UsageError(f"weight {m.group(1)[:20]}... is too large to use")
                    word = m.group(2)
                if word:
                    current.append(word)
            else:
                current.append(word)
        close()
    if not terms:
        raise UsageError("empty query: give words to search for, or an image path")
    zero = [t for t in terms if abs(t.weight) < MIN_TERM_WEIGHT]
    if zero:
        term = zero[0]
        raise UsageError(f"{term.text or term.image_path!r} has weight {term.weight:g}, which "
                         "would ignore it: use a positive weight, or a negative one to avoid it")
    if all(t.weight < 0 for t in terms):
        raise UsageError("the query has only negative terms: add something to look for")
    return terms


def parse_date(text: str | None, end: bool = False) -> float | None:
    """YYYY, YYYY-MM or YYYY-MM-DD into unix seconds (the end of the period with end=True)."""
    if not text:
        return None
    for fmt, step in (("%Y-%m-%d", "day"), ("%Y-%m", "month"), ("%Y", "year")):
        try:
            start = datetime.strptime(text, fmt)
        except ValueError:
            continue
        if not end:
            return start.timestamp()
        if step == "day":
            nxt = start + timedelta(days=1)
        elif step == "month":
            nxt = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        else:
            nxt = start.replace(year=start.year + 1)
        return nxt.timestamp() - 1e-6
    raise UsageError(f"bad date {text!r}: use YYYY, YYYY-MM or YYYY-MM-DD")


def require_device(device: str) -> None:
    """An explicit --device that queries cannot use here is an error, as it is for `index`
    (text queries use no torch, so this asks faiss, not torch, about CUDA)."""
    if device.startswith("cuda") and gpu_count() == 0:
        raise UsageError(f"--device {device}: no CUDA GPU that faiss can use here",
                         hint="searches run on the CPU with --device auto or cpu")
    if device == "mps" and sys.platform != "darwin":
        raise UsageError("--device mps: MPS is not available here",
                         hint="use --device auto or cpu")


class _Session:
    """A catalogue, its model and (lazily) the encoder and the index, for one query."""

    def __init__(self, settings: Settings, factory: EncoderFactory | None,
                 prefetch: bool = False) -> None:
        self.prefetch = prefetch
        self.settings = settings
        require_device(settings.device)
        self.factory = factory or (lambda spec: load_encoder(spec, settings.device))
        self.catalogue = Catalogue(settings.db_path, create=False)
        active = self.catalogue.active_model()
        if active is None:
            self.catalogue.close()
            raise CatalogueError(
                f"{settings.db_path}: nothing indexed yet",
                hint="run `clipsearch index FOLDER` first",
            )
        if settings.model and settings.model != active.spec:
            try:
                same = resolve_spec(settings.model).spec == active.spec
            except ClipsearchError:
                same = False
            if not same:
                self.catalogue.close()
                raise ModelMismatchError(
                    f"this catalogue was built with {active.spec}; its vectors cannot be "
                    f"compared with {settings.model}",
                    hint="drop --model (the catalogue remembers its model) or use the --db "
                    "built with that model",
                )
        self.model_id = active.id
        self.info = ModelInfo.of(active)
        self._encoder: Encoder | None = None
        self._text: Any = None
        self._index: Any = None
        self._vectors: VectorFile | None = None

    @property
    def model_label(self) -> str:
        return self.info.key if self.info.spec == self.info.key else (
            f"{self.info.spec} ({self.info.key})"
        )

    def encoder(self) -> Encoder:
        if self._encoder is None:
            enc = self.factory(self.info.spec)
            if enc.info.key != self.info.key:
                raise ModelMismatchError(
                    f"model {self.info.spec} now loads as {enc.info.key}, but the catalogue "
                    f"was built with {self.info.key}",
                    hint="restore the original weights, or re-index into a new --db",
                )
            self._encoder = enc
        return self._encoder

    def text_encoder(self) -> Any:
        """The numpy text tower when the catalogue recorded one, else the full model."""
        if self._encoder is not None:
            return self._encoder
        if self._text is None:
            import json

            from clipsearch.indexer import FAST_TEXT_META
            from clipsearch.text_tower import load_fast_text_encoder

            raw = self.catalogue.get_meta(FAST_TEXT_META + self.info.key)
            fast = load_fast_text_encoder(json.loads(raw)) if raw else None
            self._text = fast if fast is not None else self.encoder()
        return self._text

    def index(self):  # type: ignore[no-untyped-def]
        """The index, kept between queries until the catalogue's generation moves on."""
        if self._index is not None and self._index.generation == self.catalogue.generation():
            return self._index
        self._index = self._load_index()
        return self._index

    def vector_file(self, vi: Any) -> VectorFile | None:
        """The re-rank vector file of this index, if it has a usable one (kept open)."""
        if not vi.vector_token:
            return None
        vf = self._vectors
        if vf is None or vf.token != vi.vector_token or vf.rows < vi.vector_rows:
            if vf is not None:
                vf.close()
            self._vectors = vf = VectorFile.open(vector_file_path(self.settings.index_path),
                                                 vi.vector_token, vi.dim, vi.vector_rows)
            if vf is not None and self.prefetch:
                vf.prefetch_in_background()
        return vf

    def _load_index(self):  # type: ignore[no-untyped-def]
        vi = self._load_cpu_index()
        if vi is not None and wants_gpu(self.settings.device):
            to_gpu(vi)  # stays on the CPU where faiss cannot move it
        return vi

    def _load_cpu_index(self):  # type: ignore[no-untyped-def]
        write = not self.catalogue.readonly
        if write:
            try:
                with WriterLock(self.settings.lock_path, wait=False):
                    return ensure_index(self.catalogue, self.settings, self.info, self.model_id,
                                        verify_ids_up_to=SEARCH_VERIFY_IDS_MAX_IMAGES)
            except (CatalogueBusyError, CatalogueError, IndexError_):
                pass  # busy, read-only, or the index file cannot be saved: search anyway
        return ensure_index(self.catalogue, self.settings, self.info, self.model_id, write=False,
                            verify_ids_up_to=SEARCH_VERIFY_IDS_MAX_IMAGES)

    def stored_vector(self, abspath: str) -> np.ndarray | None:
        """The catalogue's vector of this file, if it is indexed and unchanged on disk since
        (an edited file must not be answered for by its old content)."""
        stored = self.catalogue.files_under([abspath]).get(abspath)
        if stored is None or stored.state != STATE_INDEXED:
            return None
        try:
            st = os.stat(abspath)
        except OSError:
            return None
        if not stored.same_stat(st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return None
        return self.catalogue.vector_for_path(abspath, self.model_id)

    def image_vector(self, path: str, notices: list[str]) -> np.ndarray:
        abspath = os.path.abspath(path)
        vec = self.stored_vector(abspath)
        if vec is not None:
            return vec
        from clipsearch.crawler import sniff_image_format

        try:
            with open(abspath, "rb") as fh:
                head = fh.read(64)
        except OSError as err:
            raise UsageError(f"{path}: cannot read: {err.strerror or err}") from err
        if sniff_image_format(head) is None:  # before loading the image model (seconds)
            raise UsageError(f"{path}: not an image (unrecognised content)")
        enc = self.encoder()
        try:
            decoded = decode_file(abspath, enc.image_size)
        except ImageError as err:
            raise UsageError(f"{path}: {err.message}") from err
        return enc.encode_images(enc.preprocess(decoded.image)[None])[0]

    def close(self) -> None:
        if self._vectors is not None:
            self._vectors.close()
        self.catalogue.close()


def _query_vector(session: _Session, terms: list[QueryTerm], notices: list[str]) -> np.ndarray:
    total = np.zeros(session.info.dim, dtype=np.float32)
    texts = [t for t in terms if t.text is not None]
    if texts:
        enc = session.text_encoder()
        for t in texts:
            assert t.text is not None
            n = enc.token_count(t.text)
            if n > enc.context_length:
                notices.append(
                    f"query {t.text[:40]!r}... is {n} tokens; the model reads the first "
                    f"{enc.context_length}"
                )
        vecs = enc.encode_texts([t.text or "" for t in texts])
        for t, v in zip(texts, vecs):
            total += t.weight * v
    for t in terms:
        if t.image_path is not None:
            total += t.weight * session.image_vector(t.image_path, notices)
    if not np.isfinite(total).all():
        raise ModelError(f"model {session.info.spec} gave a non-finite query vector: its "
                         "weights look damaged", hint="re-download or restore the model file")
    norm = float(np.linalg.norm(total))
    if norm < 1e-9:
        raise UsageError("the query terms cancel out: nothing left to search for")
    return total / norm


def _filtered(opts: SearchOptions) -> bool:
    return bool(opts.folder or opts.date_from is not None or opts.date_to is not None
                or opts.formats or opts.label)


def _passes(row: ImageRow, opts: SearchOptions) -> bool:
    if opts.folder:
        folder = os.path.abspath(opts.folder).rstrip(os.sep) + os.sep
        if not row.path.startswith(folder):
            return False
    if opts.formats and (row.format or "").upper() not in opts.formats:
        return False
    if opts.date_from is not None and row.date < opts.date_from:
        return False
    if opts.date_to is not None and row.date > opts.date_to:
        return False
    return True


MAX_DELETED_PER_QUERY = 1000
"""A search stops looking past deleted files (and says so) after finding this many."""


def _rank(session: _Session, qvec: np.ndarray, opts: SearchOptions, exclude: set[int],
          timings: dict[str, float], notices: list[str]) -> list[SearchResult]:
    """The top results, leaving out files deleted since they were indexed (the next best
    take their place). A file counts as deleted when it is gone while the folder it was
    indexed from is there: results on an unplugged drive are kept."""
    if opts.top_k <= 0:
        raise UsageError("--top must be at least 1")
    cat = session.catalogue
    filtered = None
    if _filtered(opts):
        t0 = time.perf_counter()
        labelled = cat.ids_with_label(opts.label) if opts.label else None
        rows = {r.image_id: r for r in cat.images(STATE_INDEXED)
                if _passes(r, opts) and (labelled is None or r.image_id in labelled)}
        ids, vecs = cat.vectors_by_ids(list(rows), session.model_id, session.info.dim)
        filtered = rows, ids, vecs
        timings["ann"] = time.perf_counter() - t0
    roots: list[str] | None = None
    gone: dict[int, str] = {}
    changed: list[str] = []
    extra = 0
    while True:
        count = opts.top_k + extra
        chosen, rows = _ranked(session, qvec, exclude | gone.keys(), count, filtered, timings)
        t0 = time.perf_counter()
        present: list[tuple[float, ImageRow]] = []
        for image_id, score in chosen:
            row = rows.get(image_id)
            if row is None:
                continue
            state = _file_state(row)
            if state == "gone":
                if roots is None:
                    roots = sorted(cat.roots(), key=len, reverse=True)
                if _source_present(row.path, roots):
                    gone[image_id] = row.path
                    continue
            elif state == "changed":
                changed.append(row.path)
            present.append((score, row))
        timings["check"] = timings.get("check", 0.0) + time.perf_counter() - t0
        if (len(present) >= opts.top_k or len(chosen) < count
                or len(gone) >= MAX_DELETED_PER_QUERY):
            break
        extra = max(2 * extra, opts.top_k)
    present = present[: opts.top_k]
    shown_paths = {r.path for _, r in present}
    changed = [p for p in dict.fromkeys(changed) if p in shown_paths]
    if changed:
        notices.append(f"{len(changed)} result{'' if len(changed) == 1 else 's'} changed since "
                       f"the last index run ({some_paths(changed)}), or were only touched: "
                       "ranked by their content then, until `clipsearch index` reads them again")
    if gone:
        notices.append(f"left out {len(gone)} file{'' if len(gone) == 1 else 's'} deleted "
                       f"since the last index run ({some_paths(list(gone.values()))}); "
                       "`clipsearch index` updates the catalogue")
    if opts.margin is not None and present:
        best = present[0][0]
        present = [(s, r) for s, r in present if s >= best - opts.margin]
    if opts.sort == "date":
        present.sort(key=lambda sr: sr[1].date)
    elif opts.sort != "score":
        raise UsageError(f"--sort {opts.sort!r}: use score or date")
    return [SearchResult(n + 1, s, r.path, r.date, r.image_id, r.format, r.width, r.height)
            for n, (s, r) in enumerate(present)]


def _ranked(session: _Session, qvec: np.ndarray, skip: set[int], count: int,
            filtered: tuple[dict[int, ImageRow], np.ndarray, np.ndarray] | None,
            timings: dict[str, float]) -> tuple[list[tuple[int, float]], dict[int, ImageRow]]:
    """Up to `count` (image_id, exact cosine) best first, none in `skip`, and their rows:
    from the filtered candidates, else from the index's candidates."""
    cat = session.catalogue
    t0 = time.perf_counter()
    if filtered is not None:
        rows, ids, vecs = filtered
    else:
        vi = session.index()
        _, cand = search_index(vi, qvec[None], candidate_count(count + len(skip), vi))
        timings["ann"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids, vecs = _candidate_vectors(session, vi, cand[0])
        rows = {}
    scores = vecs @ qvec if len(ids) else np.zeros(0, np.float32)
    order = np.argsort(-scores, kind="stable")
    chosen: list[tuple[int, float]] = []
    for j in order:
        image_id = int(ids[j])
        if image_id in skip:
            continue
        chosen.append((image_id, float(scores[j])))
        if len(chosen) >= count:
            break
    timings["rerank"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not rows:
        rows = cat.images_by_ids([i for i, _ in chosen])
    timings["lookup"] = time.perf_counter() - t0
    return chosen, rows


def _candidate_vectors(session: _Session, vi: Any, cand: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, exact vectors) of the ANN candidates still indexed: from the re-rank vector
    file where the index has rows for them, else (and on any read error) the catalogue."""
    cand = np.asarray(list(dict.fromkeys(int(i) for i in cand if i >= 0)), dtype=np.int64)
    vf = session.vector_file(vi) if cand.size else None
    if vf is not None:
        pos = np.searchsorted(vi.ids, cand).clip(max=max(vi.ids.size - 1, 0))
        indexed = vi.ids[pos] == cand  # dead IVF-PQ entries drop out here
        live, rows = cand[indexed], vi.rows[pos[indexed]]
        try:
            from_file = vf.read_rows(rows[rows >= 0])
        except OSError:
            pass
        else:
            # Rows damaged in place (zeroed, overwritten) are not unit vectors: those ids are
            # read from the catalogue instead.
            norms = np.linalg.norm(from_file, axis=1)
            bad = ~(np.abs(norms - 1.0) < 1e-3)
            if bad.any():
                rows = rows.copy()
                rows[np.flatnonzero(rows >= 0)[bad]] = -1
                from_file = from_file[~bad]
            rest = live[rows < 0]
            if not rest.size:
                return live[rows >= 0], from_file
            ids, vecs = session.catalogue.vectors_by_ids(rest.tolist(), session.model_id,
                                                         session.info.dim)
            return (np.concatenate([live[rows >= 0], ids]),
                    np.concatenate([from_file, vecs]))
    return session.catalogue.vectors_by_ids(cand.tolist(), session.model_id, session.info.dim)


def _file_state(row: ImageRow) -> str:
    """"gone" (no file, a dangling link, a folder in its place), "changed" (another size or
    time than indexed) or "same"; a file that cannot be stat'ed (permissions) counts as
    the same: it may well be there."""
    try:
        st = os.stat(row.path)
    except (FileNotFoundError, NotADirectoryError):
        return "gone"
    except OSError:
        return "same"
    if not stat.S_ISREG(st.st_mode):
        return "gone"
    return "same" if row.same_stat(st) else "changed"


def _source_present(path: str, roots: list[str]) -> bool:
    """Whether the folder a file was indexed from is there, so that its absence means it was
    deleted: the root it is under (longest first; its own folder when the root is the file
    itself or none is known), present and not empty (an unplugged drive can leave an empty
    mount point behind)."""
    folder = os.path.dirname(path)
    for root in roots:
        if path == root:
            break
        if path.startswith(root.rstrip(os.sep) + os.sep):
            folder = root
            break
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


class Searcher:
    """A catalogue opened once for many queries: the text encoder (and the model, if an image
    query needs it) and the index stay loaded between calls; the index is reloaded when the
    catalogue changes. `search()` and `similar()` are one-query uses of it.

    `prefetch` (on by default): once the index is loaded, read the re-rank vector file of a
    large (IVF-PQ) collection into the page cache in the background, so that re-ranking
    does not wait on the disk (`wait_until_warm`). The one-query functions do not."""

    def __init__(self, settings: Settings, encoder_factory: EncoderFactory | None = None,
                 prefetch: bool = True) -> None:
        self._session = _Session(settings, encoder_factory, prefetch)

    def wait_until_warm(self, timeout_s: float | None = None) -> bool:
        """Load the text tower and the index, and wait for the background prefetch of the
        re-rank vector file (if any); False if it did not finish within timeout_s."""
        session = self._session
        session.text_encoder()
        vf = session.vector_file(session.index())
        return vf is None or not session.prefetch or vf.prefetched.wait(timeout_s)

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def search(self, parts: Sequence[str], opts: SearchOptions = SearchOptions()
               ) -> SearchResponse:
        """Rank indexed images by cosine similarity to a text/image query."""
        return self._search_terms(parse_query(parts), opts)

    def similar(self, image: str, opts: SearchOptions = SearchOptions()) -> SearchResponse:
        """Images most like IMAGE (indexed or not); the image itself is never its own hit."""
        if os.path.isdir(image):
            raise UsageError(f"{image}: is a folder, not an image")
        if not os.path.isfile(image):
            raise UsageError(f"{image}: no such file")
        return self.search([image], opts)

    def _search_terms(self, terms: list[QueryTerm], opts: SearchOptions) -> SearchResponse:
        session = self._session
        notices: list[str] = []
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        qvec = _query_vector(session, terms, notices)
        timings["embed"] = time.perf_counter() - t0
        exclude = set()
        for t in terms:
            if t.image_path is not None and t.weight > 0:
                image_id = session.catalogue.image_id_for_path(os.path.abspath(t.image_path))
                if image_id is not None:
                    exclude.add(image_id)
        results = _rank(session, qvec, opts, exclude, timings, notices)
        if opts.label and not results and not session.catalogue.ids_with_label(opts.label):
            notices.append(f"no image has the label {opts.label!r}; give it with "
                           "`clipsearch classify --labels ...` first")
        return SearchResponse(results, session.model_label, notices, timings)


def search(settings: Settings, parts: Sequence[str], opts: SearchOptions = SearchOptions(),
           encoder_factory: EncoderFactory | None = None) -> SearchResponse:
    """Rank indexed images by cosine similarity to a text/image query."""
    terms = parse_query(parts)
    with Searcher(settings, encoder_factory, prefetch=False) as searcher:
        return searcher._search_terms(terms, opts)


def similar(settings: Settings, image: str, opts: SearchOptions = SearchOptions(),
            encoder_factory: EncoderFactory | None = None) -> SearchResponse:
    """Images most like IMAGE (indexed or not); the image itself is never its own hit."""
    with Searcher(settings, encoder_factory, prefetch=False) as searcher:
        return searcher.similar(image, opts)
