"""`clawstore serve --blob-redirect TTL`: blob GETs answered with a 307 to a presigned S3 URL,
after the same permission and repository-link checks as a streamed GET; HEAD, manifests and
uploads stay on the registry; a store that cannot presign is refused at start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import Registry, Server, make_registry
from regclient import error_codes, push_blob, push_image, sha256

ALL = (("pull", "**"), ("push", "**"), ("delete", "**"))

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    yield from make_registry(request, tmp_path, "s3-sqlite")


@pytest.fixture
def redirecting(s3_registry: Registry) -> Iterator[Server]:
    s = Server(s3_registry.store_url, s3_registry.catalog_url, "--blob-redirect", "2m")
    yield s
    s.stop()


def test_blob_get_redirects_to_a_presigned_url(s3_registry: Registry, redirecting: Server) -> None:
    token = s3_registry.user("alice", *ALL)
    data = os.urandom(3 * 1024 * 1024 + 17)
    with httpx.Client(base_url=redirecting.url, auth=("u", token), timeout=60) as c:
        d = push_blob(c, "demo/app", data)
        r = c.get(f"/v2/demo/app/blobs/{d}")
        assert r.status_code == 307, r.text
        assert r.headers["Docker-Content-Digest"] == d
        location = r.headers["Location"]
        assert urlparse(location).netloc != urlparse(redirecting.url).netloc
        assert "Signature=" in location
        # The URL alone reads the blob: no registry credentials (S3 refuses two auth schemes).
        got = httpx.get(location, timeout=60)
        assert got.status_code == 200 and sha256(got.content) == d
        # A Range header follows the redirect and S3 honours it.
        part = httpx.get(location, headers={"Range": "bytes=10-19"}, timeout=60)
        assert part.status_code == 206 and part.content == data[10:20]
        # What stays on the registry: HEAD (size from the store), manifests.
        h = c.head(f"/v2/demo/app/blobs/{d}")
        assert h.status_code == 200 and h.headers["Content-Length"] == str(len(data))
        md, _ = push_image(c, "demo/app", "v1", [b"layer"])
        m = c.get("/v2/demo/app/manifests/v1")
        assert m.status_code == 200 and m.headers["Docker-Content-Digest"] == md


def test_redirects_keep_the_registry_rules(s3_registry: Registry, redirecting: Server) -> None:
    alice = s3_registry.user("alice", ("pull", "alice/**"), ("push", "alice/**"))
    with httpx.Client(base_url=redirecting.url, auth=("u", alice), timeout=60) as c:
        d = push_blob(c, "alice/app", b"alice's layer")
        assert c.get(f"/v2/alice/app/blobs/{d}").status_code == 307
        # Linked to alice/app only: another repository gets 404, never a URL.
        r = c.get(f"/v2/alice/other/blobs/{d}")
        assert r.status_code == 404 and error_codes(r) == ["BLOB_UNKNOWN"]
        assert "Location" not in r.headers
        # Not stored at all: 404 (not a URL of nothing).
        r = c.get(f"/v2/alice/app/blobs/{sha256(b'never pushed')}")
        assert r.status_code == 404 and error_codes(r) == ["BLOB_UNKNOWN"]
        # Not allowed to pull there: denied before any URL is made.
        r = c.get(f"/v2/secret/app/blobs/{d}")
        assert r.status_code in (401, 403) and "Location" not in r.headers
    r = httpx.get(f"{redirecting.url}/v2/alice/app/blobs/{d}")  # anonymous
    assert r.status_code == 401 and "Location" not in r.headers


def test_a_store_that_cannot_presign_is_refused(tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "clawstore",
            "--store",
            str(tmp_path / "store"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--blob-redirect",
            "1m",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "--blob-redirect needs a store that presigns URLs" in p.stderr
