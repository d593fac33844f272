"""Open, migrate, lock and query the catalogue (SQLite, WAL, batched transactions).

Queries run as plain SQL on sqlite3 connections, one per thread; SQLAlchemy and Alembic are
imported only to migrate (and for `Catalogue.engine`), so a search does not pay their ~0.3 s
of imports. The tables are those of models.py (the ORM the migrations agree with)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from clipsearch.catalogue.schema import (
    IMAGE_COLUMNS,
    MODEL_COLUMNS,
    SCHEMA_HEAD,
    STATE_FAILED,
    STATE_INDEXED,
    STATE_MISSING,
    STATE_PENDING,
    STATES,
)
from clipsearch.errors import CatalogueBusyError, CatalogueDamagedError, CatalogueError

if TYPE_CHECKING:
    from sqlalchemy import Engine

BUSY_TIMEOUT_MS = 30_000
META_ACTIVE_MODEL = "active_model_key"
META_GENERATION = "generation"


@dataclass(frozen=True)
class StoredFile:
    """What the catalogue knows about one path, for the incremental comparison."""

    image_id: int
    size: int
    mtime_ns: int
    state: str
    content_hash: str | None
    attempts: int
    ctime_ns: int | None = None  # None: written before clipsearch recorded it

    def same_stat(self, size: int, mtime_ns: int, ctime_ns: int) -> bool:
        """Whether a file with this stat is, as far as stat can tell, the one catalogued."""
        return stat_unchanged(self.size, self.mtime_ns, self.ctime_ns, size, mtime_ns, ctime_ns)


def stat_unchanged(size: int, mtime_ns: int, ctime_ns: int | None, now_size: int,
                   now_mtime_ns: int, now_ctime_ns: int) -> bool:
    """Whether a file's stat now matches what the catalogue recorded: size, mtime and the
    inode change time, which also moves when an edit restores the mtime (a row written before
    ctimes were kept has None: size and mtime decide)."""
    return (now_size, now_mtime_ns) == (size, mtime_ns) and ctime_ns in (None, now_ctime_ns)


@dataclass(frozen=True)
class StoredModel:
    """A model that produced vectors (a row of the models table)."""

    id: int
    key: str
    spec: str
    arch: str
    pretrained: str | None
    checkpoint_hash: str | None
    open_clip_version: str
    dim: int
    created_at: float


@dataclass(frozen=True)
class ImageRow:
    """One catalogued image as queries return it."""

    image_id: int
    path: str
    size: int
    mtime_ns: int
    width: int | None
    height: int | None
    format: str | None
    captured_at: float | None
    state: str
    error: str | None
    ctime_ns: int | None = None

    def same_stat(self, st: os.stat_result) -> bool:
        """Whether the file, stat'ed now, is the one catalogued (stat_unchanged)."""
        return stat_unchanged(self.size, self.mtime_ns, self.ctime_ns, st.st_size,
                              st.st_mtime_ns, st.st_ctime_ns)

    @property
    def date(self) -> float:
        """Capture time from EXIF, else the file's modification time (unix seconds)."""
        return self.captured_at if self.captured_at is not None else self.mtime_ns / 1e9


# Must equal vector_index.ID_DIGEST_MULTIPLIER (a test checks both digests agree).
ID_DIGEST_MULTIPLIER = 2654435761
DAMAGE_MARKERS = ("malformed", "not a database", "disk image")


def damage_error(path: Path, err: BaseException) -> CatalogueDamagedError | None:
    """A CatalogueDamagedError naming the file when SQLite says it is corrupt, else None."""
    orig = getattr(err, "orig", None) or err
    reason = str(orig)
    if not isinstance(orig, sqlite3.DatabaseError) or not any(
        m in reason.lower() for m in DAMAGE_MARKERS
    ):
        return None
    damaged = CatalogueDamagedError(
        f"the catalogue {path} is damaged (SQLite: {reason})",
        hint="restore it from a backup, or pass --db to start a new catalogue elsewhere; "
        "clipsearch never overwrites it (`clipsearch check` shows SQLite's integrity check)",
    )
    damaged.__cause__ = err
    return damaged


def migrations_location() -> str:
    """Where the Alembic scripts are: shipped inside the package as clipsearch.migrations."""
    try:
        import clipsearch.migrations as pkg

        return str(Path(pkg.__file__).parent)
    except ImportError:  # running from a source tree that is not installed
        return str(Path(__file__).resolve().parents[2] / "migrations")


def _alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", migrations_location())
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


_INDEXED_JOIN = ("FROM images AS i JOIN embeddings AS e ON e.content_hash = i.content_hash "
                 f"WHERE e.model_id = ? AND i.state = '{STATE_INDEXED}'")
_ROW_COLS = "id, path, size, mtime_ns, width, height, format, captured_at, state, error"
READABLE_AS_IS = frozenset({"0002_image_labels"})
"""Older schemas a read-only catalogue is read in as it is (it cannot be upgraded): 0002 only
lacks the ctime column, read as NULL."""
_ROWS_PER_PAGE = 10_000


class Catalogue:
    """A handle on one catalogue file; migrates it to the current schema on open."""

    def __init__(self, path: Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        exists = self.path.exists()
        if not exists and not create:
            raise CatalogueError(
                f"no catalogue at {self.path}",
                hint="run `clipsearch index FOLDER` first, or point --db at an existing one",
            )
        if not create and exists and _empty_file(self.path) and not _wal_has_data(self.path):
            # Not for `index` (create): its first run may be creating this very file now.
            raise CatalogueDamagedError(
                f"the catalogue {self.path} is empty (0 bytes): lost or cut short, or an "
                "index run is just creating it",
                hint="restore it from a backup, or run `clipsearch index` to build it anew; "
                "searches never write it",
            )
        if not exists:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CatalogueError(f"cannot create {self.path.parent}: {err.strerror}") from err
        writable = os.access(self.path if exists else self.path.parent, os.W_OK) and os.access(
            self.path.parent, os.W_OK
        )
        self.readonly = readonly or not writable
        if self.readonly and not exists:
            raise CatalogueError(f"cannot create {self.path}: folder is not writable")
        self._engine: Engine | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._verified = False  # WAL is switched on only once the file is known to be ours
        self._immutable_stat: tuple[int, int, bool] | None = None
        self._ctime_col = "ctime_ns"
        try:
            self._migrate()
        except CatalogueError:
            self.close()
            raise
        except sqlite3.DatabaseError as err:
            self.close()
            raise CatalogueError(
                f"{self.path}: not a clipsearch catalogue or damaged ({err})",
                hint="the file was left untouched; move it aside or use another --db",
            ) from err

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection (decode threads read while the main thread writes: a
        shared one would show them its uncommitted batch)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _connect(self, autocommit: bool = True) -> sqlite3.Connection:
        """A connection with the catalogue's settings. Autocommit for the catalogue's own one
        (_write opens its transactions); the driver's implicit transactions for SQLAlchemy."""
        path = str(self.path)
        timeout = BUSY_TIMEOUT_MS / 1000
        isolation: Literal["DEFERRED"] | None = None if autocommit else "DEFERRED"
        try:
            if self.readonly:
                uri = "file:" + urllib.parse.quote(os.fsencode(path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False,
                                       isolation_level=isolation)
                try:
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    conn.close()
                    conn = self._connect_immutable(uri, timeout, isolation)
            else:
                conn = sqlite3.connect(path, timeout=timeout, check_same_thread=False,
                                       isolation_level=isolation)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if self._verified:
                self._writer_pragmas(conn)
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as err:
            raise self._error(err) from err
        return conn

    def _writer_pragmas(self, conn: sqlite3.Connection) -> None:
        if not self.readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives a power cut too (WAL + NORMAL may lose the
            # last commits); measured cost: ~0.2 ms per batch commit, next to seconds of
            # encoding per batch.
            conn.execute("PRAGMA synchronous=FULL")

    def _connect_immutable(self, uri: str, timeout: float,
                           isolation: Literal["DEFERRED"] | None) -> sqlite3.Connection:
        """A WAL catalogue in a folder we may not write, with no -shm file to share: read it as
        immutable, which only shows what the main file holds. So: refused while a -wal file
        holds changes not folded in yet, and reopened (generation()) when the files change."""
        if _wal_has_data(self.path):
            raise CatalogueError(
                f"cannot read the latest changes of {self.path}: they are still in its -wal "
                "file, and reading them needs a -shm file in a folder this user may not write",
                hint="any clipsearch command run by the catalogue's owner folds them in, or copy "
                "the catalogue with its -wal file to a folder you may write",
            )
        self._immutable_stat = _files_stat(self.path)
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=timeout,
                               check_same_thread=False, isolation_level=isolation)

    def _reconnect_if_moved_on(self) -> None:
        """An immutable reader's files changed (another user wrote them): open them afresh."""
        if self._immutable_stat is not None and _files_stat(self.path) != self._immutable_stat:
            with self._connections_lock:
                for conn in self._connections:
                    conn.close()
                self._connections.clear()
            self._local = threading.local()
            self._immutable_stat = None

    def _error(self, err: sqlite3.Error) -> CatalogueError:
        """SQLite's failure as a one-line CatalogueError naming the file."""
        if "unable to open database file" in str(err):
            return CatalogueError(f"cannot open the catalogue {self.path}: {err}",
                                  hint="check that you may read it and its folder" if
                                  self.readonly else "check that you may read and write it "
                                  "and its folder")
        damaged = damage_error(self.path, err)
        if damaged is not None:
            return damaged
        return CatalogueError(f"{self.path}: {err}")

    @property
    def engine(self) -> Engine:
        """A SQLAlchemy engine on this catalogue (migrations, maintenance), made on first use."""
        if self._engine is None:
            self._engine = self._sqlalchemy_engine(autocommit=False, name_errors=True)
        return self._engine

    def _sqlalchemy_engine(self, autocommit: bool, name_errors: bool) -> Engine:
        """An engine on this catalogue's connections (_connect); with name_errors, SQLite's
        failures become the CatalogueErrors _error makes."""
        from sqlalchemy import create_engine, event

        engine = create_engine("sqlite://", creator=lambda: self._connect(autocommit=autocommit))
        if name_errors:
            @event.listens_for(engine, "handle_error")
            def _damaged(ctx: Any) -> BaseException | None:
                err = ctx.original_exception
                return self._error(err) if isinstance(err, sqlite3.Error) else None

        return engine

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of one read; damage becomes an error naming the file."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise self._error(err) from err

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _read_revision(self) -> str | None:
        tables = {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if "alembic_version" not in tables:
            if tables:
                raise CatalogueError(
                    f"{self.path}: not a clipsearch catalogue (it holds other tables)",
                    hint="the file was left untouched; use another --db",
                )
            return None
        row = self._db.execute("SELECT version_num FROM alembic_version").fetchone()
        if row is None:
            raise CatalogueError(
                f"{self.path}: no schema version recorded (damaged, or not a clipsearch "
                "catalogue)", hint="the file was left untouched; restore it from a backup or "
                "use another --db")
        return str(row[0])

    def _current_revision(self) -> str | None:
        try:
            return self._read_revision()
        except sqlite3.DatabaseError as err:
            damaged = damage_error(self.path, err)
            if damaged is None:
                raise
            raise damaged from err

    def _migrate(self) -> None:
        current = self._current_revision()
        if current is not None and current != SCHEMA_HEAD and current not in known_revisions():
            raise CatalogueError(
                f"{self.path} was written by a newer clipsearch (schema {current})",
                hint="upgrade clipsearch to open it",
            )
        self._verified = True  # ours, or new: WAL from here on
        self._writer_pragmas(self._db)
        if current == SCHEMA_HEAD:
            return
        if self.readonly:
            if current in READABLE_AS_IS:
                self._ctime_col = "NULL"  # 0002: no ctimes yet, size and mtime decide
                return
            raise CatalogueError(f"{self.path} needs a schema upgrade but is read-only")
        self._upgrade()

    def _upgrade(self) -> None:
        """Alembic's migrations to head in one transaction that holds SQLite's write lock from
        its start: a crash leaves the old schema whole, and processes opening the catalogue at
        once take turns (the next finds it upgraded). pysqlite's own transactions would commit
        each ALTER/CREATE by itself and begin only at the version update."""
        from alembic import command
        from sqlalchemy import event
        from sqlalchemy.exc import DatabaseError

        engine = self._sqlalchemy_engine(autocommit=True, name_errors=False)

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with engine.begin() as conn:
                command.upgrade(_alembic_config(conn), "head")
        except DatabaseError as err:
            orig = err.orig if isinstance(err.orig, sqlite3.Error) else None
            if orig is None:
                raise CatalogueError(f"cannot upgrade {self.path}: {err}") from err
            raise orig from err
        finally:
            engine.dispose()

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        if self._engine is not None:
            self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite's failures become one-line CatalogueErrors."""
        conn = self._db
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if conn.in_transaction:
                conn.rollback()
            reason = str(err)
            if "locked" in reason or "busy" in reason:
                raise CatalogueError(
                    f"{self.path}: still locked by another process after "
                    f"{BUSY_TIMEOUT_MS // 1000} s ({reason})",
                    hint="another program holds a long write; try again when it is done",
                ) from err
            damaged = damage_error(self.path, err)
            if damaged is not None:
                raise damaged from err
            raise CatalogueError(f"cannot write {self.path}: {reason}",
                                 hint="free disk space or check permissions; the catalogue "
                                 "keeps every batch written before this") from err
        except sqlite3.DatabaseError as err:
            if conn.in_transaction:
                conn.rollback()
            raise (damage_error(self.path, err)
                   or CatalogueError(f"cannot write {self.path}: {err}")) from err

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- meta and models -------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def model_by_key(self, key: str) -> StoredModel | None:
        row = self._one(f"SELECT {', '.join(MODEL_COLUMNS)} FROM models WHERE key = ?", (key,))
        return None if row is None else StoredModel(*row)

    def active_model(self) -> StoredModel | None:
        key = self.get_meta(META_ACTIVE_MODEL)
        return self.model_by_key(key) if key else None

    def register_model(self, values: dict[str, Any], activate: bool = True) -> int:
        """Insert the model if new; make it the catalogue's model. Returns its id."""
        with self._write() as conn:
            row = conn.execute("SELECT id FROM models WHERE key = ?", (values["key"],)).fetchone()
            if row is None:
                record = {**values, "created_at": time.time()}
                columns = [c for c in MODEL_COLUMNS if c in record]
                cur = conn.execute(
                    f"INSERT INTO models ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' * len(columns))})", [record[c] for c in columns])
                existing = int(cur.lastrowid or 0)
            else:
                existing = int(row[0])
                conn.execute("UPDATE models SET spec = ? WHERE id = ?", (values["spec"], existing))
            if activate:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                             "DO UPDATE SET value = excluded.value",
                             (META_ACTIVE_MODEL, values["key"]))
        return existing

    # -- roots and files -------------------------------------------------------------
    def add_roots(self, paths: Iterable[str]) -> None:
        rows = [(os.fsencode(p), time.time()) for p in paths]
        if rows:
            with self._write() as conn:
                conn.executemany("INSERT INTO roots (path, added_at) VALUES (?, ?) "
                                 "ON CONFLICT DO NOTHING", rows)

    def roots(self) -> list[str]:
        return [os.fsdecode(r[0]) for r in self._rows("SELECT path FROM roots ORDER BY id")]

    def files_under(self, prefixes: Sequence[str]) -> dict[str, StoredFile]:
        """Every catalogued path equal to or below one of the prefixes."""
        raw = [os.fsencode(p) for p in prefixes]
        dirs = tuple(p.rstrip(b"/") + b"/" for p in raw)
        rawset = set(raw)
        out: dict[str, StoredFile] = {}
        for path, image_id, size, mtime_ns, state, chash, att, ctime_ns in self._rows(
                f"SELECT path, id, size, mtime_ns, state, content_hash, attempts, "
                f"{self._ctime_col} FROM images"):
            if path in rawset or path.startswith(dirs):
                out[os.fsdecode(path)] = StoredFile(image_id, size, mtime_ns, state, chash, att,
                                                    ctime_ns)
        return out

    def write_images(self, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Upsert image rows by path in one transaction; returns path -> image_id."""
        if not rows:
            return {}
        ids: dict[str, int] = {}
        with self._write() as conn:
            _upsert_images(conn, rows, time.time())
            paths = [os.fsencode(r["path"]) for r in rows]
            for chunk in _chunks(paths, 500):
                for p, image_id in conn.execute(
                        f"SELECT path, id FROM images WHERE path IN ({_marks(chunk)})", chunk):
                    ids[os.fsdecode(p)] = image_id
        return ids

    def write_batch(
        self,
        rows: Sequence[dict[str, Any]],
        vectors: dict[str, np.ndarray],
        model_id: int,
    ) -> None:
        """One transaction: new vectors (by content hash) and the image rows that use them.
        A row whose content changed loses its label, which described the old content."""
        with self._write() as conn:
            _bump_generation(conn)
            _drop_labels_of_changed_content(conn, rows)
            if vectors:
                conn.executemany(
                    "INSERT INTO embeddings (content_hash, model_id, vector) VALUES (?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    [(h, model_id, np.asarray(v, dtype=np.float32).tobytes())
                     for h, v in vectors.items()],
                )
            _upsert_images(conn, rows, time.time())

    def record_ctimes(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Store (image_id, ctime_ns) for rows written before ctimes were kept (their files
        unchanged by size and mtime): nothing indexed changes, so no generation step."""
        if pairs:
            with self._write() as conn:
                conn.executemany("UPDATE images SET ctime_ns = ? WHERE id = ?",
                                 [(int(c), int(i)) for i, c in pairs])

    def generation(self) -> int:
        """A counter bumped by every write that changes which vectors are indexed."""
        self._reconnect_if_moved_on()
        value = self.get_meta(META_GENERATION)
        return int(value) if value else 0

    def mark_missing(self, image_ids: Sequence[int]) -> None:
        self._set_state(image_ids, STATE_MISSING)

    def mark_pending(self, image_ids: Sequence[int]) -> None:
        """The next index run (re-)encodes these images (e.g. their vector was lost)."""
        self._set_state(image_ids, STATE_PENDING)

    def _set_state(self, image_ids: Sequence[int], state: str) -> None:
        if not image_ids:
            return
        with self._write() as conn:
            _bump_generation(conn)
            for chunk in _chunks([int(i) for i in image_ids], 500):
                conn.execute(f"UPDATE images SET state = ?, updated_at = ? "
                             f"WHERE id IN ({_marks(chunk)})", (state, time.time(), *chunk))

    def known_hashes(self, hashes: Sequence[str], model_id: int) -> set[str]:
        out: set[str] = set()
        for chunk in _chunks(list(hashes), 500):
            out.update(r[0] for r in self._rows(
                f"SELECT content_hash FROM embeddings WHERE model_id = ? "
                f"AND content_hash IN ({_marks(chunk)})", (int(model_id), *chunk)))
        return out

    # -- vectors ---------------------------------------------------------------------
    def indexed_vectors(self, model_id: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids int64, vectors float32 [n, dim]) of every indexed image, by id."""
        ids, vecs, _ = self.indexed_vectors_and_fingerprints(model_id, dim)
        return ids, vecs

    def indexed_vectors_and_fingerprints(self, model_id: int, dim: int
                                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """indexed_vectors plus each image's content fingerprint (indexed_fingerprints), read
        in one statement so the two agree."""
        rows = self._rows(f"SELECT i.id, e.vector, substr('0000000000000000' || i.content_hash, "
                          f"-16) {_INDEXED_JOIN} ORDER BY i.id", (int(model_id),))
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
            len(rows), dim)
        return ids, vecs, hex_fingerprints([r[2] for r in rows])

    def indexed_id_digest(self, model_id: int) -> tuple[int, int, int]:
        """(count, sum, hashed sum) of the indexed ids, computed inside SQLite: compared with
        vector_index.id_digest of the FAISS file's ids, it shows whether the two id sets
        differ without moving the ids into Python."""
        row = self._one(
            f"SELECT count(i.id), coalesce(sum(i.id), 0), "
            f"coalesce(sum((i.id * {ID_DIGEST_MULTIPLIER}) % {2**32}), 0) {_INDEXED_JOIN}",
            (int(model_id),))
        return int(row[0]), int(row[1]), int(row[2])

    def indexed_fingerprints(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, content fingerprints) of every indexed image, by id: the fingerprint is
        the last 64 bits of the content hash, so an id whose file changed shows a new one."""
        rows = self._rows(f"SELECT i.id, substr('0000000000000000' || i.content_hash, -16) "
                          f"{_INDEXED_JOIN} ORDER BY i.id", (int(model_id),))
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, hex_fingerprints([r[1] for r in rows])

    def indexed_ids(self, model_id: int) -> np.ndarray:
        rows = self._rows(f"SELECT i.id {_INDEXED_JOIN}", (int(model_id),))
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def vectors_by_ids(
        self, image_ids: Sequence[int], model_id: int, dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of those ids that are still indexed: (ids, vectors)."""
        ids: list[int] = []
        blobs: list[bytes] = []
        for chunk in _chunks([int(i) for i in image_ids], 500):
            for image_id, blob in self._rows(
                    f"SELECT i.id, e.vector {_INDEXED_JOIN} AND i.id IN ({_marks(chunk)})",
                    (int(model_id), *chunk)):
                ids.append(image_id)
                blobs.append(blob)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
        return np.asarray(ids, dtype=np.int64), vecs

    def vector_for_path(self, path: str, model_id: int) -> np.ndarray | None:
        row = self._one(f"SELECT e.vector {_INDEXED_JOIN} AND i.path = ?",
                        (int(model_id), os.fsencode(path)))
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def reusable(self, content_hash: str, model_id: int) -> dict[str, Any] | None:
        """If this content already has a vector for the model: metadata to copy, else None."""
        if self._one("SELECT 1 FROM embeddings WHERE model_id = ? AND content_hash = ?",
                     (int(model_id), content_hash)) is None:
            return None
        row = self._one("SELECT width, height, format, captured_at FROM images "
                        "WHERE content_hash = ? AND width IS NOT NULL LIMIT 1", (content_hash,))
        if row is None:
            return {}
        return {"width": row[0], "height": row[1], "format": row[2], "captured_at": row[3]}

    def vector_for_hash(self, content_hash: str, model_id: int) -> np.ndarray | None:
        row = self._one("SELECT vector FROM embeddings WHERE model_id = ? AND content_hash = ?",
                        (int(model_id), content_hash))
        return None if row is None else np.frombuffer(row[0], dtype=np.float32)

    def image_id_for_path(self, path: str) -> int | None:
        row = self._one("SELECT id FROM images WHERE path = ?", (os.fsencode(path),))
        return None if row is None else int(row[0])

    def images_by_ids(self, image_ids: Sequence[int]) -> dict[int, ImageRow]:
        out: dict[int, ImageRow] = {}
        for chunk in _chunks([int(i) for i in image_ids], 500):
            for r in self._rows(f"SELECT {_ROW_COLS}, {self._ctime_col} FROM images "
                                f"WHERE id IN ({_marks(chunk)})", chunk):
                out[r[0]] = _image_row(r)
        return out

    def images(self, state: str | None = None) -> Iterator[ImageRow]:
        """Every image row by id (read a page at a time, so callers may write meanwhile)."""
        where = "" if state is None else "AND state = ? "
        last = -(2**63)
        while True:
            page = self._rows(f"SELECT {_ROW_COLS}, {self._ctime_col} FROM images WHERE id > ? {where}"
                              f"ORDER BY id LIMIT {_ROWS_PER_PAGE}",
                              (last,) if state is None else (last, state))
            for r in page:
                yield _image_row(r)
            if len(page) < _ROWS_PER_PAGE:
                return
            last = page[-1][0]

    # -- labels ----------------------------------------------------------------------
    def write_labels(self, labels: Sequence[tuple[int, str, float]], model_id: int) -> None:
        """Store (image_id, label, confidence) from one classification run."""
        now = time.time()
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO image_labels (image_id, label, confidence, model_id, classified_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (image_id) DO UPDATE SET "
                "label = excluded.label, confidence = excluded.confidence, "
                "model_id = excluded.model_id, classified_at = excluded.classified_at",
                [(int(i), label, float(conf), int(model_id), now) for i, label, conf in labels])

    def labels_of(self, image_ids: Sequence[int]) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        for chunk in _chunks([int(i) for i in image_ids], 500):
            for image_id, label, conf in self._rows(
                    f"SELECT image_id, label, confidence FROM image_labels "
                    f"WHERE image_id IN ({_marks(chunk)})", chunk):
                out[image_id] = (label, conf)
        return out

    def ids_with_label(self, label: str) -> set[int]:
        return {r[0] for r in self._rows(
            "SELECT image_id FROM image_labels WHERE lower(label) = ?", (label.lower(),))}

    # -- reporting -------------------------------------------------------------------
    def count_by_state(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        for state, n in self._rows("SELECT state, count(*) FROM images GROUP BY state"):
            counts[state] = n
        return counts

    def failures(self) -> list[tuple[str, str, int]]:
        return [(os.fsdecode(p), e or "", a) for p, e, a in self._rows(
            "SELECT path, error, attempts FROM images WHERE state = ? ORDER BY path",
            (STATE_FAILED,))]

    def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check of this catalogue: ["ok"] when the file is sound."""
        try:
            return [str(r[0]) for r in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as err:
            return [str(err)]

    def drop_orphan_embeddings(self) -> int:
        """Delete vectors no image row refers to any more."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM embeddings WHERE content_hash NOT IN "
                               "(SELECT content_hash FROM images WHERE content_hash IS NOT NULL)")
        return int(cur.rowcount or 0)


_HEX_VALUES = np.zeros(256, np.uint64)
_HEX_VALUES[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX_VALUES[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_HEX_VALUES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_NIBBLE_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)


def hex_fingerprints(hex16: Sequence[str]) -> np.ndarray:
    """int64 values of 16-hex-digit strings, vectorised (a Python int() per row took 0.5 s
    at 1M rows)."""
    if not hex16:
        return np.zeros(0, np.int64)
    raw = np.frombuffer("".join(hex16).encode("ascii", "replace"), np.uint8)
    nibbles = _HEX_VALUES[raw.reshape(len(hex16), 16)]
    return np.bitwise_or.reduce(nibbles << _NIBBLE_SHIFTS, axis=1).view(np.int64)


def _empty_file(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def _wal_has_data(path: Path) -> bool:
    try:
        return os.stat(str(path) + "-wal").st_size > 0
    except OSError:
        return False


def _files_stat(path: Path) -> tuple[int, int, bool]:
    """(size, mtime_ns) of the main file and whether a -wal file holds data."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1, False)
    return (st.st_size, st.st_mtime_ns, _wal_has_data(path))


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" * len(items))


def _upsert_images(conn: sqlite3.Connection, rows: Sequence[dict[str, Any]], now: float) -> None:
    """Insert or update image rows by path, in order: one executemany per run of rows that
    give the same columns. A new row starts with 0 attempts unless the row says otherwise."""
    groups: list[tuple[tuple[str, ...], list[dict[str, Any]]]] = []
    for row in rows:
        values = dict(row)
        values["path"] = os.fsencode(values["path"])
        values["updated_at"] = now
        columns = tuple(sorted(values))
        if not groups or groups[-1][0] != columns:
            groups.append((columns, []))
        groups[-1][1].append(values)
    for columns, group in groups:
        unknown = set(columns) - IMAGE_COLUMNS
        if unknown:
            raise ValueError(f"not columns of images: {sorted(unknown)}")
        inserted = columns if "attempts" in columns else (*columns, "attempts")
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "path")
        conn.executemany(
            f"INSERT INTO images ({', '.join(inserted)}) VALUES ({_marks(inserted)}) "
            f"ON CONFLICT (path) DO UPDATE SET {updates}",
            [[v.get(c, 0) if c == "attempts" else v[c] for c in inserted] for v in group])


def _drop_labels_of_changed_content(conn: sqlite3.Connection,
                                    rows: Sequence[dict[str, Any]]) -> None:
    """Delete the labels of rows whose stored content hash differs from the new one (a
    touched file, same content, keeps its label)."""
    new_hash = {os.fsencode(r["path"]): r["content_hash"] for r in rows if "content_hash" in r}
    changed: list[int] = []
    for chunk in _chunks(list(new_hash), 500):
        for path, image_id, old in conn.execute(
                f"SELECT path, id, content_hash FROM images WHERE path IN ({_marks(chunk)})",
                chunk):
            if old is not None and old != new_hash[path]:
                changed.append(image_id)
    for chunk in _chunks(changed, 500):
        conn.execute(f"DELETE FROM image_labels WHERE image_id IN ({_marks(chunk)})", chunk)


GENERATION_STEP_MAX = 2**20


def _bump_generation(conn: sqlite3.Connection) -> None:
    """Move the change counter on by a random step (1 to GENERATION_STEP_MAX): a catalogue
    restored from a backup then changed again never reaches, by counting, the generation an
    index file of its other history recorded."""
    m = GENERATION_STEP_MAX
    conn.execute(
        f"INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT (key) DO UPDATE SET "
        f"value = CAST(CAST(value AS INTEGER) + (random() % {m} + {m}) % {m} + 1 AS TEXT)",
        (META_GENERATION,))


def _image_row(r: Any) -> ImageRow:
    return ImageRow(r[0], os.fsdecode(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                    r[10])


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class WriterLock:
    """One index run per catalogue: an exclusive advisory lock on `<db>.lock`."""

    def __init__(self, lock_path: Path, wait: bool = False) -> None:
        self.lock_path = lock_path
        self.wait = wait
        self._fh: Any = None

    def __enter__(self) -> WriterLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: SQLite's own locking still protects the data
            return self
        try:
            self._fh = open(self.lock_path, "a+")
        except OSError as err:
            raise CatalogueError(f"cannot create lock file {self.lock_path}: {err.strerror}") from err
        flags = fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._fh.fileno(), flags)
        except BlockingIOError as err:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            self._fh = None
            raise CatalogueBusyError(
                f"another index run is writing this catalogue (pid {holder})",
                hint="wait for it to finish, or pass --wait to queue behind it",
            ) from err
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


__all__ = ["Catalogue", "WriterLock", "StoredFile", "StoredModel", "ImageRow"]
