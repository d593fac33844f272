"""`check`: verify catalogue, index and files against each other; repair what can be."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from clipsearch.catalogue.models import STATE_INDEXED
from clipsearch.catalogue.store import Catalogue, WriterLock
from clipsearch.config import Settings
from clipsearch.encoder import ModelInfo
from clipsearch.imaging import codec_support
from clipsearch.vector_index import load_index


@dataclass
class CheckReport:
    """Findings in plain words, and what --repair did about them."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    codecs: dict[str, bool] = field(default_factory=dict)
    indexed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems or len(self.repaired) >= len(self.problems)


def check_catalogue(settings: Settings, repair: bool = False) -> CheckReport:
    """Check integrity, index agreement and files on disk; with repair, fix what can be."""
    from clipsearch.indexer import ensure_index

    report = CheckReport(codecs=codec_support())
    with Catalogue(settings.db_path, create=False) as cat:
        with cat.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            result = [r[0] for r in raw.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            report.problems.append(
                f"{settings.db_path}: SQLite integrity check failed: {'; '.join(result[:3])}"
            )
            return report
        model = cat.active_model()
        if model is None:
            report.problems.append("nothing indexed yet: the catalogue has no model")
            return report
        info = ModelInfo(model.key, model.spec, model.arch, model.pretrained,
                         model.checkpoint_hash, model.open_clip_version, model.dim)
        ids_now = cat.indexed_ids(model.id)
        report.indexed = int(ids_now.size)
        indexed_rows = list(cat.images(STATE_INDEXED))
        without_vector = report.indexed != len(indexed_rows)
        if without_vector:
            report.problems.append(
                f"{len(indexed_rows) - report.indexed} indexed images have no vector for "
                f"{model.key}"
            )
        vanished = []
        changed = []
        for row in indexed_rows:
            try:
                st = os.stat(row.path)
            except FileNotFoundError:
                vanished.append(row.image_id)
                continue
            except OSError:
                continue
            if st.st_size != row.size or st.st_mtime_ns != row.mtime_ns:
                changed.append(row.path)
        if vanished:
            report.problems.append(f"{len(vanished)} indexed files no longer exist")
        if changed:
            report.problems.append(
                f"{len(changed)} files changed since indexing (run `clipsearch index` again)"
            )
        vi = load_index(settings.index_path)
        index_bad = False
        if vi is None:
            index_bad = True
            report.problems.append(f"index {settings.index_path} is missing or damaged")
        elif vi.model_key != model.key:
            index_bad = True
            report.problems.append(f"index was built with another model ({vi.model_key})")
        elif vi.generation != cat.generation() or set(vi.ids.tolist()) != set(ids_now.tolist()):
            index_bad = True
            report.problems.append(
                f"index is stale: {vi.count} vectors, catalogue has {report.indexed}"
            )
        if not repair or cat.readonly:
            return report
        with WriterLock(settings.lock_path):
            if vanished:
                cat.mark_missing(vanished)
                report.repaired.append(f"marked {len(vanished)} vanished files missing")
            dropped = cat.drop_orphan_embeddings()
            if dropped:
                report.repaired.append(f"dropped {dropped} vectors no file uses")
            if index_bad or vanished:
                ensure_index(cat, settings, info, model.id, write=True)
                report.repaired.append("rebuilt the index from the catalogue")
            if without_vector:
                report.repaired.append("(images without vectors are re-encoded by the next "
                                       "`clipsearch index`)")
            if changed:
                report.repaired.append("(changed files are re-encoded by the next "
                                       "`clipsearch index`)")
    return report
