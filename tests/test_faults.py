"""Injected faults (ENOSPC, EIO, a failing source, an interrupt) on every local write path:
the call fails with the error, no temp file or partial object is left, and the store's earlier
state is intact and still writable."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import clawstore
import pytest
from clawstore import ArtifactStore, ImageManifest
from clawstore import mediatypes as mt
from clawstore.backends import local as local_mod
from clawstore.manifest import EMPTY_CONFIG


def files(root: Path) -> dict[str, bytes]:
    """Every file of the store but the (empty) tag lock files, which a CAS creates first."""
    return {
        os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes()
        for d, _, fs in os.walk(root)
        for f in fs
        if f != ".lock"
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    with clawstore.open(tmp_path / "store") as s:
        s.put_blob(mt.EMPTY_JSON)
        layer = s.put_blob(b"old layer")
        d = s.put_manifest(ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.VOLUME).to_json())
        s.tag("repo", "latest", d.digest)
        yield s


BIG = hashlib.shake_256(b"big").digest(3_000_000)


def new_manifest(s: ArtifactStore) -> bytes:
    return ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.CHECKPOINT, annotations={"n": "1"}).to_json()


WRITES: dict[str, Callable[[ArtifactStore, Path], object]] = {
    "blob bytes": lambda s, p: s.put_blob(BIG),
    "blob stream": lambda s, p: s.put_blob(io.BytesIO(BIG)),
    "blob path": lambda s, p: s.put_blob(p),
    "manifest": lambda s, p: s.put_manifest(new_manifest(s)),
    "tag": lambda s, p: s.tag("repo", "latest", s.put_manifest(new_manifest(s)).digest),
    "new tag": lambda s, p: s.tag("repo/new", "t", s.resolve("repo", "latest")),
}


def enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def check_unchanged(s: ArtifactStore, before: dict[str, bytes], allow_new: bool = False) -> None:
    root = Path(s.backend.root)  # type: ignore[attr-defined]
    after = files(root)
    assert [k for k in after if k.startswith("tmp")] == [], "temp file left behind"
    if allow_new:  # e.g. a manifest committed before the tag write failed
        assert {k: v for k, v in after.items() if k in before} == before
    else:
        assert after == before
    old = s.resolve("repo", "latest")
    assert s.get_manifest_typed(old)


@pytest.mark.parametrize("fault", ["write", "fsync", "link", "replace", "copy"])
@pytest.mark.parametrize("what", list(WRITES))
def test_fault_leaves_nothing(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, what: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(BIG)
    root = Path(store.backend.root)  # type: ignore[attr-defined]
    # the manifest a tag write needs is committed first, outside the fault
    if what == "tag":
        store.put_manifest(new_manifest(store))
    before = files(root)
    fake_copy = None
    if fault == "copy":

        def fake_copy(path: str, dst: str, algorithm: str) -> tuple[str, int]:
            with open(dst, "xb") as f:  # the Rust copier creates dst, then runs out of space
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    target = {
        "write": (os, "write", enospc),
        "fsync": (os, "fsync", enospc),
        "link": (os, "link", enospc),
        "replace": (os, "replace", enospc),
        "copy": (local_mod._core, "copy_file_hashed", fake_copy),
    }[fault]
    monkeypatch.setattr(*target)
    try:
        WRITES[what](store, src)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        failed = True
    else:
        failed = False
    monkeypatch.undo()
    # which paths must see which fault: a fault a path never meets changes nothing
    if failed:
        check_unchanged(store, before)
    else:
        after = files(root)
        assert [k for k in after if k.startswith("tmp")] == []
    # and the store still works afterwards
    WRITES[what](store, src)
    if what.startswith("blob"):
        assert store.read_blob("sha256:" + hashlib.sha256(BIG).hexdigest()) == BIG
    elif what == "tag":
        assert store.resolve("repo", "latest") == "sha256:" + hashlib.sha256(new_manifest(store)).hexdigest()
    elif what == "new tag":
        assert store.resolve("repo/new", "t") == store.resolve("repo", "latest")


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "source I/O error"), KeyboardInterrupt()])
def test_failing_source(store: ArtifactStore, exc: BaseException) -> None:
    root = Path(store.backend.root)  # type: ignore[attr-defined]
    before = files(root)

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
            self.n += 1
            if self.n > 3:
                raise exc
            b[:1000] = b"x" * 1000
            return 1000

    with pytest.raises(type(exc)):
        store.put_blob(Failing())
    check_unchanged(store, before)


def test_text_stream_refused(store: ArtifactStore) -> None:
    root = Path(store.backend.root)  # type: ignore[attr-defined]
    before = files(root)
    with pytest.raises(TypeError):
        store.put_blob(io.StringIO("text, not bytes"))  # type: ignore[arg-type]
    check_unchanged(store, before)


@pytest.mark.parametrize("err", [errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK])
def test_no_hardlinks_falls_back_to_rename(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def no_link(*_: object, **__: object) -> None:
        raise OSError(err, "hard links not supported (injected)")

    monkeypatch.setattr(os, "link", no_link)
    d = store.put_blob(BIG).digest
    assert store.put_blob(io.BytesIO(BIG)).digest == d  # the second put keeps the first
    m = store.put_manifest(new_manifest(store)).digest
    monkeypatch.undo()
    assert store.read_blob(d) == BIG
    assert store.get_manifest(m) == new_manifest(store)
    assert list(Path(store.backend.root, "tmp").iterdir()) == []  # type: ignore[attr-defined]


def test_durability_order(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd's commit order: data fsynced before the name appears; each new directory entry
    (fanout directories included) and the final name made durable by fsyncing its directory."""
    root = Path(store.backend.root)  # type: ignore[attr-defined]
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace, real_dir = os.fsync, os.link, os.replace, local_mod.fsync_dir

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(target):  # fsync_dir's own fsync is recorded as fsync_dir
            events.append(("fsync", target))
        real_fsync(fd)

    def link(a: str, b: str, **kw: object) -> None:
        events.append(("link", os.fspath(b)))
        real_link(a, b, **kw)  # type: ignore[arg-type]

    def replace(a: str, b: str, **kw: object) -> None:
        events.append(("rename", os.fspath(b)))
        real_replace(a, b, **kw)  # type: ignore[arg-type]

    def fsync_dir(p: str) -> None:
        events.append(("fsync_dir", os.fspath(p)))
        real_dir(p)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(local_mod, "fsync_dir", fsync_dir)

    d = store.put_blob(b"new", algorithm="blake3").digest  # a new algorithm dir and fanout dir
    final = str(root / "blobs" / "blake3" / d.encoded[:2] / d.encoded)
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "fsync_dir", "fsync_dir", "link", "fsync_dir"], events
    assert events[0][1].startswith(str(root / "tmp"))
    assert {p for k, p in events[1:3]} == {str(root / "blobs"), str(root / "blobs" / "blake3")}
    assert events[3][1] == final and events[4][1] == os.path.dirname(final)

    events.clear()
    store.tag("new/repo", "t", store.resolve("repo", "latest"))
    renames = [i for i, (k, _) in enumerate(events) if k == "rename"]
    (r,) = renames
    tag_path = str(root / "refs" / "new" / "repo" / "_tags" / "t")
    assert events[r][1] == tag_path
    assert events[r - 1][0] == "fsync" and events[r + 1] == ("fsync_dir", os.path.dirname(tag_path))
    dirs = {p for k, p in events[:r] if k == "fsync_dir"}
    assert dirs == {str(root / "refs"), str(root / "refs" / "new"), str(root / "refs" / "new" / "repo")}


def test_tmp_dir_removed_by_hand(store: ArtifactStore) -> None:
    tmp = Path(store.backend.root, "tmp")  # type: ignore[attr-defined]
    tmp.rmdir()
    d = store.put_blob(b"after rm -r tmp").digest
    assert store.read_blob(d) == b"after rm -r tmp"
    assert list(tmp.iterdir()) == []


def test_oversized_manifest_file_is_not_read_whole(store: ArtifactStore) -> None:
    d = store.resolve("repo", "latest")
    path = store.backend.layout.manifest(d)  # type: ignore[attr-defined]
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB on paper
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(clawstore.DigestMismatchError):
            store.get_manifest(d)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"reading a damaged manifest allocated {peak} bytes"
    path.write_bytes(good)
    assert store.get_manifest(d) == good


def test_damaged_tag_file(store: ArtifactStore) -> None:
    d = store.resolve("repo", "latest")
    tag_file = store.backend.layout.tag("repo", "latest")  # type: ignore[attr-defined]
    tag_file.write_bytes(b"sha256:garbage\n")
    with pytest.raises(clawstore.ClawstoreError):
        store.resolve("repo", "latest")
    with pytest.raises(clawstore.TagConflictError):
        store.tag("repo", "latest", d, expect=clawstore.MISSING)
    with pytest.raises(clawstore.TagConflictError):
        store.tag("repo", "latest", d, expect=d)
    assert store.tag("repo", "latest", d) is None  # expect=ANY repairs it
    assert store.resolve("repo", "latest") == d
    tag_file.write_bytes(b"\x00\x01")
    with pytest.raises(clawstore.RefNotFoundError):
        store.untag("repo", "latest")  # removed: there was no valid tag to return
    assert store.list_tags("repo") == []


def test_new_store_directories_are_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = local_mod.fsync_dir
    monkeypatch.setattr(local_mod, "fsync_dir", lambda p: (synced.append(os.fspath(p)), real(p)))
    clawstore.open(tmp_path / "a" / "store").close()
    assert str(tmp_path) in synced  # the new `a` entry
    assert str(tmp_path / "a") in synced  # the new `store` entry
    assert str(tmp_path / "a" / "store") in synced  # blobs, manifests, refs, tmp


def test_streamed_blob_writeback_starts_as_it_goes(
    local_store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large streamed blob asks the kernel to start writing each range back as it is written
    (so the final fsync waits for little): contiguous ranges, in order, all before the fsync."""
    events: list[tuple[str, int, int]] = []
    real_wb, real_fsync = local_mod._core.start_writeback, os.fsync

    def start_writeback(fd: int, offset: int, length: int) -> None:
        events.append(("writeback", offset, length))
        real_wb(fd, offset, length)

    def fsync(fd: int) -> None:
        if not os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            events.append(("fsync", 0, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(local_mod, "WRITEBACK_EVERY", 1 << 20)
    monkeypatch.setattr(local_mod._core, "start_writeback", start_writeback)
    monkeypatch.setattr(os, "fsync", fsync)
    data = os.urandom(5 * (1 << 20) + 12345)
    desc = local_store.put_blob(io.BufferedReader(io.BytesIO(data)))  # type: ignore[arg-type]
    assert local_store.get_blob(desc.digest).read() == data
    kinds = [k for k, _, _ in events]
    assert kinds[-1] == "fsync" and kinds.count("fsync") == 1, events
    ranges = [(o, n) for k, o, n in events if k == "writeback"]
    assert len(ranges) == 5, ranges
    assert all(n >= 1 << 20 for _, n in ranges)
    assert [o for o, _ in ranges] == [sum(n for _, n in ranges[:i]) for i in range(len(ranges))]


def test_start_writeback_is_only_a_hint(tmp_path: Path) -> None:
    from clawstore import _core

    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    with open(p, "rb+") as f:
        _core.start_writeback(f.fileno(), 0, 10000)
        _core.start_writeback(f.fileno(), 1 << 40, 1)  # past the end: nothing to do
    _core.start_writeback(-1, 0, 1)  # a bad descriptor is not an error either
    assert p.read_bytes() == b"x" * 10000
