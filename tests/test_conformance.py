"""The backend conformance suite: the contract of `ArtifactStore`, run against every backend.

Only the public `ArtifactStore` API is used here (no paths, no keys), so a new data plane joins
by adding itself to `conftest.BACKENDS`. Digests are checked against independent oracles:
`hashlib` and the `blake3` package.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import clawstore
import pytest
from clawstore import (
    ANY,
    MISSING,
    ArtifactStore,
    BlobNotFoundError,
    Descriptor,
    Digest,
    DigestMismatchError,
    ImageManifest,
    Index,
    InvalidManifestError,
    ManifestNotFoundError,
    NotFoundError,
    RefNotFoundError,
    TagConflictError,
)
from clawstore import mediatypes as mt
from clawstore.manifest import EMPTY_CONFIG, MAX_MANIFEST_SIZE, canonical_json


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oracle(data: bytes, algorithm: str = "sha256") -> str:
    if algorithm == "blake3":
        return "blake3:" + blake3.blake3(data).hexdigest()
    return f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}:{n}".encode()).digest(n) if n else b""


class Pipe(io.RawIOBase):
    """A non-seekable stream handing out data in odd-sized pieces, like a pipe or socket."""

    def __init__(self, data: bytes, piece: int = 7919) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._piece = piece

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._piece, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class ReadOnly:
    """A file-like object with only `read` (no readinto, no seek)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 3001) if n > 0 else n)


def empty_config(store: ArtifactStore) -> Descriptor:
    d = store.put_blob(mt.EMPTY_JSON, media_type=mt.OCI_EMPTY)
    assert d.digest == mt.EMPTY_DIGEST == sha256(b"{}")
    return EMPTY_CONFIG


def push_artifact(
    store: ArtifactStore, content: bytes, tag: str | None = None, repo: str = "r"
) -> Descriptor:
    empty_config(store)
    layer = store.put_blob(content, media_type=mt.VOLUME_LAYER)
    m = ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.VOLUME)
    d = store.put_manifest(m.to_json())
    if tag:
        store.tag(repo, tag, d.digest)
    return d


# -- blobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_put_bytes_roundtrip(store: ArtifactStore, size: int) -> None:
    data = payload(size, seed=size)
    d = store.put_blob(data)
    assert d.digest == sha256(data)
    assert isinstance(d.digest, Digest)
    assert d.size == size
    assert d.media_type == mt.OCTET_STREAM
    assert store.has_blob(d.digest)
    assert store.stat_blob(d.digest) == size
    assert store.read_blob(d.digest) == data
    with store.get_blob(d.digest) as r:
        assert r.read() == data
        assert r.verified


def test_empty_blob(store: ArtifactStore) -> None:
    d = store.put_blob(b"")
    assert d.digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert d.size == 0
    assert store.stat_blob(d.digest) == 0
    with store.get_blob(d.digest) as r:
        assert r.read() == b""
        assert r.verified
    assert store.put_blob(io.BytesIO(b"")).digest == d.digest


def test_put_bytes_like(store: ArtifactStore) -> None:
    data = payload(10000, 1)
    for src in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert store.put_blob(src).digest == sha256(data)
    assert store.put_blob(data, media_type=mt.CHECKPOINT_FILE).media_type == mt.CHECKPOINT_FILE


def test_put_from_path(store: ArtifactStore, tmp_path: Path) -> None:
    data = payload(2_500_000, 2)
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    for src in (p, str(p)):
        d = store.put_blob(src)
        assert (d.digest, d.size) == (sha256(data), len(data))
    assert store.read_blob(d.digest) == data
    assert p.read_bytes() == data  # source untouched


def test_put_from_missing_path(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_blob(tmp_path / "nope")
    assert list(store.iter_blobs()) == []


def test_put_from_file_objects(store: ArtifactStore, tmp_path: Path) -> None:
    data = payload(3_000_001, 3)
    want = sha256(data)
    p = tmp_path / "f"
    p.write_bytes(data)
    with open(p, "rb") as f:
        assert store.put_blob(f).digest == want
    with open(p, "rb", buffering=0) as f:
        assert store.put_blob(f).digest == want
    assert store.put_blob(io.BytesIO(data)).digest == want
    assert store.put_blob(Pipe(data)).digest == want
    assert store.put_blob(io.BufferedReader(Pipe(data))).digest == want  # type: ignore[arg-type]
    assert store.put_blob(ReadOnly(data)).digest == want  # type: ignore[arg-type]
    assert store.read_blob(want) == data


def test_put_from_os_pipe(store: ArtifactStore) -> None:
    """A real pipe (like stdin): non-seekable, filled by another thread while we read."""
    data = payload(5_000_000, 4)
    r, w = os.pipe()

    def feed() -> None:
        with open(w, "wb") as out:
            for i in range(0, len(data), 65536):
                out.write(data[i : i + 65536])

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    with open(r, "rb") as src:
        d = store.put_blob(src, expected=sha256(data))
    t.join()
    assert (d.digest, d.size) == (sha256(data), len(data))
    assert store.read_blob(d.digest) == data


def test_put_from_fifo_path(store: ArtifactStore, tmp_path: Path) -> None:
    """A path that is not a regular file (a FIFO, /dev/stdin) is streamed; a directory is refused."""
    data = payload(3_000_000, 11)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as out:
            out.write(data)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    d = store.put_blob(fifo)
    t.join()
    assert (d.digest, d.size) == (sha256(data), len(data))
    with pytest.raises(IsADirectoryError):
        store.put_blob(tmp_path)
    assert set(store.iter_blobs()) == {d.digest}


def test_put_from_file_object_at_offset(store: ArtifactStore) -> None:
    """A file object is read from its current position, as copyfileobj would."""
    f = io.BytesIO(b"headerPAYLOAD")
    f.seek(6)
    assert store.put_blob(f).digest == sha256(b"PAYLOAD")


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "blake3"])
@pytest.mark.parametrize("kind", ["bytes", "path", "stream"])
def test_algorithms(store: ArtifactStore, tmp_path: Path, algorithm: str, kind: str) -> None:
    data = payload(1_234_567, 5)
    want = oracle(data, algorithm)
    p = tmp_path / "src"
    p.write_bytes(data)
    src: object = {"bytes": data, "path": p, "stream": Pipe(data)}[kind]
    d = store.put_blob(src, algorithm=algorithm)  # type: ignore[arg-type]
    assert d.digest == want
    assert Digest(want).algorithm == algorithm
    assert store.stat_blob(want) == len(data)
    with store.get_blob(want) as r:
        assert r.read() == data
    # expected= selects the algorithm by itself
    src2: object = {"bytes": data, "path": p, "stream": Pipe(data)}[kind]
    assert store.put_blob(src2, expected=want).digest == want  # type: ignore[arg-type]
    assert want in set(store.iter_blobs())


def test_same_content_different_algorithms_are_different_blobs(store: ArtifactStore) -> None:
    data = b"same bytes"
    digests = {store.put_blob(data, algorithm=a).digest for a in ("sha256", "sha512", "blake3")}
    assert digests == {oracle(data, a) for a in ("sha256", "sha512", "blake3")}
    store.delete_blob(oracle(data, "sha512"))
    assert store.has_blob(oracle(data, "sha256")) and store.has_blob(oracle(data, "blake3"))


@pytest.mark.parametrize("kind", ["bytes", "path", "stream"])
def test_expected_digest(store: ArtifactStore, tmp_path: Path, kind: str) -> None:
    data = payload(300_000, 6)
    p = tmp_path / "src"
    p.write_bytes(data)

    def src() -> object:
        return {"bytes": data, "path": p, "stream": io.BytesIO(data)}[kind]

    wrong = sha256(data + b"x")
    with pytest.raises(DigestMismatchError):
        store.put_blob(src(), expected=wrong)  # type: ignore[arg-type]
    assert not store.has_blob(wrong)
    assert not store.has_blob(sha256(data))  # nothing stored under either name
    assert list(store.iter_blobs()) == []
    with pytest.raises(DigestMismatchError):
        store.put_blob(src(), expected=oracle(data, "blake3"), algorithm="sha256")  # type: ignore[arg-type]
    d = store.put_blob(src(), expected=Digest(sha256(data)))  # type: ignore[arg-type]
    assert d.digest == sha256(data)


def test_idempotent_put(store: ArtifactStore, tmp_path: Path) -> None:
    data = payload(100_000, 7)
    d1 = store.put_blob(data)
    d2 = store.put_blob(io.BytesIO(data))
    p = tmp_path / "x"
    p.write_bytes(data)
    d3 = store.put_blob(p)
    assert d1 == d2 == d3
    assert list(store.iter_blobs()) == [d1.digest]
    assert store.read_blob(d1.digest) == data


def test_missing_blob(store: ArtifactStore) -> None:
    d = sha256(b"never stored")
    assert not store.has_blob(d)
    for call in (store.stat_blob, store.get_blob, store.read_blob, store.delete_blob):
        with pytest.raises(BlobNotFoundError):
            call(d)
    assert issubclass(BlobNotFoundError, NotFoundError)


def test_get_blob_range(store: ArtifactStore) -> None:
    """Ranged reads (checkpoint packs): exact bytes for any range, short at the end, empty past it,
    BlobNotFoundError for a missing blob. Unverified by design: callers check their own digests."""
    data = payload(3 * 1024 * 1024 + 17, seed=5)
    d = store.put_blob(data).digest
    for off, n in [(0, 1), (0, len(data)), (1, 4096), (1024 * 1024 - 3, 2 * 1024 * 1024), (len(data) - 5, 5)]:
        assert store.get_blob_range(d, off, n) == data[off : off + n], (off, n)
    assert store.get_blob_range(d, len(data) - 5, 100) == data[-5:]
    assert store.get_blob_range(d, len(data) + 10, 4) == b""
    assert store.get_blob_range(d, 7, 0) == b""
    with pytest.raises(BlobNotFoundError):
        store.get_blob_range(sha256(b"never stored"), 0, 4)
    with pytest.raises(ValueError):
        store.get_blob_range(d, -1, 4)
    assert store.read_concurrency >= 1


def test_delete_blob(store: ArtifactStore) -> None:
    d = store.put_blob(b"to delete").digest
    keep = store.put_blob(b"to keep").digest
    store.delete_blob(d)
    assert not store.has_blob(d)
    with pytest.raises(BlobNotFoundError):
        store.get_blob(d)
    with pytest.raises(BlobNotFoundError):
        store.delete_blob(d)
    assert store.read_blob(keep) == b"to keep"
    assert store.put_blob(b"to delete").digest == d  # can be stored again
    assert store.read_blob(d) == b"to delete"


def test_delete_blobs_batched(store: ArtifactStore) -> None:
    """Many blobs removed in one call (sha256 and blake3 across many fanout directories), the
    others untouched; absent digests and duplicates are no error; an empty call does nothing."""
    made = [
        store.put_blob(payload(40 + i, i), algorithm=a).digest
        for i in range(40)
        for a in ("sha256", "blake3")
    ]
    gone, kept = made[::2] + made[1:20:2], made[21::2]
    absent = oracle(b"never stored")
    removed = store.delete_blobs([*gone, absent, gone[0]])
    # S3 acknowledges absent keys too (DeleteObjects does not tell them apart); local counts files.
    assert len(gone) <= removed <= len(gone) + 1
    assert set(store.iter_blobs()) == set(kept)
    for d in kept:
        assert store.read_blob(d) == payload(40 + made.index(d) // 2, made.index(d) // 2)
    assert store.delete_blobs([]) == 0
    store.delete_blobs(gone)  # again: all absent, no error
    assert store.remove_batch >= 1 and store.remove_concurrency >= 1


def test_delete_manifests_batched(store: ArtifactStore) -> None:
    cfg = empty_config(store)
    ms = [
        store.put_manifest(ImageManifest(cfg, (), artifact_type=f"application/x.t{i}").to_json()).digest
        for i in range(12)
    ]
    store.delete_manifests(ms[:8])
    assert set(store.iter_manifests()) == set(ms[8:])
    assert {d for d, _ in store.iter_manifest_sizes()} == set(ms[8:])
    assert store.has_blob(cfg.digest)


def test_iter_blob_sizes(store: ArtifactStore) -> None:
    want = {store.put_blob(payload(i * 7, i)).digest: i * 7 for i in range(30)}
    assert dict(store.iter_blob_sizes()) == want
    assert list(store.iter_blob_sizes()) == sorted(store.iter_blob_sizes())  # key order


def test_iter_blobs(store: ArtifactStore) -> None:
    want = {
        store.put_blob(payload(i * 10, i), algorithm=a).digest for i in range(5) for a in ("sha256", "blake3")
    }
    assert set(store.iter_blobs()) == want
    assert all(isinstance(d, Digest) for d in store.iter_blobs())


# -- the verifying reader ------------------------------------------------------------------------


@pytest.fixture
def big(store: ArtifactStore) -> tuple[str, bytes]:
    data = payload(2_345_678, 8)
    return store.put_blob(data).digest, data


def test_reader_read_sizes(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    d, data = big
    with store.get_blob(d) as r:
        assert r.readable() and not r.seekable()
        parts = []
        while chunk := r.read(100_003):
            parts.append(chunk)
        assert b"".join(parts) == data
        assert r.verified
        assert r.read() == b""
    with store.get_blob(Digest(d)) as r:
        assert r.read(10) == data[:10]
        assert r.read() == data[10:]


def test_reader_readinto(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    d, data = big
    out = bytearray()
    buf = bytearray(65536)
    with store.get_blob(d) as r:
        while n := r.readinto(buf):
            out += buf[:n]
    assert out == data


def test_reader_chunks(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    d, data = big
    with store.get_blob(d) as r:
        chunks = list(r.chunks(500_000))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= 500_000 for c in chunks)


def test_reader_copyfileobj(store: ArtifactStore, big: tuple[str, bytes], tmp_path: Path) -> None:
    d, data = big
    with store.get_blob(d) as r, open(tmp_path / "out", "wb") as out:
        shutil.copyfileobj(r, out)
        assert r.verified
    assert (tmp_path / "out").read_bytes() == data
    with store.get_blob(d) as r:
        buffered = io.BufferedReader(r)
        assert buffered.read() == data


def test_reader_verify_after_partial_read(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    d, data = big
    with store.get_blob(d) as r:
        assert r.read(1000) == data[:1000]
        assert not r.verified
        r.verify()
        assert r.verified
    with store.get_blob(d) as r:
        r.verify()  # without reading anything
        assert r.verified


def test_reader_exact_size_read_is_verified(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    """A caller that reads exactly `size` bytes and stops has still had the content verified."""
    d, data = big
    with store.get_blob(d) as r:
        assert r.size == len(data)
        got = r.read(len(data))
        assert got == data
        assert r.verified


def test_many_readers(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    d, data = big
    readers = [store.get_blob(d) for _ in range(20)]
    try:
        for i, r in enumerate(readers):
            assert r.read(i + 1) == data[: i + 1]
        for r in readers:
            r.verify()
    finally:
        for r in readers:
            r.close()
    assert all(r.closed for r in readers)


def test_delete_while_reading(store: ArtifactStore, big: tuple[str, bytes]) -> None:
    """An open reader keeps working after the blob is deleted (gc racing a reader)."""
    d, data = big
    with store.get_blob(d) as r:
        head = r.read(1000)
        store.delete_blob(d)
        try:
            rest = r.read()
        except NotFoundError:  # a backend may fail the stream, but never hand out wrong bytes
            return
        assert head + rest == data


# -- manifests -----------------------------------------------------------------------------------


def test_manifest_roundtrip_artifact(store: ArtifactStore) -> None:
    empty_config(store)
    layer1 = store.put_blob(payload(5000, 9), media_type=mt.VOLUME_LAYER)
    layer2 = store.put_blob(payload(6000, 10), media_type=mt.VOLUME_LAYER)
    layer2 = Descriptor(layer2.digest, layer2.size, mt.VOLUME_LAYER, annotations={"diff_id": sha256(b"t")})
    m = ImageManifest(EMPTY_CONFIG, (layer1, layer2), artifact_type=mt.VOLUME, annotations={"a": "b"})
    data = m.to_json()
    d = store.put_manifest(data)
    assert d.digest == sha256(data)
    assert d.size == len(data)
    assert d.media_type == mt.OCI_MANIFEST
    assert d.artifact_type == mt.VOLUME
    assert store.has_manifest(d.digest)
    assert store.stat_manifest(d.digest) == len(data)
    assert store.get_manifest(d.digest) == data
    typed = store.get_manifest_typed(d.digest)
    assert isinstance(typed, ImageManifest)
    assert typed == m
    assert d.digest in set(store.iter_manifests())
    # manifests and blobs are separate namespaces
    assert not store.has_blob(d.digest)
    assert store.put_manifest(data, mt.OCI_MANIFEST) == d  # idempotent, media type agrees


def test_manifest_with_real_config(store: ArtifactStore) -> None:
    cfg_bytes = canonical_json({"files": 3, "bytes": 12, "parent": None})
    cfg = store.put_blob(cfg_bytes, media_type=mt.CHECKPOINT)
    f = store.put_blob(b"file", media_type=mt.CHECKPOINT_FILE)
    m = ImageManifest(cfg, (f,), artifact_type=mt.CHECKPOINT)
    d = store.put_manifest(m.to_json())
    assert store.get_manifest_typed(d.digest) == m


def test_manifest_exact_bytes_kept(store: ArtifactStore) -> None:
    """The digest names the exact bytes: a non-canonical but valid manifest is stored verbatim."""
    empty_config(store)
    layer = store.put_blob(b"l")
    obj = ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.VOLUME).to_dict()
    data = json.dumps(obj, indent=3).encode()
    d = store.put_manifest(data)
    assert d.digest == sha256(data)
    assert store.get_manifest(d.digest) == data


def test_embedded_descriptor_data(store: ArtifactStore) -> None:
    """OCI 1.1 `data` on a descriptor must be base64 of exactly the described content."""
    import base64

    empty_config(store)
    layer = store.put_blob(b"tiny")
    obj = ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.VOLUME).to_dict()
    obj["layers"][0]["data"] = base64.b64encode(b"tiny").decode()
    assert store.put_manifest(canonical_json(obj)).size == len(canonical_json(obj))
    for bad in (base64.b64encode(b"tinY").decode(), "not base64!", 5, base64.b64encode(b"tin").decode()):
        obj["layers"][0]["data"] = bad
        with pytest.raises(InvalidManifestError, match="data"):
            store.put_manifest(canonical_json(obj))


def test_manifest_sha512(store: ArtifactStore) -> None:
    empty_config(store)
    data = ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.CHECKPOINT).to_json()
    d = store.put_manifest(data, expected=oracle(data, "sha512"))
    assert d.digest == oracle(data, "sha512")
    assert store.get_manifest(d.digest) == data
    with pytest.raises(DigestMismatchError):
        store.put_manifest(data, expected=oracle(data + b" ", "sha256"))


def test_index_and_subject(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a")
    b = push_artifact(store, b"b")
    idx = Index((a, b), artifact_type=mt.CHECKPOINT)
    di = store.put_manifest(idx.to_json())
    assert di.media_type == mt.OCI_INDEX
    assert store.get_manifest_typed(di.digest) == idx
    # a referrer whose subject is stored
    ref = ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.CHECKPOINT, subject=a)
    assert store.get_manifest(store.put_manifest(ref.to_json()).digest) == ref.to_json()
    # an index of indexes
    assert store.put_manifest(Index((di,)).to_json()).media_type == mt.OCI_INDEX


def test_subject_may_dangle(store: ArtifactStore) -> None:
    empty_config(store)
    ghost = Descriptor(Digest(sha256(b"not pushed yet")), 14, mt.OCI_MANIFEST)
    m = ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.CHECKPOINT, subject=ghost)
    d = store.put_manifest(m.to_json())
    assert store.get_manifest_typed(d.digest).subject == ghost


def test_dangling_references_refused(store: ArtifactStore) -> None:
    ghost_blob = Descriptor(Digest(sha256(b"ghost")), 5, mt.VOLUME_LAYER)
    ghost_manifest = Descriptor(Digest(sha256(b"ghost manifest")), 14, mt.OCI_MANIFEST)
    before = (set(store.iter_blobs()), set(store.iter_manifests()))
    # the config itself is missing
    with pytest.raises(InvalidManifestError, match="missing"):
        store.put_manifest(ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.VOLUME).to_json())
    empty_config(store)
    before = (set(store.iter_blobs()), set(store.iter_manifests()))
    with pytest.raises(InvalidManifestError, match="missing"):
        store.put_manifest(ImageManifest(EMPTY_CONFIG, (ghost_blob,), artifact_type=mt.VOLUME).to_json())
    with pytest.raises(InvalidManifestError, match="missing"):
        store.put_manifest(Index((ghost_manifest,)).to_json())
    # a blob is not a manifest: an index entry must name a stored manifest
    blob = store.put_blob(b"just a blob")
    with pytest.raises(InvalidManifestError, match="missing"):
        store.put_manifest(Index((Descriptor(blob.digest, blob.size, mt.OCI_MANIFEST),)).to_json())
    assert (set(store.iter_blobs()) - {blob.digest}, set(store.iter_manifests())) == before


def test_operation_skips_only_checks_it_can(store: ArtifactStore) -> None:
    """Within `store.operation()` the store does not re-check what it has just seen stored, but
    what it has not seen, a blob named as a manifest, a wrong size or a deleted blob still fail."""
    empty_config(store)
    with store.operation():
        blob = store.put_blob(b"seen in this operation")
        a = push_artifact(store, b"x")
        store.get_manifest(a.digest)  # learnt: it and what it references
        ok = ImageManifest(
            EMPTY_CONFIG, (Descriptor(blob.digest, blob.size, mt.VOLUME_LAYER),), artifact_type=mt.VOLUME
        )
        assert store.put_manifest(ok.to_json()).digest == sha256(ok.to_json())
        ghost = Descriptor(Digest(sha256(b"ghost")), 5, mt.VOLUME_LAYER)
        with pytest.raises(InvalidManifestError, match="missing"):
            store.put_manifest(ImageManifest(EMPTY_CONFIG, (ghost,), artifact_type=mt.VOLUME).to_json())
        as_manifest = Descriptor(blob.digest, blob.size, mt.OCI_MANIFEST)
        with pytest.raises(InvalidManifestError, match="missing"):
            store.put_manifest(Index((as_manifest,)).to_json())
        wrong = Descriptor(blob.digest, blob.size + 1, mt.VOLUME_LAYER)
        with pytest.raises(InvalidManifestError, match="bytes"):
            store.put_manifest(ImageManifest(EMPTY_CONFIG, (wrong,), artifact_type=mt.VOLUME).to_json())
        store.delete_blob(blob.digest)
        gone = ImageManifest(
            EMPTY_CONFIG, (Descriptor(blob.digest, blob.size, mt.VOLUME_LAYER),), artifact_type=mt.VOLUME
        )
        with pytest.raises(InvalidManifestError, match="missing"):
            store.put_manifest(gone.to_json())
        store.tag("op/repo", "t", a.digest)
    assert store.resolve("op/repo", "t") == a.digest


def test_size_mismatch_refused(store: ArtifactStore) -> None:
    empty_config(store)
    layer = store.put_blob(b"twelve bytes")
    bad = Descriptor(layer.digest, 13, mt.VOLUME_LAYER)
    with pytest.raises(InvalidManifestError, match="bytes"):
        store.put_manifest(ImageManifest(EMPTY_CONFIG, (bad,), artifact_type=mt.VOLUME).to_json())
    a = push_artifact(store, b"x")
    with pytest.raises(InvalidManifestError, match="bytes"):
        store.put_manifest(Index((Descriptor(a.digest, a.size + 1, mt.OCI_MANIFEST),)).to_json())
    assert set(store.iter_manifests()) == {a.digest}


def test_manifest_size_cap(store: ArtifactStore) -> None:
    empty_config(store)

    def manifest_of_size(n: int) -> bytes:
        base = ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.VOLUME, annotations={"pad": ""}).to_json()
        pad = n - len(base)
        out = ImageManifest(
            EMPTY_CONFIG, (), artifact_type=mt.VOLUME, annotations={"pad": "p" * pad}
        ).to_json()
        assert len(out) == n
        return out

    at_cap = manifest_of_size(MAX_MANIFEST_SIZE)
    assert store.get_manifest(store.put_manifest(at_cap).digest) == at_cap
    over = manifest_of_size(MAX_MANIFEST_SIZE + 1)
    with pytest.raises(InvalidManifestError, match="limit"):
        store.put_manifest(over)
    assert not store.has_manifest(sha256(over))


def test_media_type_argument(store: ArtifactStore) -> None:
    empty_config(store)
    data = ImageManifest(EMPTY_CONFIG, (), artifact_type=mt.VOLUME).to_json()
    with pytest.raises(InvalidManifestError, match="differs"):
        store.put_manifest(data, mt.OCI_INDEX)
    # mediaType absent in the JSON: the argument says what it is
    obj = json.loads(data)
    del obj["mediaType"]
    bare = canonical_json(obj)
    assert store.put_manifest(bare, mt.OCI_MANIFEST).media_type == mt.OCI_MANIFEST
    assert not store.has_manifest(sha256(data))


def test_missing_manifest(store: ArtifactStore) -> None:
    d = sha256(b"no manifest")
    assert not store.has_manifest(d)
    for call in (store.get_manifest, store.stat_manifest, store.delete_manifest):
        with pytest.raises(ManifestNotFoundError):
            call(d)


def test_delete_manifest(store: ArtifactStore) -> None:
    d = push_artifact(store, b"x")
    store.delete_manifest(d.digest)
    assert not store.has_manifest(d.digest)
    with pytest.raises(ManifestNotFoundError):
        store.get_manifest(d.digest)
    assert list(store.iter_manifests()) == []


# -- tags ----------------------------------------------------------------------------------------


def test_tag_resolve_untag(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a").digest
    b = push_artifact(store, b"b").digest
    assert store.tag("volumes/workspace/alice", "latest", a) is None
    assert store.resolve("volumes/workspace/alice", "latest") == a
    assert isinstance(store.resolve("volumes/workspace/alice", "latest"), Digest)
    assert store.tag("volumes/workspace/alice", "latest", b) == a
    assert store.resolve("volumes/workspace/alice", "latest") == b
    assert store.tag("volumes/workspace/alice", "latest", b) == b  # same value: no-op
    assert store.untag("volumes/workspace/alice", "latest") == b
    with pytest.raises(RefNotFoundError):
        store.resolve("volumes/workspace/alice", "latest")
    with pytest.raises(RefNotFoundError):
        store.untag("volumes/workspace/alice", "latest")
    with pytest.raises(RefNotFoundError):
        store.resolve("never/seen", "x")


def test_list_tags_and_repos(store: ArtifactStore) -> None:
    assert store.list_repos() == []
    assert store.list_tags("nothing") == []
    a = push_artifact(store, b"a").digest
    tags = ["v1", "V1", "latest", "_x", "1.0.0-rc.1", "a" * 128]
    for t in tags:
        store.tag("r", t, a)
    store.tag("other-repo", "t", a)
    assert store.list_tags("r") == sorted(tags)
    assert store.list_repos() == ["other-repo", "r"]
    store.untag("other-repo", "t")
    assert store.list_repos() == ["r"]  # a repository with no tags is not listed
    assert store.list_tags("other-repo") == []


def test_nested_repositories(store: ArtifactStore) -> None:
    """`a/b` is a repository; `b` can also be a tag of `a`; they never mix."""
    x = push_artifact(store, b"x").digest
    y = push_artifact(store, b"y").digest
    store.tag("a", "b", x)
    store.tag("a/b", "latest", y)
    store.tag("a/b/c", "b", x)
    store.tag("a/b/c", "tags", y)
    store.tag("a/b/c", "_tags", x)
    assert store.resolve("a", "b") == x
    assert store.resolve("a/b", "latest") == y
    assert store.list_tags("a") == ["b"]
    assert store.list_tags("a/b") == ["latest"]
    assert store.list_tags("a/b/c") == ["_tags", "b", "tags"]
    assert store.list_repos() == ["a", "a/b", "a/b/c"]
    with pytest.raises(RefNotFoundError):
        store.resolve("a/b", "b")
    store.untag("a", "b")
    assert store.list_repos() == ["a/b", "a/b/c"]
    assert store.resolve("a/b", "latest") == y


def test_tag_missing_manifest_refused(store: ArtifactStore) -> None:
    with pytest.raises(ManifestNotFoundError):
        store.tag("r", "t", sha256(b"nothing"))
    blob = store.put_blob(b"a blob, not a manifest").digest
    with pytest.raises(ManifestNotFoundError):
        store.tag("r", "t", blob)
    assert store.list_repos() == []
    with pytest.raises(RefNotFoundError):
        store.resolve("r", "t")


def test_cas_missing(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a").digest
    b = push_artifact(store, b"b").digest
    assert store.tag("r", "t", a, expect=MISSING) is None
    with pytest.raises(TagConflictError):
        store.tag("r", "t", b, expect=MISSING)
    with pytest.raises(TagConflictError):
        store.tag("r", "t", a, expect=MISSING)  # even to the same value
    assert store.resolve("r", "t") == a


def test_cas_digest(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a").digest
    b = push_artifact(store, b"b").digest
    c = push_artifact(store, b"c").digest
    with pytest.raises(TagConflictError):
        store.tag("r", "t", a, expect=b)  # tag absent, expectation names a digest
    assert store.list_tags("r") == []
    store.tag("r", "t", a, expect=ANY)
    assert store.tag("r", "t", b, expect=a) == a
    with pytest.raises(TagConflictError):
        store.tag("r", "t", c, expect=a)  # stale expectation
    assert store.resolve("r", "t") == b
    assert store.tag("r", "t", c, expect=Digest(b)) == b
    assert store.resolve("r", "t") == c


def test_untag_cas(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a").digest
    b = push_artifact(store, b"b").digest
    store.tag("r", "t", a)
    with pytest.raises(TagConflictError):
        store.untag("r", "t", expect=b)
    assert store.resolve("r", "t") == a
    assert store.untag("r", "t", expect=a) == a
    with pytest.raises((TagConflictError, RefNotFoundError)):
        store.untag("r", "t", expect=a)
    with pytest.raises(clawstore.ClawstoreError):
        store.untag("r", "t", expect=MISSING)


def test_tag_survives_reopen(store: ArtifactStore) -> None:
    a = push_artifact(store, b"a").digest
    store.tag("r", "t", a)
    with clawstore.open(store.url) as again:
        assert again.resolve("r", "t") == a
        assert again.get_manifest(a) == store.get_manifest(a)


def test_sentinels() -> None:
    assert repr(ANY) == "clawstore.ANY" and repr(MISSING) == "clawstore.MISSING"
    import pickle

    assert pickle.loads(pickle.dumps(ANY)) is ANY
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING


# -- whole artifacts -----------------------------------------------------------------------------


def test_checkpoint_like_flow(store: ArtifactStore) -> None:
    """What an artifact kind does: blobs, a config, a manifest, a tag; then read it all back."""
    files = {f"f{i}": payload(i * 1000 + 1, i) for i in range(10)}
    descs = [store.put_blob(io.BytesIO(v), media_type=mt.CHECKPOINT_FILE) for v in files.values()]
    cfg = store.put_blob(canonical_json({"session": "s1", "parent": None}), media_type=mt.CHECKPOINT)
    m = ImageManifest(cfg, tuple(descs), artifact_type=mt.CHECKPOINT)
    d = store.put_manifest(m.to_json())
    store.tag("checkpoints/agent-1", "s1", d.digest, expect=MISSING)
    got = store.get_manifest_typed(store.resolve("checkpoints/agent-1", "s1"))
    assert isinstance(got, ImageManifest)
    assert [store.read_blob(x.digest) for x in got.layers] == list(files.values())


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[tuple[ArtifactStore, ArtifactStore]]:
    with clawstore.open(tmp_path / "s1") as a, clawstore.open(tmp_path / "s2") as b:
        yield a, b


def test_stores_are_independent(two_stores: tuple[ArtifactStore, ArtifactStore]) -> None:
    a, b = two_stores
    d = a.put_blob(b"only in a").digest
    assert not b.has_blob(d)


def test_open_create_false_refuses_a_path_without_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(clawstore.NotFoundError, match="no clawstore store at"):
        clawstore.open(missing, create=False)
    with pytest.raises(clawstore.NotFoundError):
        clawstore.open(missing.as_uri(), create=False)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()  # an existing directory that is not a store is refused too
    with pytest.raises(clawstore.NotFoundError):
        clawstore.open(tmp_path / "empty", create=False)
    assert list((tmp_path / "empty").iterdir()) == []
    created = clawstore.open(missing)  # the default creates
    d = created.put_blob(b"x")
    assert clawstore.open(missing, create=False).has_blob(d.digest)


def test_failed_untag_of_an_unknown_repository_writes_nothing(store: ArtifactStore) -> None:
    before = _tree(store)
    with pytest.raises(clawstore.RefNotFoundError):
        store.untag("never/tagged", "t")
    with pytest.raises(clawstore.TagConflictError):
        store.untag("never/tagged", "t", expect="sha256:" + "0" * 64)
    assert store.list_repos() == []
    assert _tree(store) == before


def _tree(store: ArtifactStore) -> list[str] | None:
    """Every path under a local store's root (None for backends without one)."""
    root = getattr(store.backend, "root", None)
    if root is None:
        return None
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
