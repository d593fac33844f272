"""Settings: one resolution point (CLI flag > CLIPSEARCH_* environment > default)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32-256:datacomp_s34b_b86k"
BUNDLED_MODEL = "emoji-mini"
DEFAULT_TOP_K = 10
DEFAULT_BATCH_SIZE = 32
DEFAULT_DECODE_TIMEOUT_S = 120.0
CATALOGUE_FILENAME = "catalogue.sqlite3"
INDEX_FILENAME = "index.faiss"
FLAT_INDEX_MAX_IMAGES = 50_000
ENV_PREFIX = "CLIPSEARCH_"


def default_home() -> Path:
    """Per-user data folder: $CLIPSEARCH_HOME, else $XDG_DATA_HOME/clipsearch."""
    explicit = os.environ.get(ENV_PREFIX + "HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "clipsearch"


@dataclass(frozen=True)
class Settings:
    """Where the catalogue lives and how to run the model."""

    db_path: Path
    model: str | None = None
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 0
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    """Per-file limit on reading + decoding; a slower file is recorded as failed."""

    @property
    def index_path(self) -> Path:
        """The FAISS index beside the catalogue: its whole name plus .faiss (catalogues
        p.db and p.sqlite3 in one folder shared p.faiss when the stem was used)."""
        return self.db_path.with_name(self.db_path.name + ".faiss")

    @property
    def lock_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + ".lock")


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name)
    return value if value else None


DERIVED_SUFFIXES = (".faiss", ".vectors", ".lock", "-wal", "-shm", "-journal")
"""Endings of the files beside a catalogue (index, re-rank vectors, lock, SQLite's own)."""


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_settings(
    db: Path | None = None,
    model: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> Settings:
    """Merge CLI values over CLIPSEARCH_* environment over defaults."""
    db_value = db or (Path(v) if (v := _env("DB")) else None)
    if db_value is None:
        db_value = default_home() / CATALOGUE_FILENAME
    as_folder = str(db_value).endswith(("/", os.sep))  # Path() drops the trailing slash
    db_value = Path(db_value).expanduser()
    if as_folder or db_value.is_dir():
        db_value = db_value / CATALOGUE_FILENAME
    if db_value.name.endswith(DERIVED_SUFFIXES):
        from clipsearch.errors import UsageError

        raise UsageError(f"--db {db_value}: a catalogue name may not end in "
                         f"{', '.join(DERIVED_SUFFIXES)}, the names of the files clipsearch "
                         "keeps beside it (it would overwrite one with the other)",
                         hint="name it like catalogue.sqlite3")
    workers_value = workers if workers is not None else int(_env("WORKERS") or 0)
    batch_value = batch_size or int(_env("BATCH_SIZE") or DEFAULT_BATCH_SIZE)
    if workers_value < 0 or batch_value < 1:
        from clipsearch.errors import UsageError

        raise UsageError(f"workers must be 0 or more and batch size at least 1 "
                         f"(got {workers_value} and {batch_value})")
    device_value = device or _env("DEVICE") or "auto"
    if not DEVICE_PATTERN.fullmatch(device_value):
        from clipsearch.errors import UsageError

        raise UsageError(f"--device {device_value}: not a device",
                         hint="use auto, cpu, cuda, cuda:N or mps")
    return Settings(
        db_path=db_value,
        model=model or _env("MODEL"),
        device=device_value,
        batch_size=batch_value,
        workers=workers_value,
        decode_timeout_s=_positive_float(_env("DECODE_TIMEOUT"), DEFAULT_DECODE_TIMEOUT_S),
    )


def _positive_float(raw: str | None, default: float) -> float:
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if value > 0 else default
