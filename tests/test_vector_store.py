"""The re-rank vector file: rows by number, token and size checks, and searches over IVF-PQ
that read it (and fall back to the catalogue without it)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from clipsearch.vector_store import (
    DATA_OFFSET,
    MAGIC,
    VectorFile,
    append_vectors,
    vector_file_path,
    write_vector_file,
)


def test_rows_written_and_appended_read_back_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first, more = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(3, 8))
    path = tmp_path / "c.vectors"
    token = write_vector_file(path, first)
    assert append_vectors(path, token, 8, more, rows_held=5) == 5
    vf = VectorFile.open(path, token, 8, rows_needed=8)
    assert vf is not None
    np.testing.assert_array_equal(vf.read_rows(np.array([6, 0, 4])),
                                  np.stack([more[1], first[0], first[4]]).astype(np.float32))
    vf.close()


def test_appends_never_reuse_rows_an_index_may_refer_to(tmp_path: Path) -> None:
    """A file with fewer rows than the index recorded (cut short, or an older copy restored)
    got the new vectors at its end: on rows other images still used."""
    path = tmp_path / "c.vectors"
    token = write_vector_file(path, np.arange(40, dtype=np.float32).reshape(5, 8))
    data = path.read_bytes()
    path.write_bytes(data[: DATA_OFFSET + 3 * 32])  # two rows lost
    assert append_vectors(path, token, 8, np.ones((1, 8)), rows_held=5) is None
    assert path.stat().st_size == DATA_OFFSET + 3 * 32  # nothing written
    # Rows past what the saved index recorded (a run whose index save failed) are reused.
    path.write_bytes(data)
    assert append_vectors(path, token, 8, np.ones((2, 8)), rows_held=5) == 5
    assert append_vectors(path, token, 8, np.full((1, 8), 7.0), rows_held=5) == 5
    vf = VectorFile.open(path, token, 8, 6)
    assert vf is not None and vf.rows == 6
    np.testing.assert_array_equal(vf.read_rows(np.array([4, 5])),
                                  [np.arange(32, 40), np.full(8, 7.0)])
    vf.close()


def test_a_foreign_short_or_damaged_file_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "c.vectors"
    token = write_vector_file(path, np.ones((4, 8), np.float32))
    assert VectorFile.open(path, "another", 8, 4) is None
    assert VectorFile.open(path, token, 16, 1) is None  # another dimension
    assert VectorFile.open(path, token, 8, 5) is None  # the index needs a row it lacks
    assert append_vectors(path, "another", 8, np.ones((1, 8)), 4) is None
    data = path.read_bytes()
    path.write_bytes(data[: DATA_OFFSET + 3 * 32 + 5])  # cut inside row 3
    vf = VectorFile.open(path, token, 8, 3)
    assert vf is not None and vf.rows == 3
    vf.close()
    # A header length that says gigabytes is refused before anything is read.
    path.write_bytes(MAGIC + struct.pack("<I", 2**31) + data[len(MAGIC) + 4:])
    assert VectorFile.open(path, token, 8, 1) is None
    path.write_bytes(b"junk")
    assert VectorFile.open(path, token, 8, 1) is None
    assert VectorFile.open(tmp_path / "absent.vectors", token, 8, 1) is None


def _ivfpq_catalogue(settings, tiny_model: str, n: int = 6000):  # type: ignore[no-untyped-def]
    """A catalogue of n CLIP-like vectors (no files behind them) and the tiny encoder."""
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.encoder import load_encoder
    from clipsearch.indexer import remember_fast_text

    encoder = load_encoder(tiny_model, device="cpu", precision="fp32")
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(60, encoder.info.dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 60, n)] + 0.35 * rng.normal(
        size=(n, encoder.info.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    with Catalogue(settings.db_path) as cat:
        model_id = cat.register_model(encoder.info.as_record())
        remember_fast_text(cat, encoder)
        _write_rows(cat, model_id, vecs, 0)
    return encoder, vecs


def _write_rows(cat, model_id: int, vecs: np.ndarray, start: int) -> None:  # type: ignore[no-untyped-def]
    """Rows for vectors start.., each with an (empty) file behind it, as `check` expects."""
    folder = cat.path.parent / "files"
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(start, start + len(vecs)):
        path = folder / f"{i:05d}.jpg"
        path.touch()
        rows.append({"path": str(path), "size": 0, "mtime_ns": path.stat().st_mtime_ns,
                     "content_hash": f"{i:032x}", "width": 64, "height": 48, "format": "JPEG",
                     "captured_at": None, "state": "indexed", "error": None, "attempts": 0})
    cat.write_batch(rows, {r["content_hash"]: v for r, v in zip(rows, vecs)}, model_id)


def _add_random_rows(settings, n: int, start: int, seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """n new random unit vectors written as rows start.. (the index does not know them yet)."""
    from clipsearch.catalogue.store import Catalogue

    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        new = np.random.default_rng(seed).normal(size=(n, model.dim)).astype(np.float32)
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        _write_rows(cat, model.id, new, start)
    return new


def _file(settings, i: int) -> Path:  # type: ignore[no-untyped-def]
    return settings.db_path.parent / "files" / f"{i:05d}.jpg"


@pytest.fixture
def ivfpq(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipsearch import indexer

    monkeypatch.setattr(indexer, "choose_kind", lambda n: "ivfpq")


def _no_catalogue_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipsearch.catalogue.store import Catalogue

    def refuse(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("re-rank read the catalogue, not the vector file")

    monkeypatch.setattr(Catalogue, "vectors_by_ids", refuse)


def test_ivfpq_searches_re_rank_from_the_vector_file_with_exact_scores(
        settings, tiny_model: str, ivfpq, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.search import SearchOptions, Searcher

    encoder, vecs = _ivfpq_catalogue(settings, tiny_model)
    with Searcher(settings) as searcher:
        searcher.search(["warm up"])  # builds the index and its vector file
        assert vector_file_path(settings.index_path).exists()
        with monkeypatch.context() as m:
            _no_catalogue_vectors(m)
            q = encoder.encode_texts(["a dog on a beach"])[0]
            resp = searcher.search(["a dog on a beach"], SearchOptions(top_k=10))
        by_path = {str(_file(settings, i)): i for i in range(len(vecs))}
        assert len(resp.results) == 10
        for r in resp.results:
            assert abs(float(vecs[by_path[r.path]] @ q) - r.score) < 1e-5
        # New images reach the file as appended rows.
        new = _add_random_rows(settings, 50, len(vecs), seed=9)
        searcher.search(["update"])  # the index catches up with the catalogue
        with monkeypatch.context() as m:
            _no_catalogue_vectors(m)
            for i in (0, 17, 49):
                hit = _search_vector(searcher, new[i])
                assert hit.path == str(_file(settings, len(vecs) + i))
                assert hit.score == pytest.approx(1.0, abs=1e-5)


def _search_vector(searcher, vec: np.ndarray):  # type: ignore[no-untyped-def]
    """The best result for a raw query vector, through the search's ranking code."""
    from clipsearch.search import SearchOptions, _rank

    return _rank(searcher._session, vec, SearchOptions(top_k=1), set(), {}, [])[0]


def test_without_its_vector_file_a_search_reads_the_catalogue_and_the_next_update_writes_it(
        settings, tiny_model: str, ivfpq) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.indexer import ensure_index
    from clipsearch.search import Searcher

    encoder, vecs = _ivfpq_catalogue(settings, tiny_model)
    with Searcher(settings) as searcher:
        searcher.search(["warm up"])
    vector_file_path(settings.index_path).unlink()
    with Searcher(settings) as searcher:
        for i in (3, 300):
            hit = _search_vector(searcher, vecs[i])
            assert hit.path == str(_file(settings, i)) and hit.score == pytest.approx(1.0)
    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        from clipsearch.encoder import ModelInfo

        info = ModelInfo(model.key, model.spec, model.arch, model.pretrained,
                         model.checkpoint_hash, model.open_clip_version, model.dim)
        vi = ensure_index(cat, settings, info, model.id)
    vf = VectorFile.open(vector_file_path(settings.index_path), vi.vector_token, vi.dim,
                         vi.vector_rows)
    assert vf is not None and vf.rows == len(vecs)
    np.testing.assert_allclose(vf.read_rows(np.array([300])), vecs[300:301], atol=1e-7)
    vf.close()


def test_a_flat_index_keeps_no_vector_file(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.indexer import run_index

    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    assert settings.index_path.exists()
    assert not vector_file_path(settings.index_path).exists()
    header = json.loads(settings.index_path.read_bytes()[len(b"CLIPSRCHIDX1") + 24:].split(
        b"}", 1)[0] + b"}")
    assert header["vector_token"] == ""


def test_check_names_a_missing_vector_file_and_repair_writes_it(
        settings, tiny_model: str, ivfpq) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.doctor import check_catalogue
    from clipsearch.search import Searcher

    _ivfpq_catalogue(settings, tiny_model)
    with Searcher(settings) as searcher:
        searcher.search(["warm up"])
    assert not [p for p in check_catalogue(settings).problems if "vector file" in p]
    vector_file_path(settings.index_path).write_bytes(b"junk")
    report = check_catalogue(settings)
    assert any("re-rank vector file" in p for p in report.problems)
    assert check_catalogue(settings, repair=True).repaired
    assert not [p for p in check_catalogue(settings).problems if "vector file" in p]


def test_an_update_over_a_cut_short_vector_file_keeps_every_image_its_own_vector(
        settings, tiny_model: str, ivfpq) -> None:  # type: ignore[no-untyped-def]
    """The breaker's case: rows lost at the end of the file, then new images: their vectors
    went onto rows older images still used, and `similar` found the wrong files."""
    from clipsearch.search import Searcher

    _, vecs = _ivfpq_catalogue(settings, tiny_model, n=1000)
    with Searcher(settings) as searcher:
        searcher.search(["warm up"])
    path = vector_file_path(settings.index_path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10 * vecs.shape[1] * 4)
    new = _add_random_rows(settings, 20, len(vecs), seed=3)
    everything = np.concatenate([vecs, new])
    with Searcher(settings) as searcher:
        searcher.search(["update"])
        for i in (5, 994, 999, 1000, 1019):
            hit = _search_vector(searcher, everything[i])
            assert hit.path == str(_file(settings, i)) and hit.score == pytest.approx(1.0)


def test_rows_damaged_in_place_are_not_trusted_and_check_finds_them(
        settings, tiny_model: str, ivfpq) -> None:  # type: ignore[no-untyped-def]
    """Zeroed rows behind an intact header gave wrong scores, and check saw nothing."""
    from clipsearch.doctor import check_catalogue
    from clipsearch.search import Searcher
    from clipsearch.vector_index import load_index, save_index

    _, vecs = _ivfpq_catalogue(settings, tiny_model, n=1000)
    with Searcher(settings) as searcher:
        searcher.search(["warm up"])
    path = vector_file_path(settings.index_path)
    row_bytes = vecs.shape[1] * 4
    with open(path, "r+b") as fh:  # zero rows 0..99, header and size unchanged
        fh.seek(DATA_OFFSET)
        fh.write(bytes(100 * row_bytes))
    with Searcher(settings) as searcher:
        for i in (3, 50, 700):
            hit = _search_vector(searcher, vecs[i])
            assert hit.path == str(_file(settings, i)) and hit.score == pytest.approx(1.0)
    assert any("disagrees with the catalogue for 100 images" in p
               for p in check_catalogue(settings).problems)
    assert check_catalogue(settings, repair=True).repaired
    assert check_catalogue(settings).problems == []
    # A damaged row table (two images' rows swapped) inside an intact index file.
    vi = load_index(settings.index_path)
    assert vi is not None and vi.rows is not None
    vi.rows[[10, 20]] = vi.rows[[20, 10]]
    save_index(vi, settings.index_path)
    assert any("disagrees with the catalogue for 2 images" in p
               for p in check_catalogue(settings).problems)


def test_a_long_lived_searcher_prefetches_the_vector_file_and_one_shot_searches_do_not(
        settings, tiny_model: str, ivfpq, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.search import Searcher, search

    _ivfpq_catalogue(settings, tiny_model, n=1000)
    started = []
    real = VectorFile.prefetch_in_background
    monkeypatch.setattr(VectorFile, "prefetch_in_background",
                        lambda self: started.append(self) or real(self))
    search(settings, ["one shot"])  # builds the index and its file; no prefetch
    assert started == []
    with Searcher(settings) as searcher:
        assert searcher.wait_until_warm(timeout_s=30)
        assert len(started) == 1 and started[0].prefetched.is_set()
        assert searcher.search(["x"]).results
    with Searcher(settings, prefetch=False) as searcher:
        assert searcher.wait_until_warm(timeout_s=0)  # nothing to wait for
    assert len(started) == 1
