"""Indexing speed of `clipsearch index` end to end (a whole process, as a user runs it).

Usage: python benchmarks/bench_indexing.py [--photos 200] [--small 200] [--rerun-files 10000]
       [--repeats 3] [--out benchmarks/out]
Measures images/s for 12-megapixel JPEGs and for small images, the per-stage breakdown,
peak RSS and CPU utilisation of the indexing process, an unchanged re-run over many files and
a run after moving files. Model: ViT-B-32-256 with random weights from a temporary hub cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import make_hub_cache, make_images  # noqa: E402

MODEL = "ViT-B-32-256:datacomp_s34b_b86k"


def run_index(folder: Path, db: Path, env: dict[str, str], extra: list[str] = ()) -> dict:  # type: ignore[type-arg, assignment]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "clipsearch.cli", "index", str(folder), "--db", str(db),
         "--model", MODEL, "-q", "--json", *extra],
        env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"clipsearch index failed: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_utilisation": cpu / wall / (os.cpu_count() or 1),
            "peak_rss_mb": after.ru_maxrss / 1024, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--rerun-files", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    data = args.data
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(make_hub_cache(data / "hub")))
    sets = {
        "photos_12mp": make_images(data / "photos", args.photos, (4000, 3000)),
        "small_640": make_images(data / "small", args.small, (640, 480)),
    }
    results: dict[str, object] = {}
    for name, files in sets.items():
        runs = []
        for r in range(args.repeats):
            db = data / f"db-{name}-{r}.sqlite3"
            for p in data.glob(db.name + "*"):
                p.unlink()
            db.with_suffix(".faiss").unlink(missing_ok=True)
            res = run_index(files[0].parent, db, env)
            res["images_per_s"] = len(files) / res["wall_s"]
            runs.append(res)
            print(name, r, f"{res['images_per_s']:.1f} img/s", json.dumps(
                res["report"]["stage_seconds"]), flush=True)
        results[name] = {
            "n": len(files),
            "images_per_s_median": statistics.median(r["images_per_s"] for r in runs),
            "runs": runs,
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
    reruns = [run_index(many, db, env)["wall_s"] for _ in range(args.repeats)]
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "indexing.json").write_text(json.dumps(results, indent=2))
    from rich.console import Console
    from rich.table import Table

    t = Table(title="clipsearch index (ViT-B-32-256, whole process)")
    t.add_column("case")
    t.add_column("result", justify="right")
    for name in sets:
        r = results[name]
        t.add_row(f"{name} ({r['n']} images)", f"{r['images_per_s_median']:.1f} img/s")  # type: ignore[index]
    t.add_row(f"re-run, nothing changed ({args.rerun_files} files)",
              f"{statistics.median(reruns):.2f} s")
    t.add_row("after moving 1000 files", f"{moved['wall_s']:.2f} s "
              f"({moved['report']['moved_or_duplicate']} reused)")
    Console().print(t)


if __name__ == "__main__":
    main()
