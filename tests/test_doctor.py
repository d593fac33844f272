"""`check`: finds disagreements between catalogue, index and disk; --repair fixes them."""

from __future__ import annotations

import os
from pathlib import Path

from clipsearch.doctor import check_catalogue
from clipsearch.indexer import run_index
from clipsearch.search import SearchOptions, search
from clipsearch.vector_index import load_index


def test_healthy_catalogue_has_no_problems(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    report = check_catalogue(settings)
    assert report.ok and report.problems == [] and report.indexed == 1
    assert set(report.codecs) == {"HEIF", "AVIF"}


def test_vanished_file_and_damaged_index_are_found_and_repaired(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keep = make_image("keep.png", seed=1)
    gone = make_image("gone.png", seed=2)
    run_index(settings, [str(tmp_path / "photos")])
    gone.unlink()
    settings.index_path.write_bytes(b"junk")
    report = check_catalogue(settings)
    assert not report.ok
    assert any("no longer exist" in p and str(gone) in p and "--repair" in p
               for p in report.problems)
    assert any("is damaged" in p for p in report.problems)
    fixed = check_catalogue(settings, repair=True)
    assert fixed.repaired
    again = check_catalogue(settings)
    assert again.problems == []
    assert [r.path for r in search(settings, ["x"]).results] == [str(keep)]


def test_damaged_catalogue_is_reported_in_plain_words_and_left_alone(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from tests.test_catalogue import damage_middle, write_rows_catalogue

    db = tmp_path / "c.sqlite3"
    write_rows_catalogue(db)
    damaged = damage_middle(db)
    for args in (["check"], ["check", "--repair"]):
        result = CliRunner().invoke(app, args + ["--db", str(db)])
        assert result.exit_code == 1, result.output
        assert "unexpected" not in result.output
        assert "damaged" in result.output and "integrity check" in result.output
        assert "backup" in result.output
    assert db.read_bytes() == damaged


def _drop_one_vector(settings, path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    con = sqlite3.connect(settings.db_path)
    con.execute("DELETE FROM embeddings WHERE content_hash = "
                "(SELECT content_hash FROM images WHERE path = ?)", (os.fsencode(path),))
    con.commit()
    con.close()


def test_repair_rebuilds_marks_lost_vectors_and_fails_until_all_is_fixed(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = [make_image(f"{i}.png", seed=i) for i in range(4)]
    run_index(settings, [str(tmp_path / "photos")])
    _drop_one_vector(settings, photos[2])  # the generation counter does not move
    report = check_catalogue(settings)
    assert not report.ok
    assert any("no vector" in p for p in report.problems)
    assert any("stale" in p for p in report.problems)
    fixed = check_catalogue(settings, repair=True)
    assert any("rebuilt the index" in r for r in fixed.repaired)
    # The index really was rebuilt: it now agrees with the catalogue (3 vectors) ...
    assert load_index(settings.index_path).count == 3  # type: ignore[union-attr]
    # ... but one image still waits for its vector, so repair does not claim success.
    assert not fixed.ok and fixed.remaining and any("wait" in p for p in fixed.remaining)
    again = run_index(settings, [str(tmp_path / "photos")])
    assert again.encoded == 1 and again.indexed_total == 4
    assert check_catalogue(settings).ok
    assert len(search(settings, ["x"], SearchOptions(top_k=10)).results) == 4


def test_repair_exits_non_zero_while_problems_remain(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = make_image("a.png", seed=1)
    make_image("gone.png", seed=2).unlink()
    run_index(settings, [str(tmp_path / "photos")])
    os.utime(p, ns=(1, 5_000_000_000))  # changed since indexing: only `index` can fix it
    settings.index_path.write_bytes(b"junk")
    fixed = check_catalogue(settings, repair=True)
    assert fixed.repaired and not fixed.ok
    assert fixed.remaining and all("changed since indexing" in r for r in fixed.remaining)


def test_lost_vector_row_is_detected_at_start_up_and_reencoded(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = [make_image(f"{i}.png", seed=i) for i in range(4)]
    run_index(settings, [str(tmp_path / "photos")])
    _drop_one_vector(settings, photos[1])
    from clipsearch.status import catalogue_status

    assert catalogue_status(settings)["index"]["fresh"] is False
    # Search at start-up sees that the index and the catalogue hold different id sets.
    assert {r.path for r in search(settings, ["x"], SearchOptions(top_k=10)).results} == {
        str(p) for i, p in enumerate(photos) if i != 1}
    assert load_index(settings.index_path).count == 3  # type: ignore[union-attr]
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.encoded, report.indexed_total) == (1, 4)
    assert len(search(settings, ["x"], SearchOptions(top_k=10)).results) == 4


def test_id_digests_of_catalogue_and_index_agree(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.catalogue.store import ID_DIGEST_MULTIPLIER, Catalogue
    from clipsearch.vector_index import ID_DIGEST_MULTIPLIER as INDEX_MULTIPLIER
    from clipsearch.vector_index import id_digest

    for i in range(5):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    assert ID_DIGEST_MULTIPLIER == INDEX_MULTIPLIER
    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        assert cat.indexed_id_digest(model.id) == id_digest(cat.indexed_ids(model.id))
        assert cat.indexed_id_digest(model.id) == id_digest(load_index(settings.index_path).ids)  # type: ignore[union-attr]


def test_an_index_not_built_yet_is_called_that(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    settings.index_path.unlink()  # as after a first run killed before its index was written
    report = check_catalogue(settings)
    assert any("not built yet" in p for p in report.problems), report.problems
    assert not any("damaged" in p for p in report.problems)


def test_index_file_of_an_older_layout_is_named_as_such_and_rebuilt(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import struct

    from clipsearch.vector_index import FILE_MAGIC

    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    data = settings.index_path.read_bytes()
    off = len(FILE_MAGIC)
    hlen, ilen, blen = struct.unpack_from("<QQQ", data, off)
    header = json.loads(data[off + 24: off + 24 + hlen])
    header["layout"] = 1
    raw = json.dumps(header).encode()
    settings.index_path.write_bytes(FILE_MAGIC + struct.pack("<QQQ", len(raw), ilen, blen) + raw
                                    + data[off + 24 + hlen:])
    report = check_catalogue(settings)
    assert any("older layout" in p for p in report.problems)
    assert not any("damaged" in p for p in report.problems)
    assert search(settings, ["x"]).results  # the search rebuilds it
    assert check_catalogue(settings).problems == []
