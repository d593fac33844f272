"""What a catalogue holds: counts per state, model, index freshness, failures."""

from __future__ import annotations

from typing import Any

from clipsearch.catalogue.store import Catalogue
from clipsearch.config import Settings
from clipsearch.crawler import path_fields
from clipsearch.vector_index import id_digest, load_index


def catalogue_status(settings: Settings) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the catalogue at settings.db_path."""
    with Catalogue(settings.db_path, create=False) as cat:
        model = cat.active_model()
        vi = load_index(settings.index_path)
        generation = cat.generation()
        return {
            **path_fields(str(settings.db_path), "catalogue"),
            "model": None if model is None else {
                "spec": model.spec,
                "key": model.key,
                "arch": model.arch,
                "pretrained": model.pretrained,
                "checkpoint_hash": model.checkpoint_hash,
                "open_clip_version": model.open_clip_version,
                "dim": model.dim,
            },
            "counts": cat.count_by_state(),
            "index": {
                **path_fields(str(settings.index_path)),
                "kind": vi.kind if vi else "none",
                "count": vi.count if vi else 0,
                "fresh": bool(vi and model and vi.model_key == model.key
                              and vi.generation == generation
                              and id_digest(vi.ids) == cat.indexed_id_digest(model.id)),
            },
            "roots": [path_fields(r) for r in cat.roots()],
            "failures": [
                {**path_fields(p), "reason": r, "attempts": a}
                for p, r, a in cat.failures()
            ],
        }
