"""Engines, sessions and schema migrations for the metadata store (PostgreSQL or SQLite).

Alembic is imported only to migrate or to look up a revision other than `SCHEMA_HEAD`: checking that a database
is current reads Alembic's version table with SQLAlchemy, so a command on a current database never imports it
(about 0.4 s of a CLI command's start-up).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import column, table

from store.errors import SchemaVersionError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

READ_ONLY_OPTION = "omniattr_read_only"

# The newest revision in migrations/versions, known without Alembic; tests/store/test_migrations.py checks it
# against Alembic's own head, so a new migration cannot land without it.
SCHEMA_HEAD = "0002"
# Alembic's default version table (migrations/env.py keeps the default name and schema).
_VERSION_TABLE = table("alembic_version", column("version_num"))


def make_engine(
    url: str, *, echo: bool = False, connect_timeout_s: int | None = None, statement_timeout_s: float | None = None
) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and a busy timeout so two processes can share it.

    On PostgreSQL, `connect_timeout_s` bounds opening a connection and `statement_timeout_s` any one statement
    (lock waits included), so a stopped or hung server fails requests instead of holding them forever.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if (path := sqlite_file(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001 - DBAPI types are untyped
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            # pysqlite's own transaction handling breaks SAVEPOINTs (releasing one commits the outer
            # transaction), so SQLAlchemy emits BEGIN itself (the SQLAlchemy docs' pysqlite recipe).
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):  # noqa: ANN001
            # Writers: IMMEDIATE takes the write lock up front, so concurrent writers queue on the busy
            # timeout instead of failing when a transaction that read first later tries to write.
            # Readers (read_only sessions): a deferred BEGIN takes no lock; WAL gives them a snapshot.
            read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, object] = {}
    if parsed.get_backend_name() == "postgresql":
        if connect_timeout_s is not None:
            connect_args["connect_timeout"] = connect_timeout_s
        if statement_timeout_s is not None:
            connect_args["options"] = f"-c statement_timeout={round(statement_timeout_s * 1000)}"
    return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database or another engine."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit, so callers can return what they wrote.

    `read_only` sessions never block or wait for writers on SQLite (use them for queries only: a write in
    one may fail with "database is locked" under concurrency).
    """
    bind = engine.execution_options(**{READ_ONLY_OPTION: True}) if read_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config for the packaged migrations, pointed at `url` (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    # Alembic's config is ConfigParser-based: a literal '%' in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configured_by_code"] = True
    return config


def _script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    """The newest schema revision in the migration scripts, as Alembic reads them (`SCHEMA_HEAD` without Alembic)."""
    return _script_directory().get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database that was never migrated."""
    with engine.connect() as connection:
        if not inspect(connection).has_table(_VERSION_TABLE.name):
            return None
        return connection.execute(select(_VERSION_TABLE.c.version_num)).scalar_one_or_none()


def _check_known(revision: str | None, url: str) -> None:
    if revision is None or revision == SCHEMA_HEAD:
        return
    from alembic.util.exc import CommandError

    try:
        _script_directory().get_revision(revision)
    except CommandError:
        raise SchemaVersionError(
            f"the database at {make_url(url).render_as_string(hide_password=True)} is at schema revision "
            f"{revision!r}, which this version of omniattr does not know (a newer omniattr probably migrated "
            "it). Nothing was changed. Upgrade omniattr, or point it at another database."
        ) from None


def upgrade_database(url: str, *, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision`; refuses, changing nothing, at an unknown revision."""
    engine = make_engine(url)
    try:
        current = current_revision(engine)
        _check_known(current, url)
    finally:
        engine.dispose()
    if revision == "head" and current == SCHEMA_HEAD:
        return  # already current: no Alembic import or environment run (most of a CLI command's start-up)
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, *, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" drops every table)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def check_schema_current(engine: Engine) -> None:
    """Raise SchemaVersionError unless the database is at the head revision; used at start-up."""
    url = engine.url.render_as_string(hide_password=False)
    revision = current_revision(engine)
    _check_known(revision, url)
    if revision != SCHEMA_HEAD:
        raise SchemaVersionError(
            f"the database is at schema revision {revision!r} but this omniattr needs {SCHEMA_HEAD!r}; "
            "run `omniattr migrate` (or `alembic upgrade head`) first"
        )
