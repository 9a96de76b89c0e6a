"""Alembic environment: runs the packaged migrations on PostgreSQL or SQLite."""

from alembic import context

from store.database import make_engine
from store.tables import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    """The URL set by code (store.database.alembic_config), else the one from OMNIATTR_* settings."""
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from omniattr.settings import Settings  # entry point: the only place here that reads settings

    return Settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_database_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copy, drop and rename; with foreign keys on, the drop would cascade
            # to the child rows (images of a rebuilt collections table). The pragma only works outside a
            # transaction, so it goes to the driver connection before Alembic begins one.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things: batch mode rebuilds tables, which keeps one migration for both.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
