"""Crawler: content sniffing, hidden/system skipping, symlinks, unreadable paths."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from clipsearch.crawler import scan_directories, sniff_image_format


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, format="PNG")
    return path


def _names(result, root: Path) -> set[str]:  # type: ignore[no-untyped-def]
    return {os.path.relpath(f.path, root) for f in result.files}


def test_content_sniffing_and_extensions(tmp_path: Path) -> None:
    _png(tmp_path / "UPPER.PNG")
    _png(tmp_path / "no_extension")
    _png(tmp_path / "weird.dat")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "blob.bin").write_bytes(os.urandom(64))
    assert _names(scan_directories([tmp_path]), tmp_path) == {"UPPER.PNG", "no_extension",
                                                              "weird.dat"}


def test_hidden_and_system_skipped_unless_asked(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".secret" / "b.png")
    _png(tmp_path / "@eaDir" / "thumb.png")
    _png(tmp_path / "._a.png")
    assert _names(scan_directories([tmp_path]), tmp_path) == {"a.png"}
    assert _names(scan_directories([tmp_path], include_hidden=True), tmp_path) == {
        "a.png", ".hidden.png", ".secret/b.png"}
    everything = scan_directories([tmp_path], include_hidden=True, include_system=True)
    assert "@eaDir/thumb.png" in _names(everything, tmp_path)


def test_symlink_loops_and_duplicates(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "x.png")
    os.symlink("..", tmp_path / "d" / "up")
    os.symlink("x.png", tmp_path / "d" / "alias.png")
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "d", tmp_path / "dlink")
    result = scan_directories([tmp_path, tmp_path / "d"])
    assert len(result.files) == 1
    # the file itself keeps its path, though the link to it sorts (and is met) first
    assert result.files[0].path == str(tmp_path / "d" / "x.png")
    dangling = [p for p in result.problems if "dangling" in p.reason]
    assert len(dangling) == 1 and dangling[0].path.endswith("dangling.png")


def test_unreadable_folder_reported_and_walk_goes_on(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    locked = tmp_path / "locked"
    _png(locked / "in.png")
    locked.chmod(0)
    try:
        result = scan_directories([tmp_path])
    finally:
        locked.chmod(0o755)
    assert "ok.png" in _names(result, tmp_path)
    if os.geteuid() != 0:
        assert any(p.path == str(locked) for p in result.problems)


def test_non_utf8_file_names(tmp_path: Path) -> None:
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    _png(Path(os.fsdecode(raw)))
    (f,) = scan_directories([tmp_path]).files
    assert os.fsencode(f.path) == raw


def test_sniff_formats() -> None:
    assert sniff_image_format(b"\xff\xd8\xff\xe1") == "JPEG"
    assert sniff_image_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_image_format(b"\0\0\0\x18ftypheic") == "HEIF"
    assert sniff_image_format(b"\0\0\0\x18ftypavif") == "AVIF"
    assert sniff_image_format(b"\0\0\0\x18ftypisom") is None


def test_folder_removed_mid_walk_is_reported_once_and_leaves_no_ghost_rows(
    settings, make_image, tmp_path: Path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    import shutil

    from clipsearch import crawler
    from clipsearch.catalogue.store import Catalogue
    from clipsearch.indexer import run_index

    make_image("a/1.png", seed=1)
    make_image("b/2.png", seed=2)
    make_image("b/3.png", seed=3)
    gone = tmp_path / "photos" / "b"
    real_scandir = os.scandir

    class Listed(list):  # type: ignore[type-arg]
        def __enter__(self):  # type: ignore[no-untyped-def]
            return iter(self)

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir_then_remove_b(path):  # type: ignore[no-untyped-def]
        named = isinstance(path, (str, bytes))
        if not (named and os.fsdecode(path) == str(tmp_path / "photos") and gone.exists()):
            return real_scandir(path)
        with real_scandir(path) as it:
            entries = Listed(it)
        shutil.rmtree(gone)  # listed as a folder, gone before the walk reaches it
        return entries

    monkeypatch.setattr(crawler.os, "scandir", scandir_then_remove_b)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert [p.path for p in report.problems] == [str(gone)]
    assert report.new == 1 and report.failed_total == 0
    with Catalogue(settings.db_path) as cat:
        assert [Path(r.path).name for r in cat.images()] == ["1.png"]


def test_paths_in_messages_stay_one_printable_line() -> None:
    from clipsearch.crawler import display_path, some_paths

    odd = os.fsdecode(b"/p/bad\xffname.png")
    assert display_path(odd) == "/p/bad\\xffname.png"
    assert display_path("/p/two\nlines\t.png") == "/p/two\\x0alines\\x09.png"
    listed = some_paths([odd, "/p/a\nb.png", "/p/c.png", "/p/d.png"])
    assert listed == "/p/bad\\xffname.png, /p/a\\x0ab.png, /p/c.png and 1 more"
    assert "\n" not in listed and "\udcff" not in listed
