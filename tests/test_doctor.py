"""`check`: finds disagreements between catalogue, index and disk; --repair fixes them."""

from __future__ import annotations

from pathlib import Path

from clipsearch.doctor import check_catalogue
from clipsearch.indexer import run_index
from clipsearch.search import search


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
    assert any("no longer exist" in p for p in report.problems)
    assert any("missing or damaged" in p for p in report.problems)
    fixed = check_catalogue(settings, repair=True)
    assert fixed.repaired
    again = check_catalogue(settings)
    assert again.problems == []
    assert [r.path for r in search(settings, ["x"]).results] == [str(keep)]
