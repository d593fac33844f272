"""A/B of the re-rank step at one collection size, in one process: exact vectors from the
re-rank vector file (A) against the catalogue's SQLite rows (B), alternating query by query.

Usage: python benchmarks/ab_rerank.py [--n 1000000] [--queries 40] [--data DIR]
Needs the collection bench_query.py built (same --data). Each query's candidates come from
the index; B is what a search does without a usable vector file. Also measures both on
candidate sets not read before (ids drawn at random), where the page cache decides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    args = ap.parse_args()
    from clipsearch.config import resolve_settings
    from clipsearch.search import Searcher, _candidate_vectors
    from clipsearch.vector_index import candidate_count, search_index

    settings = resolve_settings(db=args.data / f"query-{args.n}" / "catalogue.sqlite3")
    rng = np.random.default_rng(7)
    out: dict[str, list[float]] = {"file": [], "catalogue": [], "file_random_ids": [],
                                   "catalogue_random_ids": []}
    with Searcher(settings) as searcher:
        session = searcher._session
        vi = session.index()
        assert session.vector_file(vi) is not None, "no usable re-rank vector file"
        dim = session.info.dim
        for i in range(args.queries):
            q = rng.standard_normal(dim).astype(np.float32)
            q /= np.linalg.norm(q)
            _, cand = search_index(vi, q[None], candidate_count(10, vi))
            random_ids = rng.choice(vi.ids, 200, replace=False)
            for name, ids in (("", cand[0]), ("_random_ids", random_ids)):
                order = ("file", "catalogue") if i % 2 == 0 else ("catalogue", "file")
                for kind in order:
                    t = time.perf_counter()
                    if kind == "file":
                        got_ids, _ = _candidate_vectors(session, vi, ids)
                    else:
                        got_ids, _ = session.catalogue.vectors_by_ids(
                            [int(x) for x in ids if x >= 0], session.model_id, dim)
                    out[kind + name].append((time.perf_counter() - t) * 1000)
                    assert len(got_ids) > 0
    result = {k: {"p50_ms": statistics.median(v), "p95_ms": float(np.percentile(v, 95)),
                  "n": len(v)} for k, v in out.items()}
    print(json.dumps({"n_images": args.n, **result}, indent=2))


if __name__ == "__main__":
    main()
