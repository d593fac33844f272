"""ORM tables of the catalogue (the migrations in migrations/ create exactly these)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from clipsearch.catalogue.schema import (  # noqa: F401 (re-exported)
    STATE_FAILED,
    STATE_INDEXED,
    STATE_MISSING,
    STATE_PENDING,
    STATES,
)


class Base(DeclarativeBase):
    pass


class Root(Base):
    """A folder (or file) the user asked to index."""

    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    added_at: Mapped[float] = mapped_column(Float)


class ModelRecord(Base):
    """A model that produced vectors: architecture, weights identity, library version."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    spec: Mapped[str] = mapped_column(String)
    arch: Mapped[str] = mapped_column(String)
    pretrained: Mapped[str | None] = mapped_column(String, nullable=True)
    checkpoint_hash: Mapped[str | None] = mapped_column(String, nullable=True)
    open_clip_version: Mapped[str] = mapped_column(String)
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class ImageRecord(Base):
    """One image file: identity on disk, what was decoded, and its indexing state."""

    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_state", "state"),
        Index("ix_images_content_hash", "content_hash"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    content_hash: Mapped[str | None] = mapped_column(String, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    format: Mapped[str | None] = mapped_column(String, nullable=True)
    captured_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class Embedding(Base):
    """One vector per (file content, model): moved and duplicate files share it."""

    __tablename__ = "embeddings"
    content_hash: Mapped[str] = mapped_column(String, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Meta(Base):
    """Catalogue-wide settings (the active model, ...)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageLabel(Base):
    """The label zero-shot classification gave an image, with its confidence."""

    __tablename__ = "image_labels"
    __table_args__ = (Index("ix_image_labels_label", "label"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String)
    confidence: Mapped[float] = mapped_column(Float)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    classified_at: Mapped[float] = mapped_column(Float)
