"""The index pipeline: incremental runs, moves, deletions, failures, interruption, models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsearch import indexer
from clipsearch.catalogue.store import Catalogue
from clipsearch.config import resolve_settings
from clipsearch.errors import CatalogueBusyError, ModelMismatchError
from clipsearch.indexer import run_index
from clipsearch.catalogue.store import WriterLock
from clipsearch.search import search


def _states(settings) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with Catalogue(settings.db_path) as cat:
        return {r.path: r.state for r in cat.images()}


def test_first_run_then_unchanged(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for i in range(6):
        make_image(f"a/{i}.png", seed=i)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.new, report.encoded, report.failed_total) == (6, 6, 0)
    assert report.indexed_total == 6
    again = run_index(settings, [str(tmp_path / "photos")])
    assert (again.unchanged, again.new, again.encoded) == (6, 0, 0)


def test_unchanged_rerun_never_loads_the_model(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_image("x.png")
    run_index(settings, [str(tmp_path / "photos")])

    def boom(spec: str | None):  # type: ignore[no-untyped-def]
        raise AssertionError("model loaded for an unchanged re-run")

    report = run_index(settings, [str(tmp_path / "photos")], encoder_factory=boom)
    assert report.unchanged == 1


def test_changed_file_is_reencoded(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = make_image("c.png", seed=1)
    run_index(settings, [str(tmp_path / "photos")])
    make_image("c.png", seed=2)
    os.utime(p, ns=(1, 1_000_000_000))
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.changed, report.encoded) == (1, 1)


def test_deleted_file_marked_missing_and_never_returned(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keep = make_image("keep.png", seed=1)
    gone = make_image("gone.png", seed=2)
    run_index(settings, [str(tmp_path / "photos")])
    gone.unlink()
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.missing == 1
    assert _states(settings)[str(gone)] == "missing"
    resp = search(settings, ["anything"], )
    assert [r.path for r in resp.results] == [str(keep)]


def test_moved_and_duplicated_files_reuse_vectors_without_decoding(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    src = make_image("old/p.png", seed=3)
    run_index(settings, [str(tmp_path / "photos")])
    moved = tmp_path / "photos" / "new" / "p-renamed.png"
    moved.parent.mkdir()
    shutil.move(src, moved)
    shutil.copy(moved, tmp_path / "photos" / "new" / "copy.png")

    def no_decode(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("decoded a file whose content is already catalogued")

    monkeypatch.setattr(indexer, "decode_image", no_decode)
    report = run_index(settings, [str(tmp_path / "photos")])
    # One file moved (its old path is not "missing"), one copy of it is a duplicate.
    assert (report.moved, report.duplicates, report.encoded) == (1, 1, 0)
    assert (report.new, report.missing) == (0, 0)
    states = _states(settings)
    assert states[str(moved)] == "indexed" and states[str(src)] == "missing"
    assert report.indexed_total == 2


def test_copies_found_in_one_run_are_encoded_once_and_counted_as_duplicates(
    settings, make_image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """Identical files met in one run, in one batch or in different batches decoded ahead of
    the first copy's write: one encode, one vector, the rest counted as duplicates."""
    import dataclasses

    first = make_image("a/00.png", seed=7)
    for n in range(1, 7):
        shutil.copy(first, tmp_path / "photos" / "a" / f"{n:02d}.png")
    for n in range(3):
        make_image(f"b/{n}.png", seed=20 + n)
    small = dataclasses.replace(settings, batch_size=2, workers=2)
    report = run_index(small, [str(tmp_path / "photos")])
    assert (report.new, report.duplicates, report.encoded) == (4, 6, 4)
    assert report.indexed_total == 10 and report.failed_total == 0


def test_failed_file_retried_only_when_changed(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "photos" / "bad.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    make_image("good.png")
    first = run_index(settings, [str(tmp_path / "photos")])
    assert first.failed_total == 1
    second = run_index(settings, [str(tmp_path / "photos")])
    assert second.failed_total == 0 and second.unchanged == 2
    retried = run_index(settings, [str(tmp_path / "photos")],
                        indexer.IndexOptions(retry_failed=True))
    assert retried.failed_total == 1
    assert (retried.retried, retried.new) == (1, 0)  # a retried failure is not a new file
    with Catalogue(settings.db_path) as cat:
        (path, reason, attempts), = cat.failures()
    assert path == str(bad) and attempts == 2 and reason
    make_image("bad.jpg", fmt="JPEG")
    os.utime(bad, ns=(1, 2_000_000_000))
    fixed = run_index(settings, [str(tmp_path / "photos")])
    assert fixed.changed == 1 and fixed.failed_total == 0


def test_one_bad_file_never_shifts_another_files_vector(settings, make_image, tmp_path: Path, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    good = [make_image(f"{i}.png", seed=10 + i) for i in range(5)]
    (tmp_path / "photos" / "2b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    run_index(settings, [str(tmp_path / "photos")])
    from clipsearch.imaging import decode_file

    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        for p in good:
            stored = cat.vector_for_path(str(p), model.id)
            img = decode_file(str(p), tiny_encoder.image_size).image
            fresh = tiny_encoder.encode_images(tiny_encoder.preprocess(img)[None])[0]
            assert stored is not None and float(stored @ fresh) > 0.999


def test_interrupted_run_keeps_finished_batches_and_resumes(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    for i in range(12):
        make_image(f"{i:02}.png", seed=i)
    real_flush = indexer._flush
    calls = {"n": 0}

    def flaky_flush(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(indexer, "_flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        run_index(settings, [str(tmp_path / "photos")])
    monkeypatch.setattr(indexer, "_flush", real_flush)
    assert sum(1 for s in _states(settings).values() if s == "indexed") == 4  # batch_size 4
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.unchanged == 4 and report.new == 8
    assert report.indexed_total == 12


def test_other_model_is_refused(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import save_tiny_model

    make_image("m.png")
    run_index(settings, [str(tmp_path / "photos")])
    other = save_tiny_model(tmp_path / "other-model", seed=5)
    other_settings = resolve_settings(db=settings.db_path, model=str(other))
    with pytest.raises(ModelMismatchError, match="built with"):
        run_index(other_settings, [str(tmp_path / "photos")])
    with pytest.raises(ModelMismatchError):
        search(other_settings, ["cat"])


def test_second_concurrent_index_run_is_refused(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    with WriterLock(settings.lock_path):
        with pytest.raises(CatalogueBusyError, match="another index run"):
            run_index(settings, [str(tmp_path / "photos")])


def test_all_roots_missing_is_an_error(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.errors import ClipsearchError

    with pytest.raises(ClipsearchError, match="nothing to index"):
        run_index(settings, [str(tmp_path / "nope")])


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_missing_or_damaged_index_file_is_rebuilt(settings, make_image, tmp_path: Path, damage: str) -> None:  # type: ignore[no-untyped-def]
    for i in range(5):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    path = settings.index_path
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.write_bytes(b"\0" * 4096)
    resp = search(settings, ["x"])
    assert len(resp.results) == 5
    from clipsearch.vector_index import load_index

    rebuilt = load_index(path)
    assert rebuilt is not None and rebuilt.count == 5


def test_index_stale_after_interrupted_run_is_caught_up_by_search(
    settings, make_image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    make_image("a.png", seed=1)
    run_index(settings, [str(tmp_path / "photos")])
    make_image("b.png", seed=2)
    # Catalogue gains a vector but the FAISS file is not refreshed (as after a kill).
    from clipsearch import indexer as ix

    real = ix.refresh_index
    try:
        ix.refresh_index = lambda *a, **k: ("flat", 0)  # type: ignore[assignment]
        run_index(settings, [str(tmp_path / "photos")])
    finally:
        ix.refresh_index = real  # type: ignore[assignment]
    resp = search(settings, ["x"], )
    assert {Path(r.path).name for r in resp.results} == {"a.png", "b.png"}


def test_search_works_while_another_connection_writes(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    import threading
    import time

    for i in range(3):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    make_image("late.png", seed=9)
    writer = sqlite3.connect(settings.db_path, timeout=30, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta(key, value) VALUES ('probe', '1')")
    # WAL: readers are never blocked by a writer.
    assert len(search(settings, ["x"]).results) == 3
    # A second writer waits on the busy timeout instead of failing with "database is locked".
    threading.Thread(target=lambda: (time.sleep(1.0), writer.commit()), daemon=True).start()
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.new == 1 and report.indexed_total == 4
    writer.close()


def test_disk_full_gives_a_clear_error_and_keeps_earlier_batches(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import sqlite3

    from clipsearch.catalogue.store import Catalogue as Cat
    from clipsearch.errors import CatalogueError

    for i in range(10):
        make_image(f"{i}.png", seed=i)
    real = Cat.write_batch
    calls = {"n": 0}

    def full_after_one(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:
            with self._write():
                raise sqlite3.OperationalError("database or disk is full")
        return real(self, *a, **k)

    monkeypatch.setattr(Cat, "write_batch", full_after_one)
    with pytest.raises(CatalogueError, match="disk is full"):
        run_index(settings, [str(tmp_path / "photos")])
    monkeypatch.setattr(Cat, "write_batch", real)
    assert sum(s == "indexed" for s in _states(settings).values()) == 4
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.indexed_total == 10


def test_file_deleted_between_listing_and_reading(settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    keep = make_image("keep.png", seed=1)
    doomed = make_image("doomed.png", seed=2)
    real_scan = indexer.scan_directories

    def scan_then_delete(*a, **k):  # type: ignore[no-untyped-def]
        result = real_scan(*a, **k)
        doomed.unlink()
        return result

    monkeypatch.setattr(indexer, "scan_directories", scan_then_delete)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.failed_total == 0 and report.indexed_total == 1
    assert _states(settings) == {str(keep): "indexed"}
    # Reported once, as a notice, not silently dropped.
    assert [(p.path, p.reason) for p in report.problems] == [
        (str(doomed), indexer.DELETED_WHILE_INDEXING)]


def test_moves_never_load_the_model_and_are_counted_as_moves(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    for i in range(12):
        make_image(f"old/{i:02}.png", seed=i)
    make_image("stay/doomed.png", seed=50)
    make_image("stay/kept.png", seed=51)
    run_index(settings, [str(photos)])
    (photos / "new").mkdir()
    for i in range(12):
        shutil.move(photos / "old" / f"{i:02}.png", photos / "new" / f"renamed-{i:02}.png")
    shutil.copy(photos / "stay" / "kept.png", photos / "new" / "kept-copy.png")
    (photos / "stay" / "doomed.png").unlink()

    def boom(spec: str | None):  # type: ignore[no-untyped-def]
        raise AssertionError("model loaded although nothing needs encoding")

    report = run_index(settings, [str(photos)], encoder_factory=boom)
    assert (report.moved, report.duplicates, report.missing) == (12, 1, 1)
    assert (report.new, report.changed, report.encoded, report.unchanged) == (0, 0, 0, 1)
    assert report.indexed_total == 14
    assert report.as_dict()["moved"] == 12


def test_hung_decode_is_recorded_as_failed_and_the_run_goes_on(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import threading

    for i in range(6):
        make_image(f"{i}.png", seed=i)
    stuck = make_image("stuck.png", seed=99)
    stuck_bytes = stuck.read_bytes()
    release = threading.Event()
    real = indexer.decode_image

    def maybe_hang(data: bytes, target: int = 0):  # type: ignore[no-untyped-def]
        if data == stuck_bytes:
            release.wait(30)  # a decoder stuck in C: never returns in time
        return real(data, target)

    monkeypatch.setattr(indexer, "decode_image", maybe_hang)
    monkeypatch.setenv("CLIPSEARCH_DECODE_TIMEOUT", "1")  # [env: CLIPSEARCH_DECODE_TIMEOUT]
    quick = resolve_settings(db=settings.db_path, model=settings.model, batch_size=4, workers=2)
    assert quick.decode_timeout_s == 1.0
    try:
        report = run_index(quick, [str(tmp_path / "photos")])
    finally:
        release.set()
    assert report.indexed_total == 6 and report.failed_total == 1
    with Catalogue(settings.db_path) as cat:
        (path, reason, _), = cat.failures()
    assert path == str(stuck) and reason == "took longer than 1 s to decode"


def test_file_growing_while_read_is_skipped_then_indexed_next_run(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import builtins

    make_image("done.png", seed=1)
    full = make_image("copying.png", seed=2, size=(300, 200)).read_bytes()
    growing = tmp_path / "photos" / "copying.png"
    growing.write_bytes(full[: len(full) // 2])  # half copied when the crawler lists it

    class GrowsWhileRead:
        """The copy goes on while the indexer reads: the rest lands after its read()."""

        def __init__(self, fh):  # type: ignore[no-untyped-def]
            self.fh = fh

        def read(self, *a):  # type: ignore[no-untyped-def]
            data = self.fh.read(*a)
            with builtins.open(growing, "ab") as out:
                out.write(full[len(full) // 2 :])
            return data

        def fileno(self) -> int:
            return self.fh.fileno()

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            self.fh.close()

    def fake_open(path, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        fh = builtins.open(path, mode, *a, **k)
        return GrowsWhileRead(fh) if str(path) == str(growing) else fh

    monkeypatch.setattr(indexer, "open", fake_open, raising=False)
    report = run_index(settings, [str(tmp_path / "photos")])
    monkeypatch.undo()
    assert report.failed_total == 0 and report.changing == 1
    assert [(p.path, p.reason) for p in report.problems] == [
        (str(growing), indexer.CHANGED_WHILE_READING)]
    assert str(growing) not in _states(settings)  # no failed row, no ghost row
    again = run_index(settings, [str(tmp_path / "photos")])
    assert again.new == 1 and again.failed_total == 0
    assert _states(settings)[str(growing)] == "indexed"


def test_read_only_catalogue_searches_and_refuses_to_index(settings, make_image, tmp_path: Path, read_only) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.errors import CatalogueError

    photos = tmp_path / "photos"
    for i in range(3):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(photos)])
    folder = settings.db_path.parent
    read_only(*sorted(folder.iterdir()), folder)
    assert len(search(settings, ["x"]).results) == 3
    make_image("late.png", seed=7)
    with pytest.raises(CatalogueError, match="read-only: cannot index") as info:
        run_index(settings, [str(photos)])
    assert info.value.hint and "searches still work" in info.value.hint
    result = CliRunner().invoke(app, ["index", str(photos), "--db", str(settings.db_path),
                                      "--model", str(settings.model), "-q"])
    assert result.exit_code == 1 and "unexpected" not in result.output
    assert "error:" in result.output and "read-only" in result.output
    assert len(search(settings, ["x"]).results) == 3


def test_only_the_lock_holder_writes_the_index_file(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """While another process holds the writer lock (an index run), a search that finds the
    index file missing answers from an in-memory index and leaves the file alone."""
    import multiprocessing

    from clipsearch.catalogue.store import WriterLock
    from clipsearch.search import SearchOptions, search

    make_image("a.png")
    make_image("b.png", seed=1)
    run_index(settings, [str(tmp_path / "photos")])
    settings.index_path.unlink()
    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:
        with WriterLock(settings.lock_path):
            ready.set()
            release.wait(30)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert ready.wait(30)
        resp = search(settings, ["a picture"], SearchOptions(top_k=5))
        assert len(resp.results) == 2
        assert not settings.index_path.exists()
    finally:
        release.set()
        holder.join(30)
    search(settings, ["a picture"], SearchOptions(top_k=5))
    assert settings.index_path.exists()  # with the lock free, the search writes it back


def test_disk_full_while_writing_the_index_file_is_a_clear_error_and_keeps_the_catalogue(
    settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import errno

    from clipsearch import vector_index
    from clipsearch.errors import ClipsearchError

    for i in range(3):
        make_image(f"{i}.png", seed=i)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vector_index.os, "fsync", full)
    with pytest.raises(ClipsearchError, match="cannot write index .*No space left"):
        run_index(settings, [str(tmp_path / "photos")])
    assert not settings.index_path.exists()
    assert not list(settings.index_path.parent.glob("*.tmp"))
    assert sorted(_states(settings).values()) == ["indexed"] * 3  # the catalogue kept them
    monkeypatch.undo()
    again = run_index(settings, [str(tmp_path / "photos")])
    assert again.unchanged == 3 and settings.index_path.exists()


def test_an_unchanged_rerun_scans_for_the_id_digest_once(settings, make_image, tmp_path,  # type: ignore[no-untyped-def]
                                                         monkeypatch) -> None:
    from clipsearch.catalogue.store import Catalogue

    for i in range(3):
        make_image(f"{i}.png", seed=i)
    run_index(settings, [str(tmp_path / "photos")])
    calls = []
    real = Catalogue.indexed_id_digest

    def counted(self, model_id):  # type: ignore[no-untyped-def]
        calls.append(model_id)
        return real(self, model_id)

    monkeypatch.setattr(Catalogue, "indexed_id_digest", counted)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.unchanged == 3 and report.encoded == 0
    assert len(calls) == 1  # a full scan of the catalogue at 1M images (~0.9 s)
    (tmp_path / "photos" / "0.png").unlink()
    calls.clear()
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.missing == 1 and report.indexed_total == 2  # a write: the digest is re-read


def _assert_index_holds_the_catalogue_vectors(settings) -> None:  # type: ignore[no-untyped-def]
    """Every id in the (flat) FAISS file carries the vector the catalogue has for it now."""
    import numpy as np

    from clipsearch.vector_index import load_index

    vi = load_index(settings.index_path)
    assert vi is not None and vi.kind == "flat"
    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        ids, vecs = cat.indexed_vectors(model.id, model.dim)
    np.testing.assert_array_equal(vi.ids, ids)
    for image_id, vec in zip(ids, vecs):
        np.testing.assert_allclose(vi.index.reconstruct(int(image_id)), vec, atol=1e-6)


def test_changed_content_reaches_the_index(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A changed file keeps its path; its old vector must not stay in the index (searches
    found it by its old content), at every size."""
    paths = [make_image(f"{i}.png", seed=i) for i in range(4)]
    run_index(settings, [str(tmp_path / "photos")])
    make_image("2.png", seed=40)
    os.utime(paths[2], ns=(1, 1_000_000_000))
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.changed == 1
    _assert_index_holds_the_catalogue_vectors(settings)
    query = make_image("query.png", seed=40, root=tmp_path / "elsewhere")
    found = search(settings, [str(query)]).results
    assert found[0].path == str(paths[2]) and found[0].score > 0.999


def test_changed_content_reaches_the_index_after_a_restore_from_backup(
        settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A catalogue restored from a copy, then changed again, must not meet the index file
    of its other history at the same change counter and id set."""
    photos = tmp_path / "photos"
    make_image("a.png", seed=1)
    run_index(settings, [str(photos)])
    backup = tmp_path / "backup.sqlite3"
    with Catalogue(settings.db_path) as cat:
        with cat.engine.connect() as conn:
            conn.exec_driver_sql(f"VACUUM INTO '{backup}'")
    make_image("b.png", seed=2)
    run_index(settings, [str(photos)])
    shutil.copy(backup, settings.db_path)
    for suffix in ("-wal", "-shm"):
        Path(str(settings.db_path) + suffix).unlink(missing_ok=True)
    (photos / "b.png").unlink()
    make_image("c.png", seed=3)  # takes the id b.png had in the other history
    run_index(settings, [str(photos)])
    _assert_index_holds_the_catalogue_vectors(settings)


def test_labels_are_dropped_when_content_changes_and_kept_when_touched(
        settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.classify import classify

    changed = make_image("changed.png", seed=1)
    touched = make_image("touched.png", seed=2)
    run_index(settings, [str(tmp_path / "photos")])
    classify(settings, ["cat", "dog"], none_margin=None)
    make_image("changed.png", seed=3)
    os.utime(changed, ns=(1, 1_000_000_000))
    os.utime(touched, ns=(5, 5_000_000_000))
    run_index(settings, [str(tmp_path / "photos")])
    with Catalogue(settings.db_path) as cat:
        ids = {r.path: r.image_id for r in cat.images()}
        labels = cat.labels_of(list(ids.values()))
    assert ids[str(touched)] in labels
    assert ids[str(changed)] not in labels


def test_files_under_a_folder_that_cannot_be_read_are_not_marked_missing(
        settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A subfolder made unreadable (permissions) reported 'cannot read folder' and then had
    all its files marked missing, as if deleted."""
    from clipsearch import crawler

    make_image("a.png", seed=1)
    inner = [make_image(f"sub/{i}.png", seed=i + 2) for i in range(3)]
    run_index(settings, [str(tmp_path / "photos")])
    real = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(crawler.os, "scandir", scandir)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert any("cannot read folder" in p.reason for p in report.problems)
    assert report.missing == 0
    assert all(_states(settings)[str(p)] == "indexed" for p in inner)


def test_the_index_file_under_its_old_name_is_removed_once_rebuilt(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Index files were named <stem>.faiss before they took the catalogue's whole name; the
    old one is derived data nothing reads: removed when the new index is written (only if it
    is an index file)."""
    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    legacy = settings.db_path.with_name(settings.db_path.stem + ".faiss")
    assert legacy != settings.index_path and not legacy.exists()
    shutil.copy(settings.index_path, legacy)
    settings.index_path.unlink()
    search(settings, ["x"])  # rebuilds the index under its name
    assert settings.index_path.exists() and not legacy.exists()
    legacy.write_bytes(b"not an index: kept")
    settings.index_path.unlink()
    search(settings, ["x"])
    assert legacy.read_bytes() == b"not an index: kept"


def _vector_of(settings, path: Path) -> np.ndarray:  # type: ignore[no-untyped-def]
    with Catalogue(settings.db_path) as cat:
        model = cat.active_model()
        assert model is not None
        vec = cat.vector_for_path(str(path), model.id)
    assert vec is not None
    return vec


def test_an_edit_that_restores_size_and_mtime_is_noticed(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`touch -r`, cp --preserve=timestamps over the original and some sync tools leave size
    and mtime as they were: the inode change time still moves."""
    p = make_image("a.bmp", seed=1, fmt="BMP")
    run_index(settings, [str(tmp_path / "photos")])
    before = os.stat(p)
    old_vec = _vector_of(settings, p)
    make_image("a.bmp", seed=2, fmt="BMP")  # same dimensions: a BMP of the same size
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(p)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.changed, report.encoded, report.unchanged) == (1, 1, 0)
    assert not np.allclose(_vector_of(settings, p), old_vec)
    again = run_index(settings, [str(tmp_path / "photos")])
    assert (again.unchanged, again.encoded) == (1, 0)


def test_a_permission_change_rereads_the_file_but_encodes_nothing(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = make_image("a.png", seed=1)
    run_index(settings, [str(tmp_path / "photos")])
    os.chmod(p, 0o600)
    report = run_index(settings, [str(tmp_path / "photos")])
    assert report.encoded == 0 and report.failed_total == 0
    assert (report.touched, report.changed) == (1, 0)


def test_a_touched_file_is_reported_as_touched_not_changed(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = make_image("a.png", seed=1)
    make_image("b.png", seed=2)
    run_index(settings, [str(tmp_path / "photos")])
    os.utime(p, ns=(1, 2_000_000_000))
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.touched, report.changed, report.unchanged, report.encoded) == (1, 0, 1, 0)
    assert report.as_dict()["touched"] == 1


def test_rows_from_before_ctimes_were_kept_adopt_them_without_reading(settings, make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A catalogue upgraded from schema 0002 has no ctimes: its files are not all read again,
    and from then on an mtime-restoring edit is caught for them too."""
    import sqlite3

    p = make_image("a.bmp", seed=1, fmt="BMP")
    make_image("b.png", seed=3)
    run_index(settings, [str(tmp_path / "photos")])
    con = sqlite3.connect(settings.db_path)
    con.execute("UPDATE images SET ctime_ns = NULL")
    con.commit()
    con.close()
    reads: list[object] = []
    real = indexer._prepare
    monkeypatch.setattr(indexer, "_prepare", lambda f, *a, **k: reads.append(f) or real(f, *a, **k))
    report = run_index(settings, [str(tmp_path / "photos")])
    assert (report.unchanged, reads) == (2, [])
    con = sqlite3.connect(settings.db_path)
    assert con.execute("SELECT count(*) FROM images WHERE ctime_ns IS NULL").fetchone()[0] == 0
    con.close()
    before = os.stat(p)
    make_image("a.bmp", seed=2, fmt="BMP")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert run_index(settings, [str(tmp_path / "photos")]).encoded == 1


def test_search_and_classify_notice_an_mtime_restoring_edit(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before the next index run: search flags the result, and a query by that file (similar,
    classify) answers from its new content, not from its stored vector."""
    import shutil

    from clipsearch.classify import classify

    a = make_image("a.bmp", seed=1, fmt="BMP")
    b = make_image("b.bmp", seed=2, fmt="BMP")
    run_index(settings, [str(tmp_path / "photos")])
    labels = ["cat", "dog", "car", "tree"]
    of_b = classify(settings, labels, [str(b)], none_margin=None, store=False)[0]
    before = os.stat(a)
    shutil.copy(b, a)  # same size: a now holds b's picture
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert any("changed since" in n for n in search(settings, ["x"]).notices)
    got = classify(settings, labels, [str(a)], none_margin=None, store=False)[0]
    assert got.scores == pytest.approx(of_b.scores, abs=1e-4)
    assert got.image_id is None


def test_a_file_replaced_by_a_link_to_another_leaves_that_other_indexed(settings, make_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """cat.png replaced by a link to pizza.png: pizza.png was marked deleted and its vector
    went to cat.png's path (the link sorted first)."""
    photos = tmp_path / "photos"
    cat = make_image("cat.png", seed=1)
    make_image("pizza.png", seed=2)
    run_index(settings, [str(photos)])
    cat.unlink()
    os.symlink("pizza.png", cat)
    report = run_index(settings, [str(photos)])
    assert report.missing == 1
    assert _states(settings) == {str(cat): "missing", str(photos / "pizza.png"): "indexed"}
