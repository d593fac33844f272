"""The ClipsearchError family: every expected failure, with a message and an optional hint."""

from __future__ import annotations


class ClipsearchError(Exception):
    """An expected failure the CLI reports as `error: message` (+ `hint: ...`), exit 1."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ClipsearchError):
    """The request itself is malformed (empty query, bad filter, bad weight)."""


class CatalogueError(ClipsearchError):
    """The catalogue cannot be opened, migrated or written."""


class CatalogueDamagedError(CatalogueError):
    """The catalogue file is corrupt (SQLite: malformed, not a database); never overwritten."""


class CatalogueBusyError(CatalogueError):
    """Another index run holds the catalogue's writer lock."""


class ModelError(ClipsearchError):
    """A model cannot be found, loaded or used."""


class ModelMismatchError(ModelError):
    """A request names a model other than the one the catalogue was built with."""


class IndexError_(ClipsearchError):
    """The FAISS index cannot be built, read or written."""


class ImageError(ClipsearchError):
    """One image cannot be read or decoded; recorded per file, never fatal to a run."""
