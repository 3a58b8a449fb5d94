"""Property tests (hypothesis): digests against independent oracles, round trips, bit flips,
and a stateful model of blobs, manifests and tags with compare-and-swap."""

from __future__ import annotations

import array
import hashlib
import io
import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
    Hasher,
    ImageManifest,
    RefNotFoundError,
    TagConflictError,
)
from clawstore import mediatypes as mt
from clawstore.backends.local import LocalBackend
from clawstore.manifest import EMPTY_CONFIG
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

ALGS = ["sha256", "sha512", "blake3"]


def oracle_hex(data: bytes, algorithm: str) -> str:
    if algorithm == "blake3":
        return blake3.blake3(data).hexdigest()
    return hashlib.new(algorithm, data).hexdigest()


@st.composite
def data_and_cuts(draw: st.DrawFn, max_size: int = 1 << 16) -> tuple[bytes, list[int]]:
    data = draw(st.binary(max_size=max_size))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return data, cuts


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- digests -------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    dc=data_and_cuts(), algorithm=st.sampled_from(ALGS), kind=st.sampled_from(["bytes", "bytearray", "mv"])
)
def test_streaming_hasher_matches_oracles(dc: tuple[bytes, list[int]], algorithm: str, kind: str) -> None:
    data, cuts = dc
    h = Hasher(algorithm)
    for p in pieces(data, cuts):
        h.update({"bytes": p, "bytearray": bytearray(p), "mv": memoryview(p)}[kind])
    want = oracle_hex(data, algorithm)
    assert h.hexdigest() == want
    assert h.digest() == f"{algorithm}:{want}"
    assert h.size == len(data)
    assert h.algorithm == algorithm
    assert clawstore.digest_bytes(data, algorithm) == f"{algorithm}:{want}"


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.integers(0, 2**32 - 1), max_size=600),
    algorithm=st.sampled_from(ALGS),
    typecode=st.sampled_from(["I", "H", "d"]),
)
def test_typed_buffers_hash_their_bytes_like_hashlib(words: list[int], algorithm: str, typecode: str) -> None:
    """Any C-contiguous buffer hashes as its raw bytes (hashlib's rule): array('I'), a
    memoryview cast to another format -- not only byte-formatted buffers."""
    limit = {"I": 2**32, "H": 2**16, "d": 2**53}[typecode]
    arr = array.array(typecode, [w % limit for w in words])
    raw = arr.tobytes()
    assert clawstore.digest_bytes(arr, algorithm) == f"{algorithm}:{oracle_hex(raw, algorithm)}"
    h = Hasher(algorithm)
    h.update(memoryview(raw).cast(typecode))
    h.update(arr)
    assert h.digest() == f"{algorithm}:{oracle_hex(raw + raw, algorithm)}"
    assert h.size == 2 * len(raw)


def test_non_contiguous_buffers_are_refused_not_misread() -> None:
    strided = memoryview(bytes(range(16)))[::2]
    with pytest.raises((TypeError, ValueError, BufferError)):
        clawstore.digest_bytes(strided)


@settings(max_examples=40, deadline=None)
@given(dc=data_and_cuts(), algorithm=st.sampled_from(ALGS))
def test_hasher_copy_forks_state(dc: tuple[bytes, list[int]], algorithm: str) -> None:
    data, cuts = dc
    h = Hasher(algorithm)
    parts = pieces(data, cuts)
    h.update(parts[0])
    fork = h.copy()
    for p in parts[1:]:
        h.update(p)
    fork.update(b"tail")
    assert h.hexdigest() == oracle_hex(data, algorithm)
    assert fork.hexdigest() == oracle_hex(parts[0] + b"tail", algorithm)


@settings(max_examples=15, deadline=None)
@given(
    size=st.sampled_from(
        [0, 1, 63, 64, 65, 1023, 1024, 1025, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3_000_017]
    ),
    algorithm=st.sampled_from(ALGS),
    seed=st.integers(0, 2**32),
)
def test_large_and_boundary_sizes(size: int, algorithm: str, seed: int) -> None:
    """Sizes around the block, chunk, GIL-release and parallel-blake3 thresholds."""
    data = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size) if size else b""
    want = f"{algorithm}:{oracle_hex(data, algorithm)}"
    assert clawstore.digest_bytes(data, algorithm) == want
    h = Hasher(algorithm)
    mv = memoryview(data)
    step = max(1, size // 7)
    for i in range(0, size, step):
        h.update(mv[i : i + step])
    assert h.digest() == want
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        assert clawstore.digest_file(f.name, algorithm) == want


# -- round trips -----------------------------------------------------------------------------------

_fixture_ok = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fixture_ok
@given(
    data=st.binary(max_size=200_000),
    algorithm=st.sampled_from(ALGS),
    how=st.sampled_from(["bytes", "stream", "path"]),
)
def test_put_get_roundtrip(
    store: ArtifactStore, tmp_path: Path, data: bytes, algorithm: str, how: str
) -> None:
    if how == "path":
        src: object = tmp_path / "src"
        (tmp_path / "src").write_bytes(data)
    else:
        src = data if how == "bytes" else io.BytesIO(data)
    d = store.put_blob(src, algorithm=algorithm)  # type: ignore[arg-type]
    assert d.digest == f"{algorithm}:{oracle_hex(data, algorithm)}"
    assert d.size == len(data)
    assert store.stat_blob(d.digest) == len(data)
    assert store.read_blob(d.digest) == data
    with store.get_blob(d.digest) as r:
        assert b"".join(r.chunks(4099)) == data


# -- bit flips -------------------------------------------------------------------------------------


def flip(path: Path, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        b = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([b ^ (1 << (bit % 8))]))


def read_with(store: ArtifactStore, digest: str, how: int) -> bytes:
    with store.get_blob(digest) as r:
        if how == 0:
            return r.read()
        if how == 1:
            return r.read(store.stat_blob(digest))  # exactly the size, no EOF read
        if how == 2:
            return b"".join(r.chunks(7))
        if how == 3:
            out = io.BytesIO()
            shutil.copyfileobj(r, out)
            return out.getvalue()
        r.verify()
        return b""


@pytest.fixture
def local(tmp_path: Path) -> ArtifactStore:
    return clawstore.open(tmp_path / "store")


def backend(store: ArtifactStore) -> LocalBackend:
    assert isinstance(store.backend, LocalBackend)
    return store.backend


@pytest.mark.parametrize("algorithm", ALGS)
def test_every_bit_flip_in_a_blob_is_detected(local: ArtifactStore, algorithm: str) -> None:
    data = hashlib.sha256(algorithm.encode()).digest() * 3  # 96 bytes: 768 flips
    d = local.put_blob(data, algorithm=algorithm).digest
    path = backend(local).layout.blob(d)
    for bit in range(len(data) * 8):
        flip(path, bit)
        with pytest.raises(DigestMismatchError):
            read_with(local, d, bit % 5)
        flip(path, bit)  # restore
    assert local.read_blob(d) == data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=3_000_000), where=st.floats(0, 1), how=st.integers(0, 4))
def test_random_bit_flip_in_large_blob(local: ArtifactStore, data: bytes, where: float, how: int) -> None:
    d = local.put_blob(data).digest
    path = backend(local).layout.blob(d)
    bit = min(int(where * len(data) * 8), len(data) * 8 - 1)
    flip(path, bit)
    try:
        with pytest.raises(DigestMismatchError):
            read_with(local, d, how)
    finally:
        flip(path, bit)


@pytest.mark.parametrize("change", ["truncate", "extend", "empty"])
def test_size_changes_detected(local: ArtifactStore, change: str) -> None:
    data = b"0123456789" * 1000
    d = local.put_blob(data).digest
    path = backend(local).layout.blob(d)
    if change == "truncate":
        path.write_bytes(data[:-1])
    elif change == "extend":
        path.write_bytes(data + b"!")
    else:
        path.write_bytes(b"")
    for how in range(5):
        with pytest.raises(DigestMismatchError):
            read_with(local, d, how)
    # putting the content again repairs a blob whose size is wrong
    local.put_blob(data)
    assert local.read_blob(d) == data


def test_every_bit_flip_in_a_manifest_is_detected(local: ArtifactStore) -> None:
    local.put_blob(mt.EMPTY_JSON)
    layer = local.put_blob(b"layer")
    m = ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.CHECKPOINT, annotations={"k": "v"})
    data = m.to_json()
    d = local.put_manifest(data).digest
    path = backend(local).layout.manifest(d)
    for bit in range(len(data) * 8):
        flip(path, bit)
        with pytest.raises(DigestMismatchError):
            local.get_manifest(d)
        with pytest.raises(DigestMismatchError):
            local.get_manifest_typed(d)
        flip(path, bit)
    assert local.get_manifest(d) == data
    path.write_bytes(data + b" ")
    with pytest.raises(DigestMismatchError):
        local.get_manifest(d)


# -- the stateful model ----------------------------------------------------------------------------

REPOS = ["a", "a/b", "b", "vol/ws/alice"]
TAGS = ["latest", "v1", "b", "_x"]


class StoreModel(RuleBasedStateMachine):
    """Blobs, manifests and tags (with CAS) against a plain dict model."""

    blobs = Bundle("blobs")
    manifests = Bundle("manifests")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="clawstore-model-")
        self.store = clawstore.open(Path(self.dir) / "store")
        self.model_blobs: dict[str, bytes] = {}
        self.model_manifests: dict[str, bytes] = {}
        self.model_tags: dict[tuple[str, str], str] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(target=blobs)
    def empty_config(self) -> str:
        d = self.store.put_blob(mt.EMPTY_JSON).digest
        self.model_blobs[d] = mt.EMPTY_JSON
        return d

    @rule(target=blobs, data=st.binary(max_size=3000), algorithm=st.sampled_from(ALGS), stream=st.booleans())
    def put_blob(self, data: bytes, algorithm: str, stream: bool) -> str:
        d = self.store.put_blob(io.BytesIO(data) if stream else data, algorithm=algorithm)
        assert d.digest == f"{algorithm}:{oracle_hex(data, algorithm)}"
        self.model_blobs[d.digest] = data
        return d.digest

    @rule(d=blobs)
    def read_blob(self, d: str) -> None:
        if d in self.model_blobs:
            assert self.store.read_blob(d) == self.model_blobs[d]
            assert self.store.stat_blob(d) == len(self.model_blobs[d])
        else:
            assert not self.store.has_blob(d)
            with pytest.raises(BlobNotFoundError):
                self.store.read_blob(d)

    @rule(d=consumes(blobs))
    def delete_blob(self, d: str) -> None:
        if d == mt.EMPTY_DIGEST:
            return
        if d in self.model_blobs:
            self.store.delete_blob(d)
            del self.model_blobs[d]
        else:
            with pytest.raises(BlobNotFoundError):
                self.store.delete_blob(d)

    @rule(target=manifests, layers=st.lists(blobs, max_size=4), note=st.text(max_size=20))
    def put_manifest(self, layers: list[str], note: str) -> str:
        descs = []
        dangling = False
        for d in layers:
            if d in self.model_blobs:
                descs.append(Descriptor(Digest(d), len(self.model_blobs[d]), mt.VOLUME_LAYER))
            else:
                dangling = True
                descs.append(Descriptor(Digest(d), 1, mt.VOLUME_LAYER))
        cfg_ok = mt.EMPTY_DIGEST in self.model_blobs
        data = ImageManifest(
            EMPTY_CONFIG, tuple(descs), artifact_type=mt.VOLUME, annotations={"note": note}
        ).to_json()
        if dangling or not cfg_ok:
            with pytest.raises(clawstore.InvalidManifestError):
                self.store.put_manifest(data)
            return "sha256:" + hashlib.sha256(data).hexdigest()  # a digest that is not stored
        d = self.store.put_manifest(data).digest
        assert d == "sha256:" + hashlib.sha256(data).hexdigest()
        self.model_manifests[d] = data
        return d

    @rule(
        repo=st.sampled_from(REPOS),
        tag=st.sampled_from(TAGS),
        m=manifests,
        mode=st.sampled_from(["any", "missing", "current", "stale"]),
        stale=manifests,
    )
    def tag(self, repo: str, tag: str, m: str, mode: str, stale: str) -> None:
        current = self.model_tags.get((repo, tag))
        expect: object = {"any": ANY, "missing": MISSING, "current": current, "stale": stale}[mode]
        if expect is None:
            expect = MISSING
        if m not in self.model_manifests:
            with pytest.raises(clawstore.ManifestNotFoundError):
                self.store.tag(repo, tag, m, expect=expect)
            return
        holds = expect is ANY or (expect is MISSING and current is None) or (expect == current)
        if not holds:
            with pytest.raises(TagConflictError):
                self.store.tag(repo, tag, m, expect=expect)
            return
        assert self.store.tag(repo, tag, m, expect=expect) == current
        self.model_tags[(repo, tag)] = m

    @rule(
        repo=st.sampled_from(REPOS),
        tag=st.sampled_from(TAGS),
        mode=st.sampled_from(["any", "current", "stale"]),
        stale=manifests,
    )
    def untag(self, repo: str, tag: str, mode: str, stale: str) -> None:
        current = self.model_tags.get((repo, tag))
        expect: object = {"any": ANY, "current": current, "stale": stale}[mode]
        if current is None:
            with pytest.raises((RefNotFoundError, TagConflictError)):
                self.store.untag(repo, tag, expect=ANY if expect is None else expect)
            return
        if expect is not ANY and expect != current:
            with pytest.raises(TagConflictError):
                self.store.untag(repo, tag, expect=expect)
            return
        assert self.store.untag(repo, tag, expect=expect) == current
        del self.model_tags[(repo, tag)]

    @precondition(lambda self: bool(self.model_manifests))
    @rule(m=manifests)
    def read_manifest(self, m: str) -> None:
        if m in self.model_manifests:
            assert self.store.get_manifest(m) == self.model_manifests[m]
        else:
            assert not self.store.has_manifest(m)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = clawstore.open(Path(self.dir) / "store")

    @invariant()
    def tags_agree(self) -> None:
        repos = sorted({r for r, _ in self.model_tags})
        assert self.store.list_repos() == repos
        for repo in REPOS:
            want = sorted(t for r, t in self.model_tags if r == repo)
            assert self.store.list_tags(repo) == want
            for t in want:
                assert self.store.resolve(repo, t) == self.model_tags[(repo, t)]

    @invariant()
    def contents_agree(self) -> None:
        assert set(self.store.iter_blobs()) == set(self.model_blobs)
        assert set(self.store.iter_manifests()) == set(self.model_manifests)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)


# -- the verifying reader on its own (as a remote backend's stream would use it) -------------------


class Trickle(io.RawIOBase):
    """A raw stream giving short reads of varying sizes, like a socket."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._f = io.BytesIO(data)
        self._sizes = sizes or [1]
        self._i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._sizes[self._i % len(self._sizes)])
        self._i += 1
        return self._f.readinto(memoryview(b)[:n])


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    sizes=st.lists(st.integers(1, 5000), max_size=5),
    reads=st.lists(st.integers(1, 9000), min_size=1, max_size=5),
    known_size=st.booleans(),
    corrupt=st.sampled_from(["none", "flip", "short", "long", "wrong size"]),
    algorithm=st.sampled_from(ALGS),
    via=st.sampled_from(["read", "readinto", "buffered"]),
)
def test_verifying_reader(
    data: bytes, sizes: list[int], reads: list[int], known_size: bool, corrupt: str, algorithm: str, via: str
) -> None:
    digest = Digest(f"{algorithm}:{oracle_hex(data, algorithm)}")
    stored = data
    size: int | None = len(data) if known_size else None
    if corrupt == "flip" and data:
        stored = bytes([data[0] ^ 0x80]) + data[1:]
    elif corrupt == "short" and data:
        stored = data[:-1]
    elif corrupt == "long":
        stored = data + b"\0"
    elif corrupt == "wrong size":
        size = len(data) + 1
    bad = stored != data or (size is not None and size != len(data))
    if corrupt == "long" and size is not None:
        bad = False  # the reader stops at `size`: what it hands out is exactly the right content
    r = clawstore.VerifyingReader(Trickle(stored, sizes), digest, size)
    # read: the reader's own (straight from the source); readinto: into a caller's buffer;
    # buffered: through io.BufferedReader, as file-like consumers wrap it
    source: Any = io.BufferedReader(r, 4096) if via == "buffered" else r

    def read(n: int) -> bytes:
        if via != "readinto":
            return bytes(source.read(n))
        buf = bytearray(n)
        return bytes(buf[: r.readinto(buf)])

    got = bytearray()
    i = 0
    try:
        while True:
            chunk = read(reads[i % len(reads)])
            i += 1
            if not chunk:
                break
            got += chunk
    except DigestMismatchError:
        assert bad
        assert not r.verified
        if corrupt == "flip" and size is not None:
            assert len(got) < size  # the read reaching the size raises instead of handing it out
        return
    assert not bad, "corruption reported as a clean end of data"
    assert bytes(got) == data
    assert r.verified


# -- names and digests: an independent oracle, and containment of every accepted name ------------

_ORACLE_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}|blake3:[0-9a-f]{64})")
_NAME_ALPHABET = "ab0._-/:@\\\x00Z \n"


def _oracle_repo(name: str) -> bool:
    """The OCI repository grammar, written out by hand instead of as one regex."""
    if not 0 < len(name) <= 255:
        return False
    for comp in name.split("/"):
        i = 0
        alnum = set("abcdefghijklmnopqrstuvwxyz0123456789")
        if not comp or comp[0] not in alnum or comp[-1] not in alnum:
            return False
        while i < len(comp):
            if comp[i] in alnum:
                i += 1
                continue
            j = i
            while j < len(comp) and comp[j] not in alnum:
                j += 1
            if comp[i:j] not in (".", "_", "__") and set(comp[i:j]) != {"-"}:
                return False
            i = j
    return True


@settings(max_examples=500, deadline=None)
@given(name=st.text(alphabet=_NAME_ALPHABET, max_size=12), tag=st.text(alphabet="aZ0._-/:\x00 ", max_size=6))
def test_names_match_oracle_and_stay_inside(name: str, tag: str) -> None:
    from clawstore.names import validate_repository, validate_tag

    try:
        validate_repository(name)
        repo_ok = True
    except clawstore.InvalidNameError:
        repo_ok = False
    assert repo_ok == _oracle_repo(name), name
    tag_ok = bool(tag) and len(tag) <= 128 and tag[0] not in ".-" and all(c in "aZ0._-" for c in tag)
    try:
        validate_tag(tag)
        assert tag_ok, tag
    except clawstore.InvalidNameError:
        assert not tag_ok, tag
    if repo_ok and tag_ok:
        from clawstore.backends.local import LocalLayout

        refs = Path("/store/refs")
        p = LocalLayout(Path("/store")).tag(name, tag)
        assert Path(os.path.normpath(p)) == p  # no `.`/`..` component, nothing to normalise
        assert p.is_relative_to(refs) and p.parent.name == "_tags"


@settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=140),
        st.builds(
            lambda a, h: f"{a}:{h}",
            st.sampled_from(["sha256", "sha512", "blake3", "SHA256", "md5", ""]),
            st.text(alphabet="0123456789abcdefABCDEF./g\x00", min_size=60, max_size=130),
        ),
    )
)
def test_digests_match_oracle_and_stay_inside(text: str) -> None:
    try:
        d = Digest.parse(text)
    except clawstore.InvalidDigestError:
        assert not _ORACLE_DIGEST.fullmatch(text)
        return
    assert _ORACLE_DIGEST.fullmatch(text)
    from clawstore.backends.local import LocalLayout

    p = LocalLayout(Path("/store")).blob(d)
    assert p == Path("/store/blobs") / d.algorithm / d.encoded[:2] / d.encoded
