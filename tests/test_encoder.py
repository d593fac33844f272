"""Model resolution and loading: local folders, offline hub cache, clear errors, precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipsearch.encoder import load_encoder, resolve_spec
from clipsearch.errors import ModelError


def test_local_folder_loads_with_stable_identity(tiny_model: str, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    again = load_encoder(tiny_model, device="cpu")
    assert again.info.key == tiny_encoder.info.key and "@sha256:" in again.info.key
    assert again.info.dim == 32
    a = tiny_encoder.encode_texts(["a cat", "a dog"])
    b = again.encode_texts(["a cat", "a dog"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_bf16_stays_within_cosine_099_of_fp32(tiny_model: str) -> None:
    from PIL import Image

    fp32 = load_encoder(tiny_model, device="cpu", precision="fp32")
    bf16 = load_encoder(tiny_model, device="cpu", precision="bf16")
    rng = np.random.default_rng(0)
    imgs = np.stack([fp32.preprocess(Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)))
                     for _ in range(8)])
    cos = np.sum(fp32.encode_images(imgs) * bf16.encode_images(imgs), axis=1)
    assert cos.min() >= 0.99
    t = ["a photo of a dog", "sunset over the sea"]
    assert np.sum(fp32.encode_texts(t) * bf16.encode_texts(t), axis=1).min() >= 0.99


def _bf16_cosines(spec: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    fp32 = load_encoder(spec, device="cpu", precision="fp32")
    bf16 = load_encoder(spec, device="cpu", precision="bf16")
    rng = np.random.default_rng(1)
    imgs = np.stack([fp32.preprocess(Image.fromarray(rng.integers(0, 255, (size, size, 3),
                                                                  np.uint8)))
                     for _ in range(6)])
    texts = ["a photo of a dog", "something to eat", "a rainy day in the city"]
    return (np.sum(fp32.encode_images(imgs) * bf16.encode_images(imgs), axis=1),
            np.sum(fp32.encode_texts(texts) * bf16.encode_texts(texts), axis=1))


def test_bf16_keeps_the_bundled_models_embeddings_within_cosine_099() -> None:
    """On trained weights (emoji-mini), not only on a tiny random model."""
    image_cos, text_cos = _bf16_cosines("emoji-mini", 64)
    assert image_cos.min() >= 0.99 and text_cos.min() >= 0.99


@pytest.mark.slow
def test_bf16_keeps_vit_b_32_embeddings_within_cosine_099(tmp_path: Path) -> None:
    """The default architecture at full size (random weights: precision does not need the
    trained values to show up)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    image_cos, text_cos = _bf16_cosines(f"ViT-B-32-256:{tmp_path / 'w.safetensors'}", 256)
    assert image_cos.min() >= 0.99 and text_cos.min() >= 0.99


@pytest.mark.parametrize(
    "spec,match",
    [
        ("ViT-B-32", "names no weights"),
        ("/no/such/folder/model", "not found"),
        ("ViT-B-32:/no/such/weights.safetensors", "not found"),
    ],
)
def test_bad_specs_give_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(ModelError, match=match) as info:
        resolve_spec(spec)
    assert "\n" not in info.value.message


def test_folder_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="open_clip_config.json"):
        resolve_spec(str(tmp_path))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    with pytest.raises(ModelError, match="no weights"):
        resolve_spec(str(tmp_path))


def test_uncached_hub_model_offline_names_the_alternative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as info:
        load_encoder("ViT-B-32-256:datacomp_s34b_b86k", device="cpu")
    assert "not in the local hub cache" in info.value.message
    assert info.value.hint and "--model" in info.value.hint


def test_unknown_tag_lists_known_ones() -> None:
    with pytest.raises(ModelError) as info:
        load_encoder("ViT-B-32-256:no_such_tag", device="cpu")
    assert "datacomp_s34b_b86k" in (info.value.hint or "")


@pytest.mark.slow
def test_hub_tag_loads_offline_from_a_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pretrained-tag path, with random weights placed in a temporary hub cache."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    repo = cache / "models--laion--CLIP-ViT-B-32-256x256-DataComp-s34B-b86K"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = open_clip.create_model("ViT-B-32-256")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(snap / "open_clip_model.safetensors"))
    del model
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    enc = load_encoder("ViT-B-32-256:datacomp_s34b_b86k", device="cpu")
    assert enc.info.key == "ViT-B-32-256:datacomp_s34b_b86k" and enc.info.dim == 512
    assert enc.image_size == 256
    assert enc.encode_texts(["a dog"]).shape == (1, 512)
    torch.set_num_threads(torch.get_num_threads())


def test_unreachable_hub_fails_fast_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hc, "ENDPOINT", "https://127.0.0.1")
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: calls.append(a) or "never")
    with pytest.raises(ModelError) as info:
        load_encoder("ViT-B-32-256:datacomp_s34b_b86k", device="cpu")
    assert "cannot be reached" in info.value.message and "\n" not in info.value.message
    assert calls == []


def test_loading_skips_random_init_yet_every_weight_comes_from_the_checkpoint(tiny_model: str) -> None:  # type: ignore[no-untyped-def]
    """Building the model does not fill parameters with random numbers the checkpoint then
    overwrites (most of a ViT-B-32 load); every parameter and buffer still equals the file,
    and torch's random fills work again afterwards."""
    import torch
    from safetensors.torch import load_file

    enc = load_encoder(tiny_model, device="cpu", precision="fp32")
    saved = load_file(str(Path(tiny_model) / "open_clip_model.safetensors"))
    state = enc.model.state_dict()
    assert set(state) == set(saved)
    for name, tensor in state.items():
        assert torch.equal(tensor, saved[name]), name
    probe = torch.zeros(1000)
    probe.uniform_()
    assert probe.std() > 0.2
    probe.normal_()
    assert probe.std() > 0.5


def test_random_init_is_restored_when_a_model_fails_to_load(tmp_path: Path) -> None:
    import shutil

    import torch

    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "m")
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short
    with pytest.raises(ModelError):
        load_encoder(str(folder), device="cpu")
    probe = torch.zeros(1000)
    probe.uniform_()
    assert probe.std() > 0.2
    shutil.rmtree(folder)
