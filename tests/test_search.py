"""Query parsing, search, similar, filters, sorting, cutoff."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clipsearch.errors import UsageError
from clipsearch.indexer import run_index
from clipsearch.search import SearchOptions, parse_date, parse_query, search, similar


def test_parse_query_terms_signs_and_weights(tmp_path: Path) -> None:
    terms = parse_query(["beach -people 2:sunset", "a dog on a beach"])
    assert [(t.weight, t.text) for t in terms] == [
        (1.0, "beach"), (-1.0, "people"), (2.0, "sunset"), (1.0, "a dog on a beach")]
    img = tmp_path / "x.png"
    img.write_bytes(b"x")
    (term,) = parse_query([str(img)])
    assert term.image_path == str(img)


@pytest.mark.parametrize("parts", [[], [""], ["   "], ["-people"]])
def test_empty_or_only_negative_query_is_a_usage_error(parts: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_query(parts)


def test_parse_date_ranges() -> None:
    start, end = parse_date("2021-07"), parse_date("2021-07", end=True)
    assert start is not None and end is not None and 30 * 86400 < end - start < 31 * 86400
    with pytest.raises(UsageError):
        parse_date("yesterday")


@pytest.fixture
def indexed(settings, make_image, tmp_path: Path):  # type: ignore[no-untyped-def]
    paths = [make_image(f"{'a' if i < 4 else 'b'}/{i}.png", seed=i) for i in range(8)]
    paths.append(make_image("b/j.jpg", seed=42, fmt="JPEG"))
    for n, p in enumerate(paths):
        os.utime(p, (1_600_000_000 + n * 86400 * 40,) * 2)
    run_index(settings, [str(tmp_path / "photos")])
    return paths


def test_search_returns_all_when_k_exceeds_collection(settings, indexed) -> None:  # type: ignore[no-untyped-def]
    resp = search(settings, ["something"], SearchOptions(top_k=100))
    assert len(resp.results) == len(indexed)
    scores = [r.score for r in resp.results]
    assert scores == sorted(scores, reverse=True) and [r.rank for r in resp.results] == list(
        range(1, len(indexed) + 1))
    assert resp.model


def test_scores_are_true_cosines(settings, indexed, tiny_model: str) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.encoder import load_encoder

    resp = search(settings, ["a red square"], SearchOptions(top_k=3))
    q = load_encoder(tiny_model, device="cpu", precision="fp32").encode_texts(["a red square"])[0]
    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        for r in resp.results:
            v = cat.vector_for_path(r.path, model.id)
            assert v is not None and abs(float(v @ q) - r.score) < 1e-4


def test_similar_excludes_the_image_itself(settings, indexed) -> None:  # type: ignore[no-untyped-def]
    resp = similar(settings, str(indexed[0]), SearchOptions(top_k=3))
    assert len(resp.results) == 3 and str(indexed[0]) not in [r.path for r in resp.results]


def test_similar_to_unindexed_image(settings, indexed, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outside = make_image("q.png", seed=3, root=tmp_path / "elsewhere")
    resp = similar(settings, str(outside), SearchOptions(top_k=1))
    assert resp.results[0].path == str(indexed[3])  # same picture, indexed copy


def test_filters_folder_format_and_dates(settings, indexed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    only_a = search(settings, ["x"], SearchOptions(top_k=50, folder=str(tmp_path / "photos/a")))
    assert {Path(r.path).parent.name for r in only_a.results} == {"a"} and len(only_a.results) == 4
    jpegs = search(settings, ["x"], SearchOptions(top_k=50, formats=("JPEG",)))
    assert [r.path for r in jpegs.results] == [str(indexed[-1])]
    cutoff = 1_600_000_000 + 2 * 86400 * 40
    dated = search(settings, ["x"], SearchOptions(top_k=50, date_to=cutoff))
    assert len(dated.results) == 3


def test_sort_by_date_and_margin(settings, indexed) -> None:  # type: ignore[no-untyped-def]
    by_date = search(settings, ["x"], SearchOptions(top_k=5, sort="date"))
    dates = [r.date for r in by_date.results]
    assert dates == sorted(dates) and len(dates) == 5
    tight = search(settings, ["x"], SearchOptions(top_k=9, margin=0.0))
    assert len(tight.results) >= 1
    assert all(r.score >= tight.results[0].score - 1e-9 for r in tight.results)


def test_weighted_terms_rank_by_the_combined_vector(settings, indexed, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.imaging import decode_file

    resp = search(settings, ["red -blue 2:green"], SearchOptions(top_k=9))
    t = tiny_encoder.encode_texts(["red", "blue", "green"])
    q = t[0] - t[1] + 2 * t[2]
    q /= np.linalg.norm(q)
    expected = []
    for p in indexed:
        img = decode_file(str(p), tiny_encoder.image_size).image
        expected.append(float(tiny_encoder.encode_images(tiny_encoder.preprocess(img)[None])[0] @ q))
    order = [str(indexed[i]) for i in np.argsort(expected)[::-1]]
    assert [r.path for r in resp.results] == order


def test_long_query_is_truncated_with_a_notice(settings, indexed) -> None:  # type: ignore[no-untyped-def]
    resp = search(settings, [" ".join(["word"] * 50)], SearchOptions(top_k=1))
    assert any("tokens" in n for n in resp.notices) and resp.results


def test_searcher_keeps_index_and_model_loaded_between_queries(  # type: ignore[no-untyped-def]
        settings, indexed, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived caller must not pay for loading the index and text tower per query (that
    is most of a query's time at 1M images); a re-index is still seen."""
    import clipsearch.indexer as indexer
    import clipsearch.text_tower as text_tower
    from clipsearch.search import Searcher

    loads = {"index": 0, "text": 0}
    real_index, real_text = indexer.load_index, text_tower.load_fast_text_encoder

    def count(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
            loads[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(indexer, "load_index", count("index", real_index))
    monkeypatch.setattr(text_tower, "load_fast_text_encoder", count("text", real_text))
    with Searcher(settings) as searcher:
        first = [searcher.search([q], SearchOptions(top_k=3)) for q in ("red", "blue", "x")]
        assert loads == {"index": 1, "text": 1}
        assert all(len(r.results) == 3 for r in first)
        assert {"embed", "ann", "rerank", "lookup"} <= set(first[0].timings)
        new = make_image("c/new.png", seed=99)
        run_index(settings, [str(tmp_path / "photos")])
        loads["index"] = 0
        after = searcher.search(["x"], SearchOptions(top_k=100))
        assert str(new) in [r.path for r in after.results]
        assert loads["index"] == 1


def test_search_through_ivfpq_returns_true_cosines_close_to_exact(
    settings, tiny_model: str, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """The large-collection path end to end: `search()` over an IVF-PQ index re-ranks its
    candidates exactly, so scores are true cosines and the top 10 match an exact scan."""
    from clipsearch import indexer
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.encoder import load_encoder
    from clipsearch.indexer import remember_fast_text

    encoder = load_encoder(tiny_model, device="cpu", precision="fp32")
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(60, encoder.info.dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 60, 6000)] + 0.35 * rng.normal(
        size=(6000, encoder.info.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    with Catalogue(settings.db_path) as cat:
        model_id = cat.register_model(encoder.info.as_record())
        remember_fast_text(cat, encoder)
        rows = [{"path": f"/photos/{i:05d}.jpg", "size": 1000 + i, "mtime_ns": i,
                 "content_hash": f"{i:032x}", "width": 64, "height": 48, "format": "JPEG",
                 "captured_at": None, "state": "indexed", "error": None, "attempts": 0}
                for i in range(len(vecs))]
        cat.write_batch(rows, {r["content_hash"]: v for r, v in zip(rows, vecs)}, model_id)
    monkeypatch.setattr(indexer, "choose_kind", lambda n: "ivfpq")
    queries = ["a red square", "a dog on a beach", "sunset", "blue circle", "a cat"]
    qvecs = encoder.encode_texts(queries)
    overlaps = []
    for query, q in zip(queries, qvecs):
        resp = search(settings, [query], SearchOptions(top_k=10))
        assert len(resp.results) == 10
        by_path = {f"/photos/{i:05d}.jpg": i for i in range(len(vecs))}
        for r in resp.results:
            assert abs(float(vecs[by_path[r.path]] @ q) - r.score) < 1e-4
        exact = set(np.argsort(-(vecs @ q))[:10].tolist())
        overlaps.append(len(exact & {by_path[r.path] for r in resp.results}) / 10)
    assert np.mean(overlaps) >= 0.9
    from clipsearch.vector_index import load_index

    vi = load_index(settings.index_path)
    assert vi is not None and vi.kind == "ivfpq"


def test_files_deleted_since_indexing_are_left_out_and_the_next_best_take_their_place(
        settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    paths = [make_image(f"{i}.png", seed=i) for i in range(5)]
    run_index(settings, [str(photos)])
    query = make_image("q.png", seed=2, root=tmp_path / "elsewhere")
    before = search(settings, [str(query)], SearchOptions(top_k=3))
    assert before.results[0].path == str(paths[2])
    paths[2].unlink()
    after = search(settings, [str(query)], SearchOptions(top_k=3))
    assert str(paths[2]) not in [r.path for r in after.results]
    assert len(after.results) == 3 and [r.rank for r in after.results] == [1, 2, 3]
    assert any("deleted since" in n and str(paths[2]) in n for n in after.notices)
    # The whole folder gone (an unplugged drive): its results are kept, no notice.
    photos.rename(tmp_path / "unplugged")
    away = search(settings, [str(query)], SearchOptions(top_k=3))
    assert len(away.results) == 3 and not any("deleted since" in n for n in away.notices)


def test_a_search_over_many_deleted_files_stops_looking_and_says_so(
        settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A folder emptied since indexing must not make every search walk the whole catalogue
    (the first version did, ten results at a time)."""
    from clipsearch import search as search_module

    monkeypatch.setattr(search_module, "MAX_DELETED_PER_QUERY", 4)
    paths = [make_image(f"{i}.png", seed=i) for i in range(12)]
    run_index(settings, [str(tmp_path / "photos")])
    for p in paths[:10]:
        p.unlink()
    resp = search(settings, ["x"], SearchOptions(top_k=2))
    assert all(r.path in {str(p) for p in paths[10:]} for r in resp.results)
    assert any("deleted since" in n for n in resp.notices)
    calls = []
    real = search_module._ranked
    monkeypatch.setattr(search_module, "_ranked", lambda *a: calls.append(a[3]) or real(*a))
    search(settings, ["x"], SearchOptions(top_k=2))
    assert len(calls) <= 3 and calls == sorted(calls)


def test_results_changed_since_indexing_are_flagged(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Until the next index run an edited file is ranked by its old content: say so."""
    paths = [make_image(f"{i}.png", seed=i) for i in range(3)]
    run_index(settings, [str(tmp_path / "photos")])
    assert not search(settings, ["x"]).notices
    make_image("1.png", seed=30)
    os.utime(paths[1], ns=(1, 1_000_000_000))
    notices = search(settings, ["x"]).notices
    assert any("changed since the last index run" in n and str(paths[1]) in n for n in notices)


def test_gone_means_gone_dangling_links_folders_and_single_file_roots_but_not_empty_mounts(
        settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    kept = [make_image(f"{i}.png", seed=i) for i in range(3)]
    target = make_image("t.png", seed=7, root=tmp_path / "targets")
    (photos / "link.png").symlink_to(target)
    replaced = make_image("replaced.png", seed=8)
    single = make_image("single.png", seed=9, root=tmp_path / "one")
    run_index(settings, [str(photos), str(single)])
    target.unlink()  # the link now dangles
    replaced.unlink()
    replaced.mkdir()  # a folder where the file was
    single.unlink()  # a deleted file that was itself a root
    (tmp_path / "one" / "other.txt").write_text("the folder is still there")
    found = search(settings, ["x"], SearchOptions(top_k=10))
    assert {r.path for r in found.results} == {str(p) for p in kept}
    assert any("left out 3 files" in n for n in found.notices)
    # A drive unplugged from its mount point leaves an empty folder: results are kept.
    for p in kept:
        p.unlink()
    (photos / "link.png").unlink()
    replaced.rmdir()
    assert not list(photos.iterdir())
    found = search(settings, ["x"], SearchOptions(top_k=10))
    assert {str(p) for p in kept} <= {r.path for r in found.results}


def test_a_search_works_when_the_index_file_cannot_be_saved(
        settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A full disk or an immutable index file made every search fail with 'cannot write
    index': a derived file that cannot be saved never stops a search."""
    from clipsearch import indexer
    from clipsearch.errors import IndexError_

    make_image("a.png", seed=1)
    run_index(settings, [str(tmp_path / "photos")])
    new = make_image("b.png", seed=2)
    # The catalogue moves on without the index (as when the index run could not save it).
    monkeypatch.setattr(indexer, "refresh_index", lambda *a, **k: ("flat", 0))
    run_index(settings, [str(tmp_path / "photos")])

    def cannot_save(*_a, **_k):  # type: ignore[no-untyped-def]
        raise IndexError_("cannot write index: No space left on device")

    monkeypatch.setattr(indexer, "save_index", cannot_save)
    query = make_image("q.png", seed=2, root=tmp_path / "elsewhere")
    found = search(settings, [str(query)], SearchOptions(top_k=1)).results
    assert found[0].path == str(new) and found[0].score > 0.999
