"""Catalogue: migrations, ORM/migration agreement, refusal of foreign or newer files, WAL."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from clipsearch.catalogue.store import SCHEMA_HEAD, Catalogue, known_revisions
from clipsearch.errors import CatalogueError


def test_upgrade_from_empty_reaches_head_with_wal(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Catalogue(path).close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"roots", "models", "images", "embeddings", "meta"} <= tables


def test_head_constant_matches_migration_scripts() -> None:
    from alembic.script import ScriptDirectory

    from clipsearch.catalogue.store import _alembic_config

    assert ScriptDirectory.from_config(_alembic_config()).get_current_head() == SCHEMA_HEAD
    assert SCHEMA_HEAD in known_revisions()


def test_orm_and_migrations_agree(tmp_path: Path) -> None:
    """`alembic check`: autogenerate finds nothing to change after upgrading to head."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from clipsearch.catalogue.models import Base

    cat = Catalogue(tmp_path / "c.sqlite3")
    with cat.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    cat.close()
    assert diff == []


def test_newer_catalogue_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Catalogue(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num='9999_from_the_future'")
    con.commit()
    con.close()
    with pytest.raises(CatalogueError, match="newer clipsearch"):
        Catalogue(path)


@pytest.mark.parametrize("content", [b"this is not a database at all" * 40, b"SQLite format 3\0" + b"\x07" * 200])
def test_damaged_file_is_refused_and_left_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.sqlite3"
    path.write_bytes(content)
    with pytest.raises(CatalogueError) as info:
        Catalogue(path)
    assert str(path) in info.value.message
    assert path.read_bytes() == content


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(CatalogueError, match="not a clipsearch catalogue"):
        Catalogue(path)


def test_missing_catalogue_for_search_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as info:
        Catalogue(tmp_path / "none.sqlite3", create=False)
    assert info.value.hint and "index" in info.value.hint


def test_read_only_catalogue_opens_read_only(tmp_path: Path, read_only) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ro"
    path = folder / "c.sqlite3"
    Catalogue(path).close()
    read_only(path, folder)  # a read-only folder too: no -shm file can be made for WAL
    cat = Catalogue(path)
    assert cat.readonly
    assert cat.count_by_state()["indexed"] == 0
    cat.close()


def test_paths_are_stored_losslessly(tmp_path: Path) -> None:
    odd = os.fsdecode(b"/photos/caf\xe9-\xff.jpg")  # not valid UTF-8
    with Catalogue(tmp_path / "c.sqlite3") as cat:
        cat.write_images([{"path": odd, "size": 1, "mtime_ns": 2, "state": "pending",
                           "attempts": 0}])
        (row,) = list(cat.images())
    assert os.fsencode(row.path) == b"/photos/caf\xe9-\xff.jpg"


def test_upgrade_from_previous_schema_keeps_data(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import create_engine

    from clipsearch.catalogue.store import _alembic_config

    path = tmp_path / "old.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001_initial_schema")
    engine.dispose()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO images (path, size, mtime_ns, state, attempts, updated_at) "
                "VALUES (x'2f612e6a7067', 1, 2, 'pending', 0, 0)")
    con.commit()
    con.close()
    with Catalogue(path) as cat:
        assert [r.path for r in cat.images()] == ["/a.jpg"]
    con = sqlite3.connect(path)
    assert con.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD


def test_write_batch_takes_a_whole_collection_in_one_call(tmp_path: Path) -> None:
    """Bulk loads (benchmarks, imports) write many rows per call through executemany; rows
    with different column sets in one batch (indexed, failed, new) keep upsert semantics."""
    import numpy as np

    n, dim = 3000, 8
    vecs = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    rows = [{"path": f"/p/{i}.jpg", "size": 10, "mtime_ns": i, "content_hash": f"h{i}",
             "width": 4, "height": 3, "format": "JPEG", "state": "indexed", "attempts": 0}
            for i in range(n)]
    with Catalogue(tmp_path / "c.sqlite3") as cat:
        model_id = cat.register_model({"key": "m", "spec": "m", "arch": "a", "pretrained": None,
                                       "checkpoint_hash": None, "open_clip_version": "0",
                                       "dim": dim})
        cat.write_batch(rows, {f"h{i}": vecs[i] for i in range(n)}, model_id)
        ids, stored = cat.indexed_vectors(model_id, dim)
        assert ids.size == n and np.array_equal(stored, vecs)
        # An upsert of rows with different column sets updates only what each row gives.
        cat.write_batch([{"path": "/p/1.jpg", "size": 11, "mtime_ns": 1, "content_hash": "h1",
                          "state": "failed", "error": "bad", "attempts": 1},
                         {"path": "/p/new.jpg", "size": 1, "mtime_ns": 0, "content_hash": "h2",
                          "state": "indexed", "attempts": 0}], {}, model_id)
        by_path = {r.path: r for r in cat.images()}
    assert len(by_path) == n + 1
    assert by_path["/p/1.jpg"].state == "failed" and by_path["/p/1.jpg"].width == 4
    assert by_path["/p/1.jpg"].size == 11 and by_path["/p/new.jpg"].state == "indexed"


def write_rows_catalogue(path: Path, n: int = 300, dim: int = 64) -> None:
    """A catalogue of n indexed rows with vectors (no model or images needed)."""
    import numpy as np

    with Catalogue(path) as cat:
        model_id = cat.register_model({"key": "fake@1", "spec": "fake", "arch": "fake",
                                       "pretrained": None, "checkpoint_hash": None,
                                       "open_clip_version": "0", "dim": dim})
        rng = np.random.default_rng(0)
        rows = [{"path": f"/photos/folder-{i % 9}/image-{i:05}.png", "size": 1000 + i,
                 "mtime_ns": i, "content_hash": f"{i:032x}", "state": "indexed"}
                for i in range(n)]
        vectors = {r["content_hash"]: rng.standard_normal(dim).astype(np.float32) for r in rows}
        cat.write_batch(rows, vectors, model_id)


def damage_middle(path: Path) -> bytes:
    """Overwrite 16 KB at offset 64 KB (a sector of a failing disk); returns the new bytes."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    assert path.stat().st_size > 96 * 1024
    with open(path, "r+b") as fh:
        fh.seek(64 * 1024)
        fh.write(b"\xab" * 16 * 1024)
    return path.read_bytes()


def test_damage_in_the_middle_is_a_catalogue_error_naming_the_file(tmp_path: Path) -> None:
    from clipsearch.errors import CatalogueDamagedError

    path = tmp_path / "c.sqlite3"
    write_rows_catalogue(path)
    damaged = damage_middle(path)
    raised = []
    with Catalogue(path) as cat:
        model = cat.active_model()
        assert model is not None
        for read in (lambda: list(cat.images()), lambda: cat.indexed_vectors(model.id, 64),
                     lambda: cat.indexed_ids(model.id), cat.count_by_state, cat.failures,
                     lambda: cat.indexed_id_digest(model.id),
                     lambda: cat.indexed_fingerprints(model.id)):
            try:
                read()
            except CatalogueDamagedError as err:  # never a raw sqlite/SQLAlchemy error
                raised.append(err)
    assert raised
    assert all(str(path) in e.message and "damaged" in e.message for e in raised)
    assert all(e.hint and "backup" in e.hint and "--db" in e.hint for e in raised)
    assert path.read_bytes() == damaged  # never overwritten


def test_commits_are_durable_against_power_loss(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL may lose the last commits on a power cut; FULL does not."""
    with Catalogue(tmp_path / "c.sqlite3") as cat:
        with cat.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            assert raw.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_other_threads_never_read_an_uncommitted_write(tmp_path: Path) -> None:
    """Decode threads ask the catalogue for reusable vectors while the main thread writes a
    batch: they must see committed data only (each thread has its own connection)."""
    import threading

    with Catalogue(tmp_path / "c.sqlite3") as cat:
        seen: list[str | None] = []
        with cat._write() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('probe', 'uncommitted')")
            reader = threading.Thread(target=lambda: seen.append(cat.get_meta("probe")))
            reader.start()
            reader.join()
            assert cat.get_meta("probe") == "uncommitted"  # the writer sees its own write
        assert seen == [None]
        reader = threading.Thread(target=lambda: seen.append(cat.get_meta("probe")))
        reader.start()
        reader.join()
        assert seen == [None, "uncommitted"]


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    with Catalogue(tmp_path / "c.sqlite3") as cat:
        with pytest.raises(RuntimeError), cat._write() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('probe', '1')")
            raise RuntimeError("boom")
        assert cat.get_meta("probe") is None
        cat.set_meta("probe", "2")  # and the connection is usable again
        assert cat.get_meta("probe") == "2"


def _catalogue_at(path: Path, revision: str) -> None:
    """A catalogue of an older schema, as an older clipsearch left it."""
    from alembic import command
    from sqlalchemy import create_engine

    from clipsearch.catalogue.store import _alembic_config

    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
    engine.dispose()
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("INSERT INTO images (path, size, mtime_ns, state, attempts, updated_at) "
                "VALUES (x'2f612e6a7067', 1, 2, 'indexed', 0, 0)")
    con.commit()
    con.close()


def _columns(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    cols = {r[1] for r in con.execute("PRAGMA table_info(images)")}
    con.close()
    return cols


def test_an_upgrade_cut_short_leaves_the_old_schema_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ALTER committed by itself (pysqlite begins transactions only for DML): a kill
    after 0003's ALTER left a catalogue that failed forever ('duplicate column name')."""
    from alembic.operations import Operations

    path = tmp_path / "old.sqlite3"
    _catalogue_at(path, "0002_image_labels")
    real = Operations.add_column

    def add_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(self, *args, **kwargs)
        raise KeyboardInterrupt  # a kill right after the ALTER

    monkeypatch.setattr(Operations, "add_column", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        Catalogue(path)
    assert "ctime_ns" not in _columns(path)
    monkeypatch.setattr(Operations, "add_column", real)
    with Catalogue(path) as cat:
        assert cat.count_by_state()["indexed"] == 1
    assert "ctime_ns" in _columns(path)


def test_processes_opening_an_old_catalogue_at_once_take_turns(tmp_path: Path) -> None:
    """Two runs started together both migrated: 'duplicate column name', 'table roots
    already exists', or 'database is locked' at once instead of after the busy timeout."""
    import subprocess
    import sys

    old = tmp_path / "old.sqlite3"
    _catalogue_at(old, "0002_image_labels")
    new = tmp_path / "new.sqlite3"
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "from clipsearch.catalogue.store import Catalogue\n"
            "deadline = time.monotonic() + 60\n"
            f"while not os.path.exists({str(go)!r}):\n"
            "    if time.monotonic() > deadline: sys.exit('never started')\n"
            "    time.sleep(0.001)\n"
            "Catalogue(sys.argv[1]).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p)], stderr=subprocess.PIPE,
                              text=True) for p in (old, new) for _ in range(3)]
    try:
        time.sleep(2.0)  # every process imported and waiting
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 6, errors
    with Catalogue(old) as cat:
        assert cat.count_by_state()["indexed"] == 1


def test_a_read_only_catalogue_of_the_previous_schema_is_searched_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _catalogue_at(path, "0002_image_labels")
    with Catalogue(path, readonly=True) as cat:
        (row,) = list(cat.images())
        assert row.ctime_ns is None
        assert cat.files_under(["/"])["/a.jpg"].ctime_ns is None
        assert cat.images_by_ids([row.image_id])[row.image_id].path == "/a.jpg"
    assert "ctime_ns" not in _columns(path)  # not upgraded


def test_an_empty_catalogue_file_is_reported_by_searches_and_never_written(tmp_path: Path) -> None:
    """Reading commands made a new catalogue of a file cut to 0 bytes and said 'no model'.
    (`index` builds one there: its first run may be creating that very file.)"""
    from clipsearch.errors import CatalogueDamagedError

    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"")
    with pytest.raises(CatalogueDamagedError, match="empty"):
        Catalogue(path, create=False)
    assert path.read_bytes() == b""


def test_another_programs_database_is_left_untouched(tmp_path: Path) -> None:
    """journal_mode=WAL was set before the tables were looked at: the 'left untouched' file
    had been switched to WAL."""
    path = tmp_path / "other.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(CatalogueError, match="not a clipsearch catalogue"):
        Catalogue(path)
    assert path.read_bytes() == before


def test_a_catalogue_without_a_schema_version_row_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Catalogue(path).close()
    con = sqlite3.connect(path)
    con.execute("DELETE FROM alembic_version")
    con.commit()
    con.close()
    with pytest.raises(CatalogueError, match="no schema version recorded"):
        Catalogue(path)


def test_a_read_only_catalogue_at_a_path_that_is_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / os.fsdecode(b"caf\xe9-\xff")
    Catalogue(folder / "c.sqlite3").close()
    with Catalogue(folder / "c.sqlite3", readonly=True) as cat:
        assert cat.count_by_state()["indexed"] == 0


def test_an_immutable_read_refuses_changes_it_cannot_see(tmp_path: Path, read_only) -> None:  # type: ignore[no-untyped-def]
    """A catalogue in a folder this user may not write, with no -shm: SQLite can read it only
    as immutable, which ignores the -wal file. Committed changes still there were silently
    missing from searches; now that is an error naming the file."""
    import shutil

    src = tmp_path / "src" / "c.sqlite3"
    writer = Catalogue(src)
    writer.set_meta("probe", "in the wal")
    folder = tmp_path / "copy"
    folder.mkdir()
    for suffix in ("", "-wal"):  # while the writer is open: the change is in the -wal only
        shutil.copy(str(src) + suffix, str(folder / "c.sqlite3") + suffix)
    writer.close()
    read_only(folder / "c.sqlite3", folder / "c.sqlite3-wal", folder)
    with pytest.raises(CatalogueError, match="still in its -wal"):
        Catalogue(folder / "c.sqlite3", create=False)


def test_an_immutable_reader_sees_what_another_user_writes_later(tmp_path: Path) -> None:
    import subprocess

    folder = tmp_path / "shared"
    path = folder / "c.sqlite3"
    Catalogue(path).close()
    if os.geteuid() != 0:
        pytest.skip("needs root's chattr to make a folder read-only for this process only")
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        reader = Catalogue(path, create=False)
        assert reader.readonly and reader._immutable_stat is not None
        assert reader.get_meta("probe") is None
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    with Catalogue(path) as writer:  # the owner writes (and checkpoints on close)
        writer.set_meta("probe", "new")
    assert reader.get_meta("probe") is None  # immutable: the old view until generation()
    reader.generation()
    assert reader.get_meta("probe") == "new"
    reader.close()
