"""Local-disk data plane.

Layout (every path is built by `LocalLayout`):

    blobs/<alg>/<2 hex>/<hex>             blob bytes
    manifests/<alg>/<2 hex>/<hex>         manifest bytes
    refs/<repo>/_tags/<tag>               a tag: the manifest digest, one line
    refs/<repo>/_tags/.lock               flock(2) serialising compare-and-swap across processes
    tmp/<pid>-<random>                    temp files; linked/renamed into place, or removed by cleanup
    tmp/<pid>-<random>.lock               flock()ed by the temp file's writer while it is in use

Tags live under `_tags/` (not `refs/<repo>/<tag>`) because repository names nest: `a/b` is a
repository and `b` could be a tag of `a`. `_` cannot start a repository component or a tag, so
`_tags` and `.lock` never collide with a name.

Every write is: temp file in `tmp/` (same filesystem), write, fsync, rename, fsync directory.
A crash leaves the old state or the new one, plus temp files that `cleanup` removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from clawstore import _core
from clawstore.backends import keys
from clawstore.digest import ALGORITHMS, Digest, Hasher
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidDigestError,
    ManifestNotFoundError,
    NotFoundError,
    TagConflictError,
)
from clawstore.manifest import MAX_MANIFEST_SIZE
from clawstore.types import ANY, MISSING, BlobSource, CleanupReport, Expectation

CHUNK = 1 << 20
#: Streamed writes start writeback every this many bytes (when fsync is on).
WRITEBACK_EVERY = 8 << 20
LOCK_SUFFIX = ".lock"
_LOCKED, _NO_LOCK_FILE = -1, -2
_NO_HARDLINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})
TAGS_DIR = keys.TAGS_DIR


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Fd:
    """An owned OS file descriptor, for `contextlib.closing`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class LocalLayout:
    """Every path of the local store: the shared key layout (`clawstore.backends.keys`, also
    the S3 backend's) under the root, plus the local-only temp files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / keys.BLOBS
        self.manifests = root / keys.MANIFESTS
        self.refs = root / keys.REFS
        self.tmp = root / "tmp"

    def blob(self, digest: Digest) -> Path:
        return self.root / keys.fanout(keys.BLOBS, digest)

    def manifest(self, digest: Digest) -> Path:
        return self.root / keys.fanout(keys.MANIFESTS, digest)

    def tags_dir(self, repo: str) -> Path:
        return self.root / keys.tags_dir(repo)

    def tag(self, repo: str, tag: str) -> Path:
        return self.root / keys.tag(repo, tag)

    def tag_lock(self, repo: str) -> Path:
        return self.tags_dir(repo) / ".lock"

    def new_temp(self) -> Path:
        return self.tmp / f"{os.getpid()}-{os.urandom(8).hex()}"


class LocalBackend:
    """Crash-safe store on a local filesystem."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.layout = LocalLayout(self.root)
        self.fsync = fsync
        self.url = self.root.as_uri()
        if create:
            for d in (self.layout.blobs, self.layout.manifests, self.layout.refs, self.layout.tmp):
                self._make_parent(d / "_")  # creates d, fsyncing each new directory entry
        elif not self.layout.blobs.is_dir():
            raise NotFoundError(f"no clawstore store at {self.root}")

    # -- atomic file primitives --------------------------------------------------------------
    def _make_parent(self, path: Path) -> None:
        parent = path.parent
        if parent.is_dir():
            return
        missing = []
        p = parent
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for d in [*missing[1:], p]:  # make each new directory entry durable
                fsync_dir(d)

    @contextlib.contextmanager
    def _temp(self) -> Iterator[Path]:
        """Reserve a temp file name in tmp/ for as long as it is in use; yields the path, which
        the caller creates exclusively (`_create` or the Rust copier's create-new).

        The reservation is `<name>.lock`, created first and flock()ed until the temp file is
        gone: that lock is what tells `cleanup` a writer is alive (it dies with the process, in
        any pid namespace), so cleanup never removes a live writer's temp file. `cleanup` may
        take the lock in the instant between our O_EXCL create and our flock; then the lock
        file is (being) unlinked and we start over with a new name.
        """
        for _ in range(16):
            path = self.layout.new_temp()
            lock = path.with_name(path.name + LOCK_SUFFIX)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(lock, flags, 0o644)
            except FileNotFoundError:  # tmp/ removed by hand: recreate it
                self.layout.tmp.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_nlink > 0:
                    break
            except BlockingIOError:
                pass
            except BaseException:
                with contextlib.suppress(OSError):
                    lock.unlink()
                os.close(fd)
                raise
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)
        else:  # pragma: no cover - needs a cleanup loop racing every single create
            raise OSError(f"could not create a temp file in {self.layout.tmp}")
        try:
            yield path
        finally:
            try:
                path.unlink(missing_ok=True)  # a renamed temp is gone already; names never repeat
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)  # releases the lock, only once the temp file is gone

    @staticmethod
    def _create(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _write_all(fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def _commit(self, tmp: Path, final: Path, *, replace: bool, size: int | None = None) -> bool:
        """Move a fsynced temp file into place. Returns False if `final` existed and `replace` is
        off (content-addressed: the existing file is the same content, keep it) -- unless its size
        differs from `size`: then it was damaged (truncated) and the verified temp replaces it."""
        self._make_parent(final)
        if replace:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # atomic create-if-absent; never clobbers a committed blob
            except FileExistsError:
                existing = self._size(final)
                if existing is None:  # deleted (gc) between our link and stat: link again
                    return self._commit(tmp, final, replace=replace, size=size)
                if size is None or existing == size:
                    return False
                os.replace(tmp, final)
            except OSError as e:
                if e.errno not in _NO_HARDLINKS:
                    raise
                # A filesystem without hard links (some FUSE/SMB mounts) or at its link limit:
                # rename instead. Not create-if-absent, but the name is the content's digest, so
                # a concurrent writer's rename replaces it with identical, verified bytes.
                if size is not None and self._size(final) == size:
                    return False
                os.replace(tmp, final)
        if self.fsync:
            fsync_dir(final.parent)
        return True

    @staticmethod
    def _size(path: Path) -> int | None:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None

    def _put_bytes(self, data: bytes, final: Path, *, replace: bool) -> bool:
        with self._temp() as tmp:
            fd = self._create(tmp)
            try:
                self._write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return self._commit(tmp, final, replace=replace, size=len(data))

    # -- blobs ---------------------------------------------------------------------------------
    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if isinstance(src, bytes | bytearray | memoryview):
            # Copy a mutable buffer first: the bytes hashed must be the bytes written.
            data = src if isinstance(src, bytes) else bytes(src)
            digest = Digest.from_hex(algorithm, _core.digest_bytes(data, algorithm))
            self._check(digest, expected)
            final = self.layout.blob(digest)
            if self._size(final) != len(data):
                self._put_bytes(data, final, replace=False)
            return digest, len(data)
        if isinstance(src, str | os.PathLike):
            path = os.fspath(src)
            if expected is not None:
                size = self.blob_size(expected)
                if size is not None and size == os.stat(path).st_size:
                    # Already stored under the digest the caller vouches for: no need to read.
                    return expected, size
            with self._temp() as tmp:
                # One pass: read, hash and write (overlapped in Rust), fsynced; removed on error.
                hexd, size = _core.copy_file_hashed(path, os.fspath(tmp), algorithm)
                digest = Digest.from_hex(algorithm, hexd)
                self._check(digest, expected)
                self._commit(tmp, self.layout.blob(digest), replace=False, size=size)
            return digest, size
        return self._write_stream(src, algorithm, expected)

    def _write_stream(self, src: BinaryIO, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        hasher = Hasher(algorithm)
        size = flushed = 0
        with self._temp() as tmp, contextlib.closing(_Fd(self._create(tmp))) as out:
            fd = out.fd
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            readinto = getattr(src, "readinto", None)
            while True:
                if readinto is not None:
                    n = readinto(view)
                    if n is None:
                        raise BlockingIOError("non-blocking source not supported")
                    chunk = view[:n]
                else:
                    data = src.read(CHUNK)
                    if not isinstance(data, bytes | bytearray | memoryview):
                        raise TypeError(f"blob source must yield bytes, not {type(data).__name__}")
                    n, chunk = len(data), memoryview(data)
                if n == 0:
                    break
                hasher.update(chunk)
                self._write_all(fd, chunk)
                size += n
                if self.fsync and size - flushed >= WRITEBACK_EVERY:
                    # Start writeback as we go: the fsync below then waits for the last few MiB,
                    # not the whole blob (a 545 MB layer: 1.4 s -> ~0).
                    _core.start_writeback(fd, flushed, size - flushed)
                    flushed = size
            if self.fsync:
                os.fsync(fd)
            digest = Digest.from_hex(algorithm, hasher.hexdigest())
            self._check(digest, expected)
            self._commit(tmp, self.layout.blob(digest), replace=False, size=size)
            return digest, size

    @staticmethod
    def _check(digest: Digest, expected: Digest | None) -> None:
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")

    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        try:
            f = open(self.layout.blob(digest), "rb", buffering=0)  # noqa: SIM115 (caller closes)
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} not found") from None
        return f, os.fstat(f.fileno()).st_size  # type: ignore[return-value]

    def read_blob_range(self, digest: Digest, offset: int, length: int) -> bytes:
        """`length` bytes of a blob from `offset` (fewer at its end): one pread."""
        try:
            fd = os.open(self.layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} not found") from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    #: Ranged reads worth running at once (local disk: a few keep the page cache and SSD busy).
    read_concurrency = 4

    def blob_path(self, digest: Digest) -> Path:
        """Local path of a blob (for zero-copy consumers such as layer unpacking); may not exist."""
        return self.layout.blob(digest)

    def blob_size(self, digest: Digest) -> int | None:
        return self._size(self.layout.blob(digest))

    def remove_blob(self, digest: Digest) -> bool:
        return self._remove(self.layout.blob(digest))

    def _remove(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        if self.fsync:
            fsync_dir(path.parent)
        return True

    def remove_blobs(self, digests: Collection[Digest]) -> int:
        return self._remove_many(self.layout.blobs, digests)

    def _remove_many(self, base: Path, digests: Collection[Digest]) -> int:
        """Unlink the objects of `digests` under `base`: one pass per fanout directory (opened
        once, names unlinked relative to it) and one directory fsync per directory that lost an
        entry, not one per file. Paths are built as strings (a `Path` per object was most of
        the old per-object cost)."""
        by_dir: dict[str, list[str]] = {}
        root = os.fspath(base)
        for d in digests:
            alg, _, enc = str(d).partition(":")
            by_dir.setdefault(f"{root}/{alg}/{enc[:2]}", []).append(enc)
        removed = 0
        for parent in sorted(by_dir):
            try:
                dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # no such fanout directory: none of these is stored
            try:
                here = 0
                for name in by_dir[parent]:
                    try:
                        os.unlink(name, dir_fd=dfd)
                        here += 1
                    except FileNotFoundError:
                        pass
                if here and self.fsync:
                    os.fsync(dfd)
                removed += here
            finally:
                os.close(dfd)
        return removed

    #: `remove_blobs` calls worth making at once, and digests per call (BatchRemovals).
    remove_concurrency = 2
    remove_batch = 1000

    def iter_blob_sizes(self) -> Iterator[tuple[Digest, int]]:
        return self._iter_fanout_sizes(self.layout.blobs)

    def iter_manifest_sizes(self) -> Iterator[tuple[Digest, int]]:
        return self._iter_fanout_sizes(self.layout.manifests)

    def _iter_fanout_sizes(self, base: Path) -> Iterator[tuple[Digest, int]]:
        for alg in ALGORITHMS:
            adir = base / alg
            if not adir.is_dir():
                continue
            for sub in sorted(os.scandir(adir), key=lambda e: e.name):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                for f in sorted(os.scandir(sub.path), key=lambda e: e.name):
                    if not f.name.startswith(sub.name):
                        continue
                    try:
                        size = f.stat(follow_symlinks=False).st_size
                        yield Digest.from_hex(alg, f.name), size
                    except (FileNotFoundError, ClawstoreError):
                        continue

    def _iter_fanout(self, base: Path) -> Iterator[Digest]:
        for alg in ALGORITHMS:
            adir = base / alg
            if not adir.is_dir():
                continue
            for sub in sorted(adir.iterdir()):
                if not sub.is_dir():
                    continue
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith(sub.name):
                        continue  # not at its fanout path: not a stored object
                    with contextlib.suppress(ClawstoreError):
                        yield Digest.from_hex(alg, f.name)

    def iter_blobs(self) -> Iterator[Digest]:
        return self._iter_fanout(self.layout.blobs)

    # -- manifests -----------------------------------------------------------------------------
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        final = self.layout.manifest(digest)
        if self._size(final) != len(data):
            self._put_bytes(data, final, replace=False)

    def read_manifest(self, digest: Digest) -> bytes:
        try:
            with open(self.layout.manifest(digest), "rb") as f:
                # Never more than the cap (+1, so an over-long file fails the digest check): a
                # damaged or planted huge file cannot make a manifest read exhaust memory.
                return f.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            raise ManifestNotFoundError(f"manifest {digest} not found") from None

    def manifest_size(self, digest: Digest) -> int | None:
        return self._size(self.layout.manifest(digest))

    def remove_manifest(self, digest: Digest) -> bool:
        return self._remove(self.layout.manifest(digest))

    def remove_manifests(self, digests: Collection[Digest]) -> int:
        return self._remove_many(self.layout.manifests, digests)

    def iter_manifests(self) -> Iterator[Digest]:
        return self._iter_fanout(self.layout.manifests)

    # -- tags ----------------------------------------------------------------------------------
    def read_tag(self, repo: str, tag: str) -> Digest | None:
        try:
            text = self.layout.tag(repo, tag).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Digest.parse(text)

    @contextlib.contextmanager
    def _repo_lock(self, repo: str) -> Iterator[None]:
        lock = self.layout.tag_lock(repo)
        self._make_parent(lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def swap_tag(self, repo: str, tag: str, new: Digest | None, expect: Expectation) -> Digest | None:
        path = self.layout.tag(repo, tag)
        if new is None and not self.layout.tags_dir(repo).is_dir():
            # Removing from a repository that has never had a tag: nothing to lock or remove, and
            # a failed untag must not leave refs/<repo>/_tags/.lock behind (it never appeared).
            if expect is not ANY and expect is not MISSING:
                raise TagConflictError(f"{repo}:{tag} points at None, expected {expect}")
            return None
        with self._repo_lock(repo):
            try:
                current = self.read_tag(repo, tag)
            except InvalidDigestError:  # a damaged tag file: only an unconditional write fixes it
                if expect is not ANY:
                    raise TagConflictError(f"{repo}:{tag} is damaged; only expect=ANY replaces it") from None
                current = None
                if new is None:
                    self._remove(path)
            if expect is MISSING and current is not None:
                raise TagConflictError(f"{repo}:{tag} exists (points at {current})")
            if expect is not ANY and expect is not MISSING and current != expect:
                raise TagConflictError(f"{repo}:{tag} points at {current}, expected {expect}")
            if new is None:
                if current is not None:
                    self._remove(path)
                return current
            if current != new:
                self._put_bytes(f"{new}\n".encode(), path, replace=True)
            return current

    def iter_tags(self, repo: str) -> Iterator[str]:
        d = self.layout.tags_dir(repo)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if not name.startswith("."):
                yield name

    def iter_repos(self) -> Iterator[str]:
        refs = self.layout.refs
        for dirpath, dirnames, _files in os.walk(refs):
            if TAGS_DIR in dirnames:
                dirnames.remove(TAGS_DIR)
                rel = os.path.relpath(dirpath, refs).replace(os.sep, "/")
                if any(not n.startswith(".") for n in os.listdir(os.path.join(dirpath, TAGS_DIR))):
                    yield rel

    # -- housekeeping --------------------------------------------------------------------------
    def iter_temp_files(self) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError):
            yield from self.layout.tmp.iterdir()

    def cleanup(self, older_than: float) -> CleanupReport:
        """Remove abandoned temp files (and their lock files): those whose `.lock` no live writer
        holds; temp files without a lock file only when older than `older_than` seconds or when
        the process named in their name is gone.

        A writer holds `<temp>.lock` flock()ed from before it creates the temp file until after
        it is committed or removed, so a live writer's temp file is never removed, whatever its
        age or `older_than`.
        """
        now = time.time()
        removed = nbytes = 0
        for p in sorted(self.iter_temp_files()):
            if p.name.endswith(LOCK_SUFFIX):
                data, lock = p.with_name(p.name[: -len(LOCK_SUFFIX)]), p
            else:
                data, lock = p, p.with_name(p.name + LOCK_SUFFIX)
                if lock.exists() or lock.is_symlink():
                    continue  # handled with its lock file
            fd = self._try_lock(lock)
            if fd == _LOCKED:
                continue
            try:
                if fd == _NO_LOCK_FILE:  # no lock file: judge by the writer's pid and the age
                    try:
                        st = data.lstat()
                    except FileNotFoundError:
                        continue
                    pid_text = data.name.partition("-")[0]
                    dead = pid_text.isdigit() and not pid_alive(int(pid_text))
                    if not stat.S_ISREG(st.st_mode) or not (dead or now - st.st_mtime >= older_than):
                        continue
                # Abandoned: remove the temp file, then its lock file while still holding it.
                with contextlib.suppress(FileNotFoundError):
                    st = data.lstat()
                    if stat.S_ISREG(st.st_mode):
                        data.unlink()
                        removed += 1
                        nbytes += st.st_size
                if fd >= 0:
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                        removed += 1
            finally:
                if fd >= 0:
                    os.close(fd)
        return CleanupReport(removed, nbytes)

    @staticmethod
    def _try_lock(lock: Path) -> int:
        """An fd holding `lock` flock()ed, or _LOCKED if a live writer holds it (or it cannot be
        locked, or it is not a regular file: leave it), or _NO_LOCK_FILE."""
        try:
            # Read-write: on NFS, flock is emulated with fcntl locks, which need it for LOCK_EX.
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return _NO_LOCK_FILE
        except OSError:
            return _LOCKED
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 0:
                return fd
        except OSError:
            pass
        os.close(fd)
        return _LOCKED

    def close(self) -> None:
        pass


__all__ = ["LocalBackend", "LocalLayout"]
