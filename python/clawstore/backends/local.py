"""Local-disk data plane.

Layout (every path is built by `LocalLayout`):

    blobs/<alg>/<2 hex>/<hex>             blob bytes
    manifests/<alg>/<2 hex>/<hex>         manifest bytes
    refs/<repo>/_tags/<tag>               a tag: the manifest digest, one line
    refs/<repo>/_tags/.lock               flock(2) serialising compare-and-swap across processes
    tmp/<pid>-<random>                    temp files; renamed into place or removed by cleanup

Tags live under `_tags/` (not `refs/<repo>/<tag>`) because repository names nest: `a/b` is a
repository and `b` could be a tag of `a`. `_` cannot start a repository component or a tag, so
`_tags` and `.lock` never collide with a name.

Every write is: temp file in `tmp/` (same filesystem), write, fsync, rename, fsync directory.
A crash leaves the old state or the new one, plus temp files that `cleanup` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from clawstore import _core
from clawstore.backends.base import ANY, MISSING, BlobSource, CleanupReport, Expectation
from clawstore.digest import ALGORITHMS, Digest, Hasher
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    ManifestNotFoundError,
    TagConflictError,
)

CHUNK = 1 << 20
TAGS_DIR = "_tags"


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


class LocalLayout:
    """Every path of the local store, built in one place from validated names."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.refs = root / "refs"
        self.tmp = root / "tmp"

    @staticmethod
    def _fanout(base: Path, digest: Digest) -> Path:
        enc = digest.encoded
        return base / digest.algorithm / enc[:2] / enc

    def blob(self, digest: Digest) -> Path:
        return self._fanout(self.blobs, digest)

    def manifest(self, digest: Digest) -> Path:
        return self._fanout(self.manifests, digest)

    def tags_dir(self, repo: str) -> Path:
        return self.refs.joinpath(*repo.split("/"), TAGS_DIR)

    def tag(self, repo: str, tag: str) -> Path:
        return self.tags_dir(repo) / tag

    def tag_lock(self, repo: str) -> Path:
        return self.tags_dir(repo) / ".lock"

    def new_temp(self) -> Path:
        return self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}"


class LocalBackend:
    """Crash-safe store on a local filesystem."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True, fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.layout = LocalLayout(self.root)
        self.fsync = fsync
        self.url = self.root.as_uri()
        if create:
            for d in (self.layout.blobs, self.layout.manifests, self.layout.refs, self.layout.tmp):
                d.mkdir(parents=True, exist_ok=True)
        elif not self.layout.blobs.is_dir():
            raise ClawstoreError(f"no clawstore store at {self.root}")

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

    def _commit(self, tmp: Path, final: Path, *, replace: bool) -> bool:
        """Move a fsynced temp file into place. Returns False if `final` existed and `replace` is off
        (content-addressed: the existing file is the same content, keep it)."""
        self._make_parent(final)
        if replace:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # atomic create-if-absent; never clobbers a committed blob
            except FileExistsError:
                tmp.unlink(missing_ok=True)
                return False
            tmp.unlink()
        if self.fsync:
            fsync_dir(final.parent)
        return True

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.layout.new_temp()
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        return tmp

    # -- blobs ---------------------------------------------------------------------------------
    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if isinstance(src, bytes | bytearray | memoryview):
            digest = Digest.from_hex(algorithm, _core.digest_bytes(src, algorithm))
            self._check(digest, expected)
            final = self.layout.blob(digest)
            if not final.exists():
                self._commit(self._write_temp(bytes(src)), final, replace=False)
            return digest, len(memoryview(src).cast("B"))
        if isinstance(src, str | os.PathLike):
            path = os.fspath(src)
            if expected is not None:
                size = self.blob_size(expected)
                if size is not None and size == os.stat(path).st_size:
                    # Already stored under the digest the caller vouches for: no need to read.
                    return expected, size
            tmp = self.layout.new_temp()
            try:
                hexd, size = _core.copy_file_hashed(path, os.fspath(tmp), algorithm)
                digest = Digest.from_hex(algorithm, hexd)
                self._check(digest, expected)
                self._commit(tmp, self.layout.blob(digest), replace=False)
            finally:
                tmp.unlink(missing_ok=True)
            return digest, size
        return self._write_stream(src, algorithm, expected)

    def _write_stream(self, src: BinaryIO, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        hasher = Hasher(algorithm)
        tmp = self.layout.new_temp()
        size = 0
        try:
            with open(tmp, "xb", buffering=0) as out:
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
                        n, chunk = len(data), memoryview(data)
                    if n == 0:
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    size += n
                if self.fsync:
                    os.fsync(out.fileno())
            digest = Digest.from_hex(algorithm, hasher.hexdigest())
            self._check(digest, expected)
            self._commit(tmp, self.layout.blob(digest), replace=False)
            return digest, size
        finally:
            tmp.unlink(missing_ok=True)

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

    def blob_path(self, digest: Digest) -> Path:
        """Local path of a blob (for zero-copy consumers such as layer unpacking); may not exist."""
        return self.layout.blob(digest)

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

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

    def _iter_fanout(self, base: Path) -> Iterator[Digest]:
        for alg in ALGORITHMS:
            adir = base / alg
            if not adir.is_dir():
                continue
            for sub in sorted(adir.iterdir()):
                if not sub.is_dir():
                    continue
                for f in sorted(sub.iterdir()):
                    with contextlib.suppress(ClawstoreError):
                        yield Digest.from_hex(alg, f.name)

    def iter_blobs(self) -> Iterator[Digest]:
        return self._iter_fanout(self.layout.blobs)

    # -- manifests -----------------------------------------------------------------------------
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        final = self.layout.manifest(digest)
        if final.exists():
            return
        self._commit(self._write_temp(data), final, replace=False)

    def read_manifest(self, digest: Digest) -> bytes:
        try:
            return self.layout.manifest(digest).read_bytes()
        except FileNotFoundError:
            raise ManifestNotFoundError(f"manifest {digest} not found") from None

    def manifest_size(self, digest: Digest) -> int | None:
        try:
            return self.layout.manifest(digest).stat().st_size
        except FileNotFoundError:
            return None

    def remove_manifest(self, digest: Digest) -> bool:
        return self._remove(self.layout.manifest(digest))

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
        with self._repo_lock(repo):
            current = self.read_tag(repo, tag)
            if expect is MISSING and current is not None:
                raise TagConflictError(f"{repo}:{tag} exists (points at {current})")
            if expect is not ANY and expect is not MISSING and current != expect:
                raise TagConflictError(f"{repo}:{tag} points at {current}, expected {expect}")
            if new is None:
                if current is not None:
                    self._remove(path)
                return current
            if current != new:
                self._commit(self._write_temp(f"{new}\n".encode()), path, replace=True)
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
        """Remove temp files older than `older_than` seconds, or of any age whose writing process
        (named in the file name) is gone."""
        now = time.time()
        removed = nbytes = 0
        for p in self.iter_temp_files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            pid_text = p.name.partition("-")[0]
            dead = pid_text.isdigit() and not pid_alive(int(pid_text))
            if dead or now - st.st_mtime >= older_than:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
                    nbytes += st.st_size
        return CleanupReport(removed, nbytes)

    def close(self) -> None:
        pass


__all__ = ["LocalBackend", "LocalLayout"]
