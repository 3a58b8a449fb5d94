"""Checkpoints through the hub: a session writes the catalog in a handful of transactions however
many files there are, the volume pointer keeps a checkpoint alive through GC, and a restore of
what a session wrote is exact. (The format itself is tested in tests/test_checkpoints.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clawstore import checkpoints as cp
from clawstore import mediatypes as mt
from clawstore.checkpoints import writer as cp_writer
from clawstore.hub import Hub
from hubutil import ADMIN, push_artifact

OLD_NS = (int(time.time()) - 3600) * 1_000_000_000


def make_tree(root: Path, n: int, large: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = root / f"d{i % 7}" / f"f{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(hashlib.shake_256(b"%d" % i).digest(100 + i))
        os.utime(p, ns=(OLD_NS, OLD_NS))
    for i in range(large):
        (root / f"big{i}.bin").write_bytes(hashlib.shake_256(b"big%d" % i).digest(70_000))


@pytest.fixture
def count_tx(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts catalog transactions opened from now on."""
    counter = [0]
    real = hub.catalog.tx

    @contextlib.contextmanager
    def tx(*a: Any, **kw: Any) -> Iterator[Any]:
        counter[0] += 1
        with real(*a, **kw) as conn:
            yield conn

    monkeypatch.setattr(hub.catalog, "tx", tx)
    monkeypatch.setattr(cp_writer, "RACY_NS", 0)  # the tree was just written; reuse is what is measured
    return counter


def test_session_writes_few_catalog_transactions_whatever_the_file_count(
    hub: Hub, tmp_path: Path, count_tx: list[int]
) -> None:
    counts = []
    for n in (300, 900):  # both past INLINE_MAX: each writes an index blob
        src = tmp_path / f"src{n}"
        make_tree(src, n, large=3)
        before = count_tx[0]
        with hub.session(ADMIN, f"ck/n{n}", kind="checkpoint") as s:
            r = cp.create(s, f"ck/n{n}:latest", src, threshold=65536)
        assert r.files == n + 3
        counts.append(count_tx[0] - before)
    assert counts[0] == counts[1], counts  # not one per file
    assert counts[1] <= 12, counts
    # after one change: a handful again (reads of the parent are leased too)
    src = tmp_path / "src900"
    (src / "d0" / "f0.txt").write_bytes(b"changed")
    before = count_tx[0]
    with hub.session(ADMIN, "ck/n900", kind="checkpoint") as s:
        r = cp.create(s, "ck/n900:latest", src, threshold=65536)
    assert r.reused_files == 902 and r.packs == 1
    assert count_tx[0] - before <= 12
    cp.restore(hub.store, "ck/n900:latest", tmp_path / "out")
    assert (tmp_path / "out" / "d0" / "f0.txt").read_bytes() == b"changed"
    assert (tmp_path / "out" / "big2.bin").read_bytes() == (src / "big2.bin").read_bytes()
    assert hub.fsck(ADMIN).ok


def test_checkpoint_through_hub_points_at_volume_and_survives_gc(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 5, large=1)
    with hub.session(ADMIN, "vol/ws") as s:
        vol = push_artifact(s, "vol/ws", "snap1", [b"volume layer"], artifact_type=mt.VOLUME)
    with hub.session(ADMIN, "ck/a") as s:
        r = cp.create(s, "ck/a:latest", src, volume="vol/ws:snap1", session={"k": "v"}, threshold=65536)
    m = hub.store.get_manifest_typed(r.digest)
    assert m.subject is not None and m.subject.digest == vol.digest
    assert m.annotations and m.annotations[cp.VOLUME_ANNOTATION] == f"vol/ws@{vol.digest}"
    assert [x["digest"] for x in hub.referrers(ADMIN, "vol/ws", vol.digest)] == [r.digest]
    hub.untag(ADMIN, "ck/a", "latest")
    hub.gc(ADMIN, grace=0)  # the checkpoint is a referrer of a live volume: it stays, packs too
    cp.restore(hub.store, r.digest, tmp_path / "out")
    assert (tmp_path / "out" / "big0.bin").read_bytes() == (src / "big0.bin").read_bytes()
    assert cp.load(hub.store, r.digest).config["session"] == {"k": "v"}
    hub.untag(ADMIN, "vol/ws", "snap1")
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_manifest(r.digest)
    assert hub.fsck(ADMIN).ok


def test_gc_keeps_parent_packs_a_child_still_uses(hub: Hub, tmp_path: Path) -> None:
    """Unchanged files point into the parent's packs; the child lists them as layers, so GC keeps
    them after the parent goes."""
    src = tmp_path / "src"
    make_tree(src, 50)
    with hub.session(ADMIN, "ck/g") as s:
        first = cp.create(s, "ck/g:first", src)
    (src / "d1" / "f1.txt").write_bytes(b"new")
    with hub.session(ADMIN, "ck/g") as s:
        second = cp.create(s, "ck/g:second", src, parent="ck/g:first")
    hub.untag(ADMIN, "ck/g", "first")
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_manifest(first.digest)
    cp.restore(hub.store, second.digest, tmp_path / "out")
    assert (tmp_path / "out" / "d1" / "f1.txt").read_bytes() == b"new"
    assert (tmp_path / "out" / "d2" / "f2.txt").read_bytes() == (src / "d2" / "f2.txt").read_bytes()
