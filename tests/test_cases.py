"""The shared awkward-files cases (../shared/cases/make_cases.py) index exactly as expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipsearch.catalogue.store import Catalogue
from clipsearch.indexer import run_index
from clipsearch.search import similar

CASES_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "cases" / "make_cases.py"


def _cases_script() -> Path:
    env = os.environ.get("CLIPSEARCH_CASES_SCRIPT")
    path = Path(env) if env else CASES_SCRIPT
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"shared cases script not found at {path} (CI must run them)")
        pytest.skip(f"shared cases script not found at {path}")
    return path


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cases") / "cases"
    subprocess.run([sys.executable, str(_cases_script()), str(out)], check=True,
                   capture_output=True)
    return out


def test_cases_index_as_expected(cases_dir: Path, settings) -> None:  # type: ignore[no-untyped-def]
    spec = json.loads((cases_dir / "expected.json").read_text())
    report = run_index(settings, [str(cases_dir)])
    with Catalogue(settings.db_path) as cat:
        rows = {os.path.relpath(r.path, cases_dir): r for r in cat.images()}
        model = cat.active_model()
        assert model is not None
        ids, vecs = cat.indexed_vectors(model.id, model.dim)
    for rel, expect in spec["files"].items():
        allowed = set(expect.split("_or_"))
        row = rows.get(rel)
        outcome = "skipped" if row is None else row.state
        assert outcome in allowed, f"{rel}: expected {expect}, got {outcome}"
        if outcome == "failed":
            assert row is not None and row.error, f"{rel}: failed without a reason"
    # Nothing outside the list (what symlink loops lead to) is catalogued, nothing twice.
    assert set(rows) <= set(spec["files"]), set(rows) - set(spec["files"])
    assert len(ids) == len(set(ids.tolist())) == report.indexed_total
    # Twins: the same picture stored two ways gives near-identical vectors.
    by_path = {os.path.relpath(rows_path, cases_dir): i for i, rows_path in
               ((r.image_id, r.path) for r in rows.values())}
    index_of = {int(i): n for n, i in enumerate(ids)}
    for a, b in spec["twins"]:
        va, vb = vecs[index_of[by_path[a]]], vecs[index_of[by_path[b]]]
        assert float(np.dot(va, vb)) >= 0.95, (a, b)


def test_twin_is_top_similar_hit(cases_dir: Path, settings) -> None:  # type: ignore[no-untyped-def]
    spec = json.loads((cases_dir / "expected.json").read_text())
    run_index(settings, [str(cases_dir)])
    for a, b in spec["twins"]:
        resp = similar(settings, str(cases_dir / a))
        assert resp.results, a
        assert resp.results[0].path == str(cases_dir / b)
        assert all(r.path != str(cases_dir / a) for r in resp.results)


def test_rerun_changes_nothing(cases_dir: Path, settings) -> None:  # type: ignore[no-untyped-def]
    first = run_index(settings, [str(cases_dir)])
    second = run_index(settings, [str(cases_dir)])
    assert second.unchanged == first.scanned
    assert second.new == second.changed == second.encoded == second.missing == 0
    assert second.failed_total == 0  # failed files are not retried unless they change
