"""Zero-shot classification: rank label prompts against images, calibrated softmax, 'none'."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clipsearch.catalogue.schema import STATE_INDEXED
from clipsearch.config import Settings
from clipsearch.encoder import Encoder
from clipsearch.errors import UsageError

NONE_LABEL = "none of these"
PROMPT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "an emoji of a {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
)
# Generic descriptions a label must beat (by the margin) to be chosen at all.
BACKGROUND_PROMPTS = ("a photo.", "an image.", "a picture of something.", "an emoji.")
DEFAULT_NONE_MARGIN = 0.0
DEFAULT_TEMPERATURE = 100.0

EncoderFactory = Callable[[str | None], Encoder]


@dataclass(frozen=True)
class Classification:
    """The label chosen for one image, its confidence and the runner-up."""

    path: str
    label: str
    confidence: float
    scores: dict[str, float]
    image_id: int | None = None


def parse_labels(text: str | None, file: str | None = None) -> list[str]:
    """Labels from a comma-separated string and/or a file (one per line, # comments)."""
    labels: list[str] = []
    if text:
        labels.extend(t.strip() for t in text.split(","))
    if file:
        try:
            with open(file, encoding="utf-8") as fh:
                labels.extend(line.strip() for line in fh if not line.lstrip().startswith("#"))
        except OSError as err:
            raise UsageError(f"{file}: cannot read labels ({err.strerror})") from err
    seen: dict[str, None] = {}
    for label in labels:
        if label and label.lower() not in (k.lower() for k in seen):
            seen[label] = None
    out = list(seen)
    if len(out) < 2:
        raise UsageError("give at least two labels (--labels 'cat,dog' or --labels-file)")
    return out


def label_vectors(encoder: Encoder, labels: Sequence[str],
                  templates: Sequence[str] = PROMPT_TEMPLATES) -> np.ndarray:
    """One unit vector per label: the mean of its prompt embeddings (prompt ensembling)."""
    prompts = [t.format(label) for label in labels for t in templates]
    vecs = encoder.encode_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def classify_vectors(
    image_vectors: np.ndarray,
    label_vecs: np.ndarray,
    labels: Sequence[str],
    background: np.ndarray | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    none_margin: float | None = DEFAULT_NONE_MARGIN,
) -> list[tuple[str, float, dict[str, float]]]:
    """Softmax over labels of temperature x cosine (the model's own logit scale);
    'none of these' when the best label does not beat the generic prompts by the margin."""
    cos = image_vectors @ label_vecs.T
    logits = temperature * cos
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    # The generic prompts are ensembled like the labels (mean of their embeddings): a label
    # vector is a mean over templates too, so the two cosines are comparable. (The best
    # single generic prompt would beat most averaged labels.)
    bg = None
    if background is not None:
        generic = np.asarray(background, dtype=np.float32).reshape(-1, image_vectors.shape[1])
        generic = generic.mean(axis=0)
        bg = image_vectors @ (generic / max(float(np.linalg.norm(generic)), 1e-12))
    out = []
    for i in range(len(image_vectors)):
        best = int(np.argmax(probs[i]))
        scores = {label: float(p) for label, p in zip(labels, probs[i])}
        if none_margin is not None and bg is not None and cos[i, best] - bg[i] < none_margin:
            out.append((NONE_LABEL, float(1.0 - probs[i, best]), scores))
        else:
            out.append((labels[best], float(probs[i, best]), scores))
    return out


def classify(
    settings: Settings,
    labels: Sequence[str],
    paths: Sequence[str] = (),
    none_margin: float | None = DEFAULT_NONE_MARGIN,
    store: bool = True,
    encoder_factory: EncoderFactory | None = None,
    failed: list[str] | None = None,
) -> list[Classification]:
    """Classify every indexed image (or the given files) and store the labels.

    A given file that cannot be read is skipped and reported as "path: reason" in
    ``failed`` when a list is passed; without one it raises ImageError naming the file."""
    from clipsearch.errors import ImageError

    from clipsearch.catalogue.store import Catalogue
    from clipsearch.encoder import load_encoder
    from clipsearch.imaging import decode_file
    from clipsearch.search import _Session  # the catalogue's model, checked

    factory = encoder_factory or (lambda spec: load_encoder(spec, settings.device))
    session = _Session(settings, factory)
    try:
        cat: Catalogue = session.catalogue
        # Label prompts through the torch-free text tower when the catalogue recorded one
        # (seconds faster: no torch/open_clip import); the image model only loads for a
        # given file that has no stored vector.
        text = session.text_encoder()
        lv = label_vectors(text, labels)
        background = text.encode_texts(list(BACKGROUND_PROMPTS))
        temperature = float(getattr(text, "logit_scale", DEFAULT_TEMPERATURE))
        items: list[tuple[str, int | None, np.ndarray]] = []
        if paths:
            for p in paths:
                abspath = os.path.abspath(p)
                vec = session.stored_vector(abspath)
                image_id = cat.image_id_for_path(abspath) if vec is not None else None
                if vec is None:
                    encoder = session.encoder()
                    try:
                        decoded = decode_file(abspath, encoder.image_size)
                    except ImageError as err:
                        reason = f"{p}: {err.message}"
                        if failed is None:
                            raise ImageError(reason) from err
                        failed.append(reason)
                        continue
                    vec = encoder.encode_images(encoder.preprocess(decoded.image)[None])[0]
                # A changed file's label is not stored: its catalogue row is the old content.
                items.append((abspath, image_id, vec))
        else:
            rows = {r.image_id: r.path for r in cat.images(STATE_INDEXED)}
            ids, vecs = cat.indexed_vectors(session.model_id, session.info.dim)
            items = [(rows[int(i)], int(i), v) for i, v in zip(ids, vecs)]
        if not items:
            return []
        results = classify_vectors(np.stack([v for _, _, v in items]), lv, labels, background,
                                   temperature, none_margin)
        out = [
            Classification(path, label, conf, scores, image_id)
            for (path, image_id, _), (label, conf, scores) in zip(items, results)
        ]
        if store and not cat.readonly:
            cat.write_labels(
                [(c.image_id, c.label, c.confidence) for c in out if c.image_id is not None],
                session.model_id,
            )
        return out
    finally:
        session.close()
