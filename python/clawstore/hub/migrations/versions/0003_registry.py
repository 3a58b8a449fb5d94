"""The OCI registry: blobs linked to a repository by an upload or a mount, resumable upload
sessions (several `serve` processes share them), and hub-wide settings (the registry's token
signing key).

Revision ID: registry_1
Revises: logs_1
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "registry_1"
down_revision = "logs_1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "repo_blobs",
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("digest", sa.String(length=200), nullable=False),
        sa.Column("pushed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("repository", "digest"),
    )
    op.create_index("ix_repo_blobs_digest", "repo_blobs", ["digest"], unique=False)
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("repository", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("lease_id", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("chunks", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_uploads_lease", "uploads", ["lease_id"], unique=False)
    op.create_table(
        "settings",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_index("ix_uploads_lease", table_name="uploads")
    op.drop_table("uploads")
    op.drop_index("ix_repo_blobs_digest", table_name="repo_blobs")
    op.drop_table("repo_blobs")
