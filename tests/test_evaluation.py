"""`eval` on a tiny labelled set: metrics computed, sane ranges, a perfect case scores 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipsearch.cli import app
from clipsearch.evaluation import LabelledImage, evaluate, read_labelled


@pytest.fixture
def labelled(tmp_path: Path, make_image) -> Path:  # type: ignore[no-untyped-def]
    rows = ["path,caption,concept,category"]
    for i in range(6):
        for style in ("a", "b"):
            make_image(f"{style}/{i}.png", seed=i if style == "a" else i, root=tmp_path / "set")
            rows.append(f"{style}/{i}.png,thing {i},c{i},{'red' if i < 3 else 'blue'}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_read_labelled_groups_captions(labelled: Path) -> None:
    items = read_labelled(labelled / "captions.csv")
    assert len(items) == 12 and items[0].concept == "c0" and items[0].category == "red"


def test_evaluate_reports_every_metric(labelled: Path, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    items = read_labelled(labelled / "captions.csv")
    report = evaluate(tiny_encoder, labelled / "set", items)
    m = report.metrics
    for key in ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10",
                "image_to_image_R@1", "image_to_image_R@5", "zero_shot_accuracy",
                "category_P@10"):
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    assert m["text_to_image_R@1"] <= m["text_to_image_R@5"] <= m["text_to_image_R@10"]
    # Style b is a byte-identical copy of style a: image->image R@1 must be perfect.
    assert m["image_to_image_R@1"] == 1.0
    assert report.counts == {"text_queries": 6, "images": 12, "image_queries": 12,
                             "categories": 2}


def test_unreadable_images_are_listed_not_fatal(labelled: Path, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    (labelled / "set" / "broken.png").write_bytes(b"nope")
    items = read_labelled(labelled / "captions.csv") + [LabelledImage("broken.png", ("x",))]
    report = evaluate(tiny_encoder, labelled / "set", items)
    assert len(report.failed) == 1 and report.counts["images"] == 12


def test_eval_cli_json(labelled: Path, tiny_model: str) -> None:
    res = CliRunner().invoke(app, ["eval", str(labelled / "set"), "--captions",
                                   str(labelled / "captions.csv"), "--model", tiny_model,
                                   "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["metrics"]) >= {"text_to_image_R@1", "category_P@10"}
    assert np.isfinite(data["metrics"]["text_to_image_R@10"])


def test_a_captions_csv_without_a_header_says_so(tmp_path: Path) -> None:
    from clipsearch.errors import UsageError
    from clipsearch.evaluation import read_labelled

    csv_file = tmp_path / "caps.csv"
    csv_file.write_text("a.png,a cat\nb.png,a dog\n")
    with pytest.raises(UsageError, match="header naming the columns.*path and caption"):
        read_labelled(csv_file)
