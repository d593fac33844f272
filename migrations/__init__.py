"""Alembic migrations of the catalogue, shipped inside the package as clipsearch.migrations."""
