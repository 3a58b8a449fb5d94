"""Checkpoints: round trip, per-file dedup, unchanged files neither hashed nor uploaded, racy
mtimes, large files streaming, diff/ls, unsafe configs refused, volume pointer, via the hub."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import clawstore
import pytest
from clawstore import checkpoints as cp
from clawstore import mediatypes as mt
from clawstore.hub import Hub
from clawstore.manifest import Descriptor, ImageManifest, canonical_json
from hubutil import ADMIN, push_artifact

OLD = time.time() - 3600


def make_tree(root: Path, n: int = 30) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = root / f"d{i % 4}" / f"f{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(hashlib.sha256(str(i).encode()).digest() * (i + 1))
        os.utime(p, (OLD, OLD))
    (root / "dup1").write_bytes(b"same")
    (root / "dup2").write_bytes(b"same")
    (root / "empty").mkdir()
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o755)
    os.symlink("d0/f0.bin", root / "link")
    for p in (root / "dup1", root / "dup2", root / "exec.sh"):
        os.utime(p, (OLD, OLD))


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = (
                    "f",
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    st.st_mode & 0o7777,
                    st.st_mtime_ns,
                )
    return out


def test_round_trip(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    r = cp.create(store, "ck/s:v1", src, session={"agent": "a", "step": 3})
    assert r.files == 33 and r.uploaded_blobs == 32  # dup1/dup2 share a blob
    m = store.get_manifest_typed(r.digest)
    assert isinstance(m, ImageManifest)
    assert m.artifact_type == mt.CHECKPOINT and m.config.media_type == mt.CHECKPOINT
    assert len(m.layers) == 32 and all(d.media_type == mt.CHECKPOINT_FILE for d in m.layers)
    cp.restore(store, "ck/s:v1", tmp_path / "out")
    assert tree_state(tmp_path / "out") == tree_state(src)
    info = cp.ls(store, "ck/s")
    assert [(i.tag, i.files, i.session) for i in info] == [("v1", 33, {"agent": "a", "step": 3})]


def test_unchanged_files_are_not_hashed_or_uploaded(
    store: clawstore.ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    first = cp.create(store, "ck/s:latest", src)
    (src / "d1" / "f1.bin").write_bytes(b"changed")  # mtime now: differs
    (src / "new.txt").write_bytes(b"new file")
    hashed: list[str] = []
    real = cp.digest_file

    def spy(path: str | os.PathLike[str], algorithm: str = "sha256") -> clawstore.Digest:
        hashed.append(Path(path).name)
        return real(path, algorithm)

    monkeypatch.setattr(cp, "digest_file", spy)
    second = cp.create(store, "ck/s:latest", src)  # parent = what the tag pointed at
    assert sorted(hashed) == ["f1.bin", "new.txt"]
    assert second.config["parent"] == first.digest
    assert (second.hashed_files, second.uploaded_blobs, second.reused_files) == (2, 2, 32)
    assert second.uploaded_bytes < 2 * 1024 + len(canonical_json(second.config)) + 4096
    d = cp.diff(store, first.digest, "ck/s:latest")
    assert (d.added, d.removed, d.modified) == (["new.txt"], [], ["d1/f1.bin"])


def test_content_change_with_same_size_and_mtime_but_racy_is_rehashed(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    """A file written in the same instant as the parent checkpoint (mtime within the racy
    window) is re-hashed, so a same-size rewrite with an unchanged mtime is still caught."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"AAAA")
    cp.create(store, "ck/r:t", src)
    st = f.stat()
    f.write_bytes(b"BBBB")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    cp.create(store, "ck/r:t", src)
    cp.restore(store, "ck/r:t", tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == b"BBBB"


@pytest.mark.slow
def test_large_file_streams(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.img"
    with open(big, "wb") as f:  # 300 MiB, past any 256 MiB cap, sparse so it is cheap
        f.truncate(300 * 1024 * 1024)
        f.seek(123_456_789)
        f.write(b"marker")
    r = cp.create(store, "ck/big:t", src)
    assert r.bytes == 300 * 1024 * 1024
    cp.restore(store, "ck/big:t", tmp_path / "out")
    with open(tmp_path / "out" / "big.img", "rb") as f:
        f.seek(123_456_789)
        assert f.read(6) == b"marker"
    assert (tmp_path / "out" / "big.img").stat().st_size == 300 * 1024 * 1024


def _forged_checkpoint(store: clawstore.ArtifactStore, path: str) -> str:
    blob = store.put_blob(b"evil")
    config = {
        "files": [
            {"path": path, "type": "file", "digest": blob.digest, "size": 4, "mode": 420, "mtime_ns": 0}
        ],
        "parent": None,
        "session": {},
    }
    cfg = store.put_blob(canonical_json(config))
    m = ImageManifest(Descriptor(cfg.digest, cfg.size, mt.CHECKPOINT), (blob,), artifact_type=mt.CHECKPOINT)
    return store.put_manifest(m.to_json()).digest


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a//b", "./a", ""])
def test_restore_refuses_unsafe_paths(store: clawstore.ArtifactStore, tmp_path: Path, path: str) -> None:
    d = _forged_checkpoint(store, path)
    with pytest.raises(clawstore.UnsafeArchiveError):
        cp.restore(store, d, tmp_path / "out" / "inner")
    assert not (tmp_path / "out" / "escape").exists() and not (tmp_path / "escape").exists()


def test_restore_refuses_non_empty_target(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 2)
    cp.create(store, "ck/s:t", src)
    with pytest.raises(clawstore.ClawstoreError, match="not an empty directory"):
        cp.restore(store, "ck/s:t", src)


def test_not_a_checkpoint(store: clawstore.ArtifactStore) -> None:
    d = push_artifact(store, "x", "t", [b"x"])
    with pytest.raises(clawstore.InvalidManifestError, match="not a checkpoint"):
        cp.read_checkpoint(store, d.digest)


def test_checkpoint_through_hub_points_at_volume_and_survives_gc(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 5)
    with hub.session(ADMIN, "vol/ws") as s:
        vol = push_artifact(s, "vol/ws", "snap1", [b"volume layer"], artifact_type=mt.VOLUME)
    with hub.session(ADMIN, "ck/a") as s:
        r = cp.create(s, "ck/a:latest", src, volume="vol/ws:snap1", session={"k": "v"})
    m = hub.store.get_manifest_typed(r.digest)
    assert m.subject is not None and m.subject.digest == vol.digest
    assert m.annotations and m.annotations[cp.VOLUME_ANNOTATION] == f"vol/ws@{vol.digest}"
    assert [x["digest"] for x in hub.referrers(ADMIN, "vol/ws", vol.digest)] == [r.digest]
    hub.untag(ADMIN, "ck/a", "latest")
    hub.gc(ADMIN, grace=0)  # the checkpoint is a referrer of a live volume: it stays
    cp.restore(hub.store, r.digest, tmp_path / "out")
    assert json.loads(hub.store.read_blob(m.config.digest))["session"] == {"k": "v"}
    hub.untag(ADMIN, "vol/ws", "snap1")
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_manifest(r.digest)
    assert hub.fsck(ADMIN).ok
