"""Markdown tables (for RESULTS.md) from benchmarks/out/indexing.json and query.json.

Usage: python benchmarks/results_tables.py [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def indexing_table(d: dict[str, Any]) -> str:
    rc = d.get("rclip", {})
    lines = ["| case | clipsearch | rclip | clipsearch / rclip |", "|---|---:|---:|---:|"]
    for name in ("photos_12mp", "small_640"):
        if name not in d:
            continue
        r, c = d[name], rc.get(name)
        ratio = r["images_per_s_median"] / c["images_per_s_median"] if c else None
        ratio2 = r["images_per_s_median"] / c["images_per_s_indexing_only_median"] if c else None
        lines.append(
            f"| {name} ({r['n']} images), images/s, median of {len(r['runs'])} "
            f"| {r['images_per_s_median']:.1f} "
            f"| {_f(c and c['images_per_s_median'], '{:.1f}')} "
            f"({_f(c and c['images_per_s_indexing_only_median'], '{:.1f}')} indexing only) "
            f"| {_f(ratio, '{:.2f}x')} ({_f(ratio2, '{:.2f}x')} vs indexing only) |")
    rr, cr = d.get("rerun_unchanged"), rc.get("rerun_unchanged")
    if rr:
        lines.append(
            f"| unchanged re-run, {rr['files']} files, s, median | {rr['rerun_s_median']:.2f} "
            f"| {_f(cr and cr['rerun_s_median'], '{:.2f}')} (query alone "
            f"{_f(cr and cr['query_only_s_median'], '{:.2f}')}) "
            f"| {_f(cr and cr['rerun_s_median'] / rr['rerun_s_median'], '{:.1f}x faster')} |")
        lines.append(f"| first index of those {rr['files']} files, s | {rr['first_index_s']:.1f} "
                     "| - | - |")
    mv = d.get("after_moving_1000")
    if mv:
        lines.append(f"| after moving 1000 files, s | {mv['wall_s']:.2f} "
                     f"({mv['report']['moved_or_duplicate']} reused) | - | - |")
    stages = ["| case | " + " | ".join(("peak RSS MB", "CPU use", "stage seconds (summed over "
                                        "threads)")) + " |", "|---|---:|---:|---|"]
    for name in ("photos_12mp", "small_640"):
        if name in d:
            run = d[name]["runs"][len(d[name]["runs"]) // 2]
            stages.append(f"| clipsearch {name} | {run['peak_rss_mb']:.0f} "
                          f"| {100 * run['cpu_utilisation']:.0f}% "
                          f"| {json.dumps(run['report']['stage_seconds'])} |")
        if rc.get(name):
            run = rc[name]["runs"][len(rc[name]["runs"]) // 2]
            stages.append(f"| rclip {name} | {run['peak_rss_mb']:.0f} "
                          f"| {100 * run['cpu_utilisation']:.0f}% | - |")
    return "\n".join(lines) + "\n\n" + "\n".join(stages)


QUERY_ROWS = [
    ("index kind (nprobe)", lambda r: f"{r['index_kind']} ({r['nprobe']})"),
    ("warm `Searcher.search()` p50 / p95 ms", lambda r: f"{r['warm_total_p50_ms']:.1f} / "
                                                        f"{r['warm_total_p95_ms']:.1f}"),
    ("- text encoding p50 ms", lambda r: f"{r['warm_text_p50_ms']:.1f}"),
    ("- ANN search p50 ms", lambda r: f"{r['warm_ann_p50_ms']:.2f}"),
    ("- re-rank p50 ms", lambda r: f"{r['warm_rerank_p50_ms']:.2f}"),
    ("- catalogue lookup p50 ms", lambda r: f"{r['warm_lookup_p50_ms']:.2f}"),
    ("- result files still there (stat) p50 ms",
     lambda r: _f(r.get("warm_check_p50_ms"), "{:.2f}")),
    ("`search()` one call p50 ms", lambda r: f"{r['search_call_p50_ms']:.0f}"),
    ("numpy exact scan p50 ms (vectors in RAM, no text)",
     lambda r: f"{r['numpy_scan_p50_ms']:.2f}"),
    ("rclip in-process query p50 ms", lambda r: _f(r.get("rclip_in_process_p50_ms"), "{:.0f}")),
    ("cold process s, median", lambda r: f"{r['cold_s_median']:.2f}"),
    ("rclip cold process s, median", lambda r: _f(r.get("rclip_cold_s_median"), "{:.2f}")),
    ("cold: rclip time / clipsearch time", lambda r: _f(r.get("cold_speedup_vs_rclip"),
                                                        "{:.1f}x")),
    ("recall@10 text queries", lambda r: f"{r['recall@10_text']:.3f}"),
    ("recall@10 image queries", lambda r: f"{r['recall@10_image']:.3f}"),
    ("recall@10 model-text queries", lambda r: f"{r['recall@10_model_text']:.3f}"),
    ("query process peak RSS MB", lambda r: f"{r['cold_peak_rss_mb']:.0f}"),
    ("rclip query process peak RSS MB", lambda r: _f(r.get("rclip_cold_peak_rss_mb"), "{:.0f}")),
    ("index bytes/image in RAM", lambda r: f"{r['index_ram_bytes_per_image']:.0f}"),
    ("index bytes/image on disk", lambda r: f"{r['index_disk_bytes_per_image']:.0f}"),
    ("catalogue bytes/image on disk", lambda r: f"{r['catalogue_bytes_per_image']:.0f}"),
    ("rclip database bytes/image", lambda r: _f(r.get("rclip_db_bytes_per_image"), "{:.0f}")),
    ("numpy vectors bytes/image in RAM", lambda r: f"{r['numpy_ram_bytes_per_image']:.0f}"),
    ("IVF-PQ training s", lambda r: f"{r['ivfpq_train_s']:.1f}"),
    ("index build s (train + add)", lambda r: f"{r['index_build_s']:.1f}"),
    ("vectors read from SQLite for the build s", lambda r: f"{r['vectors_from_sqlite_s']:.1f}"),
    ("catalogue fill through the store API s", lambda r: f"{r['catalogue_load_s']:.1f}"),
]


def query_table(rows: list[dict[str, Any]]) -> str:
    head = "| | " + " | ".join(f"{r['n']:,} images" for r in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for label, fn in QUERY_ROWS:
        cells = []
        for r in rows:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    if (args.out / "indexing.json").exists():
        print(indexing_table(json.loads((args.out / "indexing.json").read_text())), "\n")
    if (args.out / "query.json").exists():
        print(query_table(json.loads((args.out / "query.json").read_text())))


if __name__ == "__main__":
    main()
