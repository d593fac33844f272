"""A per-user cache of derived, ready-to-use weights (the numpy text tower, BPE tables).

Cold searches load the text tower on every process start. Reading it from the model's
checkpoint means converting dtypes and transposing ~250 MB each time; the cache keeps the
arrays exactly as the numpy tower uses them in one flat file that is memory-mapped, so a
start-up costs page-cache lookups instead of copies. Entries are keyed by the source file's
path, size and mtime (and a format version): an edited or replaced source is never served
from a stale entry. The cache is an optimisation only: any error reading or writing it
falls back to the slow path, and a read-only or missing cache folder is fine.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

PACK_MAGIC = b"CSPACK01"
_ALIGN = 64
T = TypeVar("T")


def cache_dir() -> Path:
    """$CLIPSEARCH_CACHE, else $XDG_CACHE_HOME/clipsearch, else ~/.cache/clipsearch."""
    explicit = os.environ.get("CLIPSEARCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "clipsearch"


def entry_path(source: str, kind: str, suffix: str) -> Path | None:
    """Where the cache keeps `kind` derived from `source`; None if the source is gone."""
    try:
        st = os.stat(source)
    except OSError:
        return None
    key = "\0".join((os.path.realpath(source), str(st.st_size), str(st.st_mtime_ns), kind))
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir() / f"{kind}-{digest}{suffix}"


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pack(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Arrays in one file: magic, header length, JSON header, 64-byte aligned raw data."""
    header: dict[str, list[Any]] = {}
    offset = 0
    for name, arr in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        header[name] = [arr.dtype.str, list(arr.shape), offset]
        offset += arr.nbytes
    raw = json.dumps({"arrays": header, "data_bytes": offset}).encode()
    start = -(-(len(PACK_MAGIC) + 8 + len(raw)) // _ALIGN) * _ALIGN

    def write(fh: Any) -> None:
        fh.write(PACK_MAGIC + len(raw).to_bytes(8, "little") + raw)
        for name, arr in arrays.items():
            fh.seek(start + header[name][2])
            fh.write(np.ascontiguousarray(arr).data.cast("B"))
        fh.truncate(start + offset)

    _write_atomically(path, write)


def read_pack(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a pack, memory-mapped read-only. ValueError if it is not a whole pack."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    head = len(PACK_MAGIC) + 8
    if len(mm) < head or bytes(mm[: len(PACK_MAGIC)]) != PACK_MAGIC:
        raise ValueError(f"{path}: not a weights pack")
    size = int.from_bytes(bytes(mm[len(PACK_MAGIC): head]), "little")
    meta = json.loads(bytes(mm[head: head + size]))
    start = -(-(head + size) // _ALIGN) * _ALIGN
    if len(mm) != start + int(meta["data_bytes"]):
        raise ValueError(f"{path}: truncated weights pack")
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, offset) in meta["arrays"].items():
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = mm[start + offset: start + offset + n].view(dt).reshape(shape)
    return out


def cached_arrays(source: str, kind: str, build: Callable[[], dict[str, np.ndarray]],
                  refresh: bool = False) -> dict[str, np.ndarray]:
    """`build()`'s arrays, memory-mapped from the cache when an entry for source exists;
    otherwise (or with `refresh`: the entry is suspect) built and, best effort, stored for
    the next process."""
    path = entry_path(source, kind, ".pack")
    if path is not None and path.exists() and not refresh:
        try:
            return read_pack(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged or partial: rebuilt below
    arrays = build()
    if path is not None:
        try:
            write_pack(path, arrays)
        except OSError:
            pass
    return arrays


def cached_marshal(source: str, kind: str, build: Callable[[], T]) -> T:
    """`build()`'s value (plain dicts, tuples, strings, numbers) via a marshal file."""
    path = entry_path(source, kind, ".marshal")
    if path is not None and path.exists():
        try:
            return marshal.loads(path.read_bytes())  # type: ignore[no-any-return]
        except (OSError, ValueError, EOFError, TypeError):
            pass
    value = build()
    if path is not None:
        try:
            data = marshal.dumps(value)  # type: ignore[arg-type]
            _write_atomically(path, lambda fh: fh.write(data))
        except (OSError, ValueError):
            pass
    return value
