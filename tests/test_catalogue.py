"""Catalogue: migrations, ORM/migration agreement, refusal of foreign or newer files, WAL."""

from __future__ import annotations

import os
import sqlite3
import stat
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_read_only_catalogue_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Catalogue(path).close()
    path.chmod(stat.S_IRUSR)
    cat = Catalogue(path)
    assert cat.readonly
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
