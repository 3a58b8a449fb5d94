"""Versioned catalog schema (Alembic), applied programmatically when a catalog is opened.

`upgrade(catalog)` runs every pending revision inside one transaction that first takes a
database-wide lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory transaction lock), so many
processes opening the same catalog at once migrate it exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from sqlalchemy import text

if TYPE_CHECKING:
    from clawstore.hub.catalog import Catalog

HERE = Path(__file__).parent
_ADVISORY_KEY = 0x636C6177  # "claw"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    return cfg


def upgrade(catalog: Catalog, revision: str = "head") -> None:
    cfg = alembic_config()
    with catalog.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current(catalog: Catalog) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with catalog.engine.begin() as conn:
        return MigrationContext.configure(conn).get_current_revision()


__all__ = ["alembic_config", "current", "upgrade"]
