"""ids of collections and images are never reused (SQLite AUTOINCREMENT)

A vector point's id is derived from the image id, so a reused image id would pick up a deleted image's
vector. PostgreSQL sequences never hand out an id twice, so only SQLite tables are rebuilt.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 11:00:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('collections', 'images')


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != 'sqlite':
        return
    for table in TABLES:
        # Copying the rows keeps their ids; sqlite_sequence starts at the highest one.
        with op.batch_alter_table(table, recreate='always', table_kwargs={'sqlite_autoincrement': autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
