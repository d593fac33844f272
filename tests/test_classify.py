"""Zero-shot classification: labels, calibrated softmax, 'none of these', stored labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch.classify import NONE_LABEL, classify, classify_vectors, parse_labels
from clipsearch.errors import UsageError
from clipsearch.indexer import run_index
from clipsearch.search import SearchOptions, search


def test_parse_labels(tmp_path: Path) -> None:
    f = tmp_path / "labels.txt"
    f.write_text("# animals\ncat\nDog\n\n")
    assert parse_labels("cat, car ,", str(f)) == ["cat", "car", "Dog"]
    with pytest.raises(UsageError):
        parse_labels("cat")


def test_softmax_is_calibrated_and_none_by_margin() -> None:
    labels = ["a", "b"]
    lv = np.eye(3, dtype=np.float32)[:2]
    images = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], np.float32)
    background = np.array([[0, 0, 1]], np.float32)
    out = classify_vectors(images, lv, labels, background, temperature=10.0, none_margin=0.0)
    assert out[0][0] == "a" and out[0][1] == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-4)
    assert out[1][0] == "b" and 0.5 < out[1][1] < 0.99
    assert out[2][0] == NONE_LABEL
    for _, _, scores in out:
        assert sum(scores.values()) == pytest.approx(1.0)


def test_classify_stores_labels_and_search_filters_by_them(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(4):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    results = classify(settings, ["cat", "dog"], none_margin=None)
    assert len(results) == 4 and all(r.label in ("cat", "dog") for r in results)
    assert all(abs(sum(r.scores.values()) - 1) < 1e-5 for r in results)
    for label in ("cat", "dog"):
        expected = {r.path for r in results if r.label == label}
        found = search(settings, ["x"], SearchOptions(top_k=10, label=label))
        assert {r.path for r in found.results} == expected
    unknown = search(settings, ["x"], SearchOptions(top_k=10, label="banana"))
    assert not unknown.results and any("banana" in n for n in unknown.notices)
    single = classify(settings, ["cat", "dog"], [str(tmp_path / "photos" / "0.png")],
                      none_margin=None)
    assert len(single) == 1 and single[0].label == next(
        r.label for r in results if r.path.endswith("0.png"))


def test_none_of_these_compares_against_the_ensembled_generic_prompts() -> None:
    """A label beats the generic prompts' mean (as labels are means over templates too); one
    generic prompt close to the image must not push every image to 'none of these'."""
    import numpy as np

    from clipsearch.classify import NONE_LABEL, classify_vectors

    image = np.array([[1.0, 0.0, 0.0]], np.float32)
    labels = np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]], np.float32)
    generic = np.array([[0.7, 0.0, 0.714], [-0.3, 0.0, 0.954]], np.float32)  # mean: cos 0.23
    (label, _, _), = classify_vectors(image, labels, ["cat", "dog"], generic, 10.0, 0.0)
    assert label == "cat"
    (label, _, _), = classify_vectors(image, labels, ["cat", "dog"], generic, 10.0, 0.4)
    assert label == NONE_LABEL


def test_classifying_the_catalogue_needs_no_image_model_and_matches_torch(  # type: ignore[no-untyped-def]
        settings, make_image, tmp_path: Path, tiny_encoder) -> None:
    for i in range(6):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    labels = ["a red thing", "a blue thing", "a green thing"]

    def no_model(spec):  # type: ignore[no-untyped-def]
        raise AssertionError("the torch model was loaded")

    fast = classify(settings, labels, store=False, encoder_factory=no_model)
    slow = classify(settings, labels, store=False,
                    encoder_factory=lambda spec: tiny_encoder)  # torch text tower
    import clipsearch.search as search_mod

    assert len(fast) == 6 and [c.label for c in fast] == [c.label for c in slow]
    for a, b in zip(fast, slow):
        assert abs(a.confidence - b.confidence) < 0.01  # bf16 torch tower and temperature
    from clipsearch.text_tower import read_logit_scale

    # The fp32 value from the checkpoint; a bf16 torch model reports it rounded (14.25 vs 14.29).
    exact = read_logit_scale(tiny_encoder.weights_file)
    assert abs(exact - tiny_encoder.logit_scale) / exact < 0.01
    del search_mod


def test_classify_of_a_file_edited_since_indexing_uses_its_new_content(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """classify FILE answered for an edited (not yet re-indexed) file from its old vector, and
    stored that label."""
    import os
    import shutil

    a = make_image("a.png", seed=1)
    b = make_image("b.png", seed=2)
    run_index(settings, [str(tmp_path / "photos")])
    labels = ["cat", "dog", "car", "tree"]
    of_b = classify(settings, labels, [str(b)], none_margin=None, store=False)[0]
    shutil.copy(b, a)  # a now holds b's picture (new mtime)
    os.utime(a, ns=(1, 1_000_000_000))
    got = classify(settings, labels, [str(a)], none_margin=None)[0]
    assert got.scores == pytest.approx(of_b.scores, abs=1e-4)
    assert got.image_id is None  # not stored against the row of the old content
