"""The hub command line, run as a subprocess (one-line errors, exit codes), on SQLite and
PostgreSQL catalogs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(
    env: dict[str, str], *args: str, ok: bool = True, input_: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-c", "from clawstore.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        input=input_.decode() if input_ is not None else None,
    )
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def env(tmp_path: Path, catalog_url: str) -> dict[str, str]:
    e = dict(os.environ)
    e["CLAWSTORE_URL"] = str(tmp_path / "store")
    e["CLAWSTORE_CATALOG"] = catalog_url
    e.pop("CLAWSTORE_TOKEN", None)
    return e


def test_checkpoint_gc_retention_export_cycle(env: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one")
    d1 = run(env, "checkpoint", "create", str(src), "ck/s:first", "--meta", "agent=a1").stdout.strip()
    run(env, "checkpoint", "create", str(src), "ck/s:latest", "--parent", "ck/s:first")
    (src / "a.txt").write_text("two")
    (src / "b.txt").write_text("new")
    r = run(env, "checkpoint", "create", str(src), "ck/s:latest")
    assert "2 files" in r.stderr and "2 blobs uploaded" in r.stderr
    assert sorted(run(env, "checkpoint", "diff", "ck/s:first", "ck/s:latest").stdout.splitlines()) == [
        "A\tb.txt",
        "M\ta.txt",
    ]
    ls = run(env, "checkpoint", "ls", "ck/s").stdout
    assert "first" in ls and d1 in ls
    run(env, "checkpoint", "restore", "ck/s:first", str(tmp_path / "out"))
    assert (tmp_path / "out" / "a.txt").read_text() == "one"
    # retention: keep only the newest tag; dry run lists, real run untags
    run(env, "retention", "set", "ck/**", "--keep-last", "1")
    dry = run(env, "retention", "apply", "--dry-run", "--grace", "0").stdout
    assert "would untag\tck/s:first" in dry
    run(env, "retention", "apply", "--grace", "0")
    gc = json.loads(run(env, "gc", "--json", "--grace", "0").stdout)
    assert gc["dry_run"] is False
    run(env, "export", "ck/s:latest", "--oci-layout", str(tmp_path / "oci"))
    assert (tmp_path / "oci" / "index.json").is_file()
    env2 = dict(
        env, CLAWSTORE_URL=str(tmp_path / "store2"), CLAWSTORE_CATALOG=f"sqlite:///{tmp_path}/c2.sqlite"
    )
    out = run(env2, "import", str(tmp_path / "oci"), "copied/s").stdout
    assert out.startswith("copied/s:latest\tsha256:")
    fsck = run(env, "catalog", "fsck")
    assert "0 problems" in fsck.stderr
    hist = run(env, "catalog", "history", "ck/s:first").stdout
    assert "retention:local-admin" in hist


def test_tokens_and_grants(env: dict[str, str], tmp_path: Path) -> None:
    token = run(env, "token", "issue", "bob").stdout.strip()
    assert token.startswith("cst_")
    run(env, "grant", "add", "bob", "pull", "ck/**")
    assert "bob\tpull\tck/**" in run(env, "grant", "ls").stdout
    bob = dict(env, CLAWSTORE_TOKEN=token)
    r = run(bob, "gc", "--dry-run", ok=False)
    assert r.returncode == 1 and r.stderr.strip() == "error: bob may not admin on the hub"
    assert token not in r.stderr
    run(bob, "checkpoint", "ls", "ck/none")
    run(env, "token", "revoke", token.split("_")[1])
    r = run(bob, "checkpoint", "ls", "ck/none", ok=False)
    assert r.returncode == 1 and "revoked" in r.stderr and "Traceback" not in r.stderr


def test_loose_writes_beside_a_catalog_go_through_the_hub(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 16 item 2: `blob put` and `manifest put` beside a catalog are hub pushes to the
    repository named by --repo (permission-checked, recorded, the manifest linked to it); without
    --repo they are refused before anything is read or stored."""
    import clawstore
    from clawstore.hub import catalog as c
    from clawstore.hub.catalog import Catalog

    data = tmp_path / "layer.bin"
    data.write_bytes(b"loose layer bytes")
    digest = clawstore.digest_bytes(data.read_bytes())
    r = run(env, "blob", "put", str(data), ok=False)
    assert r.returncode == 1 and "--repo" in r.stderr and r.stderr.count("\n") == 1
    store = clawstore.open(env["CLAWSTORE_URL"])
    assert not store.has_blob(digest)
    # A principal without push on the repository is refused, and nothing is stored.
    token = run(env, "token", "issue", "carol").stdout.strip()
    run(env, "grant", "add", "carol", "pull", "app/**")
    carol = dict(env, CLAWSTORE_TOKEN=token)
    r = run(carol, "blob", "put", str(data), "--repo", "app/x", ok=False)
    assert r.returncode == 1 and "may not push" in r.stderr, r.stderr
    assert not store.has_blob(digest)
    # With push, the blob is recorded in the catalog and the manifest linked to the repository.
    run(env, "grant", "add", "carol", "push", "app/**")
    assert run(carol, "blob", "put", str(data), "--repo", "app/x").stdout.strip() == str(digest)
    config = run(carol, "blob", "put", "-", "--repo", "app/x", input_=b"{}").stdout.strip()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.loose.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": str(digest), "size": 17}],
    }
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(manifest))
    r = run(carol, "manifest", "put", str(mpath), ok=False)
    assert r.returncode == 1 and "--repo" in r.stderr
    m = run(carol, "manifest", "put", str(mpath), "--repo", "app/x").stdout.strip()
    catalog = Catalog(env["CLAWSTORE_CATALOG"])
    try:
        with catalog.tx() as conn:
            assert conn.execute(c.blobs.select().where(c.blobs.c.digest == str(digest))).first()
            assert c.linked_repositories(conn, m) == {"app/x"}
            assert c.linked_repositories(conn, str(digest)) == {"app/x"}
    finally:
        catalog.close()


def test_errors_are_one_line(env: dict[str, str], tmp_path: Path) -> None:
    r = run(env, "checkpoint", "restore", "ck/missing:t", str(tmp_path / "o"), ok=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    r = run(env, "gc", "--grace", "soon", ok=False)
    assert r.returncode == 2 and "not a duration" in r.stderr


def test_duration_parser() -> None:
    from clawstore.cli.hub import parse_duration

    assert parse_duration("0") == 0
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400
    for bad in ("", "h", "5x", "-1"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)
