"""rclip (PyPI) as an offline baseline: its own virtual environment, a random-weight
ViT-B-32-256 exported to ONNX where rclip looks for its model, its SQLite filled directly with
vectors, and whole-process / in-process runs of it. See ../shared/notes/rclip-baseline.md.

Usage: python benchmarks/rclip_baseline.py [--data DIR]   (sets everything up, runs one query)
Everything lives under benchmarks/out/ (the virtual environments) and DATA/rclip-model/ (the
ONNX export, RCLIP_DATADIR's model part); nothing contacts a model hub.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
RCLIP_VERSION = "3.3.0"
RCLIP_VENV = OUT / "rclip-venv"
EXPORT_VENV = OUT / "export-venv"  # the system torch/open_clip plus the onnx package
MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
TOKENIZER_VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"


def _bin(env_dir: Path, name: str) -> Path:
    return env_dir / "bin" / name


def _pip_install(env_dir: Path, packages: Sequence[str], system_site: bool) -> None:
    if not _bin(env_dir, "python").exists():
        venv.EnvBuilder(with_pip=True, system_site_packages=system_site).create(env_dir)
    subprocess.run([str(_bin(env_dir, "python")), "-m", "pip", "install", "-q", *packages],
                   check=True, stdout=subprocess.DEVNULL)


def ensure_venvs() -> Path:
    """rclip in its own environment (created if missing); returns its python."""
    py = _bin(RCLIP_VENV, "python")
    probe = [str(py), "-c", f"import importlib.metadata as m; assert m.version('rclip') == "
             f"'{RCLIP_VERSION}'"]
    if not py.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        _pip_install(RCLIP_VENV, [f"rclip=={RCLIP_VERSION}", "py-spy"], system_site=False)
    export_py = _bin(EXPORT_VENV, "python")
    if not export_py.exists() or subprocess.run([str(export_py), "-c", "import onnx, torch"],
                                                capture_output=True).returncode != 0:
        _pip_install(EXPORT_VENV, ["onnx"], system_site=True)
    return py


_EXPORT = r"""
import sys, warnings, torch, open_clip
from safetensors.torch import load_file
warnings.filterwarnings("ignore")
torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
weights, out = sys.argv[1], sys.argv[2]
model = open_clip.create_model("ViT-B-32-256")
model.load_state_dict(load_file(weights))
model.eval()

class Visual(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, input): return self.m.encode_image(input)

class Textual(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, input): return self.m.encode_text(input)

axes = {"input": {0: "batch"}, "output": {0: "batch"}}
with torch.no_grad():
    torch.onnx.export(Visual(model), (torch.zeros(1, 3, 256, 256),), out + "/visual.onnx",
                      opset_version=18, input_names=["input"], output_names=["output"],
                      dynamic_axes=axes, dynamo=False)
    torch.onnx.export(Textual(model), (torch.zeros(1, 77, dtype=torch.int64),),
                      out + "/textual.onnx", opset_version=18, input_names=["input"],
                      output_names=["output"], dynamic_axes=axes, dynamo=False)
"""


def ensure_model(data: Path, hub_cache: Path) -> Path:
    """The hub cache's random ViT-B-32-256 as rclip's ONNX model; returns the model folder
    (copy or link it into every RCLIP_DATADIR with `datadir_with_model`)."""
    from datasets import HUB_REPO

    model_root = data / "rclip-model"
    target = model_root / MODEL_SUBDIR
    if (target / "textual.onnx").exists() and (model_root / TOKENIZER_VOCAB).exists():
        return model_root
    ensure_venvs()
    target.mkdir(parents=True, exist_ok=True)
    weights = next((hub_cache / HUB_REPO / "snapshots").glob("*/open_clip_model.safetensors"))
    subprocess.run([str(_bin(EXPORT_VENV, "python")), "-c", _EXPORT, str(weights), str(target)],
                   check=True)
    import open_clip

    vocab = model_root / TOKENIZER_VOCAB
    vocab.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", vocab)
    return model_root


def datadir_with_model(datadir: Path, model_root: Path, fresh_db: bool) -> Path:
    """An RCLIP_DATADIR whose model files are symlinks into model_root."""
    datadir.mkdir(parents=True, exist_ok=True)
    for rel in (MODEL_SUBDIR, "tokenizer"):
        link = datadir / rel
        if not link.exists():
            link.symlink_to(model_root / rel, target_is_directory=True)
    if fresh_db:
        for p in datadir.glob("db.sqlite3*"):
            p.unlink()
    return datadir


def rclip_env(datadir: Path) -> dict[str, str]:
    return dict(os.environ, RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1",
                TQDM_DISABLE="1")


# Linux carries a process's peak RSS across fork+exec, so a child of a big benchmark process
# would report at least the parent's size. A small launcher process forks the command instead,
# times it and reads its own child's rusage.
_LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(out, "w") as fh:
    json.dump({"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024,
               "cpu_s": ru.ru_utime + ru.ru_stime, "rc": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_measured(cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None
                 ) -> dict[str, Any]:
    """Run one whole process: wall seconds, its own peak RSS (MB) and CPU seconds, output."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, fh.name, *cmd], env=env,
                              cwd=cwd, capture_output=True, text=True)
        stats = json.loads(Path(fh.name).read_text() or "{}")
    if proc.returncode != 0 or stats.get("rc") != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({stats.get('rc')}): "
                           f"{proc.stderr[-2000:]}")
    return {**stats, "stdout": proc.stdout, "stderr": proc.stderr}


def rclip_command(query: str, top: int = 10, index: bool = False) -> list[str]:
    cmd = [str(_bin(RCLIP_VENV, "rclip")), "--top", str(top), "--filepath-only"]
    if not index:
        cmd.append("--no-indexing")
    return cmd + [query]


def create_db(db_path: Path) -> None:
    """An empty database in rclip's current schema, made by rclip's own code."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    for p in db_path.parent.glob(db_path.name + "*"):
        p.unlink()
    subprocess.run([str(_bin(RCLIP_VENV, "python")), "-c",
                    "import sys; from rclip.db import DB; DB(sys.argv[1]).close()", str(db_path)],
                   check=True)


def fill_db(db_path: Path, paths: Sequence[str], vectors: np.ndarray,
            mtimes: Sequence[float] | None = None, sizes: Sequence[int] | None = None) -> None:
    """Insert images as rclip's indexer would (float32 BLOBs), without running its model."""
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA synchronous=OFF")
    chunk = 50_000
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for start in range(0, len(paths), chunk):
        rows = [(paths[i], mtimes[i] if mtimes is not None else 0.0,
                 sizes[i] if sizes is not None else 1000, vectors[i].tobytes(), f"h{i}")
                for i in range(start, min(len(paths), start + chunk))]
        con.executemany("INSERT INTO images(deleted, indexing, filepath, modified_at, size, "
                        "vector, hash) VALUES (NULL, NULL, ?, ?, ?, ?, ?)", rows)
        con.commit()
    con.close()


_IN_PROCESS = r"""
import json, sys, time
from rclip import db, main, model
datadir, folder, queries, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
m = model.Model(); m.ensure_downloaded()
r = main.RClip(model_instance=m, database=db.DB(datadir + "/db.sqlite3"), indexing_batch_size=8,
               exclude_dirs=None)
r.search(queries[0], folder, 10)  # warm: text session created, page cache hot
times = []
for _ in range(repeats):
    for q in queries:
        t = time.perf_counter(); r.search(q, folder, 10); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def in_process_query_s(datadir: Path, folder: str, queries: Sequence[str], repeats: int = 1
                       ) -> list[float]:
    """rclip's own search call with its model loaded (what a long-lived caller would see)."""
    res = run_measured([str(_bin(RCLIP_VENV, "python")), "-c", _IN_PROCESS, str(datadir), folder,
                        json.dumps(list(queries)), str(repeats)], rclip_env(datadir))
    return [float(x) for x in json.loads(str(res["stdout"]).splitlines()[-1])]


def main() -> None:
    import argparse
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from datasets import make_hub_cache

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipsearch-bench")
    args = ap.parse_args()
    ensure_venvs()
    model_root = ensure_model(args.data, make_hub_cache(args.data / "hub"))
    datadir = datadir_with_model(args.data / "rclip-smoke", model_root, fresh_db=True)
    folder = args.data / "rclip-smoke" / "photos"
    folder.mkdir(exist_ok=True)
    create_db(datadir / "db.sqlite3")
    vecs = np.random.default_rng(0).standard_normal((100, 512)).astype(np.float32)
    fill_db(datadir / "db.sqlite3", [str(folder / f"{i}.jpg") for i in range(100)], vecs)
    res = run_measured(rclip_command("a dog on a beach", 3), rclip_env(datadir), cwd=folder)
    print(res["stdout"], f"{res['wall_s']:.2f} s, {res['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
