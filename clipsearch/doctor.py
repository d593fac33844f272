"""`check`: verify catalogue, index and files against each other; repair what can be."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.catalogue.schema import STATE_INDEXED, STATE_PENDING
from clipsearch.catalogue.store import Catalogue, WriterLock
from clipsearch.config import Settings
from clipsearch.crawler import some_paths
from clipsearch.encoder import ModelInfo
from clipsearch.errors import CatalogueDamagedError
from clipsearch.imaging import codec_support
from clipsearch.indexer import vector_file_complete
from clipsearch.vector_index import (
    FILE_LAYOUT,
    KIND_IVFPQ,
    index_delta,
    load_index,
    read_index_header,
)
from clipsearch.vector_store import VectorFile, vector_file_path

VERIFY_CHUNK_ROWS = 20_000

INTEGRITY_LINES_SHOWN = 3


@dataclass
class CheckReport:
    """Findings in plain words, what --repair did about them, and what is still wrong."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    remaining: list[str] | None = None
    """After --repair: the problems a fresh check still finds (None: no repair was tried)."""
    hints: list[str] = field(default_factory=list)
    codecs: dict[str, bool] = field(default_factory=dict)
    indexed: int = 0

    @property
    def ok(self) -> bool:
        """True only when nothing is wrong (after repair, when one was tried)."""
        return not (self.problems if self.remaining is None else self.remaining)


def integrity_check(path: Path) -> list[str]:
    """SQLite's PRAGMA quick_check on a read-only connection: ["ok"] when the file is sound."""
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    result: list[str] = []
    for suffix in ("", "&immutable=1"):  # immutable: a WAL file in a read-only folder
        try:
            con = sqlite3.connect(uri + suffix, uri=True)
            try:
                return [str(r[0]) for r in con.execute("PRAGMA quick_check")]
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            result = [str(err)]
    return result


def check_catalogue(settings: Settings, repair: bool = False) -> CheckReport:
    """Check integrity, index agreement and files on disk; with repair, fix what can be."""
    report = CheckReport(codecs=codec_support())
    try:
        _check(settings, report, repair)
        if repair and report.problems:
            again = CheckReport()
            _check(settings, again, repair=False)
            report.remaining = again.problems
    except CatalogueDamagedError as err:
        lines = integrity_check(settings.db_path)
        shown = "; ".join(lines[:INTEGRITY_LINES_SHOWN])
        more = f" (and {len(lines) - INTEGRITY_LINES_SHOWN} more)" if len(
            lines) > INTEGRITY_LINES_SHOWN else ""
        report.problems.append(f"{err.message}; SQLite's integrity check says: {shown}{more}")
        report.hints.append("the file was left untouched (--repair never rewrites a damaged "
                            "catalogue): restore it from a backup, or pass --db to build a new "
                            "catalogue elsewhere")
        if repair:
            report.remaining = list(report.problems)
    return report


def _check(settings: Settings, report: CheckReport, repair: bool) -> None:
    from clipsearch.indexer import ensure_index

    with Catalogue(settings.db_path, create=False) as cat:
        if cat.quick_check() != ["ok"]:
            raise CatalogueDamagedError(f"the catalogue {settings.db_path} is damaged")
        model = cat.active_model()
        if model is None:
            report.problems.append("nothing indexed yet: the catalogue has no model")
            return
        info = ModelInfo.of(model)
        ids_now, fps_now = cat.indexed_fingerprints(model.id)
        report.indexed = int(ids_now.size)
        indexed_rows = list(cat.images(STATE_INDEXED))
        with_vector = set(ids_now.tolist())
        without_vector = [r.image_id for r in indexed_rows if r.image_id not in with_vector]
        if without_vector:
            report.problems.append(
                f"{len(without_vector)} indexed images have no vector for {model.key}"
            )
        pending = cat.count_by_state().get(STATE_PENDING, 0)
        if pending:
            report.problems.append(
                f"{pending} images wait to be encoded (run `clipsearch index` again)"
            )
        vanished: list[int] = []
        vanished_paths: list[str] = []
        changed = []
        for row in indexed_rows:
            try:
                st = os.stat(row.path)
            except FileNotFoundError:
                vanished.append(row.image_id)
                vanished_paths.append(row.path)
                continue
            except OSError:
                continue
            if not row.same_stat(st):
                changed.append(row.path)
        if vanished:
            report.problems.append(f"{len(vanished)} indexed file"
                                   + (" no longer exists" if len(vanished) == 1
                                      else "s no longer exist")
                                   + f" ({some_paths(vanished_paths)}; `clipsearch index` or "
                                   "`check --repair` "
                                   "marks them missing)")
        if changed:
            report.problems.append(
                f"{len(changed)} file{'' if len(changed) == 1 else 's'} changed since indexing "
                "by size, time or permissions (`clipsearch index` reads "
                f"{'it' if len(changed) == 1 else 'them'} again and encodes only new content)"
            )
        vi = load_index(settings.index_path)
        index_bad = False
        if vi is None:
            index_bad = True
            header = read_index_header(settings.index_path)
            if header is not None and header.get("layout") != FILE_LAYOUT:
                report.problems.append(
                    f"index {settings.index_path} has an older layout (the next search or "
                    "index run rebuilds it)")
            else:
                report.problems.append(
                    f"index {settings.index_path} is damaged" if settings.index_path.exists()
                    else f"index {settings.index_path} is not built yet (the next search or "
                    "index run builds it)")
        elif vi.model_key != model.key:
            index_bad = True
            report.problems.append(f"index was built with another model ({vi.model_key})")
        elif vi.generation != cat.generation() or any(
                d.size for d in index_delta(vi, ids_now, fps_now)):
            index_bad = True
            report.problems.append(
                f"index is stale: {vi.count} vectors, catalogue has {report.indexed}"
            )
        elif vi.kind == KIND_IVFPQ and not vector_file_complete(vi, settings):
            index_bad = True
            report.problems.append(
                f"re-rank vector file {vector_file_path(settings.index_path)} is missing, "
                "damaged or incomplete (searches read the catalogue instead; the next index "
                "run or search rewrites it)")
        elif vi.kind == KIND_IVFPQ:
            wrong = _vector_rows_differing(cat, vi, settings, model.id)
            if wrong:
                index_bad = True
                report.problems.append(
                    f"re-rank vector file {vector_file_path(settings.index_path)} disagrees "
                    f"with the catalogue for {wrong} image{'' if wrong == 1 else 's'} (damaged "
                    "in place; `check --repair` rewrites it)")
        if not repair or not report.problems:
            return
        if cat.readonly:
            report.problems.append(f"cannot repair: {settings.db_path} is read-only")
            return
        with WriterLock(settings.lock_path):
            if vanished:
                cat.mark_missing(vanished)
                report.repaired.append(f"marked {len(vanished)} vanished file"
                                       f"{'' if len(vanished) == 1 else 's'} missing")
            if without_vector:
                cat.mark_pending(without_vector)
                report.repaired.append(
                    f"marked {len(without_vector)} images without vectors for re-encoding "
                    "(the next `clipsearch index` encodes them)"
                )
            dropped = cat.drop_orphan_embeddings()
            if dropped:
                report.repaired.append(f"dropped {dropped} vector{'' if dropped == 1 else 's'} "
                                       "no file uses")
            if index_bad or vanished or without_vector:
                rebuilt = ensure_index(cat, settings, info, model.id, write=True, rebuild=True)
                report.repaired.append(
                    f"rebuilt the index from the catalogue ({rebuilt.count} vectors)"
                )


def _vector_rows_differing(cat: Catalogue, vi: Any, settings: Settings, model_id: int) -> int:
    """How many indexed images the re-rank vector file gives another vector than the
    catalogue's (rows damaged in place, or a damaged row table): every row is read."""
    vf = VectorFile.open(vector_file_path(settings.index_path), vi.vector_token, vi.dim,
                         vi.vector_rows)
    if vf is None:
        return 0
    ids, vecs = cat.indexed_vectors(model_id, vi.dim)
    try:
        rows = vi.rows[np.searchsorted(vi.ids, ids).clip(max=max(vi.ids.size - 1, 0))]
        wrong = 0
        for start in range(0, ids.size, VERIFY_CHUNK_ROWS):
            part = slice(start, start + VERIFY_CHUNK_ROWS)
            got = vf.read_rows(rows[part])
            wrong += int((~np.isclose(got, vecs[part], atol=1e-6).all(axis=1)).sum())
        return wrong
    except OSError:
        return int(ids.size)
    finally:
        vf.close()
