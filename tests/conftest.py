"""Shared fixtures: `store` is parametrized over every backend; the conformance suite uses it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import clawstore
import pytest
from s3_server import s3_bucket, s3_client, s3_endpoint, s3_store  # noqa: F401 (fixtures)

#: Backends the conformance suite runs against. The S3 backend registers itself in
#: tests/s3_server.py (a moto server on a loopback port).
BACKENDS = ["local", "s3"]


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[clawstore.ArtifactStore]:
    with clawstore.open((tmp_path / "store").as_uri()) as s:
        yield s


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[clawstore.ArtifactStore]:
    if request.param == "local":
        with clawstore.open((tmp_path / "store").as_uri()) as s:
            yield s
    else:
        yield request.getfixturevalue(f"{request.param}_store")
