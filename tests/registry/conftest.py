"""Registry test fixtures: a real `clawstore serve` process on a free loopback port, over a local
store or moto S3, with a SQLite or PostgreSQL catalog; an admin Hub in the test process to
issue tokens and grants and to look at what was stored."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import clawstore
import httpx
import pytest
from clawstore.hub import Catalog, Hub, Principal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hub"))

from hubutil import PG_URL, pg_available
from s3_server import TEST_OPTIONS, store_url

ADMIN = Principal.local_admin()
#: Small S3 parts so multipart paths run on small data.
S3_QUERY = "&part_size=5MiB&stream_part_size=5MiB&multipart_threshold=5MiB&concurrency=4&retry_base=0.01"


class Server:
    """`clawstore serve` in a subprocess; `url` once it listens."""

    def __init__(self, store: str, catalog: str | None, *extra: str) -> None:
        cmd = [sys.executable, "-m", "clawstore", "--store", store, "serve", "--listen", "127.0.0.1:0"]
        if catalog:
            cmd += ["--catalog", catalog]
        cmd += list(extra)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CLAWSTORE_TOKEN", None)
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if " on http://" not in line:
            self.proc.kill()
            rest = self.proc.stderr.read()
            raise RuntimeError(f"clawstore serve did not start: {line}{rest}")
        self.url = line.strip().rsplit(" on ", 1)[1]
        # Drain what the server logs (a full pipe would block it) and keep it for diagnostics.
        self.log: list[str] = []
        stream = self.proc.stderr
        threading.Thread(target=lambda: self.log.extend(stream), daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log:
            sys.stderr.write("".join(f"[serve {self.url}] {x}" for x in self.log))


@dataclass
class Registry:
    """A running registry and an admin hub on the same store and catalog."""

    server: Server
    hub: Hub
    store_url: str
    catalog_url: str | None
    kind: str

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        auth = ("user", token) if token else None
        return httpx.Client(base_url=self.url, auth=auth, timeout=60, **kw)

    def user(self, name: str, *grants: tuple[str, str]) -> str:
        """A token for `name` with grants (action, pattern)."""
        token = self.hub.issue_token(ADMIN, name)
        for action, pattern in grants:
            self.hub.grant(ADMIN, name, action, pattern)
        return token


def _catalog(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        return
    if not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    url = f"{PG_URL}?schema=clawreg_{uuid.uuid4().hex[:12]}"
    yield url
    Catalog(url, migrate=False).drop_schema()


REGISTRY_KINDS = [
    "local-sqlite",
    pytest.param("s3-postgres", marks=[pytest.mark.s3, pytest.mark.postgres]),
]


@pytest.fixture(params=REGISTRY_KINDS)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    yield from make_registry(request, tmp_path, request.param)


def make_registry(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Iterator[Registry]:
    store_kind, catalog_kind = kind.split("-")
    if store_kind == "local":
        surl = str(tmp_path / "store")
        store = clawstore.open(surl)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        surl = store_url(endpoint, bucket) + S3_QUERY
        store = clawstore.open(store_url(endpoint, bucket), **TEST_OPTIONS)
    gen = _catalog(catalog_kind, tmp_path)
    curl = next(gen)
    hub = Hub(store, curl)
    server = Server(surl, curl)
    try:
        yield Registry(server, hub, surl, curl, kind)
    finally:
        server.stop()
        hub.close()
        for _ in gen:
            pass


@pytest.fixture
def local_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    yield from make_registry(request, tmp_path, "local-sqlite")
