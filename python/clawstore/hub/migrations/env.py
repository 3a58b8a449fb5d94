"""Alembic environment: always run with a connection handed in by clawstore.hub.migrations."""

from __future__ import annotations

from alembic import context

from clawstore.hub.catalog import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only programmatic use is supported
    raise RuntimeError("clawstore catalog migrations run through clawstore.hub.migrations.upgrade()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
