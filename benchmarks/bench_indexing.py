"""Indexing speed of `clipsearch index` end to end (a whole process, as a user runs it),
against rclip on the same images.

Usage: python benchmarks/bench_indexing.py [--photos 200] [--small 200] [--rerun-files 10000]
       [--repeats 3] [--no-rclip] [--out benchmarks/out]
Measures images/s for 12-megapixel JPEGs and for small images, the per-stage breakdown,
peak RSS and CPU utilisation of the indexing process, an unchanged re-run over many files and
a run after moving files. Model: ViT-B-32-256 with random weights from a temporary hub cache.

rclip (benchmarks/rclip_baseline.py: own venv, the same random weights as ONNX) indexes the
same folders with a fresh database, alternating with clipsearch (A B A B); medians and ratios.
rclip cannot index without searching, so each rclip run ends with a one-result text query; a
`--no-indexing` query on the result is timed too, and "indexing only" subtracts it. For the
unchanged re-run rclip's database is filled directly with the files' paths, sizes and mtimes
(indexing 10k files with rclip would take ~11 minutes here), then rclip is run over them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import make_hub_cache, make_images  # noqa: E402
from rclip_baseline import (  # noqa: E402
    create_db,
    datadir_with_model,
    ensure_model,
    ensure_venvs,
    fill_db,
    rclip_command,
    rclip_env,
    run_measured,
)

MODEL = "ViT-B-32-256:datacomp_s34b_b86k"


def run_index(folder: Path, db: Path, env: dict[str, str], extra: list[str] = ()) -> dict:  # type: ignore[type-arg, assignment]
    """One `clipsearch index` process; its own peak RSS and CPU time (wait4, so rclip's
    processes run in between never count)."""
    try:
        res = run_measured(
            [sys.executable, "-m", "clipsearch.cli", "index", str(folder), "--db", str(db),
             "--model", MODEL, "-q", "--json", *extra], env)
    except RuntimeError as err:
        raise SystemExit(f"clipsearch index failed: {err}") from None
    report = json.loads(str(res["stdout"]).splitlines()[-1])
    wall = float(res["wall_s"])
    return {"wall_s": wall, "cpu_utilisation": float(res["cpu_s"]) / wall / (os.cpu_count() or 1),
            "peak_rss_mb": res["peak_rss_mb"], "report": report}


def run_rclip_index(folder: Path, datadir: Path, model_root: Path) -> dict:  # type: ignore[type-arg]
    """rclip over a folder with a fresh database (indexes, then one query), and a query-only
    run on the result; "indexing only" is the difference."""
    datadir_with_model(datadir, model_root, fresh_db=True)
    run = run_measured(rclip_command("a photo", 1, index=True), rclip_env(datadir), cwd=folder)
    query = run_measured(rclip_command("a photo", 1), rclip_env(datadir), cwd=folder)
    return {"wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
            "cpu_utilisation": float(run["cpu_s"]) / float(run["wall_s"]) / (os.cpu_count() or 1),
            "query_only_s": query["wall_s"],
            "indexing_only_s": float(run["wall_s"]) - float(query["wall_s"])}


def prefill_rclip(folder: Path, datadir: Path, model_root: Path) -> Path:
    """rclip's database as its own indexer leaves it for these files (vectors random)."""
    import numpy as np

    datadir_with_model(datadir, model_root, fresh_db=True)
    files = sorted(p for p in folder.resolve().iterdir() if p.is_file())
    stats = [p.stat() for p in files]
    create_db(datadir / "db.sqlite3")
    vecs = np.random.default_rng(0).standard_normal((len(files), 512)).astype(np.float32)
    fill_db(datadir / "db.sqlite3", [str(p) for p in files], vecs,
            [st.st_mtime for st in stats], [st.st_size for st in stats])
    return datadir


def run_rclip_rerun(folder: Path, datadir: Path) -> dict[str, float]:
    run = run_measured(rclip_command("a photo", 1, index=True), rclip_env(datadir), cwd=folder)
    assert "checking images" in str(run["stderr"])
    query = run_measured(rclip_command("a photo", 1), rclip_env(datadir), cwd=folder)
    return {"wall_s": float(run["wall_s"]), "query_only_s": float(query["wall_s"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-rclip", action="store_true", help="Only clipsearch")
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--rerun-files", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    args.data = args.data.resolve()
    data = args.data
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(make_hub_cache(data / "hub")))
    sets = {
        "photos_12mp": make_images(data / "photos", args.photos, (4000, 3000)),
        "small_640": make_images(data / "small", args.small, (640, 480)),
    }
    model_root = None if args.no_rclip else ensure_model(data, Path(env["HF_HUB_CACHE"]))
    if model_root is not None:
        ensure_venvs()
    results: dict[str, object] = {}
    rclip_results: dict[str, object] = {}
    for name, files in sets.items():
        runs = []
        rclip_runs = []
        for r in range(args.repeats):  # A B A B: clipsearch, then rclip, each repeat
            db = data / f"db-{name}-{r}.sqlite3"
            for p in data.glob(db.name + "*"):
                p.unlink()
            db.with_suffix(".faiss").unlink(missing_ok=True)
            res = run_index(files[0].parent, db, env)
            res["images_per_s"] = len(files) / res["wall_s"]
            runs.append(res)
            print(name, r, f"{res['images_per_s']:.1f} img/s", json.dumps(
                res["report"]["stage_seconds"]), flush=True)
            if model_root is not None:
                rc = run_rclip_index(files[0].parent, data / f"rclip-{name}", model_root)
                rc["images_per_s"] = len(files) / rc["wall_s"]
                rc["images_per_s_indexing_only"] = len(files) / rc["indexing_only_s"]
                rclip_runs.append(rc)
                print(name, r, f"rclip {rc['images_per_s']:.1f} img/s", flush=True)
        results[name] = {
            "n": len(files),
            "images_per_s_median": statistics.median(r["images_per_s"] for r in runs),
            "runs": runs,
        }
        if rclip_runs:
            rclip_results[name] = {
                "n": len(files),
                "images_per_s_median": statistics.median(r["images_per_s"] for r in rclip_runs),
                "images_per_s_indexing_only_median": statistics.median(
                    r["images_per_s_indexing_only"] for r in rclip_runs),
                "runs": rclip_runs,
            }
    # Unchanged re-run over many files, and a run after moving 1k of them.
    many = data / "many"
    if not many.exists() or len(list(many.iterdir())) < args.rerun_files:
        many.mkdir(exist_ok=True)
        small = sets["small_640"]
        for i in range(args.rerun_files):
            target = many / f"f{i:05}.jpg"
            if not target.exists():
                shutil.copy(small[i % len(small)], target)
                with open(target, "ab") as fh:  # distinct content, same picture
                    fh.write(i.to_bytes(4, "little"))
    db = data / "db-many.sqlite3"
    for p in data.glob(db.name + "*"):
        p.unlink()
    first = run_index(many, db, env)
    rclip_dir = None
    if model_root is not None:
        rclip_dir = prefill_rclip(many, data / "rclip-many", model_root)
    reruns = []
    rclip_reruns: list[dict[str, float]] = []
    for _ in range(args.repeats):  # A B A B
        reruns.append(run_index(many, db, env)["wall_s"])
        if rclip_dir is not None:
            rclip_reruns.append(run_rclip_rerun(many, rclip_dir))
    moved_dir = many / "moved"
    moved_dir.mkdir(exist_ok=True)
    for p in sorted(many.glob("f0*.jpg"))[:1000]:
        p.rename(moved_dir / p.name)
    moved = run_index(many, db, env)
    for p in moved_dir.iterdir():
        p.rename(many / p.name)
    moved_dir.rmdir()
    results["rerun_unchanged"] = {"files": args.rerun_files, "first_index_s": first["wall_s"],
                                  "rerun_s_median": statistics.median(reruns),
                                  "rerun_s": reruns}
    results["after_moving_1000"] = {"wall_s": moved["wall_s"], "report": moved["report"]}
    if rclip_reruns:
        rclip_results["rerun_unchanged"] = {
            "files": args.rerun_files,
            "rerun_s_median": statistics.median(r["wall_s"] for r in rclip_reruns),
            "query_only_s_median": statistics.median(r["query_only_s"] for r in rclip_reruns),
            "runs": rclip_reruns,
        }
    if rclip_results:
        results["rclip"] = rclip_results
        results["ratios_clipsearch_over_rclip"] = ratios = {
            name: results[name]["images_per_s_median"]  # type: ignore[index]
            / rclip_results[name]["images_per_s_median"]  # type: ignore[index]
            for name in sets
        }
        ratios.update({
            name + "_vs_rclip_indexing_only": results[name]["images_per_s_median"]  # type: ignore[index]
            / rclip_results[name]["images_per_s_indexing_only_median"]  # type: ignore[index]
            for name in sets
        })
        if "rerun_unchanged" in rclip_results:
            ratios["rerun_unchanged_rclip_s_over_clipsearch_s"] = (
                rclip_results["rerun_unchanged"]["rerun_s_median"]  # type: ignore[index]
                / statistics.median(reruns))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "indexing.json").write_text(json.dumps(results, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title="clipsearch index (ViT-B-32-256, whole process)")
    t.add_column("case")
    t.add_column("result", justify="right")
    t.add_column("rclip", justify="right")
    t.add_column("clipsearch / rclip", justify="right")
    for name in sets:
        r = results[name]
        rc = rclip_results.get(name)
        t.add_row(f"{name} ({r['n']} images)", f"{r['images_per_s_median']:.1f} img/s",  # type: ignore[index]
                  f"{rc['images_per_s_median']:.1f} img/s "  # type: ignore[index]
                  f"({rc['images_per_s_indexing_only_median']:.1f} indexing only)"  # type: ignore[index]
                  if rc else "-",
                  f"{r['images_per_s_median'] / rc['images_per_s_median']:.2f}x"  # type: ignore[index]
                  if rc else "-")
    rr = rclip_results.get("rerun_unchanged")
    t.add_row(f"re-run, nothing changed ({args.rerun_files} files)",
              f"{statistics.median(reruns):.2f} s",
              f"{rr['rerun_s_median']:.2f} s (query alone {rr['query_only_s_median']:.2f} s)"  # type: ignore[index]
              if rr else "-",
              f"{rr['rerun_s_median'] / statistics.median(reruns):.1f}x faster" if rr else "-")  # type: ignore[index]
    t.add_row("after moving 1000 files", f"{moved['wall_s']:.2f} s "
              f"({moved['report']['moved_or_duplicate']} reused)", "-", "-")
    Console().print(t)


if __name__ == "__main__":
    main()
