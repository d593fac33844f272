"""Where a query's time goes: py-spy samples of a cold `clipsearch search` process and of warm
`Searcher.search()` calls on a collection bench_query.py built; prints the functions with the
most inclusive and self time and writes the raw stacks to benchmarks/out/.

Usage: python benchmarks/profile_query.py [--n 1000000] [--data DIR] [--warm-queries 40]
(py-spy comes with the rclip environment: benchmarks/out/rclip-venv/bin/py-spy)
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY_SPY = HERE / "out" / "rclip-venv" / "bin" / "py-spy"

_WARM = r"""
import sys
from pathlib import Path
from clipsearch.config import resolve_settings
from clipsearch.search import SearchOptions, Searcher
texts = ["a dog running on the beach", "sunset over the mountains", "a plate of pasta",
         "children playing in the park", "a red car parked on the street"]
with Searcher(resolve_settings(db=Path(sys.argv[1]))) as s:
    s.search([texts[0]])
    for i in range(int(sys.argv[2])):
        s.search([texts[i % len(texts)]])
"""


def summarise(raw: Path, top: int = 25) -> str:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    lines = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"-- {title}")
        for f, n in counter.most_common(top):
            lines.append(f"{100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


def record(name: str, cmd: list[str], env: dict[str, str], out: Path) -> None:
    raw = out / f"profile-{name}.txt"
    subprocess.run([str(PY_SPY), "record", "-r", "250", "-f", "raw", "-o", str(raw), "--",
                    *cmd], env=env, check=True, stdout=subprocess.DEVNULL)
    text = summarise(raw)
    (out / f"profile-{name}-summary.txt").write_text(text)
    print(f"== {name}\n{text}\n", flush=True)


def ab_blas_threads(db: Path, env: dict[str, str], runs: int, out: Path) -> None:
    """Whole `search` processes, alternating: as shipped (the CLI asks for one OpenBLAS
    thread) and with OPENBLAS_NUM_THREADS=2 (numpy's default here)."""
    import json
    import statistics

    sys.path.insert(0, str(HERE))
    from rclip_baseline import run_measured

    cmd = [sys.executable, "-m", "clipsearch.cli", "search", "a plate of pasta", "--db", str(db),
           "--json"]
    times: dict[str, list[float]] = {"one_thread": [], "two_threads": []}
    for _ in range(runs):
        times["one_thread"].append(float(run_measured(cmd, env)["wall_s"]))
        times["two_threads"].append(float(run_measured(
            cmd, dict(env, OPENBLAS_NUM_THREADS="2"))["wall_s"]))
    result = {k: {"median_s": statistics.median(v), "runs": v} for k, v in times.items()}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: round(v["median_s"], 3) for k, v in result.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    ap.add_argument("--warm-queries", type=int, default=40)
    ap.add_argument("--ab-runs", type=int, default=5,
                    help="Cold runs with the CLI's one BLAS thread vs OPENBLAS_NUM_THREADS=2")
    args = ap.parse_args()
    db = args.data.resolve() / f"query-{args.n}" / "catalogue.sqlite3"
    if not db.exists():
        raise SystemExit(f"{db}: run bench_query.py --sizes {args.n} first")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(args.data.resolve() / "hub"))
    out = HERE / "out"
    if args.ab_runs:
        ab_blas_threads(db, env, args.ab_runs, out / f"cold-blas-threads-{args.n}.json")
    record(f"cold-{args.n}", [sys.executable, "-m", "clipsearch.cli", "search",
                              "a dog running on the beach", "--db", str(db), "--json"], env, out)
    record(f"warm-{args.n}", [sys.executable, "-c", _WARM, str(db), str(args.warm_queries)],
           env, out)


if __name__ == "__main__":
    main()
