"""The Alembic migrations on the real PostgreSQL server and on SQLite: upgrade, no drift, round trip."""

from __future__ import annotations

import re

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from omniattr.domain import GenerationStatus, ImageStatus, IndexStatus, JobStatus, ShardStatus
from store.database import (
    SCHEMA_HEAD,
    alembic_config,
    check_schema_current,
    current_revision,
    downgrade_database,
    head_revision,
    make_engine,
    upgrade_database,
)
from store.errors import SchemaVersionError
from store.tables import Base

EXPECTED_TABLES = {
    "collections",
    "images",
    "attributes",
    "encoder_models",
    "collection_attributes",
    "jobs",
    "job_shards",
    "generations",
    "api_keys",
}


def _drift(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


@pytest.mark.slow
def test_upgrade_creates_every_table_with_no_drift(empty_database_url):
    upgrade_database(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        assert set(inspect(engine).get_table_names()) >= EXPECTED_TABLES
        assert current_revision(engine) == head_revision()
        assert _drift(engine) == []
        check_schema_current(engine)  # raises if not at head
        command.check(alembic_config(empty_database_url))  # the CLI's `alembic check`
    finally:
        engine.dispose()


@pytest.mark.slow
def test_downgrade_to_base_and_upgrade_again(empty_database_url):
    upgrade_database(empty_database_url)
    downgrade_database(empty_database_url, revision="base")
    engine = make_engine(empty_database_url)
    try:
        assert EXPECTED_TABLES.isdisjoint(inspect(engine).get_table_names())
        assert current_revision(engine) is None
        upgrade_database(empty_database_url)
        assert set(inspect(engine).get_table_names()) >= EXPECTED_TABLES
        assert _drift(engine) == []
    finally:
        engine.dispose()


def test_schema_head_constant_is_alembics_head():
    """SCHEMA_HEAD lets start-up check the schema without importing Alembic; a new migration must move it."""
    assert head_revision() == SCHEMA_HEAD, "a new migration: set store.database.SCHEMA_HEAD to its revision"


def test_unknown_revision_is_refused_and_nothing_changes(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            connection.execute(text("INSERT INTO alembic_version VALUES ('f00dfeed9999')"))
        with pytest.raises(SchemaVersionError, match="f00dfeed9999.*does not know.*Nothing was changed"):
            upgrade_database(empty_database_url)
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert current_revision(engine) == "f00dfeed9999"
        with pytest.raises(SchemaVersionError, match="does not know"):
            check_schema_current(engine)
    finally:
        engine.dispose()


def test_unmigrated_database_is_reported_at_startup(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        with pytest.raises(SchemaVersionError, match="omniattr migrate"):
            check_schema_current(engine)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_migrated_status_checks_allow_exactly_the_domain_statuses(empty_database_url):
    """A status added to an omniattr.domain enum without a migration fails here (autogenerate ignores CHECKs)."""
    upgrade_database(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        inspector = inspect(engine)
        for table, statuses in [
            ("images", ImageStatus),
            ("jobs", JobStatus),
            ("job_shards", ShardStatus),
            ("generations", GenerationStatus),
            ("collection_attributes", IndexStatus),
        ]:
            checks = {check["name"]: check["sqltext"] for check in inspector.get_check_constraints(table)}
            allowed = set(re.findall(r"'([a-z_]+)'", checks[f"ck_{table}_status"]))
            assert allowed == {status.value for status in statuses}, table
    finally:
        engine.dispose()
