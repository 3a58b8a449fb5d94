"""Alembic environment: always run with a connection handed in by clawstore.hub.migrations."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only programmatic use is supported
    raise RuntimeError("clawstore catalog migrations run through clawstore.hub.migrations.upgrade()")
# Revisions are self-contained: running them needs no table metadata. Autogenerating a new one
# compares against the catalog's tables: pass them as `target_metadata`
# (cfg.attributes["target_metadata"] = clawstore.hub.catalog.metadata).
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("target_metadata"),
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
