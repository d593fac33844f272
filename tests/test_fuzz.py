"""Hostile input: mutated real image bytes never crash or hang decoding; only ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from clipsearch.errors import ImageError
from clipsearch.imaging import decode_image


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (24, 32, 3), np.uint8)
    out = []
    for fmt, kw in (("JPEG", {"quality": 80}), ("PNG", {}), ("GIF", {}), ("WEBP", {}),
                    ("BMP", {}), ("TIFF", {}), ("AVIF", {})):
        buf = io.BytesIO()
        try:
            Image.fromarray(arr).save(buf, format=fmt, **kw)
        except (KeyError, OSError):
            continue
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:
            data = data[:pos]
    return bytes(data)


def _decode_or_fail_cleanly(data: bytes) -> None:
    try:
        out = decode_image(data, target=32)
    except ImageError as err:
        assert err.message and "\n" not in err.message
        return
    assert out.image.mode == "RGB" and out.image.size[0] > 0


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_fail_cleanly(data: bytes) -> None:
    _decode_or_fail_cleanly(data)


@pytest.mark.slow
@settings(max_examples=5000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_many_mutated_images_fail_cleanly(data: bytes) -> None:
    _decode_or_fail_cleanly(data)


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=512))
def test_random_bytes_fail_cleanly(data: bytes) -> None:
    _decode_or_fail_cleanly(data)
