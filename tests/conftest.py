"""Shared fixtures: a temp data dir per test, a tiny random open_clip model, image factory."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                   "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random-weight open_clip model in the local-dir layout clipsearch loads."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_CFG,
           "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-clip"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model: str):  # type: ignore[no-untyped-def]
    from clipsearch.encoder import load_encoder

    return load_encoder(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "home"))
    # Derived-weights cache (entries keyed by source path, size, mtime): shared by the session.
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(_session_cache))
    for name in ("CLIPSEARCH_DB", "CLIPSEARCH_MODEL", "CLIPSEARCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def settings(tmp_path: Path, tiny_model: str):  # type: ignore[no-untyped-def]
    from clipsearch.config import resolve_settings

    return resolve_settings(db=tmp_path / "cat" / "catalogue.sqlite3", model=tiny_model,
                            batch_size=4, workers=2)


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a small picture: distinct colours and shapes per seed."""

    def make(rel: str, seed: int = 0, size: tuple[int, int] = (48, 40), fmt: str | None = None,
             root: Path | None = None) -> Path:
        rng = np.random.default_rng(seed)
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        h, w = size[1], size[0]
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
        path = (root or tmp_path / "photos") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, format=fmt)
        return path

    return make


@pytest.fixture
def read_only() -> Iterator[Callable[..., None]]:
    """Make paths read-only for this process (files before their folder); undone after.

    A normal user gets the write bits removed. Root writes such files anyway, so root gets
    the immutable attribute (chattr +i), which even root cannot write through; where that is
    not possible the test is skipped, saying why."""
    undo: list[Callable[[], object]] = []

    def make(*paths: Path) -> None:
        for p in paths:
            if os.geteuid() != 0:
                mode = p.stat().st_mode
                p.chmod(mode & ~0o222)
                undo.append(lambda p=p, mode=mode: p.chmod(mode))
                continue
            try:
                done = subprocess.run(["chattr", "+i", str(p)], capture_output=True, text=True)
            except OSError as err:
                pytest.skip(f"running as root without chattr ({err}): root writes read-only "
                            "files anyway")
            if done.returncode != 0:
                pytest.skip(f"running as root and `chattr +i` failed ({done.stderr.strip()}): "
                            "root writes read-only files anyway")
            undo.append(lambda p=p: subprocess.run(["chattr", "-i", str(p)], check=True))

    yield make
    for step in reversed(undo):
        step()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
