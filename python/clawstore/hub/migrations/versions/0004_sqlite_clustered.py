"""SQLite: store the digest-keyed tables clustered by their primary key (`WITHOUT ROWID`).

A rowid table keeps its rows in insertion order and its primary key in a separate index, so
deleting a range of digests (GC's sweep walks its trash by digest) touches pages scattered over
the whole table as well as a contiguous stretch of the key's index; every page a transaction
touches is written to the WAL again. Clustered by digest, the table *is* the key's B-tree: one
tree instead of two, and a digest range is a contiguous run of its pages. PostgreSQL has no
such choice to make (heap + index): this revision does nothing there.

Revision ID: sqlite_clustered_1
Revises: registry_1
"""

from __future__ import annotations

import re

from alembic import op

revision = "sqlite_clustered_1"
down_revision = "registry_1"
branch_labels = None
depends_on = None

#: Tables whose primary key is a digest (or starts with one, or with a repository or lease and
#: then a digest), holding one small row per object or edge: the ones GC, fsck and pushes walk.
TABLES = (
    "blobs",
    "manifests",
    "manifest_blobs",
    "manifest_edges",
    "gc_trash",
    "repo_blobs",
    "repo_manifests",
    "lease_resources",
)


def _rebuild(table: str, clustered: bool) -> None:
    """Recreate `table` with the same columns, key and indexes, with or without a rowid."""
    bind = op.get_bind()
    ddl = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).scalar()
    if ddl is None:
        return
    without = re.search(r"\)\s*WITHOUT\s+ROWID\s*$", ddl, re.IGNORECASE) is not None
    if without == clustered:
        return
    indexes = [
        r[0]
        for r in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (table,),
        )
    ]
    body = ddl[ddl.index("(") : ddl.rindex(")") + 1]
    new = f"{table}__rebuilt"
    op.execute(f"CREATE TABLE {new} {body}{' WITHOUT ROWID' if clustered else ''}")
    op.execute(f"INSERT INTO {new} SELECT * FROM {table}")
    op.execute(f"DROP TABLE {table}")  # its indexes go with it
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    for index in indexes:
        op.execute(index)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, clustered=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, clustered=False)
