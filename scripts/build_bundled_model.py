"""Rebuild the bundled emoji-mini model from scratch: fetch art, train, evaluate, write the folder.

Usage (from the repository root; about 25 minutes on 2 CPU cores):
    nice -n 10 /work/venv/bin/python scripts/build_bundled_model.py
Data is npm-installed into --cache-dir (default ~/.cache/clipsearch-train, or
$CLIPSEARCH_TRAIN_CACHE), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emoji_data  # noqa: E402

from clipsearch import training  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "clipsearch" / "models" / "emoji-mini"
DEFAULT_CACHE_DIR = Path(
    os.environ.get("CLIPSEARCH_TRAIN_CACHE", Path.home() / ".cache" / "clipsearch-train")
)

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 192,
        "heads": 3,
        "layers": 4,
    },
}


NOTICE_TEXT = """emoji-mini: a small CLIP model trained by clipsearch
(scripts/build_bundled_model.py).

Weights: Apache-2.0, like clipsearch.

Training data: the 64 px emoji art of the npm package emoji-datasource-google@16.0.0, i.e.
Noto Emoji, Copyright Google Inc., Apache License 2.0
(https://www.apache.org/licenses/LICENSE-2.0), with captions made from the emoji names,
short names and categories in that package's emoji.json (MIT, Copyright Cal Henderson).

Evaluation only (never trained on, not included): Twemoji from emoji-datasource-twitter@16.0.0,
Copyright Twitter, Inc and other contributors, CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), and Apple art from
emoji-datasource-apple@16.0.0 (not licensed for redistribution; measured locally only).
If the model is rebuilt with --train-styles google,twitter, Twemoji art becomes training
data and the CC-BY 4.0 attribution above applies to it.
"""


def evaluate(model: Any, node_modules: Path, style: str) -> dict[str, Any]:
    """Text->image retrieval on one style: names as queries (R@k), category words (P@10)."""
    import torch

    emoji = emoji_data.read_emoji(node_modules, style)
    image_dir = emoji_data.style_image_dir(node_modules, style)
    preprocess_cfg = training.make_preprocess_cfg(MODEL_CFG["vision_cfg"]["image_size"])
    image_embeddings = training.encode_image_files(
        model, preprocess_cfg, [image_dir / e.image for e in emoji]
    )
    context_length = MODEL_CFG["text_cfg"]["context_length"]
    name_embeddings = training.encode_texts(model, context_length, [e.name for e in emoji])
    scores = name_embeddings @ image_embeddings.T
    target_scores = scores.diagonal().unsqueeze(1)
    ranks = (scores > target_scores).sum(dim=1)
    recall = {f"recall@{k}": round(float((ranks < k).float().mean()), 4) for k in (1, 5, 10)}
    queries = list(emoji_data.CATEGORY_QUERIES)
    query_embeddings = training.encode_texts(model, context_length, queries)
    top10 = (query_embeddings @ image_embeddings.T).topk(10, dim=1).indices
    per_query = {}
    for query, indices in zip(queries, top10.tolist(), strict=True):
        wanted = emoji_data.CATEGORY_QUERIES[query]
        per_query[query] = sum(emoji[i].subcategory in wanted for i in indices) / 10
    del torch
    return {
        "style": style,
        "images": len(emoji),
        **recall,
        "category_precision@10": round(sum(per_query.values()) / len(per_query), 4),
        "category_queries": len(per_query),
        "category_precision@10_per_query": per_query,
    }


# sample_data/emoji/<stem>.png: (style, emoji.json name). Styles alternate Twemoji / Noto.
SAMPLE_CONCEPTS: dict[str, str] = {
    "dog": "dog face",
    "cat": "cat face",
    "pizza": "slice of pizza",
    "car": "automobile",
    "rocket": "rocket",
    "tree": "deciduous tree",
    "sun": "black sun with rays",
    "moon": "crescent moon",
    "apple": "red apple",
    "banana": "banana",
    "guitar": "guitar",
    "soccer_ball": "soccer ball",
    "house": "house building",
    "airplane": "airplane",
    "bicycle": "bicycle",
    "fish": "fish",
    "sunflower": "sunflower",
    "umbrella": "umbrella",
    "birthday_cake": "birthday cake",
    "coffee": "hot beverage",
    "book": "open book",
    "heart": "heavy black heart",
    "snowman": "snowman without snow",
    "key": "key",
    "alarm_clock": "alarm clock",
    "camera": "camera",
    "horse": "horse face",
    "elephant": "elephant",
    "butterfly": "butterfly",
    "bus": "bus",
    "ship": "ship",
    "hamburger": "hamburger",
    "ice_cream": "soft ice cream",
    "rainbow": "rainbow",
    "lightning": "high voltage sign",
    "fire": "fire",
}
STYLE_LICENCES = {
    "twitter": (
        "Twemoji (Twitter, Inc. and other contributors)",
        "CC-BY-4.0",
        "https://creativecommons.org/licenses/by/4.0/",
    ),
    "google": (
        "Noto Emoji (Google Inc.)",
        "Apache-2.0",
        "https://www.apache.org/licenses/LICENSE-2.0",
    ),
}


def write_sample_data(model_dir: Path, node_modules: Path, out_dir: Path) -> int:
    """Write sample_data/emoji/*.png (on white), LICENSE.md and queries.tsv; return query count.

    queries.tsv keeps only the candidate queries whose expected image the bundled model ranks
    in its top 3 among all sample images.
    """
    from PIL import Image

    emoji_dir = out_dir / "emoji"
    emoji_dir.mkdir(parents=True, exist_ok=True)
    by_style = {
        s: {e.name: e for e in emoji_data.read_emoji(node_modules, s)} for s in STYLE_LICENCES
    }
    licence_rows = []
    paths = []
    for index, (stem, name) in enumerate(SAMPLE_CONCEPTS.items()):
        style = ("twitter", "google")[index % 2]
        emoji = by_style[style][name]
        with Image.open(emoji_data.style_image_dir(node_modules, style) / emoji.image) as opened:
            rgb = training.composite_rgba(opened)
        path = emoji_dir / f"{stem}.png"
        rgb.save(path, optimize=True)
        paths.append(path)
        source, licence, _ = STYLE_LICENCES[style]
        licence_rows.append(
            f"| emoji/{stem}.png | {emoji.unified.lower()}.png | {source} | {licence} |"
        )
    model, _ = training.load_checkpoint(model_dir)
    preprocess_cfg = training.make_preprocess_cfg(MODEL_CFG["vision_cfg"]["image_size"])
    image_embeddings = training.encode_image_files(model, preprocess_cfg, paths)
    candidates = []
    for index, (stem, name) in enumerate(SAMPLE_CONCEPTS.items()):
        word = stem.replace("_", " ")
        for query in dict.fromkeys((word, name, f"a picture of {_article(word)}")):
            candidates.append((query, index))
    query_embeddings = training.encode_texts(
        model, MODEL_CFG["text_cfg"]["context_length"], [q for q, _ in candidates]
    )
    top3 = (query_embeddings @ image_embeddings.T).topk(3, dim=1).indices.tolist()
    kept = [(q, i) for (q, i), top in zip(candidates, top3, strict=True) if i in top]
    with (out_dir / "queries.tsv").open("w", encoding="utf-8") as f:
        f.write("query\texpected\n")
        for query, index in kept:
            f.write(f"{query}\temoji/{paths[index].name}\n")
    licence_text = [
        "# sample_data licences",
        "",
        "Each image is a 64 px emoji from the npm package emoji-datasource-<style>"
        f"@{emoji_data.EMOJI_DATASOURCE_VERSION}, composited onto white and saved as PNG"
        " (no other changes).",
        "",
    ]
    for source, licence, url in STYLE_LICENCES.values():
        licence_text.append(f"- {source}: {licence} ({url})")
    licence_text += [
        "",
        "Twemoji graphics: Copyright 2019 Twitter, Inc and other contributors, licensed under"
        " CC-BY 4.0. Noto Emoji: Copyright Google Inc., licensed under the Apache License 2.0.",
        "",
        "| file | original image | source | licence |",
        "|---|---|---|---|",
        *licence_rows,
        "",
        "queries.tsv (written by scripts/build_bundled_model.py) lists queries for which the"
        " bundled emoji-mini model ranks the expected image in its top 3 among these images.",
        "",
    ]
    (out_dir / "LICENSE.md").write_text("\n".join(licence_text), encoding="utf-8")
    return len(kept)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--train-styles", default="google")
    parser.add_argument("--eval-styles", default="twitter,apple")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--compositions", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-data-dir", type=Path, default=REPO_ROOT / "sample_data")
    parser.add_argument(
        "--sample-data-only",
        action="store_true",
        help="only rewrite sample_data from the model already in --out-dir",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train_styles = tuple(s for s in args.train_styles.split(",") if s)
    eval_styles = tuple(s for s in args.eval_styles.split(",") if s)
    leaked = set(train_styles) & (set(emoji_data.EVALUATION_ONLY_STYLES) | set(eval_styles))
    if leaked:
        parser.error(f"styles {sorted(leaked)} must not be trained on")
    node_modules = emoji_data.install_emoji_datasource(
        args.cache_dir, tuple(dict.fromkeys(train_styles + eval_styles + tuple(STYLE_LICENCES)))
    )
    if args.sample_data_only:
        count = write_sample_data(args.out_dir, node_modules, args.sample_data_dir)
        print(f"sample_data: {len(SAMPLE_CONCEPTS)} images, {count} queries", file=sys.stderr)
        return 0
    data_dir = args.cache_dir / f"trainset-{'-'.join(train_styles)}-seed{args.seed}"
    captions_path = emoji_data.write_training_set(
        node_modules, train_styles, data_dir, args.compositions, args.seed
    )
    images = training.read_captions(captions_path)
    print(f"training pairs: {len(images)} images, captions {captions_path}", file=sys.stderr)

    config = training.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=100,
        seed=args.seed,
        checkpoint_every_steps=200,
    )
    model = training.create_model_from_config(MODEL_CFG, seed=args.seed)
    started = time.monotonic()

    def on_step(step: int, total: int, loss: float, pairs_per_s: float) -> None:
        if step % 25 == 0 or step == total:
            elapsed = time.monotonic() - started
            print(
                f"step {step}/{total} loss {loss:.3f} {pairs_per_s:.0f} pairs/s {elapsed:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    result = training.train_model(
        model,
        MODEL_CFG,
        data_dir,
        images,
        config,
        augment=emoji_data.augment_emoji,
        resume_path=args.cache_dir / f"resume-seed{args.seed}.pt",
        on_step=on_step,
    )
    shipped = training.round_to_half(model)
    metrics = {s: evaluate(shipped, node_modules, s) for s in eval_styles}
    parameters = sum(p.numel() for p in model.parameters())
    card = {
        "name": "emoji-mini",
        "trained_on": (
            f"emoji-datasource-{{{','.join(train_styles)}}}@{emoji_data.EMOJI_DATASOURCE_VERSION}"
            f" 64 px art, base emoji only, plus {args.compositions} two-emoji compositions;"
            " captions from emoji names, short names and (sub)category words"
        ),
        "held_out_styles": list(eval_styles),
        "licence notes": (
            "Weights trained by clipsearch (Apache-2.0). Training art: Noto Emoji (Google)"
            " Apache-2.0; Twemoji (Twitter) CC-BY-4.0 if used. Apple/Facebook art used only"
            " to measure, never trained on or shipped. See NOTICE."
        ),
        "architecture": MODEL_CFG,
        "parameters": parameters,
        "training": {
            "steps": result.steps,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "final_loss": round(result.final_loss, 4),
            "train_seconds_last_session": round(result.seconds, 1),
            "command": "nice -n 10 python scripts/build_bundled_model.py " + " ".join(sys.argv[1:]),
        },
        "metrics": metrics,
        "evaluation_notes": (
            "Text->image retrieval over all base emoji of each held-out style: emoji names as"
            " queries (Recall@k); plain-word category queries judged by subcategory"
            " (precision@10). The category words also appear in the training captions, so this"
            " measures transfer to unseen art, not language understanding."
        ),
    }
    training.save_checkpoint(model, MODEL_CFG, args.out_dir, card=card, half=True)
    (args.out_dir / "NOTICE").write_text(NOTICE_TEXT, encoding="utf-8")
    reloaded, _ = training.load_checkpoint(args.out_dir)
    probe = training.encode_texts(shipped, 32, ["red apple", "rocket"])
    probe_reloaded = training.encode_texts(reloaded, 32, ["red apple", "rocket"])
    if not torch.equal(probe, probe_reloaded):
        print("error: reloaded checkpoint gives different embeddings", file=sys.stderr)
        return 1
    count = write_sample_data(args.out_dir, node_modules, args.sample_data_dir)
    print(f"sample_data: {len(SAMPLE_CONCEPTS)} images, {count} queries", file=sys.stderr)
    print(
        json.dumps(
            {s: {k: v for k, v in m.items() if "per_query" not in k} for s, m in metrics.items()},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
