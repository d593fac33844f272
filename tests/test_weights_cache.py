"""The derived-weights cache: exact round trip, memory-mapped, never stale, never required."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsearch import weights_cache
from clipsearch.text_tower import BpeTokenizer, NumpyTextEncoder

TEXTS = ["a dog on a beach at sunset", "Café crème!", ""]


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": np.arange(7, dtype=np.int64),
            "t": np.asfortranarray(rng.normal(size=(4, 6)).astype(np.float32)),
            "s": np.float32(2.5) * np.ones((), np.float32)}


def test_pack_round_trips_every_array_exactly_and_maps_it(tmp_path: Path) -> None:
    path = tmp_path / "x.pack"
    arrays = _arrays()
    weights_cache.write_pack(path, arrays)
    back = weights_cache.read_pack(path)
    assert set(back) == set(arrays)
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)
        assert isinstance(back[name].base, np.memmap) or isinstance(back[name], np.memmap)
        assert back[name].ctypes.data % 64 == 0  # aligned for BLAS


@pytest.mark.parametrize("damage", ["truncate", "magic", "empty"])
def test_a_damaged_pack_is_refused_and_rebuilt(tmp_path: Path, damage: str) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w")
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return _arrays()

    weights_cache.cached_arrays(str(source), "k", build)
    entry = weights_cache.entry_path(str(source), "k", ".pack")
    assert entry is not None and entry.exists()
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[:-3], "magic": b"X" + data[1:], "empty": b""}[damage])
    with pytest.raises(ValueError):
        weights_cache.read_pack(entry)
    got = weights_cache.cached_arrays(str(source), "k", build)
    np.testing.assert_array_equal(got["a"], _arrays()["a"])
    assert len(calls) == 2
    weights_cache.read_pack(entry)  # rewritten whole


def test_a_changed_source_gets_a_new_entry(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"one")
    first = weights_cache.entry_path(str(source), "k", ".pack")
    source.write_bytes(b"three")
    os.utime(source, ns=(1, 1))
    assert weights_cache.entry_path(str(source), "k", ".pack") != first
    assert weights_cache.entry_path(str(tmp_path / "gone"), "k", ".pack") is None


def test_an_unwritable_cache_only_costs_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(blocker / "cache"))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w")
    got = weights_cache.cached_arrays(str(source), "k", _arrays)
    np.testing.assert_array_equal(got["b"], np.arange(7))
    assert weights_cache.cached_marshal(str(source), "m", lambda: {"x": (1, "y")}) == {"x": (1, "y")}


def test_text_towers_are_equal_from_the_cache_and_from_the_checkpoint(  # type: ignore[no-untyped-def]
        tiny_encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_encoder.weights_file, weights)
    first = NumpyTextEncoder(str(weights), tiny_encoder.text_tower)  # builds the entries
    assert not isinstance(first.w["token_embedding.weight"], np.memmap)
    second = NumpyTextEncoder(str(weights), tiny_encoder.text_tower)  # maps them
    assert isinstance(second.w["token_embedding.weight"].base, np.memmap)
    np.testing.assert_array_equal(first.encode_texts(TEXTS), second.encode_texts(TEXTS))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["bpe", "clip"]


def test_bpe_tables_from_the_cache_tokenize_the_same(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    built = BpeTokenizer(77)
    cached = BpeTokenizer(77)
    assert cached.bpe_ranks == built.bpe_ranks and cached.encoder == built.encoder
    np.testing.assert_array_equal(cached(TEXTS), built(TEXTS))


def test_a_pack_whose_numbers_are_damaged_is_rebuilt_from_the_model(  # type: ignore[no-untyped-def]
        tiny_encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_encoder.weights_file, weights)
    good = NumpyTextEncoder(str(weights), tiny_encoder.text_tower).encode_texts(TEXTS)
    pack = next((tmp_path / "cache").glob("clip-*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2: len(data) // 2 + 200_000] = b"\x7f" * 200_000  # huge floats / NaN
    pack.write_bytes(bytes(data))
    enc = NumpyTextEncoder(str(weights), tiny_encoder.text_tower)  # maps the damaged pack
    got = enc.encode_texts(TEXTS)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, good, atol=1e-6)
    assert np.isfinite(NumpyTextEncoder(str(weights), tiny_encoder.text_tower)
                       .encode_texts(TEXTS)).all()  # the entry was rewritten whole
