"""Type stubs for the Rust core `clawstore._core`."""

from os import PathLike
from typing import Final

from typing_extensions import Buffer

__version__: Final[str]

class ClawstoreError(Exception): ...
class NotFoundError(ClawstoreError): ...
class BlobNotFoundError(NotFoundError): ...
class ManifestNotFoundError(NotFoundError): ...
class RefNotFoundError(NotFoundError): ...
class DigestMismatchError(ClawstoreError): ...
class InvalidDigestError(ClawstoreError): ...
class InvalidNameError(ClawstoreError): ...
class InvalidManifestError(ClawstoreError): ...
class TagConflictError(ClawstoreError): ...
class UnsafeArchiveError(ClawstoreError): ...
class PermissionDeniedError(ClawstoreError): ...
class LeaseConflictError(ClawstoreError): ...

class Hasher:
    """Streaming sha256 / sha512 / blake3; `update` releases the GIL for large buffers."""

    def __init__(self, algorithm: str = "sha256") -> None: ...
    def update(self, data: Buffer) -> None: ...
    def copy(self) -> Hasher: ...
    def hexdigest(self) -> str: ...
    def digest(self) -> str:
        """`algorithm:hex` of everything hashed so far."""
    @property
    def algorithm(self) -> str: ...
    @property
    def size(self) -> int: ...

def digest_bytes(data: Buffer, algorithm: str = "sha256") -> str:
    """Hex digest of a bytes-like object (zero-copy)."""

def digest_file(path: str | PathLike[str], algorithm: str = "sha256") -> tuple[str, int]:
    """(hex digest, size) of a file."""

def copy_file_hashed(
    src: str | PathLike[str], dst: str | PathLike[str], algorithm: str = "sha256"
) -> tuple[str, int]:
    """Copy src to a new file dst (fsynced), hashing in the same pass: (hex digest, size)."""

def validate_digest_str(digest: str) -> tuple[str, str]:
    """(algorithm, hex) or InvalidDigestError."""

# -- layer: volume scan/index, tar+zstd pack, safe unpack ------------------------------------

_EntryTuple = tuple[str, str, int, int, int, str | None, str | None]

class Scan:
    """A scanned tree (or a decoded index): entries sorted by path, root (".") first."""

    @property
    def root(self) -> str | None: ...
    @property
    def files(self) -> int: ...
    @property
    def bytes(self) -> int:
        """Bytes of regular files, each hardlinked inode once."""
    def __len__(self) -> int: ...
    def encode(self) -> bytes:
        """The file index: zstd-compressed JSON."""
    def entries(self) -> list[_EntryTuple]:
        """(path, kind, size, mode, mtime_ns, link target, content digest) per entry."""
    def diff(self, old: Scan, content: bool = False) -> Delta: ...

class Delta:
    @property
    def changed(self) -> int: ...
    @property
    def changed_bytes(self) -> int: ...
    @property
    def changed_paths(self) -> list[str]: ...
    @property
    def whiteouts(self) -> list[str]: ...
    @property
    def opaque(self) -> list[str]: ...
    def is_empty(self) -> bool: ...

def scan_tree(
    root: str | PathLike[str], content_digests: bool = False, algorithm: str = "sha256"
) -> Scan: ...
def decode_index(data: Buffer) -> Scan: ...
def pack_to_file(
    scan: Scan,
    path: str | PathLike[str],
    delta: Delta | None = None,
    level: int = 3,
    threads: int = 0,
    readers: int = 0,
    algorithm: str = "sha256",
) -> dict[str, int | str]:
    """Pack into a new file: {digest, diff_id, size, uncompressed_size, entries, files, file_bytes}."""

class PackStream:
    """A layer packed on a background thread, read like a raw binary file."""

    def __init__(
        self,
        scan: Scan,
        delta: Delta | None = None,
        level: int = 3,
        threads: int = 0,
        readers: int = 0,
        algorithm: str = "sha256",
    ) -> None: ...
    def readable(self) -> bool: ...
    def readinto(self, buffer: Buffer) -> int: ...
    def read(self, size: int = -1) -> bytes: ...
    @property
    def progress(self) -> tuple[int, int, int]:
        """(entries, files, file bytes) packed so far."""
    def result(self) -> dict[str, int | str]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> PackStream: ...
    def __exit__(self, *exc: object) -> None: ...

class Unpacker:
    """Applies layers in order to `dest`; UnsafeArchiveError on escapes and limits."""

    def __init__(
        self,
        dest: str | PathLike[str],
        *,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        max_ratio: int | None = None,
        allow_devices: bool = False,
        same_owner: bool | None = None,
        workers: int = 0,
    ) -> None: ...
    def apply(
        self,
        source: str | PathLike[str] | object,
        *,
        digest: str | None = None,
        diff_id: str | None = None,
        size: int | None = None,
        progress: object | None = None,
    ) -> dict[str, int | str | None]: ...
    def finish(self) -> dict[str, int]: ...
