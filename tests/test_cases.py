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


def _normal_user() -> tuple[int, int]:
    """(uid, gid) of an unprivileged account for root to act as: nobody, else one made now."""
    import pwd
    import shutil as sh

    for name in ("nobody", "clipsearch-test"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
    if sh.which("useradd") is None:
        pytest.skip("running as root, no unprivileged account and no useradd to make one")
    made = subprocess.run(["useradd", "--system", "--no-create-home", "clipsearch-test"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and useradd failed: {made.stderr.strip()}")
    entry = pwd.getpwnam("clipsearch-test")
    return entry.pw_uid, entry.pw_gid


def test_permission_cases_as_a_normal_user(tmp_path: Path, tiny_encoder) -> None:  # type: ignore[no-untyped-def]
    """The cases' unreadable file and folder, as a normal user sees them.

    As root, this process drops to an unprivileged effective uid for the run (the
    interpreter lives under /root, mode 0700, so a separate process of that user could not
    even start it); everything it needs is imported first, while still root."""
    import runpy
    import shutil
    import tempfile

    from clipsearch.config import resolve_settings

    if os.geteuid() != 0:
        pytest.skip("not root: test_cases_index_as_expected already runs the permission cases")
    uid, gid = _normal_user()
    cases_main = runpy.run_path(str(_cases_script()), run_name="cases")["main"]
    factory = lambda spec: tiny_encoder  # noqa: E731 - loaded as root, before dropping rights
    warm = tmp_path / "warm"
    warm.mkdir()
    np.save(warm / "not-an-image.npy", np.zeros(1))
    (warm / "x").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(warm / "x" / "a.png")
    run_index(resolve_settings(db=tmp_path / "warm.sqlite3"), [str(warm)],
              encoder_factory=factory)  # imports every lazily imported module ...
    from clipsearch.imaging import codec_support

    Image.init()  # ... and every Pillow plugin (Pillow imports them on first use)
    codec_support()
    base = Path(tempfile.mkdtemp(prefix="clipsearch-perms-"))
    base.chmod(0o777)
    try:
        os.setegid(gid)
        os.seteuid(uid)
        try:
            cases_main(base / "cases")
            spec = json.loads((base / "cases" / "expected.json").read_text())
            settings = resolve_settings(db=base / "db" / "c.sqlite3", workers=2, batch_size=4)
            run_index(settings, [str(base / "cases")], encoder_factory=factory)
            with Catalogue(settings.db_path) as cat:
                rows = {os.path.relpath(r.path, base / "cases"): r for r in cat.images()}
        finally:
            os.seteuid(0)
            os.setegid(0)
        perms = {rel: expect for rel, expect in spec["files"].items() if rel.startswith("perms/")}
        assert perms, "make_cases wrote no permission cases for a normal user"
        for rel, expect in spec["files"].items():  # every case, as that user sees it
            row = rows.get(rel)
            outcome = "skipped" if row is None else row.state
            assert outcome in set(expect.split("_or_")), f"{rel}: expected {expect}, got {outcome}"
            if outcome == "failed":
                assert row is not None and row.error, f"{rel}: failed without a reason"
                if rel in perms:
                    assert "ermission" in row.error, row.error
    finally:
        shutil.rmtree(base, ignore_errors=True)
