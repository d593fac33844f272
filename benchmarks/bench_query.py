"""Query speed, recall and memory of clipsearch at 10k / 100k / 1M images, against an exact
numpy scan and against rclip on the same vectors.

Usage: python benchmarks/bench_query.py [--sizes 10000,100000,1000000] [--queries 50]
       [--cold-runs 5] [--rclip-queries 5] [--no-rclip] [--rebuild] [--data DIR]
Per size it fills a real catalogue through clipsearch's store API (vectors, image rows and the
model record of a random-weight ViT-B-32-256 whose numpy text tower encodes the queries),
builds the index with clipsearch.vector_index, and measures:
- warm latency: `clipsearch.search.Searcher.search()` with text tower and index loaded, split
  into text encoding / ANN / re-rank (candidate vectors from SQLite, exact scores) / catalogue
  lookup; and `clipsearch.search.search()`, which opens everything per call;
- cold latency: a whole `python -m clipsearch.cli search TEXT --db ...` process, its peak RSS;
- recall@10 of the ANN path (+ exact re-rank) against exact search, for text and image queries;
- index bytes per image in RAM and on disk, IVF-PQ training and build time;
- an exact numpy scan (vectors in RAM) and rclip (whole process and in-process) as baselines.
Collections are reused from DATA between runs (with their build times) unless --rebuild.

Vectors: CLIP-shaped synthetic collections (concept clusters, anisotropy, a modality gap
between texts and images: the recipe of tests/test_vector_index.py::clip_like, generated in
chunks). A random-weight model's own embeddings are degenerate (nearly one direction), so they
are used only where real compute matters: the text tower encodes real query strings, and those
"model text" vectors are a third query set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MODEL = "ViT-B-32-256:datacomp_s34b_b86k"
DIM = 512
K = 10
GENERATOR = "clip_like-chunked-v1"
QUERY_TEXTS = [
    "a dog running on the beach", "sunset over the mountains", "birthday cake with candles",
    "a cat sleeping on a sofa", "snow covered trees in the forest", "people dancing at a wedding",
    "a red car parked on the street", "children playing in the park", "a plate of pasta",
    "the eiffel tower at night", "a baby laughing", "fireworks over the city",
    "a boat on a calm lake", "old black and white family photo", "a horse in a field",
    "my passport", "receipt from the restaurant", "a screenshot of a chat", "whiteboard notes",
    "a bicycle leaning against a wall", "autumn leaves on the ground", "a lighthouse by the sea",
    "coffee cup on a wooden table", "a crowded train station", "graduation ceremony",
    "a cactus in the desert", "rainbow after the rain", "a bowl of fruit", "skiing down a slope",
    "the moon over the ocean", "a group selfie", "a waterfall in the jungle",
    "christmas tree with presents", "a squirrel eating a nut", "a bridge at sunrise",
    "a street market in asia", "surfing a big wave", "a tent under the stars",
    "a close up of a flower", "my grandmother in the kitchen", "a football match in a stadium",
    "a painting in a museum", "a rocket launch", "a microscope image of cells",
    "an astronaut in space", "a coin collection", "a motorcycle on a country road",
    "a hot air balloon", "a library full of books", "a dog wearing sunglasses",
]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_collection(n: int, n_queries: int, dim: int = DIM, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [n, dim], text queries, image queries): clip_like's recipe, in float32 chunks."""
    rng = np.random.default_rng(seed)
    n_concepts = max(50, n // 40)
    concepts = _unit(rng.standard_normal((n_concepts, dim)))
    common = _unit(rng.standard_normal(dim))
    image_gap = common * 1.2 + _unit(rng.standard_normal(dim)) * 0.6
    text_gap = common * 0.6 + _unit(rng.standard_normal(dim)) * 0.6
    images = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(n, start + 100_000) - start
        noise = _unit(rng.standard_normal((m, dim), dtype=np.float32)) * 1.5
        images[start : start + m] = _unit(concepts[rng.integers(0, n_concepts, m)] + image_gap
                                          + noise)
    texts = _unit(concepts[rng.integers(0, n_concepts, n_queries)] + text_gap
                  + _unit(rng.standard_normal((n_queries, dim))) * 1.0)
    image_q = _unit(images[rng.integers(0, n, n_queries)]
                    + _unit(rng.standard_normal((n_queries, dim))) * 0.3)
    return images, texts, image_q


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def exact_top(images: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact top-k per query (numpy, chunked over the collection)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(images), 200_000):
        s = queries @ images[start : start + 200_000].T
        i = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, i, 1)], 1)
        best_i = np.concatenate([best_i, i + start], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


class Bench:
    """One collection: its catalogue, index and query sets."""

    def __init__(self, n: int, args: argparse.Namespace, encoder: Any) -> None:
        from clipsearch.config import resolve_settings

        self.n = n
        self.args = args
        self.folder = args.data / f"query-{n}"
        self.photos = self.folder / "photos"  # the rows' folder (rclip's cwd)
        self.photos.mkdir(parents=True, exist_ok=True)
        self._link_files()
        self.settings = resolve_settings(db=self.folder / "catalogue.sqlite3")
        self.encoder = encoder
        self.images, self.text_q, self.image_q = make_collection(n, args.recall_queries,
                                                                 seed=n)
        self.result: dict[str, Any] = {"n": n}

    # -- setup ---------------------------------------------------------------------
    def _link_files(self) -> None:
        """An (empty) file behind every row, as in a real collection: searches check that
        their results still exist. Hard links to a few empty files (ext4 allows 65,000 links
        to one), not an inode each."""
        done = self.folder / "files-linked.txt"
        if done.exists() and done.read_text() == str(self.n):
            return
        for i, path in enumerate(self.paths(0, self.n)):
            source = self.folder / f"empty-{i // 60_000}.jpg"
            if i % 60_000 == 0:
                source.touch()
            try:
                os.link(source, path)
            except FileExistsError:
                pass
        done.write_text(str(self.n))

    def paths(self, start: int, stop: int) -> list[str]:
        return [str(self.photos / f"img_{i:07}.jpg") for i in range(start, stop)]

    def build(self) -> None:
        """Fill the catalogue and build the index, or reuse them (and their recorded build
        times) from an earlier run: the catalogue while the vectors' recipe is the same, the
        index while clipsearch/vector_index.py is too."""
        import hashlib

        import clipsearch.vector_index as vx
        from clipsearch.catalogue.store import Catalogue
        from clipsearch.indexer import remember_fast_text

        code = hashlib.sha256(Path(vx.__file__).read_bytes()).hexdigest()[:12]
        cat_stamp = f"{GENERATOR}:n={self.n}:seed={self.n}"
        record = self.folder / "build.json"
        built = json.loads(record.read_text()) if record.exists() else {}
        if self.args.rebuild or built.get("catalogue_stamp") != cat_stamp:
            for p in self.folder.glob("catalogue.*"):
                p.unlink()
            built = {"catalogue_stamp": cat_stamp, "catalogue": {}, "index": {}}
            t = time.perf_counter()
            with Catalogue(self.settings.db_path) as cat:
                model_id = cat.register_model(self.encoder.info.as_record())
                remember_fast_text(cat, self.encoder)
                for start in range(0, self.n, 20_000):
                    stop = min(self.n, start + 20_000)
                    rows = [{"path": p, "size": 2_500_000 + i,
                             "mtime_ns": 1_600_000_000_000_000_000 + i * 10**9,
                             "content_hash": f"{i:032x}", "width": 4000, "height": 3000,
                             "format": "JPEG", "captured_at": None, "state": "indexed",
                             "error": None, "attempts": 0}
                            for i, p in zip(range(start, stop), self.paths(start, stop))]
                    cat.write_batch(rows, {r["content_hash"]: self.images[i]
                                           for i, r in zip(range(start, stop), rows)}, model_id)
            built["catalogue"] = {"catalogue_load_s": time.perf_counter() - t}
        else:
            self.result["catalogue_reused_from_earlier_run"] = True
        stale = built.get("index_stamp") != code and not self.args.keep_index
        if self.args.rebuild or stale or vx.load_index(self.settings.index_path) is None:
            with Catalogue(self.settings.db_path) as cat:
                model = cat.active_model()
                assert model is not None
                built["index"] = self._build_index(cat, model.id)
            built["index_stamp"] = code
        else:
            self.result["index_reused_from_earlier_run"] = True
        built["catalogue"]["catalogue_bytes_per_image"] = (
            self.settings.db_path.stat().st_size / self.n)
        record.write_text(json.dumps(built))
        self.result.update(built["catalogue"], **built["index"])

    def _build_index(self, cat: Any, model_id: int) -> dict[str, Any]:
        """ensure_index's rebuild path, step by step: vectors from SQLite, train+add, save."""
        import clipsearch.vector_index as vx

        train_s = [0.0]
        real_train = vx._train

        def timed_train(index: Any, sample: np.ndarray, *args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real_train(index, sample, *args)
            finally:
                train_s[0] += time.perf_counter() - t0

        t = time.perf_counter()
        ids, vecs, fps = cat.indexed_vectors_and_fingerprints(model_id, DIM)
        load_s = time.perf_counter() - t
        assert ids.size == self.n and ids[0] == 1 and ids[-1] == self.n  # image_id = row + 1
        vx._train = timed_train
        try:
            t = time.perf_counter()
            vi = vx.build_index(ids, vecs, self.encoder.info.key, cat.generation(),
                                fingerprints=fps)
            build_s = time.perf_counter() - t
        finally:
            vx._train = real_train
        t = time.perf_counter()
        vector_file_s = 0.0
        if vi.kind == vx.KIND_IVFPQ:
            from clipsearch.indexer import write_vector_file_for

            write_vector_file_for(vi, vecs, self.settings)
            vector_file_s = time.perf_counter() - t
            t = time.perf_counter()
        vx.save_index(vi, self.settings.index_path)
        save_s = time.perf_counter() - t
        return {"index_kind": vi.kind, "nprobe": vi.nprobe, "vectors_from_sqlite_s": load_s,
                "index_build_s": build_s, "ivfpq_train_s": train_s[0],
                "index_add_s": build_s - train_s[0], "index_save_s": save_s,
                "rerank_vector_file_write_s": vector_file_s}

    # -- measurements ----------------------------------------------------------------
    def sizes(self) -> None:
        import faiss

        from clipsearch.vector_index import load_index
        from clipsearch.vector_store import vector_file_path

        vi = load_index(self.settings.index_path)
        assert vi is not None
        ram = faiss.serialize_index(vi.index).nbytes + vi.ids.nbytes * 3  # ids, fps, rows
        self.result.update(
            index_kind=vi.kind, nprobe=vi.nprobe,
            index_ram_bytes_per_image=ram / self.n,
            index_disk_bytes_per_image=self.settings.index_path.stat().st_size / self.n,
            rerank_file_bytes_per_image=(vector_file_path(self.settings.index_path).stat()
                                         .st_size / self.n
                                         if vector_file_path(self.settings.index_path).exists()
                                         else 0),
            numpy_ram_bytes_per_image=self.images.nbytes / self.n)

    def warm(self) -> None:
        """`Searcher.search()`: the library's call for a long-lived caller (catalogue, text
        tower and index loaded once), split into the stages it reports."""
        from clipsearch.search import SearchOptions, Searcher

        names = {"embed": "text", "ann": "ann", "rerank": "rerank", "lookup": "lookup",
                 "check": "check"}
        stages: dict[str, list[float]] = {s: [] for s in (*names.values(), "total")}
        with Searcher(self.settings) as searcher:
            t = time.perf_counter()
            # A long-lived caller: text tower and index loaded, re-rank vector file read
            # into the page cache by the Searcher's background prefetch.
            self.result["warm_ready"] = searcher.wait_until_warm(timeout_s=300)
            self.result["warm_ready_s"] = time.perf_counter() - t
            for text in QUERY_TEXTS[:3]:  # warms the remaining caches
                searcher.search([text], SearchOptions(top_k=K))
            for text in QUERY_TEXTS[: self.args.queries]:
                t = time.perf_counter()
                resp = searcher.search([text], SearchOptions(top_k=K))
                total = time.perf_counter() - t
                assert len(resp.results) == K
                for key, name in names.items():
                    stages[name].append(resp.timings.get(key, 0.0) * 1000)
                stages["total"].append(total * 1000)
        for name, values in stages.items():
            self.result[f"warm_{name}_p50_ms"] = statistics.median(values)
            self.result[f"warm_{name}_p95_ms"] = pct(values, 95)

    def library_call(self, n_calls: int) -> None:
        """`clipsearch.search.search()` as one call: opens the catalogue, loads index and
        text tower, searches (what a program calling the library per query pays)."""
        from clipsearch.search import SearchOptions, search

        times = []
        for text in QUERY_TEXTS[:n_calls]:
            t = time.perf_counter()
            resp = search(self.settings, [text], SearchOptions(top_k=K))
            times.append((time.perf_counter() - t) * 1000)
            assert len(resp.results) == K
        self.result["search_call_p50_ms"] = statistics.median(times)
        self.result["search_call_p95_ms"] = pct(times, 95)

    def recall(self, model_text: np.ndarray) -> None:
        from clipsearch.vector_index import candidate_count, load_index, search_index

        vi = load_index(self.settings.index_path)
        assert vi is not None
        for name, queries in (("text", self.text_q), ("image", self.image_q),
                              ("model_text", model_text)):
            truth = exact_top(self.images, queries, K) + 1  # row -> image_id
            _, cand = search_index(vi, queries, candidate_count(K, vi))
            found = []
            for q, row in zip(queries, cand):
                row = row[row >= 0]
                found.append(row[np.argsort(-(self.images[row - 1] @ q))[:K]].tolist())
            self.result[f"recall@10_{name}"] = recall_at_k(found, truth)
            gap = float(np.mean(queries @ self.images[:2000].T))
            self.result[f"mean_cos_{name}_to_images"] = gap
        self.result["mean_cos_image_to_image"] = float(
            np.mean(self.images[:1000] @ self.images[1000:2000].T))

    def numpy_scan(self, text_q: np.ndarray) -> None:
        times = []
        for q in text_q:
            t = time.perf_counter()
            s = self.images @ q
            top = np.argpartition(-s, K)[:K]
            top[np.argsort(-s[top])]
            times.append((time.perf_counter() - t) * 1000)
        self.result["numpy_scan_p50_ms"] = statistics.median(times)
        self.result["numpy_scan_p95_ms"] = pct(times, 95)

    def cold(self, env: dict[str, str], rclip: Any | None) -> None:
        """Whole processes, alternating clipsearch and rclip (A B A B)."""
        from rclip_baseline import rclip_command, rclip_env, run_measured

        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        runs = self.args.cold_runs
        for i in range(runs):
            text = QUERY_TEXTS[(7 * i) % len(QUERY_TEXTS)]
            res = run_measured([sys.executable, "-m", "clipsearch.cli", "search", text, "--db",
                                str(self.settings.db_path), "--json"], env)
            assert len(str(res["stdout"]).splitlines()) == K, res["stderr"]
            ours.append(res)
            if rclip is not None and i < self.args.rclip_cold_runs:
                res = run_measured(rclip_command(text, K), rclip_env(rclip), cwd=self.photos)
                assert len(str(res["stdout"]).splitlines()) == K, res["stderr"]
                theirs.append(res)
        self.result["cold_s_median"] = statistics.median(r["wall_s"] for r in ours)
        self.result["cold_s_runs"] = [round(r["wall_s"], 3) for r in ours]
        self.result["cold_peak_rss_mb"] = max(r["peak_rss_mb"] for r in ours)
        if theirs:
            self.result["rclip_cold_s_median"] = statistics.median(r["wall_s"] for r in theirs)
            self.result["rclip_cold_s_runs"] = [round(r["wall_s"], 3) for r in theirs]
            self.result["rclip_cold_peak_rss_mb"] = max(r["peak_rss_mb"] for r in theirs)
            self.result["cold_speedup_vs_rclip"] = (self.result["rclip_cold_s_median"]
                                                    / self.result["cold_s_median"])

    def rclip_setup(self, model_root: Path) -> Path:
        from rclip_baseline import create_db, datadir_with_model, fill_db

        datadir = datadir_with_model(self.folder / "rclip", model_root, fresh_db=False)
        db = datadir / "db.sqlite3"
        stamp = datadir / "filled.json"
        want = f"{GENERATOR}:{self.n}"
        if self.args.rebuild or not stamp.exists() or stamp.read_text() != want:
            t = time.perf_counter()
            create_db(db)
            fill_db(db, self.paths(0, self.n), self.images)
            stamp.write_text(want)
            self.result["rclip_db_fill_s"] = time.perf_counter() - t
        self.result["rclip_db_bytes_per_image"] = db.stat().st_size / self.n
        return datadir

    def rclip_in_process(self, datadir: Path) -> None:
        from rclip_baseline import in_process_query_s

        n_q = self.args.rclip_queries if self.n < 1_000_000 else max(2, self.args.rclip_queries // 2)
        times = in_process_query_s(datadir, str(self.photos), QUERY_TEXTS[:n_q])
        self.result["rclip_in_process_p50_ms"] = statistics.median(times) * 1000


def encode_until_eot(enc: Any, texts: list[str]) -> np.ndarray:
    """What-if, for the record: clipsearch's numpy text tower run only over the positions up
    to the end-of-text token. With CLIP's causal mask and EOT pooling the later positions
    cannot change the result, so the vector is the same; the time shows what the tower pays
    for always running all 77 positions."""
    tokens = enc.tokenizer(texts)
    n = int(tokens.argmax(-1).max()) + 1  # the EOT id is the largest id
    saved_tokenizer, saved_w = enc.tokenizer, enc.w
    enc.tokenizer = lambda _texts: tokens[:, :n]
    enc.w = {**saved_w, "positional_embedding": saved_w["positional_embedding"][:n]}
    try:
        return np.asarray(type(enc).encode_texts(enc, texts))
    finally:
        enc.tokenizer, enc.w = saved_tokenizer, saved_w


def text_tower_timings(enc: Any, texts: list[str]) -> dict[str, float]:
    full, short, diff = [], [], 0.0
    enc.encode_texts(["warm up"])
    for rep in (1,):
        for text in texts:
            t = time.perf_counter()
            a = enc.encode_texts([text])
            t1 = time.perf_counter()
            b = encode_until_eot(enc, [text])
            t2 = time.perf_counter()
            if rep:
                full.append((t1 - t) * 1000)
                short.append((t2 - t1) * 1000)
                diff = max(diff, float(np.abs(a - b).max()))
    return {"text_tower_77_positions_p50_ms": statistics.median(full),
            "text_tower_until_eot_p50_ms": statistics.median(short),
            "text_tower_until_eot_max_abs_diff": diff}


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The random-weight ViT-B-32-256 (torch, for its identity and the catalogue record) and
    the numpy text tower that clipsearch's searches use."""
    from clipsearch.encoder import load_encoder
    from clipsearch.text_tower import fast_text_record, load_fast_text_encoder

    encoder = load_encoder(MODEL, device="cpu")
    record = fast_text_record(encoder.weights_file, encoder.text_tower)  # type: ignore[attr-defined]
    text = load_fast_text_encoder(json.loads(record)) if record else None
    if text is None:
        raise SystemExit("the numpy text tower is not available for this model")
    return encoder, text


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(r: dict[str, Any], key: str, fmt: str = "{:.1f}") -> str:
        v = r.get(key)
        return "-" if v is None else fmt.format(v)

    t = Table(title="clipsearch queries (ViT-B-32-256 random weights, 512-d, top 10, 2 cores)")
    t.add_column("metric")
    for r in rows:
        t.add_column(f"{r['n']:,} images", justify="right")
    spec = [
        ("index kind (nprobe)", lambda r: f"{r['index_kind']} ({r['nprobe']})"),
        ("warm p50 total ms", lambda r: f(r, "warm_total_p50_ms")),
        ("warm p95 total ms", lambda r: f(r, "warm_total_p95_ms")),
        ("  text encoding p50 ms", lambda r: f(r, "warm_text_p50_ms")),
        ("  ANN search p50 ms", lambda r: f(r, "warm_ann_p50_ms", "{:.2f}")),
        ("  re-rank p50 ms", lambda r: f(r, "warm_rerank_p50_ms", "{:.2f}")),
        ("  catalogue lookup p50 ms", lambda r: f(r, "warm_lookup_p50_ms", "{:.2f}")),
        ("  result files check p50 ms", lambda r: f(r, "warm_check_p50_ms", "{:.2f}")),
        ("search() library call p50 ms", lambda r: f(r, "search_call_p50_ms")),
        ("numpy exact scan p50 ms (no text)", lambda r: f(r, "numpy_scan_p50_ms", "{:.2f}")),
        ("rclip in-process p50 ms", lambda r: f(r, "rclip_in_process_p50_ms", "{:.0f}")),
        ("cold process s (median)", lambda r: f(r, "cold_s_median", "{:.2f}")),
        ("rclip cold process s", lambda r: f(r, "rclip_cold_s_median", "{:.2f}")),
        ("cold: rclip / clipsearch", lambda r: f(r, "cold_speedup_vs_rclip", "{:.1f}x")),
        ("recall@10 text", lambda r: f(r, "recall@10_text", "{:.3f}")),
        ("recall@10 image", lambda r: f(r, "recall@10_image", "{:.3f}")),
        ("recall@10 model-text", lambda r: f(r, "recall@10_model_text", "{:.3f}")),
        ("query process peak RSS MB", lambda r: f(r, "cold_peak_rss_mb", "{:.0f}")),
        ("rclip query peak RSS MB", lambda r: f(r, "rclip_cold_peak_rss_mb", "{:.0f}")),
        ("index B/image RAM", lambda r: f(r, "index_ram_bytes_per_image", "{:.0f}")),
        ("index B/image disk", lambda r: f(r, "index_disk_bytes_per_image", "{:.0f}")),
        ("re-rank vector file B/image disk",
         lambda r: f(r, "rerank_file_bytes_per_image", "{:.0f}")),
        ("catalogue B/image", lambda r: f(r, "catalogue_bytes_per_image", "{:.0f}")),
        ("numpy B/image RAM", lambda r: f(r, "numpy_ram_bytes_per_image", "{:.0f}")),
        ("IVF-PQ train s", lambda r: f(r, "ivfpq_train_s", "{:.1f}")),
        ("index build s (train+add)", lambda r: f(r, "index_build_s", "{:.1f}")),
        ("catalogue load s", lambda r: f(r, "catalogue_load_s", "{:.1f}")),
    ]
    for label, fn in spec:
        t.add_row(label, *[fn(r) for r in rows])
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=20, help="Real text queries timed")
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--library-calls", type=int, default=5)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--rclip-cold-runs", type=int, default=3)
    ap.add_argument("--rclip-queries", type=int, default=5)
    ap.add_argument("--no-rclip", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="Regenerate the collections")
    ap.add_argument("--keep-index", action="store_true",
                    help="Reuse index files even if clipsearch/vector_index.py changed (only "
                    "for changes that take effect on load)")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args()
    args.data = args.data.resolve()
    args.queries = min(args.queries, len(QUERY_TEXTS))
    from datasets import make_hub_cache

    # Before anything imports huggingface_hub, which reads these once.
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(args.data / "hub"))
    hub = make_hub_cache(args.data / "hub")
    env = dict(os.environ)
    model_root = None
    if not args.no_rclip:
        from rclip_baseline import ensure_model, ensure_venvs

        ensure_venvs()
        model_root = ensure_model(args.data, hub)
    encoder, text_encoder = load_model(args)
    model_text = np.stack([text_encoder.encode_texts([t])[0]
                           for t in QUERY_TEXTS[: args.queries]])
    tower = text_tower_timings(text_encoder, QUERY_TEXTS[:5])
    print(json.dumps(tower), flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        b = Bench(n, args, encoder)
        t = time.perf_counter()
        b.build()
        print(f"[{n}] catalogue + index ready in {time.perf_counter() - t:.1f} s", flush=True)
        b.sizes()
        b.recall(model_text)
        b.warm()
        b.library_call(args.library_calls)
        b.numpy_scan(b.text_q[:50])
        datadir = b.rclip_setup(model_root) if model_root is not None else None
        b.cold(env, datadir)
        if datadir is not None:
            b.rclip_in_process(datadir)
        b.result["bench_process_peak_rss_mb"] = __import__("resource").getrusage(
            __import__("resource").RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(b.result), flush=True)
        rows.append(b.result)
        del b
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query.json").write_text(json.dumps(rows, indent=2))
    (args.out / "text_tower.json").write_text(json.dumps(tower, indent=2))
    print_table(rows)
    print(f"text tower alone: all 77 positions {tower['text_tower_77_positions_p50_ms']:.1f} ms; "
          f"until the EOT token {tower['text_tower_until_eot_p50_ms']:.1f} ms (what-if; same "
          f"vector to {tower['text_tower_until_eot_max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
