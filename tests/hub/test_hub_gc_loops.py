"""Issue 16 item 2: the CLI's writers against a concurrent `gc --grace 0s`, as two processes,
on local and S3 stores with SQLite and PostgreSQL catalogs.

Each iteration runs a writer command and a GC side by side. Whatever the interleaving, a writer
that exits 0 must leave what it printed intact: no dangling tag, every layer of the tagged
snapshot stored, and the next snapshot of the same ref works. CI runs a few iterations per
combination; `CLAWSTORE_GC_LOOPS=200` runs the full loop by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import clawstore
import pytest
from clawstore.fsck import fsck as store_fsck
from clawstore.hub import Hub
from hubutil import ADMIN, push_artifact

LOOPS = int(os.environ.get("CLAWSTORE_GC_LOOPS", "3"))
#: Each round starts two CLI processes (up to ~20 s on a loaded 2-core machine): the suite-wide
#: timeout is for a few rounds, a long run needs one that grows with it.
long_run = pytest.mark.timeout(max(600, 30 * LOOPS))


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from clawstore.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    from s3_server import store_url as s3_url

    return str(s3_url(request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")))


@pytest.fixture
def env(store_url: str, catalog_url: str) -> dict[str, str]:
    e = dict(os.environ)
    e["CLAWSTORE_URL"] = store_url
    e["CLAWSTORE_CATALOG"] = catalog_url
    e.pop("CLAWSTORE_TOKEN", None)
    return e


@pytest.mark.slow
@long_run
def test_cli_tag_against_gc_loop(env: dict[str, str], store_url: str, catalog_url: str) -> None:
    """`clawstore tag app:prod M` (M old and untagged) racing `clawstore gc --grace 0s`."""
    hub = Hub(clawstore.open(store_url), catalog_url, create_catalog=True)
    try:
        ok = 0
        i = 0
        # At least LOOPS rounds, and on until one tag has succeeded (bounded): a tag that GC
        # beat to an untagged manifest is refused, rightly, and a run of only those would test
        # nothing. Which process starts first alternates.
        while i < LOOPS or (ok == 0 and i < LOOPS + 40):
            with hub.session(ADMIN, "app") as s:
                m = push_artifact(s, "app", None, [f"layer {i}".encode()])
            if i % 2:
                tag = _cli(env, "tag", "app:prod", str(m.digest))
                gc = _cli(env, "gc", "--grace", "0s")
            else:
                gc = _cli(env, "gc", "--grace", "0s")
                tag = _cli(env, "tag", "app:prod", str(m.digest))
            _out, tag_err = tag.communicate(timeout=300)
            _out, gc_err = gc.communicate(timeout=300)
            assert gc.returncode == 0, gc_err
            if tag.returncode == 0:
                ok += 1
                # What the tag command promised holds: the tag names a whole manifest.
                assert hub.store.resolve("app", "prod") == m.digest
                assert hub.store.has_manifest(m.digest)
                assert hub.store.has_blob(clawstore.digest_bytes(f"layer {i}".encode()))
            else:
                assert tag_err.startswith("error: ") and "Traceback" not in tag_err, tag_err
            report = store_fsck(hub.store)
            assert report.ok, report.summary()
            i += 1
        assert ok > 0  # (most iterations tag successfully; a refusal is fine, a lie is not)
    finally:
        hub.close()


@pytest.mark.slow
@long_run
def test_cli_volume_snapshot_against_gc_loop(
    env: dict[str, str], store_url: str, catalog_url: str, tmp_path: Path
) -> None:
    """Two writers snapshotting vol/c0 and vol/c1 while `gc --grace 0s` runs each round."""
    ws = [tmp_path / "w0", tmp_path / "w1"]
    for w in ws:
        w.mkdir()
    hub = Hub(clawstore.open(store_url), catalog_url, create_catalog=True)
    hub.catalog.close()
    store = clawstore.open(store_url)
    for i in range(LOOPS):
        for k, w in enumerate(ws):
            (w / f"f{i}").write_bytes(os.urandom(2048) + f"{k}-{i}".encode())
            if i % 3 == 2:
                (w / f"f{i - 1}").unlink()
        procs = [_cli(env, "volume", "snapshot", str(w), f"vol/c{k}:latest") for k, w in enumerate(ws)]
        gc = _cli(env, "gc", "--grace", "0s")
        results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
        _, gc_err = gc.communicate(timeout=300)
        assert gc.returncode == 0, gc_err
        for k, (out, err, code) in enumerate(results):
            assert code == 0 or (err.startswith("error: ") and "Traceback" not in err), err
            if code == 0:
                printed = out.strip().splitlines()[-1]
                assert str(store.resolve(f"vol/c{k}", "latest")) == printed
        report = store_fsck(store)
        assert report.ok, report.summary()
    # Every ref still snapshots and restores.
    for k, w in enumerate(ws):
        p = _cli(env, "volume", "snapshot", str(w), f"vol/c{k}:latest")
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        p = _cli(env, "volume", "restore", f"vol/c{k}:latest", str(tmp_path / f"out{k}"))
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert sorted(x.name for x in (tmp_path / f"out{k}").iterdir()) == sorted(x.name for x in w.iterdir())
    store.close()


@pytest.mark.slow
@long_run
def test_cli_retention_against_replica_tag_loop(
    env: dict[str, str], store_url: str, catalog_url: str
) -> None:
    """Issue 16 item 10: `clawstore retention apply --grace 0s` (keep the newest build) racing
    another replica's `clawstore tag` re-pointing the build tag retention is about to remove.
    Whatever the interleaving, the store and the catalog agree on every tag, and no tag names
    a manifest that retention's own GC pass deleted."""
    from clawstore.hub import catalog as c
    from clawstore.hub.retention import Policy

    hub = Hub(clawstore.open(store_url), catalog_url, create_catalog=True)
    try:
        hub.set_policy(ADMIN, Policy("ci/**", keep_last=1))
        tagged = 0
        i = 0
        # At least LOOPS rounds, and on until one tag has succeeded (bounded): when retention
        # wins every race the tag is refused each time, rightly, and the rounds test only half
        # the interleavings (a CI run of 3 rounds on S3 + PostgreSQL saw exactly that). Past
        # LOOPS, retention starts after a head start for the tag that grows each round.
        while i < LOOPS or (tagged == 0 and i < LOOPS + 20):
            with hub.session(ADMIN, "ci/app") as s:
                old = push_artifact(s, "ci/app", f"build-{i}", [f"build {i}".encode()])
                push_artifact(s, "ci/app", f"build-{i + 1}", [f"build {i + 1}".encode()])
            with hub.catalog.tx() as conn:  # build-i is the older of the two
                conn.execute(
                    c.tags.update()
                    .where(c.tags.c.repository == "ci/app", c.tags.c.tag == f"build-{i}")
                    .values(updated_at=c.tags.c.updated_at - 1000)
                )
            first, second = (
                ("retention", "apply", "--grace", "0s"),
                ("tag", f"ci/app:build-{i}", str(old.digest)),
            )
            head_start = 0.0
            if i % 2 or i >= LOOPS:
                first, second = second, first
                head_start = 0.25 * max(0, i - LOOPS + 1)
            p1 = _cli(env, *first)
            time.sleep(head_start)
            p2 = _cli(env, *second)
            for p, args in ((p1, first), (p2, second)):
                _out, err = p.communicate(timeout=300)
                if args[0] == "retention":
                    assert p.returncode == 0, err
                elif p.returncode == 0:
                    tagged += 1
                else:  # retention's GC got to the manifest first: refused, not a lie
                    assert err.startswith("error: ") and "Traceback" not in err, err
            assert store_fsck(hub.store).ok
            report = hub.fsck(ADMIN)
            assert report.ok, report
            # Start the next round from one tag: untag whatever this round left.
            for t in hub.list_tags(ADMIN, "ci/app"):
                hub.untag(ADMIN, "ci/app", t)
            i += 1
        assert tagged > 0
    finally:
        hub.close()
