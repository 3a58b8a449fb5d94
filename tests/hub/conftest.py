"""Hub test fixtures: every catalog test runs on SQLite and on the local PostgreSQL server
(a fresh schema per test, dropped afterwards; skipped with a reason when the server is down)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import clawstore
import pytest
from clawstore.hub import Catalog, Hub
from hubutil import CATALOGS, make_catalog_url


@pytest.fixture(params=CATALOGS)
def catalog_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def catalog_url(catalog_kind: str, tmp_path: Path) -> Iterator[str]:
    """A catalog URL (PostgreSQL URLs carry ?schema=...); the schema is dropped afterwards."""
    url, schema = make_catalog_url(catalog_kind, tmp_path)
    if schema is None:
        yield url
        return
    full = f"{url}?schema={schema}"
    yield full
    Catalog(full, migrate=False).drop_schema()


@pytest.fixture
def hub(catalog_url: str, tmp_path: Path) -> Iterator[Hub]:
    h = Hub(clawstore.open(tmp_path / "store"), catalog_url)
    yield h
    h.close()
