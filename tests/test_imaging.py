"""Decoding: every colour mode to RGB, EXIF rotation, bounded size, clear failures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsearch.errors import ImageError
from clipsearch.imaging import BACKGROUND_RGB, decode_image, to_rgb


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_alpha_is_composited_on_the_fixed_background() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # transparent, leftover red colour
    rgb = np.asarray(decode_image(_bytes(img, "PNG")).image)
    assert tuple(rgb[0, 0]) == BACKGROUND_RGB


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    rgb = np.asarray(decode_image(_bytes(pal, "PNG", transparency=0)).image)
    assert tuple(rgb[0, 0]) == BACKGROUND_RGB


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    out = decode_image(_bytes(img, "JPEG"))
    r, g, b = np.asarray(out.image)[8, 8]
    assert out.image.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.linspace(0, 65535, 64).astype(np.uint16).reshape(1, 64).repeat(4, 0)
    rgb = np.asarray(decode_image(_bytes(Image.fromarray(arr), "PNG")).image)[..., 0]
    assert rgb[0, 0] == 0 and rgb[0, -1] == 255 and 100 < rgb[0, 32] < 160


def test_32_bit_and_float_grey_reach_rgb() -> None:
    assert to_rgb(Image.fromarray(np.full((4, 4), 70000, np.int32))).mode == "RGB"
    grey = np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32))))
    assert 120 <= grey[0, 0, 0] <= 135


def test_bilevel() -> None:
    assert decode_image(_bytes(Image.new("1", (8, 8), 1), "PNG")).image.mode == "RGB"


def test_exif_rotation_applied_and_dimensions_after_rotation() -> None:
    img = Image.new("RGB", (60, 20), "red")
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_bytes(img, "JPEG", exif=exif, quality=95))
    assert (out.width, out.height) == (20, 60)
    arr = np.asarray(out.image)
    assert arr[2, 10, 2] > 200  # the blue strip is now on top


def test_malformed_exif_is_ignored() -> None:
    img = Image.new("RGB", (10, 6), "green")
    exif = Image.Exif()
    exif[0x0112] = 77  # nonsense orientation
    exif[0x0132] = "not a date"
    out = decode_image(_bytes(img, "JPEG", exif=exif))
    assert (out.width, out.height) == (10, 6) and out.captured_at is None


def test_capture_time_read_from_exif() -> None:
    exif = Image.Exif()
    exif[0x0132] = "2021:07:04 12:30:00"
    out = decode_image(_bytes(Image.new("RGB", (8, 8)), "JPEG", exif=exif))
    assert out.captured_at is not None


def test_big_jpeg_decodes_at_reduced_size_and_reports_full_size() -> None:
    data = _bytes(Image.new("RGB", (4000, 3000), "teal"), "JPEG")
    out = decode_image(data, target=256)
    assert (out.width, out.height) == (4000, 3000)
    assert min(out.image.size) >= 256 and max(out.image.size) <= 1100


def test_huge_png_is_refused_without_touching_the_global_guard() -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = _bytes(Image.new("1", (20000, 10000)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, target=64)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"hello world, not an image", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 30, "corrupt"),
    ],
)
def test_bad_bytes_fail_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_fails() -> None:
    data = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
                  "JPEG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = np.asarray(decode_image(buf.getvalue()).image)[0, 0]
    assert r > 200 and b < 50


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP", "TIFF", "BMP"])
def test_other_formats_decode(fmt: str) -> None:
    from clipsearch.imaging import codec_support

    if fmt in ("HEIF", "AVIF") and not codec_support()[fmt]:
        pytest.skip(f"{fmt} codec not installed")
    img = Image.new("RGB", (32, 24), (200, 30, 30))
    out = decode_image(_bytes(img, fmt))
    assert out.format == fmt and (out.width, out.height) == (32, 24)
    r, g, b = np.asarray(out.image)[12, 16]
    assert r > 150 and g < 90 and b < 90


def test_mpo_uses_the_primary_frame() -> None:
    first, second = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    r, _, b = np.asarray(decode_image(buf.getvalue()).image)[8, 8]
    assert r > 200 and b < 60


def test_any_decoder_exception_becomes_a_one_line_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by fuzzing: the AVIF decoder raises RuntimeError on damaged files."""
    data = _bytes(Image.new("RGB", (8, 8)), "PNG")

    def boom(*_a, **_k):  # type: ignore[no-untyped-def]
        raise RuntimeError("Failed to decode image:\nMissing or empty image item")

    monkeypatch.setattr(Image, "open", boom)
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert "corrupt" in info.value.message and "\n" not in info.value.message


def test_16_bit_scaling_makes_no_full_size_float_copies() -> None:
    """A 9-megapixel 16-bit PNG: the old float64 path allocated 72 MB per copy, several times;
    scaling in strips allocates the 9 MB uint8 result and a few small strips."""
    import tracemalloc

    arr = np.zeros((3000, 3000), np.uint16)
    arr[::5, ::3] = 60000
    data = _bytes(Image.fromarray(arr), "PNG")
    del arr
    tracemalloc.start()
    try:
        out = decode_image(data, target=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.image.mode == "RGB" and (out.width, out.height) == (3000, 3000)
    assert peak < 9_000_000 + 12 * 1_000_000 * 4, peak  # result + a few 4 MB strips


def test_full_size_formats_are_capped_lower_than_jpeg() -> None:
    from clipsearch.imaging import MAX_DECODE_PIXELS, MAX_JPEG_PIXELS, MAX_WEBP_PIXELS

    assert MAX_WEBP_PIXELS < MAX_DECODE_PIXELS <= 50_000_000 < MAX_JPEG_PIXELS
    data = _bytes(Image.new("1", (8000, 7500)), "PNG")  # 60 MP, a few KB on disk
    with pytest.raises(ImageError, match="limit 50"):
        decode_image(data, target=64)


def test_pixel_budget_bounds_concurrent_decodes() -> None:
    import threading
    import time

    from clipsearch.imaging import _PixelBudget

    budget = _PixelBudget(100)
    inside: list[int] = []
    most = [0]
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                inside.append(min(pixels, 100))
                most[0] = max(most[0], sum(inside))
            time.sleep(0.05)
            with lock:
                inside.remove(min(pixels, 100))

    threads = [threading.Thread(target=decode, args=(p,)) for p in (60, 60, 60, 500, 10, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] <= 100 and budget.free == 100  # a request above the total takes it all


def test_rotated_png_is_shrunk_before_rotating_and_stays_right() -> None:
    img = Image.new("RGB", (600, 200), "red")
    img.paste((0, 0, 255), (0, 0, 100, 200))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_bytes(img, "PNG", exif=exif), target=32)
    assert (out.width, out.height) == (200, 600)
    arr = np.asarray(out.image)
    assert max(out.image.size) < 600 and arr.shape[0] > arr.shape[1]
    assert arr[2, arr.shape[1] // 2, 2] > 200  # the blue strip is now on top
