"""Write a `clipsearch eval` captions file for held-out emoji styles.

Usage: python scripts/emoji_eval_set.py twitter[,apple] OUT.csv [--cache-dir DIR]
Rows: path (relative to the node_modules folder printed at the end), caption (the emoji
name), concept (its code point: the same concept across styles), category (a plain-word
category query from scripts/emoji_data.CATEGORY_QUERIES, judged by subcategory).
Then: clipsearch eval NODE_MODULES --captions OUT.csv --model emoji-mini
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emoji_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("styles")
    ap.add_argument("out", type=Path)
    ap.add_argument("--cache-dir", type=Path, default=Path(
        os.environ.get("CLIPSEARCH_TRAIN_CACHE", Path.home() / ".cache" / "clipsearch-train")))
    args = ap.parse_args()
    styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    node_modules = emoji_data.install_emoji_datasource(args.cache_dir, styles)
    category_of = {sub: word for word, subs in emoji_data.CATEGORY_QUERIES.items()
                   for sub in subs}
    rows = 0
    with args.out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "caption", "concept", "category"])
        for style in styles:
            folder = emoji_data.style_image_dir(node_modules, style)
            for e in emoji_data.read_emoji(node_modules, style):
                rel = (folder / e.image).relative_to(node_modules)
                writer.writerow([str(rel), e.name, e.unified, category_of.get(e.subcategory, "")])
                rows += 1
    print(f"wrote {rows} rows to {args.out}; images under {node_modules}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
