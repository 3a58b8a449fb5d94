"""Versioned catalog schema (Alembic), applied programmatically when a catalog is opened.

`upgrade(engine)` runs every pending revision inside one transaction that first takes a
database-wide lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory transaction lock), so many
processes opening the same catalog at once migrate it exactly once.

Migrations need only an engine: this package never imports `clawstore.hub.catalog` (which
imports it), and each revision is self-contained (it names its own tables and columns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

HERE = Path(__file__).parent


@runtime_checkable
class _HasEngine(Protocol):
    """A catalog (anything with an engine) may be passed where an engine is expected."""

    engine: Engine


_ADVISORY_KEY = 0x636C6177  # "claw"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    return cfg


def _engine(db: Engine | _HasEngine) -> Engine:
    return db if isinstance(db, Engine) else db.engine


def upgrade(db: Engine | _HasEngine, revision: str = "head") -> None:
    cfg = alembic_config()
    with _engine(db).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current(db: Engine | _HasEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with _engine(db).begin() as conn:
        return MigrationContext.configure(conn).get_current_revision()


__all__ = ["alembic_config", "current", "upgrade"]
