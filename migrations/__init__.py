"""Alembic migrations for the metadata store (PostgreSQL and SQLite)."""
