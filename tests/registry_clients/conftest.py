"""Fixtures for the registry client tests: registry servers and isolated client environments.

`registry` is parametrised over the reference server (Debian's docker-registry, distribution
2.8) and `clawstore serve` on a local store; `auth_registry` is the same with auth on (htpasswd
for distribution, a hub token for clawstore); `s3_registry` runs both on moto's S3 server.
Servers are module-scoped: tests use fresh repository names (`repo_name`), not fresh servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_servers import (
    ClawstoreServer,
    Credentials,
    DistributionServer,
    RegistryServer,
    S3Target,
    distribution_binary,
)
from s3_server import REGION, make_client, new_bucket, store_url

KINDS = ["distribution", "clawstore"]
#: Small S3 parts so the multipart paths run on small images, and bounded memory per upload.
S3_QUERY = "&part_size=5MiB&stream_part_size=5MiB&multipart_threshold=5MiB&concurrency=4&retry_base=0.01"


def _require(kind: str) -> None:
    if kind == "distribution" and distribution_binary() is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it from Debian)")


def _server(
    kind: str, workdir: Path, auth: bool, s3: S3Target | None = None, tls: bool = False
) -> RegistryServer:
    if kind == "distribution":
        creds = Credentials("tester", "secret-" + uuid.uuid4().hex[:8]) if auth else None
        return DistributionServer(workdir, creds, s3, tls=tls)
    if s3 is None:
        url, catalog = (workdir / "store").as_uri(), None
    else:
        url, catalog = store_url(s3.endpoint, s3.bucket) + S3_QUERY, f"sqlite:///{workdir / 'catalog.sqlite'}"
    return ClawstoreServer(
        workdir, url, credentials_user="tester" if auth else None, catalog=catalog, tls=tls
    )


@pytest.fixture(scope="module", params=KINDS)
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """An anonymous read-write registry of each kind, on the local filesystem."""
    _require(request.param)
    with _server(request.param, tmp_path_factory.mktemp(request.param), auth=False) as server:
        yield server


@pytest.fixture(scope="module", params=KINDS)
def auth_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """A registry of each kind that refuses anonymous clients; `.credentials` may push and pull."""
    _require(request.param)
    with _server(request.param, tmp_path_factory.mktemp(request.param + "-auth"), auth=True) as server:
        assert server.credentials is not None
        yield server


@pytest.fixture(scope="module", params=KINDS)
def tls_auth_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """`auth_registry` on https with a self-signed certificate for 127.0.0.1."""
    _require(request.param)
    workdir = tmp_path_factory.mktemp(request.param + "-tls")
    with _server(request.param, workdir, auth=True, tls=True) as server:
        yield server


@pytest.fixture(scope="module", params=KINDS)
def s3_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> Iterator[RegistryServer]:
    """An anonymous registry of each kind whose data lives in a fresh bucket on moto's S3."""
    _require(request.param)
    bucket = new_bucket(make_client(s3_endpoint))
    target = S3Target(
        s3_endpoint,
        bucket,
        REGION,
        os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )
    workdir = tmp_path_factory.mktemp(request.param + "-s3")
    with _server(request.param, workdir, auth=False, s3=target) as server:
        yield server


@pytest.fixture(scope="module")
def s3_redirect_registry(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> Iterator[RegistryServer]:
    """`clawstore serve --blob-redirect` on moto's S3, with auth: blob GETs are 307s to presigned
    URLs that clients follow without the registry's credentials."""
    bucket = new_bucket(make_client(s3_endpoint))
    workdir = tmp_path_factory.mktemp("clawstore-s3-redirect")
    server = ClawstoreServer(
        workdir,
        store_url(s3_endpoint, bucket) + S3_QUERY,
        credentials_user="tester",
        catalog=f"sqlite:///{workdir / 'catalog.sqlite'}",
        extra_args=["--blob-redirect", "10m"],
    )
    with server:
        yield server


@pytest.fixture
def repo_name() -> str:
    """A repository name no other test uses (two path components, as clients usually push)."""
    return f"tests/r{uuid.uuid4().hex[:12]}"


@dataclass
class Tools:
    """Container tools run as root with private storage (`--storage-driver vfs`) and config."""

    root: Path
    env: dict[str, str]
    #: podman refuses a runroot longer than 50 characters, so run state lives in a short /tmp dir.
    runroot: Path
    storage: str = "storage"

    def with_storage(self, name: str) -> Tools:
        """The same tools on another image store (a second machine, as far as pulls go)."""
        return Tools(self.root, self.env, self.runroot, name)

    def storage_args(self) -> list[str]:
        return [
            "--root",
            str(self.root / self.storage),
            "--runroot",
            str(self.runroot / self.storage),
            "--storage-driver",
            "vfs",
        ]

    def run(
        self, tool: str, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`tool args...`; on failure the assertion shows the command's stderr."""
        cmd = [tool, *args]
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                f"stderr:\n{proc.stderr[-5000:]}"
            )
        return proc

    def skopeo(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("skopeo", *args, check=check)

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("buildah", *self.storage_args(), *args, check=check)

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("podman", *self.storage_args(), *args, check=check)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it from Debian)")


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[Tools]:
    """Private auth file, containers.conf, registries.conf and storage for one test."""
    root = tmp_path / "containers"
    root.mkdir()
    (root / "containers.conf").write_text(
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{root / "events.log"}"\n'
    )
    # No search registries: every reference in the tests names its registry host explicitly.
    (root / "registries.conf").write_text(
        'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
    )
    (root / "tmp").mkdir()
    (root / "auth.json").write_text('{"auths": {}}')
    env = dict(
        os.environ,
        REGISTRY_AUTH_FILE=str(root / "auth.json"),
        CONTAINERS_CONF=str(root / "containers.conf"),
        CONTAINERS_REGISTRIES_CONF=str(root / "registries.conf"),
        TMPDIR=str(root / "tmp"),
        XDG_RUNTIME_DIR=str(root / "run"),
        STORAGE_DRIVER="vfs",
    )
    (root / "run").mkdir(mode=0o700)
    runroot = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    try:
        yield Tools(root, env, runroot)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


@pytest.fixture
def skopeo(tools: Tools) -> Tools:
    _need("skopeo")
    return tools


@pytest.fixture
def buildah(tools: Tools) -> Tools:
    _need("buildah")
    return tools


@pytest.fixture
def podman(tools: Tools) -> Tools:
    _need("podman")
    return tools
