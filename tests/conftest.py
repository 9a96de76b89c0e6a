"""Fixtures shared by every test package: throwaway databases on the real PostgreSQL server and SQLite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from omniattr.testing import create_throwaway_postgres, drop_throwaway_postgres
from store.database import make_engine, make_session_factory, upgrade_database
from store.tables import Base

# Tests never reach a model hub: every model is built from a config or loaded from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "OMNIATTR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _admin_engine():
    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the PostgreSQL server on loopback; fails loudly (no skip) when it is down."""
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({error.__class__.__name__}). "
            "Start it (.ci/run does) or set OMNIATTR_TEST_POSTGRES_URL."
        )
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path) -> Iterator[str]:
    """An empty, never-migrated database on each engine the store supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'omniattr.sqlite3'}"
        return
    admin_url = request.getfixturevalue("postgres_server")
    url = create_throwaway_postgres(admin_url)
    try:
        yield url
    finally:
        drop_throwaway_postgres(admin_url, url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def migrated_engine(request, tmp_path_factory):
    """An engine on a database migrated to head, shared by one module's tests on each engine."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'omniattr.sqlite3'}"
        upgrade_database(url)
        engine = make_engine(url)
        yield engine
        engine.dispose()
        return
    admin_url = request.getfixturevalue("postgres_server")
    url = create_throwaway_postgres(admin_url)
    upgrade_database(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()
    drop_throwaway_postgres(admin_url, url)


@pytest.fixture
def session(migrated_engine) -> Iterator[Session]:
    """A session on a migrated database whose rows are all deleted after the test."""
    factory = make_session_factory(migrated_engine)
    with factory() as session:
        yield session
        session.rollback()
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
