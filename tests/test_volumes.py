"""Volume snapshots end to end through the ArtifactStore: round trips, incremental chains,
squashing, concurrency (tag CAS), restore atomicity, the CLI. Trees are compared with
os.lstat/hashlib (tests/volume_trees.py), never with clawstore's own scanner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import clawstore
import pytest
import zstandard
from clawstore import _core, volumes
from clawstore import mediatypes as mt
from clawstore.errors import ClawstoreError, DigestMismatchError, TagConflictError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volume_trees import NS, assert_same_tree, describe, make_every_kind, set_mtime

REF = "volumes/workspace/alice:latest"


def restore_fresh(store: clawstore.ArtifactStore, ref: str, where: Path) -> Path:
    dest = where / f"restored-{len(list(where.iterdir()))}"
    volumes.restore(store, ref, dest)
    return dest


def test_round_trip_every_kind(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src)
    snap = volumes.snapshot(store, src, REF)
    assert snap.created_now and len(snap.layers) == 1
    dest = tmp_path / "dest"
    r = volumes.restore(store, REF, dest)
    assert_same_tree(src, dest)
    assert r.files == snap.files
    # hardlink identity survives
    assert os.stat(dest / "big.bin").st_ino == os.stat(dest / "nested" / "big-hardlink").st_ino
    # symlinks are links, never followed
    assert os.readlink(dest / "abs-link") == "/etc/hostname"
    assert os.readlink(dest / "nested" / "dangling") == "../nowhere/at/all"


def test_manifest_config_and_index_shape(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src)
    snap = volumes.snapshot(local_store, src, REF)
    raw = json.loads(local_store.get_manifest(snap.digest))
    assert raw["mediaType"] == mt.OCI_MANIFEST
    assert raw["artifactType"] == mt.VOLUME
    assert raw["config"]["mediaType"] == mt.VOLUME
    kinds = [layer["mediaType"] for layer in raw["layers"]]
    assert kinds == [mt.VOLUME_LAYER, mt.VOLUME_INDEX_V2_ZSTD]
    layer = raw["layers"][0]
    assert layer["annotations"][volumes.ANNOTATION_DIFF_ID].startswith("sha256:")
    config = json.loads(local_store.read_blob(raw["config"]["digest"]))
    assert config["parent"] is None
    assert config["index"]["digest"] == raw["layers"][1]["digest"]
    regular = [p for p, d in describe(src).items() if d[0] == 0o100000]
    assert config["files"] == len(regular)
    inodes = {(os.lstat(src / p).st_ino): os.lstat(src / p).st_size for p in regular}
    assert config["bytes"] == sum(inodes.values())
    listed = {e[0] for e in _core.decode_index(local_store.read_blob(config["index"]["digest"])).entries()}
    assert listed == set(describe(src))


def test_same_tree_same_layer_digest(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=100_000)
    a = volumes.snapshot(local_store, src, "v/a:1")
    # a copy with the same metadata (other inodes, ctimes) packs to the same bytes
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
    b = volumes.snapshot(local_store, copy, "v/b:1")
    assert a.layers[0].digest == b.layers[0].digest
    assert a.layers[0].annotations == b.layers[0].annotations


def edit_chain(src: Path) -> list[str]:
    """Apply a set of edits of every kind; returns their names."""
    (src / "text.py").write_text("changed\n")  # edit
    os.remove(src / "private")  # delete
    os.rename(src / "exec.sh", src / "nested" / "renamed.sh")  # rename
    shutil.rmtree(src / "nested" / "deeper")  # delete a subtree
    (src / "new dir" / "sub").mkdir(parents=True)  # new dirs
    (src / "new dir" / "sub" / "f").write_text("new")
    os.remove(src / "rel-link")  # symlink -> file
    (src / "rel-link").write_text("I was a symlink")
    os.remove(src / "empty-file")  # file -> symlink
    os.symlink("big.bin", src / "empty-file")
    shutil.rmtree(src / "empty dir")  # dir -> file
    (src / "empty dir").write_text("I was a dir")
    os.remove(src / "setuid")  # file -> dir
    (src / "setuid").mkdir()
    (src / "setuid" / "child").write_text("c")
    os.chmod(src / "sticky", 0o755)  # mode only
    set_mtime(src / "héllo wörld ✓.txt", 1_234_567_890 * NS + 5)  # mtime only
    return [
        "edit",
        "delete",
        "rename",
        "rmtree",
        "mkdir",
        "link->file",
        "file->link",
        "dir->file",
        "file->dir",
    ]


def test_incremental_chain_restores_latest(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=200_000)
    first = volumes.snapshot(store, src, REF)
    edit_chain(src)
    second = volumes.snapshot(store, src, REF)
    assert second.created_now
    assert second.parent == first.digest
    assert len(second.layers) == 2
    assert second.layers[0] == first.layers[0]
    assert (second.new_layer.annotations or {})[volumes.ANNOTATION_LAYER_KIND] == "delta"
    # the delta is small: the unchanged big file (and its hardlink) are not in it
    assert second.layers[1].size < first.layers[0].size / 4
    # a dir recreated under the same name -> opaque directory; then a third snapshot
    shutil.rmtree(src / "new dir")
    (src / "new dir").mkdir()
    (src / "new dir" / "only").write_text("only child")
    third = volumes.snapshot(store, src, REF)
    assert len(third.layers) == 3
    dest = restore_fresh(store, REF, tmp_path)
    assert_same_tree(src, dest)
    # every older snapshot still restores to its own tree
    dest1 = tmp_path / "first"
    volumes.restore(store, str(first.digest), dest1)
    assert (dest1 / "private").exists()
    hist = volumes.history(store, REF)
    assert [s.digest for s in hist] == [third.digest, second.digest, first.digest]


def test_unchanged_tree_makes_no_new_snapshot(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=1000)
    a = volumes.snapshot(store, src, REF)
    b = volumes.snapshot(store, src, REF)
    assert not b.created_now and b.digest == a.digest
    assert store.resolve(*REF.split(":")) == a.digest


def test_squash_past_chain_length_and_when_deltas_outweigh(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "base").write_bytes(os.urandom(50_000))
    volumes.snapshot(store, src, REF, max_chain=3)
    for i in range(2):
        (src / f"f{i}").write_text(str(i))
        s = volumes.snapshot(store, src, REF, max_chain=3)
    assert len(s.layers) == 3
    (src / "f9").write_text("9")
    s = volumes.snapshot(store, src, REF, max_chain=3)
    assert len(s.layers) == 1 and (s.layers[0].annotations or {})[volumes.ANNOTATION_LAYER_KIND] == "full"
    # a delta bigger than the base squashes as well
    (src / "huge").write_bytes(os.urandom(80_000))
    s = volumes.snapshot(store, src, REF)
    assert len(s.layers) == 1
    assert_same_tree(src, restore_fresh(store, REF, tmp_path))


def test_full_flag_forces_one_layer(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=1000)
    volumes.snapshot(store, src, REF)
    (src / "x").write_text("x")
    s = volumes.snapshot(store, src, REF, full=True)
    assert len(s.layers) == 1 and s.parent is not None


def test_content_digests_catch_same_metadata_edits(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("aaaa")
    volumes.snapshot(local_store, src, REF, content_digests=True)
    st = os.lstat(src / "f")
    (src / "f").write_text("bbbb")
    os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    s = volumes.snapshot(local_store, src, REF, content_digests=True)
    assert s.created_now
    dest = restore_fresh(local_store, REF, tmp_path)
    assert (dest / "f").read_text() == "bbbb"


def test_concurrent_snapshot_loses_cas(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    first = volumes.snapshot(store, src, REF)
    (src / "b").write_text("b")
    # someone else moves the tag between our resolve and our tag: simulate by wrapping resolve
    real_resolve = store.resolve
    other = volumes.snapshot(store, src, "volumes/other:x")

    def racing_resolve(repo: str, tag: str) -> clawstore.Digest:
        d = real_resolve(repo, tag)
        store.tag(repo, tag, other.digest)  # a concurrent writer wins
        return d

    store.resolve = racing_resolve  # type: ignore[method-assign]
    try:
        with pytest.raises(TagConflictError):
            volumes.snapshot(store, src, REF)
    finally:
        store.resolve = real_resolve  # type: ignore[method-assign]
    assert store.resolve(*REF.split(":")) == other.digest != first.digest


def test_restore_refuses_non_empty_and_force_replaces(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=1000)
    volumes.snapshot(store, src, REF)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep-me").write_text("precious")
    with pytest.raises(ClawstoreError, match="not empty"):
        volumes.restore(store, REF, dest)
    assert (dest / "keep-me").read_text() == "precious"
    volumes.restore(store, REF, dest, force=True)
    assert_same_tree(src, dest)
    # an existing empty directory is fine without force
    empty = tmp_path / "empty"
    empty.mkdir()
    volumes.restore(store, REF, empty)
    assert_same_tree(src, empty)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_corrupt_layer_leaves_no_target(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=300_000)
    snap = volumes.snapshot(local_store, src, REF)
    blob = local_store.blob_local_path(snap.layers[0].digest)
    assert blob is not None
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises((DigestMismatchError, clawstore.UnsafeArchiveError, OSError)):
        volumes.restore(local_store, REF, dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src", "store"] or not any(
        p.name.startswith(".dest") for p in tmp_path.iterdir()
    )


def test_diff_id_checked_on_request(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    """The blob digest is always verified; the diff_id (a second sha256 over the uncompressed
    tar) only with verify_diff_id: a manifest whose layer claims another diff_id restores by
    default (its bytes are the ones the digest names) and is refused when asked to check."""
    src = tmp_path / "src"
    make_every_kind(src, big=300_000)
    snap = volumes.snapshot(store, src, REF)
    doc = json.loads(store.get_manifest(snap.digest))
    doc["layers"][0]["annotations"][volumes.ANNOTATION_DIFF_ID] = "sha256:" + "0" * 64
    forged = store.put_manifest(json.dumps(doc).encode(), mt.OCI_MANIFEST)
    (tmp_path / "plain").mkdir()
    assert_same_tree(src, restore_fresh(store, str(forged.digest), tmp_path / "plain"))
    dest = tmp_path / "checked"
    with pytest.raises(DigestMismatchError, match="diff_id"):
        volumes.restore(store, forged.digest, dest, verify_diff_id=True)
    assert not dest.exists()
    volumes.restore(store, snap.digest, dest, verify_diff_id=True)
    assert_same_tree(src, dest)


def test_restore_removes_what_dead_restores_left(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    """A restore removes the `.NAME.restore-*` directories of restores that died (no lock held)
    and leaves alone one still in progress (its flock held) and other names."""
    import fcntl

    src = tmp_path / "src"
    make_every_kind(src, big=10_000)
    volumes.snapshot(store, src, REF)
    dead = tmp_path / ".dest.restore-dead1"
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "file").write_bytes(b"x" * 1000)
    live = tmp_path / ".dest.restore-live1"
    live.mkdir()
    other = tmp_path / ".destination.restore-x"
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        volumes.restore(store, REF, tmp_path / "dest")
        assert not dead.exists() and live.is_dir() and other.is_dir()
    finally:
        os.close(fd)
    assert_same_tree(src, tmp_path / "dest")
    volumes.restore(store, REF, tmp_path / "dest", force=True)
    assert not live.exists()  # its owner is gone now
    assert not list(tmp_path.glob(".dest.restor*"))


def test_restore_through_streaming_reader(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    """The non-local path (what S3 uses): layers read through the store's verifying reader."""
    src = tmp_path / "src"
    make_every_kind(src, big=2_000_000)
    volumes.snapshot(local_store, src, REF)
    (src / "text.py").write_text("v2")
    volumes.snapshot(local_store, src, REF)
    local_store.blob_local_path = lambda digest: None  # type: ignore[method-assign]
    dest = tmp_path / "dest"
    volumes.restore(local_store, REF, dest)
    assert_same_tree(src, dest)


def test_snapshot_errors_are_clear(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        volumes.snapshot(store, tmp_path / "missing", REF)
    with pytest.raises(clawstore.InvalidNameError):
        volumes.snapshot(store, tmp_path, "Bad Name:tag")
    blob = store.put_blob(b"{}", media_type=mt.OCI_EMPTY)
    m = clawstore.ImageManifest(config=blob, layers=(), artifact_type="application/vnd.example.other")
    d = store.put_manifest(m.to_json())
    store.tag("not/a/volume", "t", d.digest)
    with pytest.raises(clawstore.InvalidManifestError):
        volumes.restore(store, "not/a/volume:t", tmp_path / "x")


def test_progress_events(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_every_kind(src, big=1000)
    events: list[volumes.ProgressEvent] = []
    volumes.snapshot(store, src, REF, progress=events.append)
    assert {e.phase for e in events} >= {"scan", "pack"}
    last = [e for e in events if e.phase == "pack"][-1]
    assert last.files == last.total_files and last.bytes == last.total_bytes
    events.clear()
    volumes.restore(store, REF, tmp_path / "d", progress=events.append)
    assert events[-1].phase == "restore" and events[-1].bytes == events[-1].total_bytes


# -- random edit sequences vs a fresh full snapshot ---------------------------------------------

NAMES = ["a", "b", "c d", "é"]
op = st.one_of(
    st.tuples(
        st.just("write"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.binary(max_size=300)
    ),
    st.tuples(st.just("mkdir"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.none()),
    st.tuples(
        st.just("symlink"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.sampled_from(NAMES)
    ),
    st.tuples(st.just("delete"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.none()),
    st.tuples(
        st.just("hardlink"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.sampled_from(NAMES)
    ),
    st.tuples(
        st.just("chmod"),
        st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
        st.sampled_from([0o600, 0o755]),
    ),
    st.tuples(
        st.just("rename"), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.sampled_from(NAMES)
    ),
)


def apply_op(root: Path, kind: str, parts: list[str], arg: object) -> None:
    path = root.joinpath(*parts)
    parent = path.parent
    if not parent.is_dir() or parent.is_symlink():
        return
    exists = path.exists() or path.is_symlink()

    def remove() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif exists:
            path.unlink()

    if kind == "write":
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink():
            path.unlink()
        with open(path, "ab" if exists and len(arg) % 2 else "wb") as f:  # type: ignore[arg-type]
            f.write(arg)  # type: ignore[arg-type]
    elif kind == "mkdir":
        remove()
        path.mkdir()
    elif kind == "symlink":
        remove()
        os.symlink(str(arg), path)
    elif kind == "delete":
        remove()
    elif kind == "hardlink":
        src = parent / str(arg)
        if src.is_file() and not src.is_symlink() and src != path:
            remove()
            os.link(src, path)
    elif kind == "chmod":
        if exists and not path.is_symlink():
            os.chmod(path, int(arg))  # type: ignore[call-overload]
    elif kind == "rename":
        dst = parent / str(arg)
        if exists and dst != path and not (dst.is_dir() and not dst.is_symlink()):
            if path.is_dir() and not path.is_symlink() and (dst.exists() or dst.is_symlink()):
                dst.unlink()  # rename(2) puts a directory only over an empty directory
            os.rename(path, dst)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.lists(op, min_size=1, max_size=6), min_size=1, max_size=4))
def test_random_edit_sequences_match_full_snapshot(
    local_store: clawstore.ArtifactStore, tmp_path_factory: pytest.TempPathFactory, steps: list
) -> None:
    work = tmp_path_factory.mktemp("hyp")
    src = work / "src"
    src.mkdir()
    (src / "a").write_text("seed")
    ref = f"hyp/{work.name.lower().replace('_', '-')}:latest"
    volumes.snapshot(local_store, src, ref)
    for batch in steps:
        for kind, parts, arg in batch:
            apply_op(src, kind, parts, arg)
        volumes.snapshot(local_store, src, ref)
    incremental = work / "incremental"
    volumes.restore(local_store, ref, incremental)
    assert_same_tree(src, incremental)
    full = volumes.snapshot(local_store, src, ref + "-full", full=True)
    fresh = work / "fresh"
    volumes.restore(local_store, str(full.digest), fresh)
    assert describe(incremental) == describe(fresh)


# -- CLI -----------------------------------------------------------------------------------------


def run_cli(store_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from clawstore.cli import main; main()", "--store", store_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(clawstore.__file__).parent.parent)},
    )


def test_cli_snapshot_restore_ls_history(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    src = tmp_path / "src"
    make_every_kind(src, big=10_000)
    r = run_cli(url, "volume", "snapshot", str(src), "vols/w:latest")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip()
    assert digest.startswith("sha256:")
    (src / "added").write_text("new")
    r2 = run_cli(url, "volume", "snapshot", str(src), "vols/w:latest")
    assert r2.returncode == 0 and "delta" in r2.stderr
    dest = tmp_path / "dest"
    r = run_cli(url, "volume", "restore", "vols/w:latest", str(dest))
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, dest)
    r = run_cli(url, "volume", "restore", "vols/w:latest", str(dest))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert run_cli(url, "volume", "restore", "vols/w:latest", str(dest), "--force").returncode == 0
    ls = run_cli(url, "volume", "ls")
    assert ls.returncode == 0 and "vols/w:latest" in ls.stdout
    hist = run_cli(url, "volume", "history", "vols/w:latest")
    assert hist.returncode == 0 and digest in hist.stdout and len(hist.stdout.strip().splitlines()) == 2
    missing = run_cli(url, "volume", "restore", "vols/none:latest", str(tmp_path / "n"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")


# -- kill -9 in the middle ------------------------------------------------------------------------

KILL_SCRIPT = """
import sys, clawstore
from clawstore import volumes
store = clawstore.open(sys.argv[1])
print("start", flush=True)
if sys.argv[2] == "snapshot":
    volumes.snapshot(store, sys.argv[3], sys.argv[4])
else:
    volumes.restore(store, sys.argv[3], sys.argv[4])
print("done", flush=True)
"""


def run_and_kill(args: list[str], delay: float) -> bool:
    """Start a snapshot/restore in a child, SIGKILL it after `delay`s; True if it finished first."""
    p = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "start"
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=60)
        return False
    return p.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_kill9_during_snapshot_and_restore(tmp_path: Path, delay: float) -> None:
    url = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(256 * 1024))
    store = clawstore.open(url)
    first = volumes.snapshot(store, src, REF)
    for i in range(40):
        (src / f"g{i}").write_bytes(os.urandom(256 * 1024))
    finished = run_and_kill([url, "snapshot", str(src), REF], delay)
    # The tag points at a whole snapshot: the old one, or the new one (the child may be killed
    # after moving the tag and before exiting), whose every layer is stored and which restores
    # to exactly the new tree below.
    now = store.resolve(*REF.split(":"))
    if finished or now != first.digest:
        assert all(store.has_blob(d.digest) for d in volumes.load(store, now).layers)
    dest = tmp_path / "dest"
    volumes.restore(store, REF, dest)
    if now == first.digest:
        assert not (dest / "g0").exists() and (dest / "f39").exists()
    else:
        assert_same_tree(src, dest)
    # a killed restore never leaves a target that looks complete unless it is: the kill may land
    # after the final rename and before the process exits (seen under load), and then the
    # target is the whole tree
    dest2 = tmp_path / "dest2"
    finished = run_and_kill([url, "restore", REF, str(dest2)], delay)
    if finished or dest2.exists():
        assert_same_tree(dest, dest2)
    # and a later restore to the same place works and removes what the killed one left
    shutil.rmtree(dest2, ignore_errors=True)
    volumes.restore(store, REF, dest2)
    assert_same_tree(dest, dest2)
    assert not list(tmp_path.glob(".dest2.restore-*"))


SECRET = b"TOP-SECRET-0600-BYTES-OUTSIDE!!\n"
HARMLESS = b"harmless workspace file content\n"


def _layer_tars(store: clawstore.ArtifactStore, snap: volumes.Snapshot) -> list[bytes]:
    dctx = zstandard.ZstdDecompressor()
    return [dctx.decompressobj().decompress(store.read_blob(d.digest)) for d in snap.layers]


def test_symlink_swapped_in_after_scan_is_never_read(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    """Issue 16 item 3: a thread flips ws/x between a regular file and a same-size symlink to a
    0600 file outside the workspace while snapshots run; the outside bytes must never get into a
    layer (a snapshot may fail with "changed while packing", or pack x as a file or a symlink)."""
    assert len(SECRET) == len(HARMLESS)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    staging = tmp_path / "staging"  # same filesystem, outside the workspace
    staging.mkdir()
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    for i in range(50):
        (ws / "sub" / f"f{i}").write_bytes(HARMLESS)
    (ws / "x").write_bytes(HARMLESS)
    stop = threading.Event()

    def flip() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            link, plain = staging / f"l{n}", staging / f"p{n}"
            os.symlink(secret, link)
            os.replace(link, ws / "x")
            plain.write_bytes(HARMLESS)
            os.replace(plain, ws / "x")

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    packed = failed = 0
    try:
        for i in range(40):
            try:
                snap = volumes.snapshot(local_store, ws, f"race/ws:t{i}", full=True)
            except ClawstoreError as e:
                assert "changed while packing" in str(e)
                failed += 1
                continue
            packed += 1
            for tar_bytes in _layer_tars(local_store, snap):
                assert SECRET not in tar_bytes, "a layer holds the bytes of the file outside"
    finally:
        stop.set()
        flipper.join()
    assert packed + failed == 40


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_restored_modes_are_exact_whatever_the_umask(
    local_store: clawstore.ArtifactStore, tmp_path: Path, umask: int
) -> None:
    """Small files are created with their final mode when the umask leaves it whole (no
    fchmod), and chmod'ed otherwise: either way every mode comes back exactly, set-id and
    sticky bits included (`special_bits`)."""
    src = tmp_path / "src"
    src.mkdir()
    modes = [0o400, 0o444, 0o600, 0o640, 0o644, 0o660, 0o666, 0o700, 0o755, 0o777, 0o1755, 0o2755, 0o4755]
    for m in modes:
        p = src / f"f{m:o}"
        p.write_bytes(b"x" * (m % 7))
        os.chmod(p, m)
    volumes.snapshot(local_store, src, "vol/modes:1")
    old = os.umask(umask)
    try:
        volumes.restore(local_store, "vol/modes:1", tmp_path / "out")
    finally:
        os.umask(old)
    got = {p.name: p.stat().st_mode & 0o7777 for p in (tmp_path / "out").iterdir()}
    assert got == {f"f{m:o}": m for m in modes}
