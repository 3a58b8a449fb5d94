"""Checkpoints (framed packs): round trips on every backend, the pack format read with independent
oracles (zstandard + tarfile + hashlib), one ranged read per file, change detection (ctime and
inode, racy mtimes), compaction, crafted indexes refused, kill -9 during restore, and a
hypothesis property: random edit sequences -> checkpoint chain -> every restore equals its tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import clawstore
import pytest
import zstandard
from clawstore import checkpoints as cp
from clawstore import mediatypes as mt
from clawstore.checkpoints import index as cp_index
from clawstore.checkpoints import writer as cp_writer
from clawstore.manifest import Descriptor, ImageManifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OLD_NS = (int(time.time()) - 3600) * 1_000_000_000 + 123_456_789
#: Small thresholds so tests get large files, several packs and many frames cheaply.
SMALL = {"threshold": 4096, "group_bytes": 2048}


@pytest.fixture
def no_racy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files here are written just before their first checkpoint, so their ctime falls in the
    racy window and the next checkpoint would re-read them; tests of reuse turn the window off."""
    monkeypatch.setattr(cp_writer, "RACY_NS", 0)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tree(root: Path, n: int = 30) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = root / f"d{i % 4}" / f"f{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(hashlib.shake_256(str(i).encode()).digest(i * 300))
        os.utime(p, ns=(OLD_NS, OLD_NS + i))
    (root / "dup1").write_bytes(b"same" * 2000)  # two large files, one blob
    (root / "dup2").write_bytes(b"same" * 2000)
    (root / "empty").mkdir()
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o755)
    os.symlink("d0/f0.bin", root / "link")
    os.symlink("/nonexistent/abs", root / "d1" / "abslink")
    (root / "ünïcode name with spaces" / ("deep" * 30)).mkdir(parents=True)
    (root / "ünïcode name with spaces" / ("deep" * 30) / "x.txt").write_bytes(b"x")
    if (root / "d2").is_dir():
        os.chmod(root / "d2", 0o750)
    for p in (root / "dup1", root / "dup2", root / "exec.sh"):
        os.utime(p, ns=(OLD_NS, OLD_NS))


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {".": ("d", root.stat().st_mode & 0o7777)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                out[rel] = (
                    "f",
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    st.st_mode & 0o7777,
                    st.st_mtime_ns,
                )
    return out


def test_round_trip_and_pack_format(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    before = tree_state(src)
    r = cp.create(store, "ck/s:v1", src, session={"agent": "a", "step": 3}, **SMALL)
    assert r.files == 34 and r.packs == 1 and not r.skipped
    m = store.get_manifest_typed(r.digest)
    assert isinstance(m, ImageManifest)
    assert m.artifact_type == mt.CHECKPOINT and m.config.media_type == mt.CHECKPOINT_CONFIG_ZSTD
    kinds = [d.media_type for d in m.layers]
    large = {sha(p.read_bytes()) for p in src.rglob("*") if p.is_file() and p.stat().st_size >= 4096}
    assert kinds == [mt.CHECKPOINT_PACK] + [mt.CHECKPOINT_FILE] * len(large)
    assert {str(d.digest) for d in m.layers[1:]} == large  # dup1 and dup2: one blob
    # The config is zstd JSON (independent decoder) holding the index.
    config = json.loads(
        zstandard.ZstdDecompressor().decompressobj().decompress(store.read_blob(m.config.digest))
    )
    assert config["session"] == {"agent": "a", "step": 3} and config["parent"] is None
    pack = store.read_blob(m.layers[0].digest)
    # The pack is one ordinary tar+zstd stream holding every small file ...
    # (python-zstandard stops after the first frame unless asked; zstd(1) and libzstd do not)
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(pack), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = {ti.name: tf.extractfile(ti).read() for ti in tf.getmembers()}  # type: ignore[union-attr]
    small = {
        str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file() and not p.is_symlink()
    }
    small = {k: v for k, v in small.items() if len(v) < 4096}
    assert members == small
    # ... cut into independent frames: each file's frame alone gives its bytes back.
    frames = set()
    for e in config["entries"]:
        if e["t"] == "file" and "k" in e:
            frame = pack[e["f"] : e["f"] + e["n"]]
            plain = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
            body = plain[e["o"] : e["o"] + e["s"]]
            assert sha(body) == e["h"] == sha(small[e["p"]])
            frames.add(e["f"])
    assert len(frames) > 5
    out = tmp_path / "out"
    res = cp.restore(store, "ck/s:v1", out)
    assert res.files == 34
    assert tree_state(out) == before == tree_state(src)
    assert [(i.tag, i.files, i.session) for i in cp.ls(store, "ck/s")] == [
        ("v1", 34, {"agent": "a", "step": 3})
    ]
    assert not list(tmp_path.glob(".out.*"))


def test_second_checkpoint_uploads_only_what_changed(
    store: clawstore.ArtifactStore, tmp_path: Path, no_racy: None
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    first = cp.create(store, "ck/s:latest", src, **SMALL)
    (src / "d1" / "f1.bin").write_bytes(b"changed")
    (src / "new.txt").write_bytes(b"new file")
    second = cp.create(store, "ck/s:latest", src, **SMALL)  # parent = what the tag points at
    assert second.config["parent"] == str(first.digest)
    assert (second.hashed_files, second.reused_files, second.packs) == (2, 33, 1)
    # one small pack + the config: bytes of what changed plus the index, not of the tree
    assert second.uploaded_blobs == 2
    assert second.uploaded_bytes < 8192
    m1 = store.get_manifest_typed(first.digest)
    m2 = store.get_manifest_typed(second.digest)
    assert m1.layers[0] in m2.layers  # unchanged files still point into the first pack
    d = cp.diff(store, first.digest, "ck/s:latest")
    assert (d.added, d.removed, d.modified) == (["new.txt"], [], ["d1/f1.bin"])
    cp.restore(store, "ck/s:latest", tmp_path / "out")
    assert tree_state(tmp_path / "out") == tree_state(src)
    cp.restore(store, first.digest, tmp_path / "out1")
    assert (tmp_path / "out1" / "d1" / "f1.bin").read_bytes() != b"changed"
    assert not (tmp_path / "out1" / "new.txt").exists()
    third = cp.create(store, "ck/s:latest", src, **SMALL)  # nothing changed: nothing read
    assert (third.hashed_files, third.packs, third.uploaded_blobs) == (0, 0, 1)


@pytest.mark.parametrize("how", ["touch-d", "cp-p"])
def test_same_size_and_mtime_change_is_detected(
    store: clawstore.ArtifactStore, tmp_path: Path, how: str, no_racy: None
) -> None:
    """Issue 16 item 5: `cp -p`, `rsync -a`, `touch -d` keep size and mtime; ctime and inode
    still change, and the checkpoint must see it (the file is old: no racy re-read helps)."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"AAAA")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    cp.create(store, "ck/r:t", src)
    if how == "touch-d":
        f.write_bytes(b"BBBB")
        os.utime(f, ns=(OLD_NS, OLD_NS))
    else:
        other = tmp_path / "other"
        other.write_bytes(b"CCCC")
        os.utime(other, ns=(OLD_NS, OLD_NS))
        os.rename(other, f)  # what cp -p / rsync -a do: a new inode, same size and mtime
    r = cp.create(store, "ck/r:t", src)
    assert r.reused_files == 0
    cp.restore(store, "ck/r:t", tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == f.read_bytes()


def test_racy_rewrite_is_reread(
    store: clawstore.ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file changed in the same instant as the parent was taken (same size, mtime and ctime as
    far as the clock can tell) is read again rather than trusted."""
    monkeypatch.setattr(cp_writer, "RACY_NS", 3600 * 10**9)  # "the same instant", however slow the machine
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"AAAA")
    first = cp.create(store, "ck/r:t", src)
    second = cp.create(store, "ck/r:t", src)
    # the file's ctime is within the racy window of the parent's creation: re-read (hashed), and
    # as its content is the parent's, its record is kept (no new pack)
    assert second.hashed_files == 1 and second.reused_files == 1 and second.packs == 0
    assert first.config["entries"][0] == second.config["entries"][0]
    (src / "f").write_bytes(b"BBBB")  # a same-size rewrite in the racy window: caught
    third = cp.create(store, "ck/r:t", src)
    assert third.reused_files == 0 and third.packs == 1
    assert cp.cat(store, "ck/r:t", "f") == b"BBBB"


def test_cat_is_one_ranged_read_verified(
    store: clawstore.ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    make_tree(src, 40)
    cp.create(store, "ck/c:t", src, **SMALL)
    calls: list[tuple[str, int, int]] = []
    real = store.get_blob_range

    def spy(digest: Any, offset: int, length: int) -> bytes:
        calls.append((str(digest), offset, length))
        return real(digest, offset, length)

    monkeypatch.setattr(store, "get_blob_range", spy)
    assert cp.cat(store, "ck/c:t", "d3/f3.bin") == (src / "d3" / "f3.bin").read_bytes()
    assert len(calls) == 1 and calls[0][2] < 8192  # one frame, not the pack
    assert cp.cat(store, "ck/c:t", "dup1") == (src / "dup1").read_bytes()  # a large file: its blob
    with pytest.raises(clawstore.NotFoundError):
        cp.cat(store, "ck/c:t", "nope")
    with pytest.raises(clawstore.ClawstoreError, match="not a file"):
        cp.cat(store, "ck/c:t", "d1")


def test_cat_detects_a_corrupted_pack(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello " * 100)
    r = cp.create(local_store, "ck/c:t", src)
    pack = r.config["packs"][0]["digest"]
    path = local_store.blob_local_path(pack)
    assert path is not None
    os.chmod(path, 0o644)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.replace(b"hello", b"HELLO")))
    with pytest.raises(clawstore.DigestMismatchError):
        cp.cat(local_store, "ck/c:t", "a")
    with pytest.raises(clawstore.DigestMismatchError):
        cp.restore(local_store, "ck/c:t", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_restore_path_prefix(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    cp.create(store, "ck/p:t", src, **SMALL)
    cp.restore(store, "ck/p:t", tmp_path / "out", path="d2")
    got = tree_state(tmp_path / "out")
    want = {k: v for k, v in tree_state(src).items() if k == "d2" or k.startswith("d2/")}
    del got["."]
    assert got == want
    cp.restore(store, "ck/p:t", tmp_path / "one", path="ünïcode name with spaces/" + "deep" * 30 + "/x.txt")
    assert (tmp_path / "one" / "ünïcode name with spaces" / ("deep" * 30) / "x.txt").read_bytes() == b"x"
    with pytest.raises(clawstore.NotFoundError):
        cp.restore(store, "ck/p:t", tmp_path / "none", path="d9")


def test_compaction_drops_mostly_dead_packs(
    store: clawstore.ArtifactStore, tmp_path: Path, no_racy: None
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(hashlib.shake_256(b"%d" % i).digest(1000))
        os.utime(src / f"f{i}", ns=(OLD_NS, OLD_NS))
    first = cp.create(store, "ck/k:t", src)
    first_pack = first.config["packs"][0]["digest"]
    for i in range(8):  # 40% dead: keep the old pack
        (src / f"f{i}").write_bytes(b"new %d" % i)
        os.utime(src / f"f{i}", ns=(OLD_NS, OLD_NS))
    second = cp.create(store, "ck/k:t", src)
    assert not second.compacted and second.config["packs"][0]["digest"] == first_pack
    for i in range(8, 14):  # now 70% of the first pack is dead: repack everything
        (src / f"f{i}").write_bytes(b"new %d" % i)
        os.utime(src / f"f{i}", ns=(OLD_NS, OLD_NS))
    third = cp.create(store, "ck/k:t", src)
    assert third.compacted and third.reused_files == 0 and len(third.config["packs"]) == 1
    layers = {str(d.digest) for d in store.get_manifest_typed(third.digest).layers}
    assert first_pack not in layers
    cp.restore(store, "ck/k:t", tmp_path / "out")
    assert tree_state(tmp_path / "out") == tree_state(src)


def test_large_files_are_shared_across_sessions(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.bin").write_bytes(b"w" * 200_000)
        (d / f"own-{name}").write_bytes(name.encode() * 10)
    ra = cp.create(store, "ck/a:t", tmp_path / "a", threshold=65536)
    rb = cp.create(store, "ck/b:t", tmp_path / "b", threshold=65536)
    assert ra.uploaded_bytes > 200_000 > rb.uploaded_bytes


def test_setuid_bits_dropped_unless_asked(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o6755)
    (src / "shared").mkdir()
    os.chmod(src / "shared", 0o1777)
    cp.create(local_store, "ck/u:t", src)
    cp.restore(local_store, "ck/u:t", tmp_path / "plain")
    assert (tmp_path / "plain" / "tool").stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "plain" / "shared").stat().st_mode & 0o7777 == 0o777
    cp.restore(local_store, "ck/u:t", tmp_path / "kept", special_bits=True)
    assert (tmp_path / "kept" / "tool").stat().st_mode & 0o7777 == 0o6755


def test_non_utf8_name_is_a_one_line_error(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / os.fsdecode(b"bad\xff")).write_bytes(b"x")
    with pytest.raises(clawstore.ClawstoreError, match=r"not UTF-8: .*bad\\xff"):
        cp.create(local_store, "ck/n:t", src)


def test_restore_refuses_non_empty_target_unless_forced(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, 2)
    cp.create(store, "ck/s:t", src)
    tgt = tmp_path / "tgt"
    tgt.mkdir()
    (tgt / "old").write_bytes(b"old")
    with pytest.raises(clawstore.ClawstoreError, match="not empty"):
        cp.restore(store, "ck/s:t", tgt)
    cp.restore(store, "ck/s:t", tgt, force=True)
    assert tree_state(tgt) == tree_state(src)


# -- crafted indexes -----------------------------------------------------------------------------


def forge(store: clawstore.ArtifactStore, entries: list[Any], files: dict[str, bytes] | None = None) -> str:
    """A checkpoint with a hand-written index over a pack made by tarfile + zstandard. File
    entries may say {"loc": NAME} to point at that member."""
    files = files if files is not None else {"a": b"evil"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        offsets = {ti.name: ti.offset_data for ti in tf.getmembers()}
    frame = zstandard.ZstdCompressor().compress(buf.getvalue())
    pack = store.put_blob(frame, media_type=mt.CHECKPOINT_PACK)
    out = []
    for e in entries:
        if isinstance(e, dict) and "loc" in e:
            e = dict(e)
            name = e.pop("loc")
            data = files[name]
            loc = {"k": 0, "f": 0, "n": len(frame), "o": offsets[name]}
            e = {"t": "file", "m": 0o644, "mt": 0, "s": len(data), "h": sha(data), **loc, **e}
        out.append(e)
    config = {
        "version": 2,
        "created_ns": 0,
        "parent": None,
        "session": {},
        "packs": [{"digest": str(pack.digest), "size": pack.size, "bytes": 4}],
        "entries": out,
    }
    data = zstandard.ZstdCompressor().compress(json.dumps(config).encode())
    cfg = store.put_blob(data, media_type=mt.CHECKPOINT_CONFIG_ZSTD)
    m = ImageManifest(
        Descriptor(cfg.digest, cfg.size, mt.CHECKPOINT_CONFIG_ZSTD),
        (Descriptor(pack.digest, pack.size, mt.CHECKPOINT_PACK),),
        artifact_type=mt.CHECKPOINT,
    )
    return str(store.put_manifest(m.to_json()).digest)


def D(p: Any) -> dict[str, Any]:
    return {"p": p, "t": "dir", "m": 0o755, "mt": 0}


def L(p: str, target: str) -> dict[str, Any]:
    return {"p": p, "t": "symlink", "l": target, "m": 0o777, "mt": 0}


def F(p: Any, **kw: Any) -> dict[str, Any]:
    return {"p": p, "loc": "a", **kw}


CRAFTED = {
    "dotdot": [F("../escape")],
    "absolute": [F("/abs")],
    "inner-dotdot": [D("a"), F("a/../../b")],
    "double-slash": [D("a"), F("a//b")],
    "dot": [F("./a")],
    "empty": [F("")],
    "non-string": [F(5)],
    "duplicate": [F("x"), F("x")],
    "dup-dir-file": [D("x"), F("x")],
    "below-symlink": [L("d", "OUTSIDE"), D("d/newdir"), F("d/newdir/x")],
    "file-below-symlink": [L("d", "OUTSIDE"), F("d/x")],
    "implied-dirs": [F("d/newdir/sub/l")],
    "below-file": [F("f"), F("f/x")],
    "frame-outside-pack": [F("x", n=10**6)],
    "negative-offset": [F("x", f=-1)],
    "body-outside-frame": [F("x", o=10**6)],
    "pack-not-in-table": [F("x", k=3)],
    "missing-mtime": [{"p": "x", "t": "dir", "m": 0o755}],
    "missing-digest": [{"p": "x", "t": "file", "m": 0o644, "mt": 0, "s": 4}],
    "huge-mode": [F("x", m=2**40)],
    "bool-size": [F("x", s=True)],
    "empty-link": [L("l", "")],
    "unknown-type": [{"p": "x", "t": "fifo", "m": 0o644, "mt": 0}],
    "blob-not-a-layer": [{"p": "x", "t": "file", "m": 0o644, "mt": 0, "s": 4, "h": sha(b"evil")}],
    "not-an-object": ["x"],
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_index_is_refused(store: clawstore.ArtifactStore, tmp_path: Path, case: str) -> None:
    """Issue 16 item 6 and the crafted-index list of issue 13: every case is UnsafeArchiveError,
    no traceback of another kind, nothing written outside the target, no target left behind."""
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = json.loads(json.dumps(CRAFTED[case]).replace("OUTSIDE", str(outside)))
    d = forge(store, entries)
    target = tmp_path / "out" / "inner"
    with pytest.raises(clawstore.UnsafeArchiveError):
        cp.restore(store, d, target)
    assert list(outside.iterdir()) == []
    assert not target.exists()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "escape").exists()
    if (tmp_path / "out").exists():
        assert list((tmp_path / "out").iterdir()) == []


def test_forged_but_honest_index_restores(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    """The forge helper itself is sound: the same shape with safe paths restores."""
    d = forge(store, [D("d"), F("d/x"), L("l", "d/x")], files={"a": b"evil"})
    cp.restore(store, d, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "x").read_bytes() == b"evil"
    assert os.readlink(tmp_path / "out" / "l") == "d/x"


def test_wrong_content_digest_is_refused(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    d = forge(store, [F("x", h=sha(b"other"))])
    with pytest.raises(clawstore.DigestMismatchError):
        cp.restore(store, d, tmp_path / "out")
    with pytest.raises(clawstore.DigestMismatchError):
        cp.cat(store, d, "x")
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(store: clawstore.ArtifactStore) -> None:
    cfg = store.put_blob(b"{}", media_type=mt.OCI_EMPTY)
    m = ImageManifest(Descriptor(cfg.digest, cfg.size, mt.OCI_EMPTY), (), artifact_type=mt.VOLUME)
    d = store.put_manifest(m.to_json()).digest
    with pytest.raises(clawstore.InvalidManifestError, match="not a checkpoint"):
        cp.load(store, d)


# -- crash ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_restore_leaves_no_target_and_the_next_restore_works(tmp_path: Path) -> None:
    store_url = (tmp_path / "store").as_uri()
    src = tmp_path / "src"
    make_tree(src, 200)
    with clawstore.open(store_url) as s:
        cp.create(s, "ck/k:t", src, threshold=4096, group_bytes=2048)
    target = tmp_path / "target"
    marker = tmp_path / "marker"
    script = textwrap.dedent(
        f"""
        import os, time, clawstore
        from clawstore import checkpoints as cp
        from clawstore.checkpoints import restorer
        restorer.LAYER_BATCH = 4096  # many layers, so the restore is caught in the middle
        calls = []
        def progress(n):
            calls.append(n)
            if len(calls) == 2:  # the first layer of files is written by now
                open({str(marker)!r}, "w").close()
                time.sleep(60)
        with clawstore.open({store_url!r}) as s:
            cp.restore(s, "ck/k:t", {str(target)!r}, progress=progress)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "restore ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        leftovers = list(tmp_path.glob(".target.restore-*"))
        assert leftovers and any(True for p in leftovers for _ in p.rglob("*.bin"))  # mid-restore
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not target.exists()
    with clawstore.open(store_url) as s:
        cp.restore(s, "ck/k:t", target)
    assert tree_state(target) == tree_state(src)
    assert not list(tmp_path.glob(".target.*"))


# -- property ------------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "sub/a", "sub/b", "sub/deep/c", "other/x"])
EDIT = st.one_of(
    st.tuples(st.just("write"), NAMES, st.integers(0, 6000), st.integers(0, 3)),
    st.tuples(st.just("rewrite-same-size-old-mtime"), NAMES, st.just(0), st.integers(0, 3)),
    st.tuples(st.just("delete"), NAMES, st.just(0), st.just(0)),
    st.tuples(st.just("symlink"), NAMES, st.just(0), st.just(0)),
    st.tuples(st.just("chmod"), NAMES, st.sampled_from([0o600, 0o755, 0o644]), st.just(0)),
    st.tuples(st.just("checkpoint"), st.just(""), st.just(0), st.just(0)),
)


def _apply(root: Path, op: str, name: str, n: int, seed: int) -> None:
    p = root / name
    if op == "write":
        for parent in reversed(p.relative_to(root).parents[:-1]):
            q = root / parent
            if q.is_symlink() or (q.exists() and not q.is_dir()):
                q.unlink()
            q.mkdir(exist_ok=True)
        if p.is_symlink() or p.is_file():
            p.unlink()
        if p.is_dir():
            return
        p.write_bytes(hashlib.shake_256(f"{name}{n}{seed}".encode()).digest(n))
    elif op == "rewrite-same-size-old-mtime" and p.is_file() and not p.is_symlink():
        size = p.stat().st_size
        p.write_bytes(hashlib.shake_256(f"x{seed}{time.time_ns()}".encode()).digest(size))
        os.utime(p, ns=(OLD_NS, OLD_NS))
    elif op == "delete" and (p.is_symlink() or p.is_file()):
        p.unlink()
    elif (
        op == "symlink"
        and p.parent.is_dir()
        and not p.parent.is_symlink()
        and not p.exists()
        and not p.is_symlink()
    ):
        os.symlink("../elsewhere", p)
    elif op == "chmod" and p.is_file() and not p.is_symlink():
        os.chmod(p, n)
    # setting an old mtime on everything written makes reuse decisions depend on ctime/inode
    if op == "write" and p.is_file():
        os.utime(p, ns=(OLD_NS, OLD_NS))


def _property(store: clawstore.ArtifactStore, base: Path, edits: list[tuple[str, str, int, int]]) -> None:
    inline_max = cp_writer.INLINE_MAX
    cp_writer.INLINE_MAX = 3  # exercise index blobs and delta configs on small trees
    try:
        _property_run(store, base, edits)
    finally:
        cp_writer.INLINE_MAX = inline_max


def _property_run(store: clawstore.ArtifactStore, base: Path, edits: list[tuple[str, str, int, int]]) -> None:
    work = Path(tempfile.mkdtemp(dir=base))
    root = work / "root"
    root.mkdir()
    repo = f"prop/r{work.name.lower().replace('_', '')}"
    snapshots: list[tuple[str, dict[str, tuple[object, ...]]]] = []
    for op, name, n, seed in [*edits, ("checkpoint", "", 0, 0)]:
        if op == "checkpoint":
            r = cp.create(store, f"{repo}:t", root, threshold=2048, group_bytes=1024, pack_limit=8192)
            snapshots.append((str(r.digest), tree_state(root)))
        else:
            _apply(root, op, name, n, seed)
    for i, (digest, state) in enumerate(snapshots):
        out = work / f"out{i}"
        cp.restore(store, digest, out)
        assert tree_state(out) == state, f"checkpoint {i} of {len(snapshots)}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDIT, max_size=25))
def test_property_edit_sequences_local(
    local_store: clawstore.ArtifactStore, tmp_path: Path, edits: Any
) -> None:
    _property(local_store, tmp_path, edits)


@pytest.mark.s3
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDIT, max_size=15))
def test_property_edit_sequences_s3(s3_store: clawstore.ArtifactStore, tmp_path: Path, edits: Any) -> None:
    _property(s3_store, tmp_path, edits)


# -- S3 requests per checkpoint ------------------------------------------------------------------


class Sent:
    """The HTTP requests an S3 store's client sends (botocore's before-send hook: after retries
    are split into attempts, so every request on the wire is one entry)."""

    def __init__(self, store: clawstore.ArtifactStore) -> None:
        self.requests: list[tuple[str, str]] = []
        store.backend.client.meta.events.register("before-send.s3", self)  # type: ignore[attr-defined]

    def __call__(self, request: Any, **_: Any) -> None:
        self.requests.append((request.method, request.url.split("?")[0]))

    def take(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for method, _url in self.requests:
            out[method] = out.get(method, 0) + 1
        self.requests = []
        return out


@pytest.mark.s3
@pytest.mark.parametrize("via", ["store", "hub session as admin", "hub session as a user"])
def test_s3_requests_per_checkpoint(
    s3_store: clawstore.ArtifactStore, tmp_path: Path, via: str, no_racy: None
) -> None:
    """A first checkpoint costs at most 10 requests plus one per file over the threshold, one after
    changing a file at most 8 (issue 13), through the store and through a hub session: nothing is
    asked about twice (a blob just written, the parent's packs, the manifest before its tag), small
    blobs go as one conditional PUT, and the tag's compare-and-swap uses the ETag read with it."""
    from clawstore.hub import Hub, Principal

    src = tmp_path / "src"
    for i in range(300):  # > INLINE_MAX records (an index blob), a pack > 1 MiB (HEAD + PUT)
        p = src / f"d{i % 10}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(hashlib.shake_256(b"%d" % i).digest(4000 + i))
        os.utime(p, ns=(OLD_NS, OLD_NS))
    for i in range(2):  # over the threshold: one blob each
        (src / f"big{i}").write_bytes(hashlib.shake_256(b"big%d" % i).digest(100_000))
        os.utime(src / f"big{i}", ns=(OLD_NS, OLD_NS))
    hub = None
    store: Any = s3_store
    if via != "store":
        hub = Hub(s3_store, f"sqlite:///{tmp_path / 'catalog.sqlite'}")
        principal = Principal.local_admin()
        if via.endswith("user"):
            token = hub.issue_token(principal, "alice")
            hub.grant(principal, "alice", "push", "ck/**")
            hub.grant(principal, "alice", "pull", "ck/**")
            principal = hub.authenticate(token)
    sent = Sent(s3_store)

    def checkpoint() -> cp.CheckpointResult:
        if hub is None:
            return cp.create(store, "ck/r:latest", src, threshold=65536)
        with hub.session(principal, "ck/r", kind="checkpoint") as s:
            return cp.create(s, "ck/r:latest", src, threshold=65536)

    try:
        sent.take()
        checkpoint()
        # GET the tag (absent); HEAD + PUT the pack (> 1 MiB: it may be stored already) and each
        # large file; PUT the index blob, the config, the manifest (each If-None-Match) and the tag.
        first = sent.take()
        assert first == {"GET": 1, "HEAD": 3, "PUT": 7}
        assert sum(first.values()) <= 10 + 2
        (src / "d3" / "f3.bin").write_bytes(b"changed")
        cp.forget_recent()  # as a new process would: the parent's index comes from the store
        second = checkpoint()
        # GET the tag, the parent's manifest, config and index blob; PUT the new pack, the config,
        # the manifest and the tag (If-Match the ETag of the GET).
        assert sent.take() == {"GET": 4, "PUT": 4}
        assert second.hashed_files == 1 and second.reused_files == 301
        (src / "d4" / "f4.bin").write_bytes(b"changed too")
        third = checkpoint()  # the same process: the parent it just wrote is not read back
        assert sent.take() == {"GET": 2, "PUT": 4}
        assert third.hashed_files == 1
        fourth = checkpoint()  # nothing changed: a config and a manifest (created time differs)
        assert sent.take() == {"GET": 2, "PUT": 3}
        assert fourth.packs == 0
        out = tmp_path / "out"
        cp.restore(s3_store, "ck/r:latest", out)
        assert tree_state(out) == tree_state(src)
    finally:
        if hub is not None:
            hub.close()


def test_recent_checkpoints_are_bounded_and_exact(
    local_store: clawstore.ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process memory of recent checkpoints gives what a fresh load gives, and stays within
    its bounds (count and records)."""
    src = tmp_path / "src"
    make_tree(src)
    cp.forget_recent()
    digests = []
    for i in range(3):
        (src / f"n{i}").write_bytes(b"%d" % i)
        digests.append(cp.create(local_store, "ck/m:latest", src, **SMALL).digest)
    remembered = [cp.load(local_store, d) for d in digests]
    cp.forget_recent()
    for d, ck in zip(digests, remembered, strict=True):
        fresh = cp.load(local_store, d)
        assert fresh is not ck
        assert (fresh.entries, fresh.packs, fresh.config) == (ck.entries, ck.packs, ck.config)
    monkeypatch.setattr(
        cp_index, "RECENT_MAX_RECORDS", len(remembered[1].entries) + len(remembered[2].entries)
    )
    cp.forget_recent()
    for d in digests:
        cp.load(local_store, d)
    assert list(cp_index._recent) == [str(d) for d in digests[1:]]  # the oldest went first
