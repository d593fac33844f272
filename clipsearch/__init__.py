"""clipsearch: find pictures by meaning, with CLIP embeddings, a SQLite catalogue and FAISS."""

__version__ = "0.1.0"
