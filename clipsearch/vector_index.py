"""The only module that imports faiss: build (Flat / IVF-PQ), update, search, save, load."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.atomic_file import write_atomically
from clipsearch.config import FLAT_INDEX_MAX_IMAGES
from clipsearch.errors import IndexError_

FILE_MAGIC = b"CLIPSRCHIDX1"
FILE_LAYOUT = 2
"""Layout 2 adds, per id, a content fingerprint and a row in the re-rank vector file (and
counts dead IVF-PQ entries): files of layout 1 may hold the vectors of files whose content
changed under the same image id, so they are rebuilt, not trusted."""
KIND_FLAT = "flat"
KIND_IVFPQ = "ivfpq"
IVF_MIN_POINTS_PER_LIST = 39
IVF_TRAIN_MAX_POINTS = 200_000
IVF_PROBE_DIVISOR = 3
RERANK_MIN_CANDIDATES = 200
RERANK_FACTOR = 20
SINGLE_THREAD_MAX_QUERIES = 4


ID_DIGEST_MULTIPLIER = 2654435761


def id_digest(ids: np.ndarray) -> tuple[int, int, int]:
    """(count, sum, hashed sum) of an id set: equal digests mean (almost surely) equal sets;
    Catalogue.indexed_id_digest computes the same inside SQLite."""
    ids = np.asarray(ids, dtype=np.int64)
    hashed = (ids * ID_DIGEST_MULTIPLIER) % 2**32
    return int(ids.size), int(ids.sum()), int(hashed.sum())


@dataclass
class VectorIndex:
    """A FAISS index keyed by catalogue image ids, plus what it was built from."""

    index: Any
    kind: str
    dim: int
    model_key: str
    generation: int
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nprobe: int = 1
    on_gpu: bool = False
    """Searches run on the GPU copy in `index` (never saved or updated: see to_gpu)."""
    fingerprints: np.ndarray | None = None
    """Per id (same order): the content fingerprint its vector was made from
    (Catalogue.indexed_fingerprints); None reads as zeros."""
    dead: int = 0
    """IVF-PQ entries whose id left the indexed set or got new content: still in the FAISS
    index (see update_index); searches drop them at the exact re-rank."""
    rows: np.ndarray | None = None
    """Per id (same order): its row in the re-rank vector file (vector_store), -1 for none;
    None reads as all -1."""
    vector_token: str = ""
    """The token of the re-rank vector file these rows refer to ("" for none)."""
    vector_rows: int = 0
    """Rows the vector file held when this index was made: rows below it may be in use (by
    this or an older index), rows past it are not (vector_store.append_vectors)."""

    def __post_init__(self) -> None:
        if self.fingerprints is None:
            self.fingerprints = np.zeros(self.ids.size, np.int64)
        if self.rows is None:
            self.rows = np.full(self.ids.size, -1, np.int64)

    @property
    def count(self) -> int:
        return int(self.ids.size)


def choose_kind(n: int, threshold: int = FLAT_INDEX_MAX_IMAGES) -> str:
    """Exact search while small; IVF-PQ once the collection is large."""
    return KIND_FLAT if n < threshold else KIND_IVFPQ


def ivfpq_params(n: int, dim: int) -> tuple[int, int, int]:
    """(nlist, pq_subquantizers, nprobe) derived from collection size and dimension."""
    nlist = int(round(4 * math.sqrt(max(n, 1))))
    nlist = max(1, min(nlist, n // IVF_MIN_POINTS_PER_LIST, 65536))
    m = dim // 8
    while m > 1 and dim % m:
        m -= 1
    return nlist, m, nprobe_for(nlist)


def nprobe_for(nlist: int) -> int:
    """Lists to probe: a third of them. With an eighth, recall@10 (after the exact re-rank)
    fell from 0.998 at 100k CLIP-like vectors to 0.89 at 1M, as neighbours spread over more
    lists; at 1M a quarter gives 0.972 / 0.974 (text / image queries), a third 0.990 / 0.987
    and a half 0.999 / 0.991 (4-bit FastScan codes, 300 queries each, benchmarks/RESULTS.md)."""
    return max(1, min(nlist, max(16, nlist // IVF_PROBE_DIVISOR)))


def fastscan_subquantizers(dim: int) -> int:
    """4-bit PQ sub-quantizers for FastScan: four dimensions each for large vectors (64 bytes
    per 512-d vector, the size of the 8-bit codes they replaced, at equal recall), but at
    least 64 (or dim / 2): 16 centroids over 4 dimensions are too coarse for small vectors
    (32-d: recall@10 0.68 with 8 sub-quantizers, >= 0.9 with 16). Even, and dividing dim."""
    m = max(2, min(dim // 2, max(dim // 4, 64)))
    while m > 2 and (dim % m or m % 2):
        m -= 1
    return m


def _faiss() -> Any:
    import faiss

    return faiss


def build_index(
    ids: np.ndarray,
    vectors: np.ndarray,
    model_key: str,
    generation: int,
    kind: str = "auto",
    seed: int = 1234,
    use_gpu: bool | None = None,
    fingerprints: np.ndarray | None = None,
) -> VectorIndex:
    """Build a fresh index over L2-normalised vectors (cosine = inner product).
    `use_gpu`: train on (and lay codes out for) the GPU; None: when faiss sees one.
    `fingerprints`: the content fingerprint of each vector (by position), for updates."""
    faiss = _faiss()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = choose_kind(n)
    gpu = use_gpu is not False and gpu_count() > 0
    # Too few vectors to train the PQ codebooks (FAISS wants 39 points per centroid: 16 per
    # 4-bit sub-quantizer, 256 per 8-bit one) or the lists: exact search instead.
    if kind == KIND_IVFPQ and n < IVF_MIN_POINTS_PER_LIST * (256 if gpu else 16):
        kind = KIND_FLAT
    nprobe = 1
    if kind == KIND_FLAT:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist, m, nprobe = ivfpq_params(n, dim)
        quantizer = faiss.IndexFlatIP(dim)
        if gpu:
            # Classic 8-bit codes: the layout faiss can train and search on a GPU.
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            # 4-bit codes scanned with SIMD (FastScan): at 1M CLIP-like vectors and the same
            # 64 bytes per vector, 4.2 ms per query instead of 22.4 at equal recall after the
            # exact re-rank (0.972 / 0.974 vs 0.972 / 0.980, nprobe 1000, one thread).
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist,
                                             fastscan_subquantizers(dim), 4,
                                             faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors
        if n > IVF_TRAIN_MAX_POINTS:
            sample = vectors[np.sort(rng.choice(n, IVF_TRAIN_MAX_POINTS, replace=False))]
        index.cp.seed = seed
        index = _train(index, sample, gpu)
        index.nprobe = nprobe
    if n:
        index.add_with_ids(vectors, ids)
    order = np.argsort(ids, kind="stable")
    fps = (np.zeros(n, np.int64) if fingerprints is None
           else np.asarray(fingerprints, np.int64)[order])
    return VectorIndex(index, kind, dim, model_key, generation, ids[order], nprobe,
                       fingerprints=fps)


def gpu_count() -> int:
    """GPUs faiss can use here (0 for a CPU-only build or machine)."""
    faiss = _faiss()
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001
        return 0


def wants_gpu(device: str) -> bool:
    """Whether faiss should use the GPU (index training, searches): `auto` or cuda when faiss
    sees one; never for `--device cpu` (or mps, which faiss cannot use)."""
    if device == "cpu" or device == "mps":
        return False
    return gpu_count() > 0


def to_gpu(vi: VectorIndex) -> bool:
    """Put a loaded index on the GPU(s) for searching; False, leaving it on the CPU, where
    faiss cannot (no GPU, not enough memory, or a kind without a GPU version: IVF-PQ
    FastScan). The GPU copy only searches: updates and saves go to a CPU index loaded from
    the file (ensure_index), so it is never written back."""
    if vi.on_gpu or vi.count == 0:
        return vi.on_gpu
    faiss = _faiss()
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True  # PQ codes of 56+ bytes need float16 lookup tables on GPU
        gpu = faiss.index_cpu_to_all_gpus(vi.index, co=options)
        if vi.kind == KIND_IVFPQ:
            faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", vi.nprobe)
    except Exception:  # noqa: BLE001 - the CPU index always works
        return False
    vi.index = gpu
    vi.on_gpu = True
    return True


def _train(index: Any, sample: np.ndarray, gpu: bool) -> Any:
    """Train IVF-PQ on the GPU when asked (then back to a CPU index), else the CPU."""
    faiss = _faiss()
    if gpu:
        try:
            on_gpu = faiss.index_cpu_to_all_gpus(index)
            on_gpu.train(sample)
            return faiss.index_gpu_to_cpu(on_gpu)
        except Exception:  # noqa: BLE001 - fall back to the CPU, which always works
            pass
    index.train(sample)
    return index


def index_delta(vi: VectorIndex, ids: np.ndarray, fingerprints: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(ids to add, ids to remove) to bring the index to this id set with these content
    fingerprints (ids sorted): a changed id is in both."""
    in_index = np.isin(ids, vi.ids)
    add = ids[~in_index]
    remove = vi.ids[~np.isin(vi.ids, ids)]
    common = ids[in_index]
    assert vi.fingerprints is not None
    now = np.asarray(fingerprints, np.int64)[in_index]
    then = vi.fingerprints[np.searchsorted(vi.ids, common)]
    changed = common[now != then]
    return np.union1d(add, changed), np.union1d(remove, changed)


def update_index(
    vi: VectorIndex,
    add_ids: np.ndarray,
    add_vectors: np.ndarray,
    remove_ids: np.ndarray,
    generation: int,
    add_fingerprints: np.ndarray | None = None,
    add_rows: np.ndarray | None = None,
) -> None:
    """Apply a delta in place: first the removals, then the additions (an id in both gets
    its new vector); afterwards `vi.ids` is the new id set.

    IVF-PQ indexes only ever add: FAISS 1.15.1's IndexIVFPQFastScan mis-places codes added
    after any `remove_ids` (30 of 500 vectors added after removing 50 lost their own top-20
    spot; none without the removal). Removed entries stay in FAISS as `dead` ones, which
    the exact re-rank drops (it reads only the catalogue's indexed ids and their current
    vectors). Flat indexes remove in place."""
    faiss = _faiss()
    add_ids = np.asarray(add_ids, dtype=np.int64)
    remove_ids = np.asarray(remove_ids, dtype=np.int64)
    add_vectors = np.asarray(add_vectors, dtype=np.float32).reshape(add_ids.size, vi.dim)
    fps = (np.zeros(add_ids.size, np.int64) if add_fingerprints is None
           else np.asarray(add_fingerprints, np.int64))
    rows = (np.full(add_ids.size, -1, np.int64) if add_rows is None
            else np.asarray(add_rows, np.int64))
    assert vi.fingerprints is not None and vi.rows is not None
    keep = ~np.isin(vi.ids, remove_ids)
    if vi.kind == KIND_IVFPQ:
        vi.dead += int((~keep).sum())
    elif remove_ids.size:
        vi.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(remove_ids)))
    if add_ids.size:
        vi.index.add_with_ids(np.ascontiguousarray(add_vectors), np.ascontiguousarray(add_ids))
    ids = np.concatenate([vi.ids[keep], add_ids])
    fingerprints = np.concatenate([vi.fingerprints[keep], fps])
    all_rows = np.concatenate([vi.rows[keep], rows])
    order = np.argsort(ids, kind="stable")
    vi.ids, vi.fingerprints, vi.rows = ids[order], fingerprints[order], all_rows[order]
    vi.generation = generation


def candidate_count(k: int, vi: VectorIndex) -> int:
    """How many ANN candidates to fetch for k exact results (more in proportion to the dead
    entries, which the re-rank drops)."""
    if vi.kind == KIND_FLAT:
        return k
    wanted = max(RERANK_MIN_CANDIDATES, RERANK_FACTOR * k)
    return -(-wanted * (vi.count + vi.dead) // max(vi.count, 1))


def search_index(vi: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query; FAISS's -1 padding is removed by callers via ids >= 0."""
    if vi.count == 0 or k <= 0:
        q = len(queries)
        return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
    k = min(k, vi.count + vi.dead)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if vi.on_gpu:
        return vi.index.search(queries, k)  # nprobe was set when it moved (to_gpu)
    if vi.kind == KIND_IVFPQ:
        vi.index.nprobe = vi.nprobe
    faiss = _faiss()
    if len(queries) <= SINGLE_THREAD_MAX_QUERIES:
        # One query gains nothing from OpenMP and loses ~10x when the cores are busy.
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return vi.index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(before)
    return vi.index.search(queries, k)


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product (the reference for recall)."""
    faiss = _faiss()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    return flat.search(np.ascontiguousarray(queries, np.float32), min(k, len(ids)))


def save_index(vi: VectorIndex, path: Path) -> None:
    """Write atomically: temp file in the same folder, fsync, rename."""
    faiss = _faiss()
    header = json.dumps(
        {
            "kind": vi.kind,
            "dim": vi.dim,
            "model_key": vi.model_key,
            "generation": vi.generation,
            "count": vi.count,
            "dead": vi.dead,
            "layout": FILE_LAYOUT,
            "vector_token": vi.vector_token,
            "vector_rows": vi.vector_rows,
            "id_digest": list(id_digest(vi.ids)),
            "nprobe": vi.nprobe,
        }
    ).encode()
    blob = faiss.serialize_index(vi.index).tobytes()
    assert vi.fingerprints is not None and vi.rows is not None
    ids = np.ascontiguousarray(np.concatenate([vi.ids, vi.fingerprints, vi.rows]),
                               dtype="<i8").tobytes()

    def write(fh: Any) -> None:
        fh.write(FILE_MAGIC)
        fh.write(struct.pack("<QQQ", len(header), len(ids), len(blob)))
        fh.write(header)
        fh.write(ids)
        fh.write(blob)

    try:
        write_atomically(path, write)
    except OSError as err:
        raise IndexError_(f"cannot write index {path}: {err.strerror or err}") from err


def read_index_header(path: Path) -> dict[str, Any] | None:
    """The header of an index file (kind, dim, model_key, generation, count, layout) without
    faiss; None when it is not one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(FILE_MAGIC) + 24)
            if not head.startswith(FILE_MAGIC) or len(head) < len(FILE_MAGIC) + 24:
                return None
            hlen, ilen, blen = struct.unpack_from("<QQQ", head, len(FILE_MAGIC))
            if os.fstat(fh.fileno()).st_size != len(head) + hlen + ilen + blen:
                return None
            header: dict[str, Any] = json.loads(fh.read(hlen))
            return header
    except (OSError, ValueError, struct.error):
        return None


def load_index(path: Path) -> VectorIndex | None:
    """Read an index file; None when it is missing, truncated, damaged or of an older layout
    (rebuild it)."""
    faiss = _faiss()
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if not data.startswith(FILE_MAGIC):
            return None
        off = len(FILE_MAGIC)
        hlen, ilen, blen = struct.unpack_from("<QQQ", data, off)
        off += 24
        if off + hlen + ilen + blen != len(data):
            return None
        header = json.loads(data[off : off + hlen])
        if header.get("layout") != FILE_LAYOUT:
            return None
        off += hlen
        ids = np.frombuffer(data, dtype="<i8", count=ilen // 8, offset=off).astype(np.int64)
        live, dead = int(header["count"]), int(header["dead"])
        if ids.size != 3 * live:
            return None
        ids, fingerprints, rows = ids[:live], ids[live: 2 * live], ids[2 * live:]
        off += ilen
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=off))
        if index.ntotal != live + dead or index.d != header["dim"]:
            return None
        return VectorIndex(
            index,
            header["kind"],
            int(header["dim"]),
            header["model_key"],
            int(header["generation"]),
            ids,
            # An index built under an older, smaller probe policy searches with today's.
            max(int(header.get("nprobe", 1)), nprobe_for(int(index.nlist)))
            if header["kind"] == KIND_IVFPQ else int(header.get("nprobe", 1)),
            fingerprints=fingerprints,
            dead=dead,
            rows=rows,
            vector_token=str(header.get("vector_token", "")),
            vector_rows=int(header.get("vector_rows", 0)),
        )
    except Exception:  # noqa: BLE001 - any damage means: rebuild from the catalogue
        return None
