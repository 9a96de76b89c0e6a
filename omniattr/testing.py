"""Throwaway PostgreSQL databases for the tests and the benchmarks (both need one; neither imports the other).

Not used by the product: an import-linter contract keeps every product package off it.
"""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def create_throwaway_postgres(admin_url: str) -> str:
    """Create an empty database with a unique name on the server at `admin_url` and return its URL."""
    name = f"omniattr_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_throwaway_postgres(admin_url: str, url: str) -> None:
    """Drop a database made by create_throwaway_postgres, closing its leftover connections."""
    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
            {"name": name},
        )
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()
