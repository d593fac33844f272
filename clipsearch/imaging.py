"""Safe image decoding: sniff, bounded decode (JPEG draft), EXIF rotation, every mode to RGB."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from clipsearch.crawler import sniff_image_format
from clipsearch.errors import ImageError

# Largest image decoded at full size (every format but JPEG, which decodes at reduced size).
# Every image is shrunk to the model's size before any further full-size copy and 16-bit
# grey is scaled to 8 bits in strips, so one decode holds the stored pixels plus at most one
# converted copy: measured peaks are at most 9 bytes per pixel (RGBA/LA/palette PNG, 32-bit
# TIFF, CMYK) except WebP, whose decoder makes extra copies (16 bytes per pixel). Hence the
# caps: one decode stays below about 450 MB (9 x 50 MP, or 16 x 25 MP for WebP) plus the
# file's own bytes; JPEG decodes at 1/8 scale or finer, below 1e9 / 64 x 9 = 140 MB.
MAX_DECODE_PIXELS = 50_000_000
MAX_WEBP_PIXELS = 25_000_000
# What all threads together may be decoding at once, in MAX_DECODE_PIXELS units (a WebP pixel
# counts double): any number of threads decode ordinary photos side by side, but at most two
# images at the cap, so all decoding in one process stays below about 900 MB.
DECODE_BUDGET_PIXELS = 2 * MAX_DECODE_PIXELS
# Values per strip when scaling high-bit-depth grey (bounds the temporary arrays to ~4 MB).
SCALE_STRIP_VALUES = 1_000_000
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


class _PixelBudget:
    """A counting semaphore in pixels: bounds what concurrent full-size decodes hold."""

    def __init__(self, pixels: int) -> None:
        self.total = pixels
        self.free = pixels
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        want = max(0, min(int(pixels), self.total))
        with self._cond:
            while self.free < want:
                self._cond.wait()
            self.free -= want
        try:
            yield
        finally:
            with self._cond:
                self.free += want
                self._cond.notify_all()


_budget = _PixelBudget(DECODE_BUDGET_PIXELS)


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, values) strips of a one-channel image, about SCALE_STRIP_VALUES each."""
    w, h = img.size
    rows = max(1, SCALE_STRIP_VALUES // max(1, w))
    for y in range(0, h, rows):
        yield y, np.asarray(img.crop((0, y, w, min(h, y + rows))))


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale high-bit-depth or float greyscale into 0..255 without clipping its range.

    Works strip by strip: besides the uint8 result, only one strip is ever copied."""
    w, h = img.size
    out = np.zeros((h, w), np.uint8)
    if w == 0 or h == 0:
        return out
    low, high, nonfinite = np.inf, -np.inf, False
    for _, strip in _strips(img):
        if strip.dtype.kind == "f":
            finite = np.isfinite(strip)
            nonfinite = nonfinite or not bool(finite.all())
            strip = strip[finite]
        if strip.size:
            low = min(low, float(strip.min()))
            high = max(high, float(strip.max()))
    if nonfinite:  # NaN and infinities count as 0
        low, high = min(low, 0.0), max(high, 0.0)
    if not np.isfinite(low):  # nothing finite at all
        return out
    low = min(0.0, low)
    high -= low
    if high <= 1.0:
        scale = 255.0  # float images in 0..1
    elif high <= 255.0:
        scale = 1.0
    elif high <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / high
    for y, strip in _strips(img):
        values = strip.astype(np.float32)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        values -= np.float32(low)
        values *= np.float32(scale)
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        out[y : y + values.shape[0]] = values
    return out


def to_rgb(img: Image.Image, target: int = 0) -> Image.Image:
    """Convert any Pillow mode to RGB; alpha is composited on one fixed background.

    With `target` > 0 the picture is shrunk (see _reduce) as soon as its mode allows, so
    no conversion makes a second full-size copy."""
    mode = img.mode
    if mode == "RGB":
        return _reduce(img, target)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _reduce(Image.fromarray(_scale_to_uint8(img), "L"), target)
        return grey.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("P", "1"):
        return _reduce(img.convert("RGB"), target)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = _reduce(img, target).convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return _reduce(img, target).convert("RGB")


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
        limit = MAX_WEBP_PIXELS if fmt == "WEBP" else MAX_DECODE_PIXELS
        if img.size[0] * img.size[1] > limit:
            w, h = img.size
            raise ImageError(
                f"image too large to decode safely ({w}x{h} = {w * h / 1e6:.0f} megapixels, "
                f"limit {limit / 1e6:.0f})"
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        orientation = _orientation(img)
        captured = _captured_at(img)
        weight = (MAX_DECODE_PIXELS // MAX_WEBP_PIXELS) if fmt == "WEBP" else 1
        with _budget.hold(img.size[0] * img.size[1] * weight):
            img.load()
            if orientation != 1:
                # Shrink first (box reduction commutes with a rotation) so that the
                # transpose copies a small picture, not the full-size one.
                img = _reduce(img, target)
                try:
                    img = ImageOps.exif_transpose(img) or img
                except Exception:  # noqa: BLE001 - malformed EXIF: use the image as stored
                    pass
            rgb = to_rgb(img, target)
            del img
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


REDUCIBLE_MODES = frozenset({"L", "LA", "PA", "RGB", "RGBA", "RGBa", "La", "CMYK", "YCbCr",
                             "LAB", "HSV", "I", "F"})


def _reduce(img: Image.Image, target: int) -> Image.Image:
    """Shrink by an integer box factor while the shortest side stays >= 2 x target (modes
    Pillow cannot reduce are returned as they are, for to_rgb to shrink after converting)."""
    if target <= 0 or img.mode not in REDUCIBLE_MODES:
        return img
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
