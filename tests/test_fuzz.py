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


def _mutations(count: int, seed: int) -> list[bytes]:
    """Reproducible mutated copies of the seed images (same operations as `mutated`)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        data = bytearray(SEEDS[int(rng.integers(len(SEEDS)))])
        for _ in range(int(rng.integers(1, 9))):
            op = int(rng.integers(4))
            pos = int(rng.integers(0, max(1, len(data))))
            if op == 0 and data:
                data[pos] = int(rng.integers(256))
            elif op == 1:
                del data[pos : pos + int(rng.integers(1, 65))]
            elif op == 2:
                data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 33)), np.uint8).tobytes()
            else:
                data = data[:pos]
        out.append(bytes(data))
    return out


def _index_mutated_folder(settings, tmp_path, count: int) -> None:  # type: ignore[no-untyped-def]
    """Index a folder of mutated files end to end: the run finishes, every file is catalogued
    once as indexed or failed with a one-line reason, and the index holds the indexed ones."""
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.indexer import run_index

    folder = tmp_path / "fuzz"
    folder.mkdir()
    for n, data in enumerate(_mutations(count, seed=count)):
        (folder / f"{n:05d}.img").write_bytes(data)
    report = run_index(settings, [str(folder)])
    assert report.scanned <= count  # empty or unrecognisable bytes may not look like images
    with Catalogue(settings.db_path) as cat:
        rows = list(cat.images())
        states = [r.state for r in rows]
        assert len({r.path for r in rows}) == len(rows) == report.new + report.duplicates
        assert set(states) <= {"indexed", "failed"}
        assert states.count("failed") == report.failed_total
        assert all(r.error and "\n" not in r.error for r in rows if r.state == "failed")
    assert report.indexed_total == states.count("indexed")


def test_mutated_files_index_cleanly(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _index_mutated_folder(settings, tmp_path, 150)


@pytest.mark.slow
def test_thousands_of_mutated_files_index_cleanly(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _index_mutated_folder(settings, tmp_path, 3000)
