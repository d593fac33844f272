"""Reproducible benchmark data from images that ship in packages (scikit-image's samples).

- phone photos: 4000x3000 JPEG (quality 90), scaled/cropped/tinted variants of the sample
  photographs, one in five with an EXIF orientation tag;
- small images: <= 640 px JPEGs made the same way;
- a random-weight ViT-B-32-256 placed in a temporary Hugging Face cache, so that both
  clipsearch and rclip run the real architecture offline (speed does not depend on weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
           "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png", "camera.png",
           "coins.png", "moon.png", "horse.png")
HUB_REPO = "models--laion--CLIP-ViT-B-32-256x256-DataComp-s34B-b86K"


def sample_photos() -> list[Image.Image]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith((".png", ".jpg")) and not name.startswith(("chessboard", "logo")):
            img = Image.open(folder / name)
            if min(img.size) >= 256:
                out.append(img.convert("RGB"))
    return out


def _variant(base: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = base.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = base.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    noise = rng.normal(0, 6, (size[1], size[0], 3))  # sensor-like noise: real JPEG entropy
    arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_images(out: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n JPEGs of the given size under out/ (reused when already there)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    bases = sample_photos()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = out / f"img_{i:05}.jpg"
        paths.append(p)
        if p.exists():
            continue
        img = _variant(bases[i % len(bases)], size, rng)
        exif = Image.Exif()
        if i % 5 == 0:
            exif[0x0112] = 6
        exif[0x0132] = f"2020:{1 + i % 12:02}:{1 + i % 28:02} 12:00:00"
        img.save(p, "JPEG", quality=90, exif=exif)
    return paths


def make_hub_cache(cache: Path) -> Path:
    """Random ViT-B-32-256 weights where open_clip's datacomp tag looks for them."""
    snap = cache / HUB_REPO / "snapshots" / ("0" * 40)
    target = snap / "open_clip_model.safetensors"
    if target.exists():
        return cache
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256")
    snap.mkdir(parents=True, exist_ok=True)
    (cache / HUB_REPO / "refs").mkdir(exist_ok=True)
    (cache / HUB_REPO / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))
    return cache
