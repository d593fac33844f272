"""`eval`: retrieval and classification quality of any model on a labelled image folder."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.classify import classify_vectors, label_vectors
from clipsearch.encoder import Encoder
from clipsearch.errors import ImageError, UsageError
from clipsearch.imaging import decode_file

EVAL_BATCH = 64


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation image: its captions, and optionally a concept and a category."""

    path: str
    captions: tuple[str, ...]
    concept: str | None = None
    category: str | None = None


@dataclass
class EvalReport:
    """Metrics (None where the labels needed are absent) and how many items each used."""

    model: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "metrics": self.metrics, "counts": self.counts,
                "failed": self.failed}


def read_labelled(captions_file: Path) -> list[LabelledImage]:
    """CSV (header: path, caption[, concept][, category]) or JSON lines with those keys;
    several rows per image add captions."""
    from clipsearch.training import read_caption_rows

    try:
        rows = read_caption_rows(captions_file)
    except (OSError, ValueError) as err:
        raise UsageError(f"{captions_file}: cannot read captions ({err})") from err
    caps: dict[str, list[str]] = defaultdict(list)
    concept: dict[str, str] = {}
    category: dict[str, str] = {}
    for n, row in enumerate(rows, 2):
        if not row.get("path") or not row.get("caption"):
            raise UsageError(f"{captions_file}: row {n} needs 'path' and 'caption'")
        p = str(row["path"])
        if row["caption"] not in caps[p]:
            caps[p].append(str(row["caption"]))
        if row.get("concept"):
            concept[p] = str(row["concept"])
        if row.get("category"):
            category[p] = str(row["category"])
    if not caps:
        raise UsageError(f"{captions_file}: no captioned rows (needs a header with path and "
                         "caption)")
    return [LabelledImage(p, tuple(c), concept.get(p), category.get(p)) for p, c in caps.items()]


def _recall_at(ranked: np.ndarray, relevant: list[set[int]], k: int) -> float:
    return float(np.mean([bool(set(r[:k].tolist()) & rel) for r, rel in zip(ranked, relevant)]))


def evaluate(
    encoder: Encoder,
    folder: Path,
    items: list[LabelledImage],
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Encode every image, then measure text->image, image->image and category quality."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    report = EvalReport(encoder.info.spec if encoder.info.spec == encoder.info.key
                        else f"{encoder.info.spec} ({encoder.info.key})")
    kept: list[LabelledImage] = []
    vecs: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for n, item in enumerate(items):
        try:
            img = decode_file(str(folder / item.path), encoder.image_size).image
        except ImageError as err:
            report.failed.append(f"{item.path}: {err.message}")
            continue
        kept.append(item)
        batch.append(encoder.preprocess(img))
        if len(batch) >= EVAL_BATCH:
            vecs.append(encoder.encode_images(np.stack(batch)))
            batch = []
        if progress:
            progress(n + 1, len(items))
    if batch:
        vecs.append(encoder.encode_images(np.stack(batch)))
    if not kept:
        raise UsageError(f"{folder}: no readable images among the {len(items)} listed")
    images = np.concatenate(vecs)
    m = report.metrics
    # Text -> image: every distinct caption is a query; its images are the relevant ones.
    by_caption: dict[str, set[int]] = defaultdict(set)
    for i, item in enumerate(kept):
        for c in item.captions:
            by_caption[c].add(i)
    queries = list(by_caption)
    texts = np.concatenate([encoder.encode_texts(queries[s:s + 256])
                            for s in range(0, len(queries), 256)])
    ranked = np.argsort(-(texts @ images.T), axis=1)[:, :10]
    rel = [by_caption[q] for q in queries]
    for k in (1, 5, 10):
        m[f"text_to_image_R@{k}"] = _recall_at(ranked, rel, k)
    report.counts["text_queries"] = len(queries)
    report.counts["images"] = len(kept)
    # Image -> image: same concept, another image of it (e.g. another style).
    by_concept: dict[str, set[int]] = defaultdict(set)
    for i, item in enumerate(kept):
        if item.concept:
            by_concept[item.concept].add(i)
    probe = [i for i, item in enumerate(kept) if item.concept and len(by_concept[item.concept]) > 1]
    if probe:
        sims = images[probe] @ images.T
        sims[np.arange(len(probe)), probe] = -np.inf
        ranked_i = np.argsort(-sims, axis=1)[:, :5]
        rel_i = [by_concept[kept[i].concept or ""] - {i} for i in probe]
        m["image_to_image_R@1"] = _recall_at(ranked_i, rel_i, 1)
        m["image_to_image_R@5"] = _recall_at(ranked_i, rel_i, 5)
    else:
        m["image_to_image_R@1"] = m["image_to_image_R@5"] = None
    report.counts["image_queries"] = len(probe)
    # Categories: zero-shot accuracy over the category names, and precision@10 of each name.
    cats = sorted({item.category for item in kept if item.category})
    if len(cats) >= 2:
        labelled = [i for i, item in enumerate(kept) if item.category]
        lv = label_vectors(encoder, cats)
        temperature = float(getattr(encoder, "logit_scale", 100.0))
        out = classify_vectors(images[labelled], lv, cats, None, temperature, None)
        m["zero_shot_accuracy"] = float(np.mean(
            [label == kept[i].category for i, (label, _, _) in zip(labelled, out)]))
        cat_text = encoder.encode_texts(cats)
        top = np.argsort(-(cat_text @ images.T), axis=1)[:, :10]
        m["category_P@10"] = float(np.mean(
            [np.mean([kept[j].category == c for j in row]) for c, row in zip(cats, top)]))
        report.counts["categories"] = len(cats)
    else:
        m["zero_shot_accuracy"] = m["category_P@10"] = None
        report.counts["categories"] = len(cats)
    return report
