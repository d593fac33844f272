"""The whole benchmark suite in one command: indexing (vs rclip), then queries (vs numpy and
rclip) at 10k / 100k / 1M images. Measured here (2 cores, 2026-12-04, 11:51 UTC): 16.4 minutes,
with the rclip venv, its ONNX export and the test data made by an earlier run (22 minutes when
the run makes them). See benchmarks/RESULTS.md.

Usage: python benchmarks/run_all.py [--quick] [--data DIR] [--no-rclip]
--quick: 50 photos, 50 small images, 2k re-run files, 2 repeats; 10k and 100k vectors only.
Writes benchmarks/out/indexing.json, query.json and suite.json (machine, date, commands,
durations). Nothing else may run meanwhile: the figures are timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": round(mem_gb, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-rclip", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    args = ap.parse_args()
    common = ["--data", str(args.data)] + (["--no-rclip"] if args.no_rclip else [])
    indexing = [sys.executable, str(HERE / "bench_indexing.py"), *common, "--photos", "200"]
    query = [sys.executable, str(HERE / "bench_query.py"), *common]
    if args.quick:
        indexing = indexing[:-2] + ["--photos", "50", "--small", "50", "--rerun-files", "2000",
                                    "--repeats", "2"]
        query += ["--sizes", "10000,100000", "--queries", "20", "--cold-runs", "3"]
    suite: dict[str, object] = {
        "machine": machine(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commands": [], "durations_s": {},
    }
    start = time.perf_counter()
    for name, cmd in (("indexing", indexing), ("query", query)):
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        suite["durations_s"][name] = round(time.perf_counter() - t, 1)  # type: ignore[index]
        suite["commands"].append(cmd)  # type: ignore[attr-defined]
    suite["durations_s"]["total"] = round(time.perf_counter() - start, 1)  # type: ignore[index]
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "suite.json").write_text(json.dumps(suite, indent=2))
    print(json.dumps(suite["durations_s"]))


if __name__ == "__main__":
    main()
