"""Where does IVF-PQ pay off over an exact Flat index? Query latency, build time and memory
per vector at several collection sizes, both measured in the same process (A B A B).

Usage: python benchmarks/bench_index_kinds.py [--sizes 10000,50000,100000,200000] [--dim 512]
Prints a rich table and writes benchmarks/out/index_kinds.json. Vectors are CLIP-like
(concept clusters, anisotropy, modality gap; see tests/test_vector_index.py::clip_like).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_vector_index import clip_like  # noqa: E402

from clipsearch.vector_index import (  # noqa: E402
    KIND_FLAT,
    KIND_IVFPQ,
    build_index,
    candidate_count,
    exact_search,
    search_index,
)


def query_ms(vi, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> list[float]:  # type: ignore[no-untyped-def]
    """One query at a time (what a user waits for), including the exact re-rank."""
    times = []
    for q in queries:
        t = time.perf_counter()
        _, cand = search_index(vi, q[None], candidate_count(k, vi))
        ids = cand[0][cand[0] >= 0]
        if vi.kind == KIND_IVFPQ:
            scores = vectors[ids] @ q  # ids are row numbers here
            ids = ids[np.argsort(-scores)[:k]]
        times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,50000,100000,200000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        images, texts, image_q = clip_like(n, args.queries, args.dim)
        ids = np.arange(n, dtype=np.int64)
        t = time.perf_counter()
        flat = build_index(ids, images, "bench", 0, kind=KIND_FLAT)
        flat_build = time.perf_counter() - t
        t = time.perf_counter()
        ivf = build_index(ids, images, "bench", 0, kind=KIND_IVFPQ)
        ivf_build = time.perf_counter() - t
        flat_ms: list[float] = []
        ivf_ms: list[float] = []
        for _ in range(2):  # A B A B
            flat_ms += query_ms(flat, images, texts)
            ivf_ms += query_ms(ivf, images, texts)
        _, truth = exact_search(images, ids, texts, 10)
        _, cand = search_index(ivf, texts, candidate_count(10, ivf))
        found = []
        for q, row in zip(texts, cand):
            row = row[row >= 0]
            found.append(row[np.argsort(-(images[row] @ q))[:10]])
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        import faiss

        flat_bytes = faiss.serialize_index(flat.index).nbytes / n
        ivf_bytes = faiss.serialize_index(ivf.index).nbytes / n
        rows.append({
            "n": n, "dim": args.dim,
            "flat_p50_ms": statistics.median(flat_ms), "ivfpq_p50_ms": statistics.median(ivf_ms),
            "flat_p95_ms": float(np.percentile(flat_ms, 95)),
            "ivfpq_p95_ms": float(np.percentile(ivf_ms, 95)),
            "speedup_p50": statistics.median(flat_ms) / statistics.median(ivf_ms),
            "ivfpq_recall@10_text": recall,
            "flat_build_s": flat_build, "ivfpq_build_s": ivf_build,
            "flat_bytes_per_vector": flat_bytes, "ivfpq_bytes_per_vector": ivf_bytes,
        })
        print(json.dumps(rows[-1]), flush=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Flat vs IVF-PQ (+ exact re-rank), one text query at a time")
    for col in ("n", "flat p50 ms", "ivfpq p50 ms", "flat/ivfpq", "recall@10", "ivfpq build s",
                "flat B/vec", "ivfpq B/vec"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), f"{r['flat_p50_ms']:.2f}", f"{r['ivfpq_p50_ms']:.2f}",
                      f"{r['speedup_p50']:.2f}", f"{r['ivfpq_recall@10_text']:.3f}",
                      f"{r['ivfpq_build_s']:.1f}", f"{r['flat_bytes_per_vector']:.0f}",
                      f"{r['ivfpq_bytes_per_vector']:.0f}")
    Console().print(table)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "index_kinds.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
