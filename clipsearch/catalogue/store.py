"""Open, migrate, lock and query the catalogue (SQLite, WAL, batched transactions)."""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, Integer, Text, cast, create_engine, delete, event, func, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DatabaseError, OperationalError

from clipsearch.catalogue.models import (
    STATE_FAILED,
    STATE_INDEXED,
    STATE_MISSING,
    STATE_PENDING,
    STATES,
    Embedding,
    ImageLabel,
    ImageRecord,
    Meta,
    ModelRecord,
    Root,
)
from clipsearch.errors import CatalogueBusyError, CatalogueDamagedError, CatalogueError

SCHEMA_HEAD = "0002_image_labels"
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
        self.engine = self._make_engine()
        try:
            self._migrate()
        except CatalogueError:
            self.engine.dispose()
            raise
        except DatabaseError as err:
            self.engine.dispose()
            raise CatalogueError(
                f"{self.path}: not a clipsearch catalogue or damaged ({err.orig})",
                hint="the file was left untouched; move it aside or use another --db",
            ) from err

    def _make_engine(self) -> Engine:
        path = str(self.path)
        readonly = self.readonly

        def connect() -> sqlite3.Connection:
            if readonly:
                uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                       check_same_thread=False)
                try:
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    # A WAL catalogue in a folder we cannot write has no -shm file to share:
                    # read it as immutable (nobody can be writing what we may not write).
                    conn.close()
                    conn = sqlite3.connect(uri + "&immutable=1", uri=True,
                                           timeout=BUSY_TIMEOUT_MS / 1000,
                                           check_same_thread=False)
            else:
                conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000,
                                       check_same_thread=False)
            return conn

        engine = create_engine("sqlite://", creator=connect)

        @event.listens_for(engine, "handle_error")
        def _damaged(ctx: Any) -> BaseException | None:
            # Corruption anywhere in the file surfaces at some query: name the file.
            err = ctx.original_exception
            if "unable to open database file" in str(err):
                return CatalogueError(f"cannot open the catalogue {path}: {err}",
                                      hint="check that you may read it and its folder")
            return damage_error(Path(path), err)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed batch survives a power cut too (WAL + NORMAL may lose the
                # last commits); measured cost: ~0.2 ms per batch commit, next to seconds of
                # encoding per batch.
                cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine

    def _current_revision(self) -> str | None:
        try:
            return self._read_revision()
        except sqlite3.DatabaseError as err:
            damaged = damage_error(self.path, err)
            if damaged is None:
                raise
            raise damaged from err

    def _read_revision(self) -> str | None:
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            tables = {
                r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "alembic_version" not in tables:
                if tables:
                    raise CatalogueError(
                        f"{self.path}: not a clipsearch catalogue (it holds other tables)",
                        hint="the file was left untouched; use another --db",
                    )
                return None
            row = raw.execute("SELECT version_num FROM alembic_version").fetchone()
            return str(row[0]) if row else None

    def _migrate(self) -> None:
        current = self._current_revision()
        if current == SCHEMA_HEAD:
            return
        if current is not None and current not in known_revisions():
            raise CatalogueError(
                f"{self.path} was written by a newer clipsearch (schema {current})",
                hint="upgrade clipsearch to open it",
            )
        if self.readonly:
            raise CatalogueError(f"{self.path} needs a schema upgrade but is read-only")
        from alembic import command

        with self._write() as conn:
            command.upgrade(_alembic_config(conn), "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction; SQLite's failures become one-line CatalogueErrors."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as err:
            reason = str(err.orig) if err.orig is not None else str(err)
            if "locked" in reason or "busy" in reason:
                raise CatalogueError(
                    f"{self.path}: still locked by another process after "
                    f"{BUSY_TIMEOUT_MS // 1000} s ({reason})",
                    hint="another program holds a long write; try again when it is done",
                ) from err
            raise CatalogueError(f"cannot write {self.path}: {reason}",
                                 hint="free disk space or check permissions; the catalogue "
                                 "keeps every batch written before this") from err
        except DatabaseError as err:
            raise CatalogueError(f"cannot write {self.path}: {err.orig or err}") from err

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- meta and models -------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(Meta.value).where(Meta.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        stmt = sqlite_insert(Meta).values(key=key, value=value)
        stmt = stmt.on_conflict_do_update(index_elements=[Meta.key], set_={"value": value})
        with self._write() as conn:
            conn.execute(stmt)

    def model_by_key(self, key: str) -> ModelRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(ModelRecord).where(ModelRecord.key == key)).first()
        if row is None:
            return None
        return _model_from_row(row._mapping)

    def active_model(self) -> ModelRecord | None:
        key = self.get_meta(META_ACTIVE_MODEL)
        return self.model_by_key(key) if key else None

    def register_model(self, values: dict[str, Any], activate: bool = True) -> int:
        """Insert the model if new; make it the catalogue's model. Returns its id."""
        with self._write() as conn:
            existing = conn.execute(
                select(ModelRecord.id).where(ModelRecord.key == values["key"])
            ).scalar()
            if existing is None:
                existing = conn.execute(
                    sqlite_insert(ModelRecord).values(created_at=time.time(), **values)
                ).inserted_primary_key[0]
            else:
                conn.execute(
                    update(ModelRecord).where(ModelRecord.id == existing).values(spec=values["spec"])
                )
            if activate:
                stmt = sqlite_insert(Meta).values(key=META_ACTIVE_MODEL, value=values["key"])
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[Meta.key], set_={"value": values["key"]}
                    )
                )
        return int(existing)

    # -- roots and files -------------------------------------------------------------
    def add_roots(self, paths: Iterable[str]) -> None:
        rows = [{"path": os.fsencode(p), "added_at": time.time()} for p in paths]
        if rows:
            with self._write() as conn:
                conn.execute(sqlite_insert(Root).values(rows).on_conflict_do_nothing())

    def roots(self) -> list[str]:
        with self.engine.connect() as conn:
            return [os.fsdecode(r[0]) for r in conn.execute(select(Root.path).order_by(Root.id))]

    def files_under(self, prefixes: Sequence[str]) -> dict[str, StoredFile]:
        """Every catalogued path equal to or below one of the prefixes."""
        raw = [os.fsencode(p) for p in prefixes]
        dirs = [p.rstrip(b"/") + b"/" for p in raw]
        out: dict[str, StoredFile] = {}
        cols = (
            ImageRecord.path,
            ImageRecord.id,
            ImageRecord.size,
            ImageRecord.mtime_ns,
            ImageRecord.state,
            ImageRecord.content_hash,
            ImageRecord.attempts,
        )
        rawset = set(raw)
        with self.engine.connect() as conn:
            for path, image_id, size, mtime_ns, state, chash, att in conn.execute(select(*cols)):
                if path in rawset or path.startswith(tuple(dirs)):
                    out[os.fsdecode(path)] = StoredFile(image_id, size, mtime_ns, state, chash, att)
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
                    select(ImageRecord.path, ImageRecord.id).where(ImageRecord.path.in_(chunk))
                ):
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
                # executemany: one prepared statement however large the batch (bulk loads).
                conn.execute(
                    sqlite_insert(Embedding).on_conflict_do_nothing(),
                    [
                        {
                            "content_hash": h,
                            "model_id": model_id,
                            "vector": np.asarray(v, dtype=np.float32).tobytes(),
                        }
                        for h, v in vectors.items()
                    ],
                )
            _upsert_images(conn, rows, time.time())

    def generation(self) -> int:
        """A counter bumped by every write that changes which vectors are indexed."""
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
            for chunk in _chunks(list(image_ids), 500):
                conn.execute(
                    update(ImageRecord)
                    .where(ImageRecord.id.in_(chunk))
                    .values(state=state, updated_at=time.time())
                )

    def known_hashes(self, hashes: Sequence[str], model_id: int) -> set[str]:
        out: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(list(hashes), 500):
                out.update(
                    r[0]
                    for r in conn.execute(
                        select(Embedding.content_hash).where(
                            Embedding.model_id == model_id, Embedding.content_hash.in_(chunk)
                        )
                    )
                )
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
        stmt = (
            select(ImageRecord.id, Embedding.vector,
                   func.substr("0000000000000000" + ImageRecord.content_hash, -16))
            .join(Embedding, Embedding.content_hash == ImageRecord.content_hash)
            .where(Embedding.model_id == model_id, ImageRecord.state == STATE_INDEXED)
            .order_by(ImageRecord.id)
        )
        ids: list[int] = []
        blobs: list[bytes] = []
        hexes: list[str] = []
        with self.engine.connect() as conn:
            for image_id, blob, hex16 in conn.execute(stmt):
                ids.append(image_id)
                blobs.append(blob)
                hexes.append(hex16)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
        return np.asarray(ids, dtype=np.int64), vecs, hex_fingerprints(hexes)

    def indexed_id_digest(self, model_id: int) -> tuple[int, int, int]:
        """(count, sum, hashed sum) of the indexed ids, computed inside SQLite: compared with
        vector_index.id_digest of the FAISS file's ids, it shows whether the two id sets
        differ without moving the ids into Python."""
        stmt = (
            select(
                func.count(ImageRecord.id),
                func.coalesce(func.sum(ImageRecord.id), 0),
                func.coalesce(func.sum((ImageRecord.id * ID_DIGEST_MULTIPLIER) % 2**32), 0),
            )
            .join(Embedding, Embedding.content_hash == ImageRecord.content_hash)
            .where(Embedding.model_id == model_id, ImageRecord.state == STATE_INDEXED)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).one()
        return int(row[0]), int(row[1]), int(row[2])

    def indexed_fingerprints(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, content fingerprints) of every indexed image, by id: the fingerprint is
        the last 64 bits of the content hash, so an id whose file changed shows a new one."""
        images, embeddings = ImageRecord.__tablename__, Embedding.__tablename__
        sql = (f"SELECT i.id, substr('0000000000000000' || i.content_hash, -16) FROM {images} "
               f"AS i JOIN {embeddings} AS e ON e.content_hash = i.content_hash "
               f"WHERE e.model_id = ? AND i.state = ? ORDER BY i.id")
        # The sqlite3 cursor itself: SQLAlchemy's row objects doubled the time (1M rows:
        # 2.4 s against 1.4 s), so damage is mapped here as the engine's hook would.
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            try:
                rows = raw.execute(sql, (int(model_id), STATE_INDEXED)).fetchall()
            except sqlite3.DatabaseError as err:
                raise (damage_error(self.path, err) or err) from err
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, hex_fingerprints([r[1] for r in rows])

    def indexed_ids(self, model_id: int) -> np.ndarray:
        stmt = (
            select(ImageRecord.id)
            .join(Embedding, Embedding.content_hash == ImageRecord.content_hash)
            .where(Embedding.model_id == model_id, ImageRecord.state == STATE_INDEXED)
        )
        with self.engine.connect() as conn:
            return np.fromiter((r[0] for r in conn.execute(stmt)), dtype=np.int64)

    def vectors_by_ids(
        self, image_ids: Sequence[int], model_id: int, dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of those ids that are still indexed: (ids, vectors)."""
        # The re-rank step of every ANN query: plain SQL on the driver connection (the same
        # statement through SQLAlchemy Core took 2.3x as long for 200 ids: 3.7 vs 1.6 ms).
        ids: list[int] = []
        blobs: list[bytes] = []
        images, embeddings = ImageRecord.__tablename__, Embedding.__tablename__
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in image_ids], 500):
                sql = (f"SELECT i.id, e.vector FROM {images} AS i JOIN {embeddings} AS e "
                       f"ON e.content_hash = i.content_hash WHERE e.model_id = ? "
                       f"AND i.state = ? AND i.id IN ({','.join('?' * len(chunk))})")
                for image_id, blob in conn.exec_driver_sql(
                        sql, (int(model_id), STATE_INDEXED, *chunk)):
                    ids.append(image_id)
                    blobs.append(blob)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
        return np.asarray(ids, dtype=np.int64), vecs

    def vector_for_path(self, path: str, model_id: int) -> np.ndarray | None:
        stmt = (
            select(Embedding.vector)
            .join(ImageRecord, Embedding.content_hash == ImageRecord.content_hash)
            .where(Embedding.model_id == model_id, ImageRecord.path == os.fsencode(path),
                   ImageRecord.state == STATE_INDEXED)
        )
        with self.engine.connect() as conn:
            blob = conn.execute(stmt).scalar()
        return None if blob is None else np.frombuffer(blob, dtype=np.float32)

    def reusable(self, content_hash: str, model_id: int) -> dict[str, Any] | None:
        """If this content already has a vector for the model: metadata to copy, else None."""
        with self.engine.connect() as conn:
            has = conn.execute(
                select(Embedding.content_hash).where(
                    Embedding.model_id == model_id, Embedding.content_hash == content_hash
                )
            ).first()
            if has is None:
                return None
            row = conn.execute(
                select(
                    ImageRecord.width, ImageRecord.height, ImageRecord.format,
                    ImageRecord.captured_at,
                ).where(ImageRecord.content_hash == content_hash, ImageRecord.width.is_not(None))
            ).first()
        if row is None:
            return {}
        return {"width": row[0], "height": row[1], "format": row[2], "captured_at": row[3]}

    def vector_for_hash(self, content_hash: str, model_id: int) -> np.ndarray | None:
        stmt = select(Embedding.vector).where(
            Embedding.model_id == model_id, Embedding.content_hash == content_hash
        )
        with self.engine.connect() as conn:
            blob = conn.execute(stmt).scalar()
        return None if blob is None else np.frombuffer(blob, dtype=np.float32)

    def image_id_for_path(self, path: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(ImageRecord.id).where(ImageRecord.path == os.fsencode(path))
            ).scalar()

    def images_by_ids(self, image_ids: Sequence[int]) -> dict[int, ImageRow]:
        out: dict[int, ImageRow] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in image_ids], 500):
                for r in conn.execute(select(*_ROW_COLS).where(ImageRecord.id.in_(chunk))):
                    out[r[0]] = _image_row(r)
        return out

    def images(self, state: str | None = None) -> Iterator[ImageRow]:
        stmt = select(*_ROW_COLS).order_by(ImageRecord.id)
        if state is not None:
            stmt = stmt.where(ImageRecord.state == state)
        with self.engine.connect() as conn:
            for r in conn.execute(stmt):
                yield _image_row(r)

    # -- labels ----------------------------------------------------------------------
    def write_labels(self, labels: Sequence[tuple[int, str, float]], model_id: int) -> None:
        """Store (image_id, label, confidence) from one classification run."""
        now = time.time()
        with self._write() as conn:
            for image_id, label, confidence in labels:
                values = {"label": label, "confidence": float(confidence),
                          "model_id": model_id, "classified_at": now}
                stmt = sqlite_insert(ImageLabel).values(image_id=image_id, **values)
                conn.execute(
                    stmt.on_conflict_do_update(index_elements=[ImageLabel.image_id], set_=values)
                )

    def labels_of(self, image_ids: Sequence[int]) -> dict[int, tuple[str, float]]:
        out: dict[int, tuple[str, float]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks([int(i) for i in image_ids], 500):
                for image_id, label, conf in conn.execute(
                    select(ImageLabel.image_id, ImageLabel.label, ImageLabel.confidence).where(
                        ImageLabel.image_id.in_(chunk)
                    )
                ):
                    out[image_id] = (label, conf)
        return out

    def ids_with_label(self, label: str) -> set[int]:
        with self.engine.connect() as conn:
            return {
                r[0]
                for r in conn.execute(
                    select(ImageLabel.image_id).where(
                        func.lower(ImageLabel.label) == label.lower()
                    )
                )
            }

    # -- reporting -------------------------------------------------------------------
    def count_by_state(self) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        with self.engine.connect() as conn:
            for state, n in conn.execute(
                select(ImageRecord.state, func.count()).group_by(ImageRecord.state)
            ):
                counts[state] = n
        return counts

    def failures(self) -> list[tuple[str, str, int]]:
        stmt = (
            select(ImageRecord.path, ImageRecord.error, ImageRecord.attempts)
            .where(ImageRecord.state == STATE_FAILED)
            .order_by(ImageRecord.path)
        )
        with self.engine.connect() as conn:
            return [(os.fsdecode(p), e or "", a) for p, e, a in conn.execute(stmt)]

    def drop_orphan_embeddings(self) -> int:
        """Delete vectors no image row refers to any more."""
        used = select(ImageRecord.content_hash).where(ImageRecord.content_hash.is_not(None))
        with self._write() as conn:
            res = conn.execute(delete(Embedding).where(Embedding.content_hash.not_in(used)))
        return int(res.rowcount or 0)


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


def _upsert_images(conn: Any, rows: Sequence[dict[str, Any]], now: float) -> None:
    """Insert or update image rows by path, in order: one executemany per run of rows that
    give the same columns."""
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
        stmt = sqlite_insert(ImageRecord)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ImageRecord.path],
            set_={c: stmt.excluded[c] for c in columns if c != "path"},
        )
        conn.execute(stmt, group)


def _drop_labels_of_changed_content(conn: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Delete the labels of rows whose stored content hash differs from the new one (a
    touched file, same content, keeps its label)."""
    new_hash = {os.fsencode(r["path"]): r["content_hash"] for r in rows if "content_hash" in r}
    changed: list[int] = []
    for chunk in _chunks(list(new_hash), 500):
        for path, image_id, old in conn.execute(
            select(ImageRecord.path, ImageRecord.id, ImageRecord.content_hash).where(
                ImageRecord.path.in_(chunk))
        ):
            if old is not None and old != new_hash[path]:
                changed.append(image_id)
    for chunk in _chunks(changed, 500):
        conn.execute(delete(ImageLabel).where(ImageLabel.image_id.in_(chunk)))


GENERATION_STEP_MAX = 2**20


def _bump_generation(conn: Any) -> None:
    """Move the change counter on by a random step (1 to GENERATION_STEP_MAX): a catalogue
    restored from a backup then changed again never reaches, by counting, the generation an
    index file of its other history recorded."""
    stmt = sqlite_insert(Meta).values(key=META_GENERATION, value="1")
    step = (func.random() % GENERATION_STEP_MAX + GENERATION_STEP_MAX) % GENERATION_STEP_MAX + 1
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[Meta.key],
            set_={"value": cast(cast(Meta.value, Integer) + step, Text)},
        )
    )


_ROW_COLS = (
    ImageRecord.id,
    ImageRecord.path,
    ImageRecord.size,
    ImageRecord.mtime_ns,
    ImageRecord.width,
    ImageRecord.height,
    ImageRecord.format,
    ImageRecord.captured_at,
    ImageRecord.state,
    ImageRecord.error,
)


def _image_row(r: Any) -> ImageRow:
    return ImageRow(r[0], os.fsdecode(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])


def _model_from_row(m: Any) -> ModelRecord:
    rec = ModelRecord()
    for col in ("id", "key", "spec", "arch", "pretrained", "checkpoint_hash",
                "open_clip_version", "dim", "created_at"):
        setattr(rec, col, m[col] if col in m else m[getattr(ModelRecord, col)])
    return rec


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


__all__ = ["Catalogue", "WriterLock", "StoredFile", "ImageRow", "OperationalError"]
