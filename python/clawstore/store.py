"""`ArtifactStore`: the small interface checkpoints, volumes and the hub are built on.

It validates every name and digest before any I/O, validates and digest-checks manifests,
refuses dangling manifests, and wraps reads in verifying readers; the backend below it owns
bytes, atomicity and compare-and-swap.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from clawstore import _core
from clawstore import mediatypes as mt
from clawstore.atomic import atomic_file
from clawstore.backends.base import (
    Backend,
    BatchRemovals,
    BlobPaths,
    Downloads,
    PresignedReads,
    RangedReads,
    Recording,
    SizedListing,
)
from clawstore.digest import ALGORITHMS, DEFAULT_ALGORITHM, Digest, check_algorithm, digest_bytes
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    ManifestNotFoundError,
    RefNotFoundError,
)
from clawstore.manifest import Descriptor, Manifest, parse_manifest, references
from clawstore.names import Reference, validate_repository, validate_tag
from clawstore.reader import VerifyingReader
from clawstore.types import ANY, MISSING, BlobSource, CleanupReport, Expectation


def _expectation(expect: Expectation | str) -> Expectation:
    if expect is ANY or expect is MISSING:
        return expect  # type: ignore[return-value]
    return Digest.parse(expect)  # type: ignore[arg-type]


#: Longest an operation's knowledge of what is stored is trusted (see `ArtifactStore.operation`).
KNOWN_TTL = 300.0


class ArtifactStore:
    """A content-addressed store of blobs and manifests with tags, over one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # What open operations know to be stored: (kind, digest) -> (size, when learnt).
        self._known: dict[tuple[str, str], tuple[int, float]] = {}
        self._operations = 0
        self._known_lock = threading.Lock()

    # -- what an operation knows is stored ---------------------------------------------------
    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """One unit of work (a checkpoint, a push): while it lasts, the store remembers what it
        has just seen stored (blobs it wrote or read whole and verified, manifests it wrote or
        read verified, and what those manifests reference, which the store checked when they
        were put) so that `put_manifest` and `tag` do not ask the backend again about them.
        Nothing is remembered outside an operation, and everything is forgotten when the last
        open one ends (or after KNOWN_TTL). A hub session holds each of those digests in its
        lease before relying on it, so GC cannot take them meanwhile; on a plain store the
        window is the one any existence check leaves anyway (the object can go right after)."""
        with self._known_lock:
            self._operations += 1
        try:
            yield
        finally:
            with self._known_lock:
                self._operations -= 1
                if self._operations == 0:
                    self._known.clear()

    def _learn(self, items: Mapping[str, int], kind: str = "blob") -> None:
        if self._operations > 0:
            now = time.monotonic()
            with self._known_lock:
                if self._operations > 0:
                    self._known.update(((kind, d), (n, now)) for d, n in items.items())

    def _forget(self, digest: Digest | str, kind: str) -> None:
        with self._known_lock:
            self._known.pop((kind, str(digest)), None)

    def _known_size(self, kind: str, digest: Digest | str) -> int | None:
        """The size of blob or manifest (`kind`) `digest` if an open operation saw it stored
        (see `operation`), else None."""
        if self._operations == 0:
            return None
        hit = self._known.get((kind, str(digest)))
        if hit is None or time.monotonic() - hit[1] > KNOWN_TTL:
            return None
        return hit[0]

    @property
    def url(self) -> str:
        return self.backend.url

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # -- blobs -------------------------------------------------------------------------------
    def put_blob(
        self,
        src: BlobSource,
        expected: Digest | str | None = None,
        *,
        media_type: str = mt.OCTET_STREAM,
        algorithm: str | None = None,
        trust_size: bool = False,
    ) -> Descriptor:
        """Store bytes, a file path or a binary file object; one pass, verified, atomic.

        With `expected`, nothing is stored unless the content hashes to it. A file whose size
        equals that of a blob already stored under `expected` is still read and hashed, unless
        `trust_size` (the caller vouches for the file: the store then skips reading it)."""
        if algorithm is not None:
            check_algorithm(algorithm)
        exp = Digest.parse(expected) if expected is not None else None
        alg = exp.algorithm if exp is not None else (algorithm or DEFAULT_ALGORITHM)
        if exp is not None and algorithm is not None and algorithm != exp.algorithm:
            raise DigestMismatchError(f"algorithm {algorithm!r} differs from expected digest {exp}")
        if isinstance(src, str | os.PathLike):
            path = Path(src)
            if not path.exists():
                raise FileNotFoundError(errno.ENOENT, "no such file", os.fspath(src))
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(src))
            if not path.is_file():  # a FIFO, /dev/stdin, a character device: stream it
                with builtins.open(path, "rb") as f:
                    digest, size = self.backend.write_blob(f, alg, exp)
                return Descriptor(digest, size, media_type)
            if exp is not None and not trust_size:
                # Backends skip reading a file whose size matches the blob stored under the
                # digest the caller names: verification asked for is verification done.
                stored = self.backend.blob_size(exp)
                if stored is not None and stored == path.stat().st_size:
                    hexd, size = _core.digest_file(os.fspath(path), exp.algorithm)
                    got = Digest.from_hex(exp.algorithm, hexd)
                    if got != exp:
                        raise DigestMismatchError(
                            f"{os.fspath(src)}: content hashes to {got}, expected {exp}"
                        )
                    if size == stored:
                        self._learn({str(exp): size})
                        return Descriptor(exp, size, media_type)
        digest, size = self.backend.write_blob(src, alg, exp)
        self._learn({str(digest): size})
        return Descriptor(digest, size, media_type)

    def get_blob(self, digest: Digest | str) -> VerifyingReader:
        """A streaming reader that raises DigestMismatchError before end of data if bytes differ."""
        d = Digest.parse(digest)
        raw, size = self.backend.open_blob(d)
        return VerifyingReader(raw, d, size)

    def get_blob_to_path(self, digest: Digest | str, path: str | os.PathLike[str]) -> int:
        """Write a blob to `path`, verified: the file appears (atomic rename) only if the whole
        content matches the digest. Backends with a faster way (S3: parallel ranged GETs) provide
        `download_to`; otherwise the verifying reader is copied. Returns the size."""
        d = Digest.parse(digest)
        if isinstance(self.backend, Downloads):
            return int(self.backend.download_to(d, path))
        with self.get_blob(d) as r, atomic_file(path) as out:
            shutil.copyfileobj(r, out, 1 << 20)
        return Path(path).stat().st_size

    def get_blob_range(self, digest: Digest | str, offset: int, length: int) -> bytes:
        """`length` bytes of a blob from `offset` (fewer past its end, b"" beyond it): one ranged
        read (local: pread; S3: a Range GET). NOT verified: a part cannot be checked against the
        whole blob's digest, so callers verify what they read by a digest of their own (checkpoint
        packs: each file's content digest). BlobNotFoundError."""
        d = Digest.parse(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        if isinstance(self.backend, RangedReads):
            return bytes(self.backend.read_blob_range(d, offset, length))
        raw, _size = self.backend.open_blob(d)  # a backend without ranged reads: skip ahead
        with raw:
            while offset > 0:
                skipped = raw.read(min(offset, 1 << 20))
                if not skipped:
                    return b""
                offset -= len(skipped)
            return raw.read(length)

    @property
    def read_concurrency(self) -> int:
        """How many reads (ranged or whole) the backend serves well at once."""
        return self.backend.read_concurrency if isinstance(self.backend, RangedReads) else 4

    def hold(self, *digests: Digest | str) -> None:
        """Say that the caller is about to rely on these digests (reuse them in a manifest): a
        recording backend (a hub session) leases them all in one transaction; a plain store has
        nothing to do."""
        if isinstance(self.backend, Recording) and digests:
            self.backend.hold([Digest.parse(d) for d in digests])

    def read_blob(self, digest: Digest | str) -> bytes:
        """Whole blob in memory, verified. For small blobs (configs, indexes)."""
        with self.get_blob(digest) as r:
            data = r.read()
        self._learn({str(digest): len(data)})
        return data

    def blob_local_path(self, digest: Digest | str) -> Path | None:
        """Path of a stored blob on a local filesystem, for zero-copy readers that verify the bytes
        themselves against the digest (layer unpacking); None if the backend is not local or the
        blob is absent. Never write to it."""
        d = Digest.parse(digest)
        if not isinstance(self.backend, BlobPaths):
            return None
        path = self.backend.blob_path(d)
        return path if path is not None and path.is_file() else None

    def stat_blob(self, digest: Digest | str) -> int:
        size = self.backend.blob_size(Digest.parse(digest))
        if size is None:
            raise BlobNotFoundError(f"blob {digest} not found")
        return size

    def blob_url(self, digest: Digest | str, ttl: float) -> str | None:
        """A URL reading the blob without credentials for `ttl` seconds (S3: presigned), or None
        where the backend has no such thing (local). Neither checks that the blob exists nor
        verifies what the URL returns: callers stat first, readers check the digest."""
        if isinstance(self.backend, PresignedReads):
            return self.backend.blob_url(Digest.parse(digest), ttl)
        return None

    def has_blob(self, digest: Digest | str) -> bool:
        return self.backend.blob_size(Digest.parse(digest)) is not None

    def delete_blob(self, digest: Digest | str) -> None:
        """Remove a blob (GC uses this; artifact kinds never do)."""
        self._forget(digest, "blob")
        if not self.backend.remove_blob(Digest.parse(digest)):
            raise BlobNotFoundError(f"blob {digest} not found")

    def delete_blobs(self, digests: Iterable[Digest | str]) -> int:
        """Remove many blobs in as few requests as the backend allows (GC's sweep); absent ones
        are skipped. Returns how many were removed (on S3: keys acknowledged as gone, which
        includes keys that were already absent: DeleteObjects does not tell them apart)."""
        ds = [Digest.parse(d) for d in digests]
        return self.backend.remove_blobs(ds) if ds else 0

    @property
    def remove_batch(self) -> int:
        """Digests per `delete_blobs` / `delete_manifests` call that the backend handles in
        one request (S3: its DeleteObjects limit)."""
        return self.backend.remove_batch if isinstance(self.backend, BatchRemovals) else 1000

    @property
    def remove_concurrency(self) -> int:
        """`delete_*` calls worth having in flight at once."""
        return self.backend.remove_concurrency if isinstance(self.backend, BatchRemovals) else 1

    def iter_blobs(self) -> Iterator[Digest]:
        return self.backend.iter_blobs()

    def iter_blob_sizes(self) -> Iterator[tuple[Digest, int]]:
        """Every stored blob with its size, from the listing where the backend has one with sizes
        (S3: no HEAD per object); objects removed while listing are skipped."""
        if isinstance(self.backend, SizedListing):
            return self.backend.iter_blob_sizes()
        return _with_sizes(self.backend.iter_blobs(), self.backend.blob_size)

    # -- manifests ---------------------------------------------------------------------------
    def put_manifest(
        self, data: bytes, media_type: str | None = None, *, expected: Digest | str | None = None
    ) -> Descriptor:
        """Validate, check references exist, and store a manifest by its sha256 digest (or by the
        algorithm of `expected`). The exact bytes are kept: their digest is the manifest's name."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidManifestError(f"manifest must be bytes, not {type(data).__name__}")
        data = bytes(data)
        manifest = parse_manifest(data, media_type)
        exp = Digest.parse(expected) if expected is not None else None
        digest = digest_bytes(data, exp.algorithm if exp else DEFAULT_ALGORITHM)
        if exp is not None and digest != exp:
            raise DigestMismatchError(f"manifest hashes to {digest}, expected {exp}")
        refs = references(manifest)
        recording = self.backend if isinstance(self.backend, Recording) else None
        if recording is not None:  # hold it and what it references before checking they exist
            recording.hold([digest, *(d.digest for d in refs.blobs), *(d.digest for d in refs.manifests)])
        check_references(self.backend, manifest, self._known_size)
        self.backend.write_manifest(digest, data)  # keeps a stored one (same digest, same bytes)
        if recording is not None:
            recording.manifest_stored(digest, manifest, len(data))
        self._learn({str(digest): len(data)}, "manifest")
        return Descriptor(digest, len(data), manifest.media_type, artifact_type=manifest.artifact_type)

    def get_manifest(self, digest: Digest | str) -> bytes:
        """Manifest bytes, verified against their digest."""
        d = Digest.parse(digest)
        data = self.backend.read_manifest(d)
        actual = digest_bytes(data, d.algorithm)
        if actual != d:
            raise DigestMismatchError(f"manifest {d} hashes to {actual}")
        if self._operations > 0:
            self._learn_manifest(d, data)
        return data

    def _learn_manifest(self, digest: Digest, data: bytes) -> None:
        """A verified stored manifest: it, and what it references (checked when it was put)."""
        self._learn({str(digest): len(data)}, "manifest")
        try:
            refs = references(parse_manifest(data))
        except (InvalidManifestError, ValueError):
            return
        self._learn({str(x.digest): x.size for x in refs.blobs}, "blob")
        self._learn({str(x.digest): x.size for x in refs.manifests}, "manifest")

    def get_manifest_typed(self, digest: Digest | str) -> Manifest:
        return parse_manifest(self.get_manifest(digest))

    def has_manifest(self, digest: Digest | str) -> bool:
        return self.backend.manifest_size(Digest.parse(digest)) is not None

    def stat_manifest(self, digest: Digest | str) -> int:
        size = self.backend.manifest_size(Digest.parse(digest))
        if size is None:
            raise ManifestNotFoundError(f"manifest {digest} not found")
        return size

    def delete_manifest(self, digest: Digest | str) -> None:
        self._forget(digest, "manifest")
        if not self.backend.remove_manifest(Digest.parse(digest)):
            raise ManifestNotFoundError(f"manifest {digest} not found")

    def delete_manifests(self, digests: Iterable[Digest | str]) -> int:
        """`delete_blobs` for manifests."""
        ds = [Digest.parse(d) for d in digests]
        return self.backend.remove_manifests(ds) if ds else 0

    def iter_manifests(self) -> Iterator[Digest]:
        return self.backend.iter_manifests()

    def iter_manifest_sizes(self) -> Iterator[tuple[Digest, int]]:
        """`iter_blob_sizes` for manifests."""
        if isinstance(self.backend, SizedListing):
            return self.backend.iter_manifest_sizes()
        return _with_sizes(self.backend.iter_manifests(), self.backend.manifest_size)

    # -- tags --------------------------------------------------------------------------------
    def resolve(self, repo: str, tag: str) -> Digest:
        d = self.backend.read_tag(validate_repository(repo), validate_tag(tag))
        if d is None:
            raise RefNotFoundError(f"{repo}:{tag} not found")
        return d

    def resolve_ref(self, ref: str | Digest | Reference) -> Digest:
        """The manifest digest a reference names: `repo:tag` (resolved; RefNotFoundError),
        `repo@digest` or a bare digest (taken as is). There is no default tag: a reference
        without one is an InvalidNameError. The one resolver every artifact kind uses."""
        if isinstance(ref, Digest):
            return ref
        if isinstance(ref, str) and ref.startswith(tuple(f"{a}:" for a in ALGORITHMS)):
            return Digest.parse(ref)
        r = ref if isinstance(ref, Reference) else Reference.parse(ref)
        if r.digest is not None:
            return r.digest
        assert r.tag is not None  # Reference.parse gives a tag or a digest
        return self.resolve(r.repository, r.tag)

    def tag(
        self, repo: str, tag: str, digest: Digest | str, expect: Expectation | str = ANY
    ) -> Digest | None:
        """Point `repo:tag` at a stored manifest. `expect` is ANY, MISSING or the digest the tag
        must point at now (compare-and-swap); TagConflictError when it does not hold. Returns the
        previous digest."""
        validate_repository(repo)
        validate_tag(tag)
        d = Digest.parse(digest)
        exp = _expectation(expect)
        if self._known_size("manifest", d) is None and self.backend.manifest_size(d) is None:
            raise ManifestNotFoundError(f"cannot tag {repo}:{tag}: manifest {d} not found")
        return self.backend.swap_tag(repo, tag, d, exp)

    def untag(self, repo: str, tag: str, expect: Expectation | str = ANY) -> Digest:
        """Remove a tag (with the same compare-and-swap as `tag`); returns what it pointed at."""
        validate_repository(repo)
        validate_tag(tag)
        exp = _expectation(expect)
        if exp is MISSING:
            raise ClawstoreError("untag with expect=MISSING makes no sense")
        prev = self.backend.swap_tag(repo, tag, None, exp)
        if prev is None:
            raise RefNotFoundError(f"{repo}:{tag} not found")
        return prev

    def list_tags(self, repo: str) -> list[str]:
        return sorted(self.backend.iter_tags(validate_repository(repo)))

    def list_repos(self) -> list[str]:
        return sorted(self.backend.iter_repos())

    # -- housekeeping ------------------------------------------------------------------------
    def cleanup(self, older_than: float = 3600.0) -> CleanupReport:
        return self.backend.cleanup(older_than)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_sizes(
    digests: Iterator[Digest], size_of: Callable[[Digest], int | None]
) -> Iterator[tuple[Digest, int]]:
    for d in digests:
        size = size_of(d)
        if size is not None:
            yield d, size


def check_references(
    backend: Backend, manifest: Manifest, known: Callable[[str, Digest], int | None] | None = None
) -> None:
    """InvalidManifestError unless every blob and manifest `manifest` references is stored with
    the size its descriptor says. `subject` may dangle, as in the OCI distribution spec:
    referrers can be pushed first. `known(kind, digest)` ("blob" or "manifest"): the size of
    what the caller has just seen stored (the backend is not asked again), or None."""
    refs = references(manifest)
    for descs, size_of, referrer, kind in (
        (refs.blobs, backend.blob_size, "manifest", "blob"),
        (refs.manifests, backend.manifest_size, "index", "manifest"),
    ):
        for d in descs:
            size = known(kind, d.digest) if known is not None else None
            if size is None:
                size = size_of(d.digest)
            if size is None:
                raise InvalidManifestError(f"{referrer} references missing {kind} {d.digest}")
            if size != d.size:
                raise InvalidManifestError(f"{kind} {d.digest} is {size} bytes, descriptor says {d.size}")


def default_store_url() -> str:
    env = os.environ.get("CLAWSTORE_URL")
    if env:
        return env
    import platformdirs

    return Path(platformdirs.user_data_dir("clawstore")).as_uri()


def open(url: str | os.PathLike[str] | None = None, *, create: bool = True, **options: Any) -> ArtifactStore:
    """Open a store: `file:///path` (or a plain path), or `s3://bucket/prefix?endpoint_url=...`.

    With no URL: `$CLAWSTORE_URL`, else a local store under the user's data directory.

    `create` (local stores): make the store's directories when the path holds no store yet (the
    default, like `sqlite3.connect`). Pass `create=False` when only reading: a path that holds no
    store then raises NotFoundError ("no clawstore store at PATH") instead of leaving an empty
    store behind a typo. S3 stores are never created here: the bucket must exist.
    """
    text = os.fspath(url) if url is not None else default_store_url()
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        from clawstore.backends.local import LocalBackend

        path = unquote(parsed.path) if parsed.scheme == "file" else text
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ClawstoreError(f"file URL must be local: {text}")
        return ArtifactStore(LocalBackend(path, create=create, **options))
    if parsed.scheme == "s3":
        from clawstore.backends.s3 import S3Backend

        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return ArtifactStore(S3Backend.from_url(parsed.netloc, parsed.path.lstrip("/"), query, **options))
    raise ClawstoreError(f"unsupported store URL scheme {parsed.scheme!r} in {text!r}")
