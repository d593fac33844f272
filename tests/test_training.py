"""Tests for clipsearch.training and the bundled emoji-mini model it produced."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from clipsearch import training

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL_DIR = REPO_ROOT / "clipsearch" / "models" / "emoji-mini"
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (240, 220, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
    "purple": (140, 30, 160),
    "orange": (250, 140, 10),
}


@pytest.fixture()
def tiny_dataset(tmp_path: Path) -> tuple[Path, list[training.CaptionedImage]]:
    """Sixteen 32 px images (colour x shape) with two captions each, as a CSV captions file."""
    from PIL import Image, ImageDraw

    rows = []
    for colour, rgb in COLOURS.items():
        for shape in ("square", "circle"):
            image = Image.new("RGBA", (32, 32), (0, 255, 0, 0))  # transparent, leftover green
            draw = ImageDraw.Draw(image)
            if shape == "square":
                draw.rectangle((6, 6, 25, 25), fill=(*rgb, 255))
            else:
                draw.ellipse((4, 4, 27, 27), fill=(*rgb, 255))
            name = f"{colour}-{shape}.png"
            image.save(tmp_path / name)
            rows += [(name, f"a {colour} {shape}"), (name, f"{colour} {shape}")]
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "caption"), *rows])
    return tmp_path, training.read_captions(captions)


class _Interrupted(Exception):
    pass


def _train_tiny(
    image_dir: Path,
    images: list[training.CaptionedImage],
    steps: int,
    resume_path: Path | None = None,
    stop_after: int | None = None,
) -> tuple[Any, training.TrainResult]:
    config = training.TrainConfig(
        steps=steps,
        batch_size=8,
        learning_rate=2e-3,
        warmup_steps=2,
        seed=1,
        checkpoint_every_steps=2,
    )

    def on_step(step: int, total: int, loss: float, pairs_per_s: float) -> None:
        if step == stop_after:
            raise _Interrupted

    model = training.create_model_from_config(TINY_MODEL_CFG, seed=1)
    result = training.train_model(
        model, TINY_MODEL_CFG, image_dir, images, config, resume_path=resume_path, on_step=on_step
    )
    return model, result


def test_read_captions_groups_rows_by_image_from_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(
        '{"path": "a.png", "caption": "dog"}\n{"path": "a.png", "caption": "a dog"}\n'
        '{"path": "b.png", "caption": "cat", "group": "cat|pet"}\n',
        encoding="utf-8",
    )
    images = training.read_captions(tmp_path / "c.jsonl")
    assert [(i.path, i.captions) for i in images] == [
        ("a.png", ("dog", "a dog")),
        ("b.png", ("cat",)),
    ]
    assert images[1].groups == {"cat", "pet"}
    assert images[0].groups == {"a.png"}


def test_plan_batches_never_puts_one_group_twice_in_a_batch() -> None:
    images = [
        training.CaptionedImage(f"{i}.png", ("x",), frozenset({f"concept{i % 6}"}))
        for i in range(30)
    ]
    batches = training.plan_batches(images, batch_size=6, seed=3, epoch=0)
    assert batches
    for batch in batches:
        groups = [g for index in batch for g in images[index].groups]
        assert len(groups) == len(set(groups))
    assert batches == training.plan_batches(images, batch_size=6, seed=3, epoch=0)


def test_composite_rgba_replaces_leftover_colour_of_transparent_pixels() -> None:
    from PIL import Image

    image = Image.new("RGBA", (2, 1), (0, 255, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    rgb = training.composite_rgba(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)


def test_training_a_tiny_model_makes_the_loss_fall(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]],
) -> None:
    image_dir, images = tiny_dataset
    steps: list[int] = []
    config = training.TrainConfig(steps=25, batch_size=8, learning_rate=2e-3, warmup_steps=2)
    model = training.create_model_from_config(TINY_MODEL_CFG)
    result = training.train_model(
        model,
        TINY_MODEL_CFG,
        image_dir,
        images,
        config,
        on_step=lambda step, total, loss, speed: steps.append(step),
    )
    assert steps == list(range(1, 26))
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < 0.7 * (sum(first) / 5)


def test_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]], tmp_path: Path
) -> None:
    import torch

    image_dir, images = tiny_dataset
    straight, _ = _train_tiny(image_dir, images, steps=4)
    resume = tmp_path / "resume.pt"
    with pytest.raises(_Interrupted):
        _train_tiny(image_dir, images, steps=4, resume_path=resume, stop_after=2)
    assert torch.load(resume, weights_only=True)["step"] == 2
    resumed, result = _train_tiny(image_dir, images, steps=4, resume_path=resume)
    assert len(result.losses) == 2
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_saved_checkpoint_reloads_via_local_dir_with_identical_embeddings(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]], tmp_path: Path
) -> None:
    import open_clip
    import torch
    from PIL import Image

    image_dir, images = tiny_dataset
    model, _ = _train_tiny(image_dir, images, steps=3)
    out = training.save_checkpoint(
        model, TINY_MODEL_CFG, tmp_path / "ckpt", card={"name": "tiny", "metrics": {}}
    )
    assert json.loads((out / "clipsearch_model.json").read_text())["name"] == "tiny"
    reloaded, preprocess, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    reloaded.eval()
    expected = training.round_to_half(model)
    texts = tokenizer(["a red square", "blue circle"])
    pixels = torch.stack(
        [preprocess(training.composite_rgba(Image.open(image_dir / i.path))) for i in images[:4]]
    )
    with torch.no_grad():
        assert torch.equal(reloaded.encode_text(texts), expected.encode_text(texts))
        assert torch.equal(reloaded.encode_image(pixels), expected.encode_image(pixels))


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hub offline, an empty hub cache, and any socket connection fails."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _load_bundled_model() -> tuple[Any, Any, Any]:
    model, config = training.load_checkpoint(BUNDLED_MODEL_DIR)
    preprocess = training.make_image_transform(config["preprocess_cfg"])
    tokenizer = training.make_tokenizer(config["model_cfg"], BUNDLED_MODEL_DIR)
    return model.eval(), preprocess, tokenizer


def test_bundled_model_loads_offline_with_its_card(no_network: None) -> None:
    import torch

    card = json.loads((BUNDLED_MODEL_DIR / "clipsearch_model.json").read_text(encoding="utf-8"))
    assert {"name", "trained_on", "licence notes", "metrics"} <= set(card)
    assert (BUNDLED_MODEL_DIR / "NOTICE").is_file()
    model, _, tokenizer = _load_bundled_model()
    with torch.no_grad():
        features = model.encode_text(tokenizer(["a red apple"]), normalize=True)
    assert features.shape == (1, card["architecture"]["embed_dim"])


def test_bundled_model_ranks_each_sample_query_image_in_its_top_3(
    no_network: None, tmp_path: Path
) -> None:
    """The quickstart, as a library call: index sample_data with emoji-mini, then every query
    in sample_data/queries.tsv puts its expected image in the top 3."""
    from clipsearch.config import resolve_settings
    from clipsearch.indexer import run_index
    from clipsearch.search import SearchOptions, search

    with (SAMPLE_DATA_DIR / "queries.tsv").open(encoding="utf-8", newline="") as f:
        queries = list(csv.DictReader(f, delimiter="\t"))
    assert len(queries) >= 20
    settings = resolve_settings(db=tmp_path / "catalogue.sqlite3", model="emoji-mini")
    report = run_index(settings, [str(SAMPLE_DATA_DIR)])
    images = sorted(p for p in SAMPLE_DATA_DIR.rglob("*") if p.suffix in (".png", ".jpg"))
    assert report.failed_total == 0 and report.new == len(images)
    misses = []
    for q in queries:
        response = search(settings, [q["query"]], SearchOptions(top_k=3))
        top = [Path(r.path).relative_to(SAMPLE_DATA_DIR).as_posix() for r in response.results]
        if q["expected"] not in top:
            misses.append((q["query"], q["expected"], top))
    assert not misses
    # A cold `search` process answers the same from the numpy text tower, without torch.
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from clipsearch.config import resolve_settings\n"
        "from clipsearch.search import SearchOptions, search\n"
        f"r = search(resolve_settings(db={str(settings.db_path)!r}), [{queries[0]['query']!r}],"
        " SearchOptions(top_k=3))\n"
        "print(json.dumps({'paths': [x.path for x in r.results],"
        " 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    warm = [r.path for r in search(settings, [queries[0]["query"]],
                                   SearchOptions(top_k=3)).results]
    assert json.loads(out.stdout) == {"paths": warm, "torch": False}


def test_frozen_image_tower_keeps_its_weights(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]],
) -> None:
    import torch

    image_dir, images = tiny_dataset
    model = training.create_model_from_config(TINY_MODEL_CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = training.TrainConfig(steps=2, batch_size=8, warmup_steps=1, freeze_image_tower=True)
    training.train_model(model, TINY_MODEL_CFG, image_dir, images, config)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])


def test_train_cli_writes_a_model_that_indexes_and_validates(tmp_path: Path) -> None:
    """`clipsearch train` end to end on tiny data: checkpoint loads with --model, validation
    metrics are recorded in the card."""
    import json as _json

    from PIL import Image as _Image
    from typer.testing import CliRunner

    from clipsearch.cli import app

    rows = ["path,caption"]
    for i, (name, colour) in enumerate([("red", (220, 20, 20)), ("green", (20, 200, 20)),
                                        ("blue", (20, 20, 220)), ("yellow", (230, 230, 20))]):
        _Image.new("RGB", (24, 24), colour).save(tmp_path / f"{name}.png")
        rows.append(f"{name}.png,a {name} square")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16,
                                            "patch_size": 8, "head_width": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2,
                        "layers": 1}}
    (tmp_path / "cfg.json").write_text(_json.dumps(cfg))
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["train", str(tmp_path), "--captions", str(tmp_path / "caps.csv"),
                                   "--out", str(out), "--config", str(tmp_path / "cfg.json"),
                                   "--steps", "4", "--batch-size", "4", "--val-folder",
                                   str(tmp_path), "--val-captions", str(tmp_path / "caps.csv"),
                                   "--val-every", "2"])
    assert res.exit_code == 0, res.output
    assert "validation" in res.output
    card = _json.loads((out / "clipsearch_model.json").read_text())
    assert "text_to_image_R@1" in card["validation"]
    from clipsearch.encoder import load_encoder

    enc = load_encoder(str(out), device="cpu")
    assert enc.info.dim == 16 and enc.image_size == 16


TOKENIZER_FILE = BUNDLED_MODEL_DIR / "tokenizer.json"
TINY_SENTENCE_CFG: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {
        "kind": "bert-sentence", "context_length": 16, "tokenizer_file": str(TOKENIZER_FILE),
        "bert": {"vocab_size": 30522, "hidden_size": 24, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "intermediate_size": 48,
                 "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12},
    },
}


def test_locked_sentence_tower_trains_only_the_image_side_and_the_loss_falls(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]],
) -> None:
    """LiT: a pretrained sentence encoder stays fixed (captions encoded once), the image
    tower and the text projection learn, and the CLIP loss falls."""
    import torch

    image_dir, images = tiny_dataset
    model = training.create_model_from_config(TINY_SENTENCE_CFG, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = training.TrainConfig(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                                  freeze_text_tower=True)
    result = training.train_model(model, TINY_SENTENCE_CFG, image_dir, images, config)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text.bert."))
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert sum(result.losses[-5:]) / 5 < 0.8 * (sum(result.losses[:5]) / 5)


def test_sentence_checkpoint_reloads_and_the_numpy_path_matches(
    tiny_dataset: tuple[Path, list[training.CaptionedImage]], tmp_path: Path
) -> None:
    import numpy as np

    from clipsearch.encoder import load_encoder
    from clipsearch.text_tower import NumpyBertEncoder

    image_dir, images = tiny_dataset
    model = training.create_model_from_config(TINY_SENTENCE_CFG, seed=3)
    config = training.TrainConfig(steps=2, batch_size=8, warmup_steps=1)
    training.train_model(model, TINY_SENTENCE_CFG, image_dir, images, config)
    out = training.save_checkpoint(model, TINY_SENTENCE_CFG, tmp_path / "sentence")
    assert (out / "tokenizer.json").is_file()
    saved_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert "tokenizer_file" not in saved_cfg["text_cfg"]  # no path of this machine inside
    reloaded, _ = training.load_checkpoint(out)
    tokenizer = training.make_tokenizer(saved_cfg, out)
    texts = ["a red square", "something to eat", "a very long caption " * 10]
    expected = training.encode_texts(training.round_to_half(model), 16, texts,
                                     tokenizer=tokenizer)
    assert np.array_equal(training.encode_texts(reloaded, 16, texts, tokenizer=tokenizer)
                          .numpy(), expected.numpy())
    encoder = load_encoder(str(out), device="cpu", precision="fp32")
    assert encoder.info.dim == 24 and encoder.context_length == 16
    torch_path = encoder.encode_texts(texts)
    numpy_path = NumpyBertEncoder(encoder.weights_file, encoder.text_tower).encode_texts(texts)
    np.testing.assert_allclose(numpy_path, torch_path, atol=1e-5)
    np.testing.assert_allclose(torch_path, expected.numpy(), atol=1e-5)
