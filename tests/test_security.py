"""Issue 16 (security and integrity), the items that need no hub: restore limits come from
configuration, `--expected` means verified, and bad input gives one line, not a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
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


# -- item 12: one-line errors -----------------------------------------------------------------------
def test_non_utf8_name_in_volume_snapshot_is_one_escaped_line(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "ok").write_text("x")
    with open(os.path.join(os.fsencode(ws), b"bad\xff"), "wb") as f:
        f.write(b"x")
    url = (tmp_path / "store").as_uri()
    r = run(["--store", url, "volume", "snapshot", str(ws), "vol/u:1"])
    assert_error(r, "UTF-8")
    assert "\\xff" in r.err.lower()
    r = run(["--store", url, "checkpoint", "create", str(ws), "cp/u:1"])
    assert_error(r, "UTF-8")


NO_AWS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask the (non-loopback) instance metadata service
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
}


def test_s3_without_credentials_is_one_line(s3_endpoint: str) -> None:
    url = f"s3://nobucket/p?endpoint_url={s3_endpoint}&region=us-east-1"
    r = run(["--store", url, "tags", "x"], env=NO_AWS)
    assert_error(r, "credentials")


def test_s3_endpoint_not_a_url_is_one_line() -> None:
    r = run(["--store", "s3://b/p?endpoint_url=notaurl&region=us-east-1", "tags", "x"], env=NO_AWS)
    assert_error(r, "notaurl")


@pytest.mark.parametrize(
    ("catalog", "fragment"),
    [
        ("nosuch://x/y", "nosuch"),
        ("postgresql+asyncpg://u:hunter2@127.0.0.1:1/db", "asyncpg"),
        ("not a url at all", "catalog"),
    ],
)
def test_bad_catalog_url_is_one_line(tmp_path: Path, catalog: str, fragment: str) -> None:
    url = (tmp_path / "store").as_uri()
    clawstore.open(url).close()  # an (empty) store exists
    r = run(["--store", url, "gc", "--dry-run", "--catalog", catalog])
    assert_error(r, fragment)
    assert "hunter2" not in r.err


def test_mistyped_catalog_beside_a_store_with_content_is_refused(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    src = tmp_path / "f"
    src.write_bytes(b"content")
    assert run(["--store", url, "blob", "put", str(src)]).code == 0
    typo = tmp_path / "typo" / "dir" / "catalog.sqlite"
    r = run(["--store", url, "gc", "--dry-run", "--catalog", f"sqlite:///{typo}"])
    assert_error(r, "no catalog", "--create-catalog")
    assert not typo.parent.parent.exists()  # nothing created behind the typo
    r = run(["--store", url, "gc", "--dry-run", "--catalog", f"sqlite:///{typo}", "--create-catalog"])
    assert r.code == 0, r.err
    assert typo.exists()
    # Once it exists it opens as usual; the default catalog beside a local store needs no flag.
    assert run(["--store", url, "gc", "--dry-run", "--catalog", f"sqlite:///{typo}"]).code == 0
    assert run(["--store", url, "gc", "--dry-run"]).code == 0


def test_blob_put_stdin_closed_is_one_line(tmp_path: Path) -> None:
    from test_cli import _entry_point

    p = subprocess.run(
        [*_entry_point(), "--store", str(tmp_path / "store"), "blob", "put", "-"],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.close(0),
        check=False,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of our own (root only: CI and the dev machines run as root)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_store_is_one_line(tmpfs: Path, tmp_path: Path) -> None:
    url = (tmpfs / "store").as_uri()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a").write_text("a")
    assert run(["--store", url, "checkpoint", "create", str(ws), "cp/ro:1"]).code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for args in (["gc", "--dry-run"], ["checkpoint", "ls", "cp/ro"]):
        r = run(["--store", url, *args])
        if r.code != 0:
            assert_error(r)
    assert run(["--store", url, "resolve", "cp/ro:1"]).code == 0  # reads still work


def test_restore_enospc_reports_the_disk_error(
    local_store: clawstore.ArtifactStore, tmpfs: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # More than the decoder's channel holds (16 MiB), so that it is still sending when the
    # disk fills: the case that reported "tar reader stopped" instead of ENOSPC.
    for i in range(16):
        (src / f"f{i:02d}").write_bytes(os.urandom(2 << 20))
    volumes.snapshot(local_store, src, REF)
    with pytest.raises(OSError) as e:
        volumes.restore(local_store, REF, tmpfs / "out")
    assert "No space left on device" in str(e.value), str(e.value)
    assert "tar reader stopped" not in str(e.value)
    assert os.listdir(tmpfs) == []  # the temp directory went too


# -- item 2: a snapshot never builds on a parent whose content is gone ------------------------------
def test_snapshot_over_a_parent_with_lost_content_is_full(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a").write_text("one")
    first = volumes.snapshot(store, ws, "vol/lost:latest")
    store.delete_blob(first.layers[0].digest)  # collected behind the tag's back
    (ws / "b").write_text("two")
    snap = volumes.snapshot(store, ws, "vol/lost:latest")
    assert snap.lost_parent == first.digest
    assert len(snap.layers) == 1 and snap.config["parent"] is None
    out = tmp_path / "out"
    volumes.restore(store, "vol/lost:latest", out)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    # and the next one builds on this whole snapshot again
    (ws / "c").write_text("three")
    nxt = volumes.snapshot(store, ws, "vol/lost:latest")
    assert nxt.lost_parent is None and len(nxt.layers) == 2
