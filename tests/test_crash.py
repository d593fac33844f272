"""Crash safety: kill `clipsearch index` (SIGKILL, SIGINT) at random points, resume, verify."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.catalogue.store import Catalogue
from clipsearch.config import resolve_settings
from clipsearch.search import SearchOptions, search
from clipsearch.vector_index import load_index


def _make_photos(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = np.full((40, 48, 3), rng.integers(0, 256, 3), np.uint8)
        arr[5:20, 5:30] = rng.integers(0, 256, 3)
        p = root / f"d{i % 7}" / f"img{i:04}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _index_cmd(root: Path, db: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "clipsearch.cli", "index", str(root), "--db", str(db),
            "--model", model, "--batch-size", "8", "-q"]


def _check_invariants(db: Path, photos: list[Path], final: bool) -> None:
    settings = resolve_settings(db=db)
    with Catalogue(db) as cat:
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        dup = con.execute("SELECT path, COUNT(*) FROM images GROUP BY path HAVING COUNT(*) > 1"
                          ).fetchall()
        con.close()
        assert dup == []
        rows = list(cat.images())
        known = {Path(r.path) for r in rows}
        assert known <= set(photos)
        model = cat.active_model()
        if model is None:
            assert not rows
            return
        indexed = {r.image_id for r in rows if r.state == "indexed"}
        assert all(r.state in ("indexed", "pending") for r in rows), {r.state for r in rows}
    # Searches answer at every stop, and bring the index in line with the catalogue.
    resp = search(settings, ["a picture"], SearchOptions(top_k=5))
    assert len(resp.results) == min(5, len(indexed))
    vi = load_index(settings.index_path)
    if indexed:
        assert vi is not None and set(vi.ids.tolist()) == indexed
    if final:
        assert known == set(photos) and len(indexed) == len(photos)


def _indexed_count(db: Path) -> int:
    """Rows the running index has committed so far (0 before the catalogue exists)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM images WHERE state = 'indexed'"
                                   ).fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError:  # no tables yet
        return 0


BATCH = 8


def _kill_and_resume(tmp_path: Path, tiny_model: str, rounds: int, n_photos: int) -> None:
    root = tmp_path / "photos"
    photos = _make_photos(root, n_photos)
    db = tmp_path / "cat.sqlite3"
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    mid_run = 0
    searches_during_runs = 0
    log: list[tuple[int, int, int, int | None]] = []  # (before, target, landed, exit)
    for r in range(rounds):
        before = _indexed_count(db)
        # Kill on progress, not on the clock: once the run has committed a random number of
        # further rows, while some are still left to do.
        # Paced so that later rounds still find work left, and never so close to the end
        # that the run can finish between two looks at the catalogue.
        last = n_photos - 4 * BATCH
        step = max(1, (last - before) // (rounds - r))
        target = min(last, before + rng.randint(1, 2 * step))
        proc = subprocess.Popen(_index_cmd(root, db, tiny_model), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        searcher: subprocess.Popen[bytes] | None = None
        while proc.poll() is None and (count := _indexed_count(db)) < target:
            assert time.monotonic() < deadline, "index run made no progress"
            if searcher is None and count > before:
                # A search while the index run writes: answers from what is committed. In
                # its own process: a thread would hold this process's GIL in long C calls
                # and stall the polling until the run had finished.
                searcher = subprocess.Popen(
                    [sys.executable, "-m", "clipsearch.cli", "search", "a picture", "--db",
                     str(db), "-k", "5", "--paths"], env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
            time.sleep(0.01)
        sig = signal.SIGKILL if r % 2 == 0 else signal.SIGINT
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        # -SIGINT: interrupted while the interpreter was still starting (no handler yet).
        if b"Traceback" in err or (sig == signal.SIGINT and proc.returncode not in (
                0, 1, 130, -signal.SIGINT)):
            pytest.fail(f"SIGINT exit {proc.returncode}: {err.decode()[-500:]}")
        if searcher is not None:
            out, serr = searcher.communicate(timeout=120)
            assert searcher.returncode == 0, serr.decode()[-500:]
            assert 1 <= len(out.splitlines()) <= 5, out
            searches_during_runs += 1
        landed = _indexed_count(db)
        mid_run += before < landed < n_photos and proc.returncode != 0
        log.append((before, target, landed, proc.returncode))
        if db.exists():
            _check_invariants(db, photos, final=False)
    # Most kills land mid-run (between the first and the last batch), not before or after.
    assert mid_run >= max(1, rounds // 2), log
    assert searches_during_runs >= 1
    done = subprocess.run(_index_cmd(root, db, tiny_model), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-800:]
    _check_invariants(db, photos, final=True)
    assert not list(tmp_path.glob("*.tmp"))


def test_kill_and_resume_a_few_times(tmp_path: Path, tiny_model: str) -> None:
    _kill_and_resume(tmp_path, tiny_model, rounds=2, n_photos=100)


@pytest.mark.slow
def test_kill_and_resume_twenty_times(tmp_path: Path, tiny_model: str) -> None:
    _kill_and_resume(tmp_path, tiny_model, rounds=20, n_photos=400)
