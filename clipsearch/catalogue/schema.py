"""Names the catalogue's SQL shares with the ORM tables in models.py, without importing
SQLAlchemy: image states, the schema revision, and the columns of each table."""

from __future__ import annotations

STATE_PENDING = "pending"
STATE_INDEXED = "indexed"
STATE_FAILED = "failed"
STATE_MISSING = "missing"
STATES = (STATE_PENDING, STATE_INDEXED, STATE_FAILED, STATE_MISSING)

SCHEMA_HEAD = "0003_image_ctime"
"""The newest migration in migrations/versions (a test compares it with Alembic's head)."""

IMAGE_COLUMNS = frozenset({
    "id", "path", "size", "mtime_ns", "ctime_ns", "content_hash", "width", "height", "format",
    "captured_at", "state", "error", "attempts", "updated_at",
})
MODEL_COLUMNS = ("id", "key", "spec", "arch", "pretrained", "checkpoint_hash",
                 "open_clip_version", "dim", "created_at")
