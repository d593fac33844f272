"""Safe image decoding: sniff, bounded decode (JPEG draft), EXIF rotation, every mode to RGB."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from clipsearch.crawler import sniff_image_format
from clipsearch.errors import ImageError

# Largest image decoded at full size (formats without reduced-size decoding).
MAX_DECODE_PIXELS = 120_000_000
# Largest header size accepted for JPEG, which decodes at reduced size (draft mode).
MAX_JPEG_PIXELS = 1_000_000_000
BACKGROUND_RGB = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
EXIF_IFD = 0x8769
EXIF_DATETIME_ORIGINAL = 0x9003
EXIF_DATETIME = 0x0132
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_heif_registered: bool | None = None


@dataclass(frozen=True)
class DecodedImage:
    """An RGB picture ready for the model, plus what the catalogue records about the file."""

    image: Image.Image
    width: int
    height: int
    format: str
    captured_at: float | None


def _ensure_heif() -> bool:
    global _heif_registered
    if _heif_registered is None:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_registered = True
        except Exception:  # noqa: BLE001 - optional codec; absence is reported per file
            _heif_registered = False
    return _heif_registered


def codec_support() -> dict[str, bool]:
    """Which optional codecs this installation can decode."""
    from PIL import features

    return {"HEIF": _ensure_heif(), "AVIF": bool(features.check("avif"))}


def _captured_at(img: Image.Image) -> float | None:
    try:
        exif = img.getexif()
        raw = exif.get_ifd(EXIF_IFD).get(EXIF_DATETIME_ORIGINAL) or exif.get(EXIF_DATETIME)
        if not raw:
            return None
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        return datetime.strptime(text.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").timestamp()
    except Exception:  # noqa: BLE001 - malformed EXIF never fails an image
        return None


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001
        return 1
    return value if 1 <= value <= 8 else 1


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale high-bit-depth or float greyscale into 0..255 without clipping its range."""
    arr = arr.astype(np.float64)
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    low = min(0.0, float(arr.min())) if arr.size else 0.0
    arr = arr - low
    high = float(arr.max()) if arr.size else 0.0
    if high <= 1.0:
        scale = 255.0  # float images in 0..1
    elif high <= 255.0:
        scale = 1.0
    elif high <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / high
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; alpha is composited on one fixed background."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _scale_to_uint8(np.asarray(img))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("RGB")
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(data: bytes, fmt: str, target: int) -> tuple[Image.Image, tuple[int, int]]:
    if fmt == "JPEG":
        # Constructing the JPEG plugin directly skips Pillow's process-wide bomb check,
        # which draft mode makes unnecessary; the decoded size is bounded below.
        img: Image.Image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
        full = img.size
        if full[0] * full[1] > MAX_JPEG_PIXELS:
            raise ImageError(f"image too large ({full[0]}x{full[1]} pixels)")
        if target > 0:
            img.draft("RGB" if img.mode == "RGB" else None, (target, target))
        return img, full
    if fmt == "HEIF" and not _ensure_heif():
        raise ImageError("HEIC/HEIF support is not installed (pip install pillow-heif)")
    try:
        img = Image.open(io.BytesIO(data))
        return img, img.size
    except Image.DecompressionBombError as err:
        raise ImageError(_too_large(err)) from err


def _too_large(err: Exception) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(m.group(1)) / 1e6:.0f} megapixels, " if m else ""
    return f"image too large to decode safely ({size}over the decompression-bomb limit)"


def decode_image(data: bytes, target: int = 0) -> DecodedImage:
    """Decode image bytes into RGB, at reduced size where cheap when `target` > 0.

    `target` is the smallest side the caller needs; the result keeps its shortest side at
    least that large when the source allows. Raises ImageError with a readable reason.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    fmt = sniff_image_format(data[:32])
    if fmt is None:
        raise ImageError("not an image (unrecognised content)")
    try:
        img, (full_w, full_h) = _open(data, fmt, target)
        if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
            w, h = img.size
            raise ImageError(
                f"image too large to decode safely ({w}x{h} = {w * h / 1e6:.0f} megapixels, "
                f"limit {MAX_DECODE_PIXELS / 1e6:.0f})"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        orientation = _orientation(img)
        captured = _captured_at(img)
        img.load()
        if orientation != 1:
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # noqa: BLE001 - malformed EXIF: use the image as stored
                pass
        rgb = to_rgb(img)
        if target > 0:
            rgb = _reduce(rgb, target)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(_too_large(err)) from err
    except UnidentifiedImageError as err:
        raise ImageError(f"corrupt or unsupported {fmt} file") from err
    except MemoryError as err:
        raise ImageError("out of memory while decoding") from err
    except Exception as err:  # noqa: BLE001 - decoders raise many kinds; all mean "bad file"
        msg = " ".join((str(err) or type(err).__name__).split())[:200]
        raise ImageError(f"corrupt or truncated {fmt} file: {msg}") from err
    if orientation in ROTATED_ORIENTATIONS:
        full_w, full_h = full_h, full_w
    return DecodedImage(rgb, int(full_w), int(full_h), fmt, captured)


def _reduce(img: Image.Image, target: int) -> Image.Image:
    """Shrink by an integer box factor while the shortest side stays >= 2 x target."""
    short = min(img.size)
    factor = short // (2 * target)
    if factor >= 2:
        return img.reduce(factor)
    return img


def decode_file(path: str, target: int = 0) -> DecodedImage:
    """Read and decode one file (see decode_image)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ImageError(f"cannot read: {err.strerror or err}") from err
    return decode_image(data, target)
