"""Cache entries (last use, for LRU eviction) and per-scope cache byte budgets.

Revision ID: logs_1
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "logs_1"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("scope", sa.String(length=255), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("digest", sa.String(length=200), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key"),
    )
    op.create_index("ix_cache_entries_lru", "cache_entries", ["scope", "last_used_at"], unique=False)
    op.create_table(
        "cache_budgets",
        sa.Column("scope", sa.String(length=255), nullable=False),
        sa.Column("max_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )


def downgrade() -> None:
    op.drop_table("cache_budgets")
    op.drop_index("ix_cache_entries_lru", table_name="cache_entries")
    op.drop_table("cache_entries")
