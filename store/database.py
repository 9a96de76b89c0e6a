"""Engines, sessions and schema migrations for the metadata store (PostgreSQL or SQLite)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from store.errors import SchemaVersionError

READ_ONLY_OPTION = "omniattr_read_only"


def make_engine(
    url: str, *, echo: bool = False, connect_timeout_s: int | None = None, statement_timeout_s: float | None = None
) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and a busy timeout so two processes can share it.

    On PostgreSQL, `connect_timeout_s` bounds opening a connection and `statement_timeout_s` any one statement
    (lock waits included), so a stopped or hung server fails requests instead of holding them forever.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
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


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit, so callers can return what they wrote.

    `read_only` sessions never block or wait for writers on SQLite (use them for queries only: a write in
    one may fail with "database is locked" under concurrency).
    """
    bind = engine.execution_options(**{READ_ONLY_OPTION: True}) if read_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config for the packaged migrations, pointed at `url` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    # Alembic's config is ConfigParser-based: a literal '%' in a password must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configured_by_code"] = True
    return config


def head_revision() -> str:
    """The newest schema revision this code knows."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database that was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _check_known(revision: str | None, script: ScriptDirectory, url: str) -> None:
    if revision is None:
        return
    try:
        script.get_revision(revision)
    except CommandError:
        raise SchemaVersionError(
            f"the database at {make_url(url).render_as_string(hide_password=True)} is at schema revision "
            f"{revision!r}, which this version of omniattr does not know (a newer omniattr probably migrated "
            "it). Nothing was changed. Upgrade omniattr, or point it at another database."
        ) from None


def upgrade_database(url: str, *, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision`; refuses, changing nothing, at an unknown revision."""
    config = alembic_config(url)
    script = ScriptDirectory.from_config(config)
    engine = make_engine(url)
    try:
        current = current_revision(engine)
        _check_known(current, script, url)
    finally:
        engine.dispose()
    if revision == "head" and current == script.get_current_head():
        return  # already current: skip Alembic's environment run (most of a CLI command's start-up)
    command.upgrade(config, revision)


def downgrade_database(url: str, *, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" drops every table)."""
    command.downgrade(alembic_config(url), revision)


def check_schema_current(engine: Engine) -> None:
    """Raise SchemaVersionError unless the database is at the head revision; used at start-up."""
    url = engine.url.render_as_string(hide_password=False)
    revision = current_revision(engine)
    script = ScriptDirectory.from_config(alembic_config(url))
    _check_known(revision, script, url)
    head = script.get_current_head()
    if revision != head:
        raise SchemaVersionError(
            f"the database is at schema revision {revision!r} but this omniattr needs {head!r}; "
            "run `omniattr migrate` (or `alembic upgrade head`) first"
        )
