"""The catalogue: SQLite via SQLAlchemy 2, schema by Alembic; the source of truth."""
