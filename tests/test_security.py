"""Issue 16 (security and integrity), the items that need no hub: restore limits come from
configuration, `--expected` means verified, and bad input gives one line, not a traceback."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import clawstore
import pytest
from clawstore import volumes
from clawstore.errors import DigestMismatchError, InvalidManifestError, UnsafeArchiveError
from clawstore.manifest import parse_manifest
from test_cli import assert_error, run

REF = "vol/limits:latest"


# -- item 7: the bomb limit trusts configuration, never the manifest -------------------------------
def test_declared_size_does_not_lift_the_ratio_limit(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    """A layer honestly declaring its (huge) uncompressed size is still a bomb under the
    configured ratio: the declaration used to become max_bytes and switch the ratio check off."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "zeros", "wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MiB of zeros that compress to almost nothing
    snap = volumes.snapshot(local_store, src, REF)
    assert snap.layers[0].size < (100 << 20) // 1000
    with pytest.raises(UnsafeArchiveError, match="ratio"):
        volumes.restore(local_store, REF, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Configuration may allow it.
    volumes.restore(local_store, REF, tmp_path / "out2", max_ratio=0)
    assert (tmp_path / "out2" / "zeros").stat().st_size == 100 << 20


def _with_declared(store: clawstore.ArtifactStore, digest: str, value: object) -> str:
    raw = json.loads(store.get_manifest(digest))
    raw["layers"][0]["annotations"][volumes.ANNOTATION_UNCOMPRESSED_SIZE] = value
    return str(store.put_manifest(json.dumps(raw).encode()).digest)


@pytest.mark.parametrize("value", ["99999999999999999999999", "-1", "1e9", "½"])
def test_absurd_declared_size_is_a_typed_error(
    local_store: clawstore.ArtifactStore, tmp_path: Path, value: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    snap = volumes.snapshot(local_store, src, REF)
    bad = _with_declared(local_store, str(snap.digest), value)
    with pytest.raises(InvalidManifestError, match="uncompressed_size"):
        volumes.restore(local_store, f"vol/limits@{bad}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_declared_size_still_bounds_its_layer(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(50_000))
    snap = volumes.snapshot(local_store, src, REF)
    bad = _with_declared(local_store, str(snap.digest), "1024")
    with pytest.raises(UnsafeArchiveError, match="declares"):
        volumes.restore(local_store, f"vol/limits@{bad}", tmp_path / "out")
    parse_manifest(local_store.get_manifest(bad))  # (a valid manifest: only its claim is false)


# -- item 9: --expected verifies unless the caller opts in to trusting the size --------------------
def test_expected_with_same_size_blob_stored_is_verified(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    real = b"A" * 1000
    d = store.put_blob(real).digest
    other = tmp_path / "other"
    other.write_bytes(b"B" * 1000)
    with pytest.raises(DigestMismatchError):
        store.put_blob(other, expected=d)
    good = tmp_path / "good"
    good.write_bytes(real)
    assert store.put_blob(good, expected=d).digest == d
    # Explicit opt-in: the store does not read the file.
    assert store.put_blob(other, expected=d, trust_size=True).digest == d
    assert store.read_blob(d) == real


def test_cli_blob_put_expected_hashes(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    real = tmp_path / "real"
    real.write_bytes(b"secret-A" * 100)
    fake = tmp_path / "fake"
    fake.write_bytes(b"secret-B" * 100)
    d = f"sha256:{hashlib.sha256(real.read_bytes()).hexdigest()}"
    assert run(["--store", url, "blob", "put", str(real)]).text.strip() == d
    assert_error(run(["--store", url, "blob", "put", "--expected", d, str(fake)]), "expected")
    r = run(["--store", url, "blob", "put", "--expected", d, "--trust-size", str(fake)])
    assert r.code == 0 and r.text.strip() == d
    assert_error(run(["--store", url, "blob", "put", "--trust-size", str(fake)]), "--expected")
