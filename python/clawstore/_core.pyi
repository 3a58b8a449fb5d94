"""Type stubs for the Rust core `clawstore._core`."""

from collections.abc import Callable
from os import PathLike
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal

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

def copy_stream_hashed(
    src: BinaryIO, fd: int, algorithm: str = "sha256", size_hint: int = 0
) -> tuple[str, int]:
    """Receive a binary stream (with `readinto`) into the open file `fd` (from its current offset;
    the caller keeps `fd`), hashing exactly the bytes written; GIL released except inside
    `readinto`; O_DIRECT from `DIRECT_MIN` bytes (`size_hint`) where the filesystem allows it. Not
    fsynced. (hex digest, size); an exception of the stream is raised as is."""

#: Files at least this large are written with O_DIRECT where the filesystem allows it.
DIRECT_MIN: Final[int]

def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing that range of the open file back to disk without waiting (Linux
    sync_file_range; elsewhere nothing). A hint so that a later fsync has less to wait for."""

def validate_digest_str(digest: str) -> tuple[str, str]:
    """(algorithm, hex) or InvalidDigestError."""

def hash_features() -> dict[str, bool | int]:
    """CPU features the hashing uses here (`sha_ni`, `avx2`, `avx512f`), blake3 thread count and
    the read size: for benchmark reports and diagnostics."""

# -- stage (multipart part staging for the S3 backend) ------------------------------------------

MIN_PART_SIZE: Final[int]
MAX_PART_SIZE: Final[int]
MAX_PARTS: Final[int]

class PartStager:
    """Splits a path, a bytes-like object or a binary stream into upload parts.

    `next_part()` may be called from many threads at once (GIL released while reading and
    hashing); each part is added to the whole-object digest in order before it is returned, so at
    most one part per calling thread is alive."""

    def __init__(
        self,
        source: str | PathLike[str] | Buffer | object,
        part_size: int,
        algorithm: str = "sha256",
        checksum: str = "md5",
        precomputed: tuple[str, int, list[str]] | None = None,
    ) -> None:
        """`precomputed`: `digest_file_parts(source, algorithm, part_size, checksum)` of the same
        path: then nothing is hashed; each part comes with its precomputed checksum and `finish`
        gives the precomputed digest (ValueError if the file's size or part count differs)."""
    @property
    def checksum(self) -> str:
        """ "md5" (Content-MD5), "sha256" (x-amz-checksum-sha256) or "crc32" (x-amz-checksum-crc32):
        the third element of a part."""
    @property
    def size(self) -> int | None: ...
    @property
    def part_size(self) -> int: ...
    @property
    def algorithm(self) -> str: ...
    def next_part(self) -> tuple[int, bytes, str] | None:
        """(part_number from 1, data, checksum base64) or None when the source is exhausted."""
    def finish(self) -> tuple[str, int, int]:
        """(hex digest, size, parts) of the whole source; RuntimeError before every part was staged."""
    def abort(self, reason: str) -> None: ...

def digest_file_parts(
    path: str | PathLike[str], algorithm: str = "sha256", part_size: int = 8388608, checksum: str = "sha256"
) -> tuple[str, int, list[str]]:
    """(hex digest, size, [base64 checksum of each part_size part]) of a file, from one read
    (GIL released; the whole digest and the part checksums on two threads)."""

def content_md5(data: Buffer) -> str:
    """Base64 MD5 of a bytes-like object (the Content-MD5 header value)."""

def crc32_base64(data: Buffer) -> str:
    """Base64 big-endian CRC-32 of a bytes-like object (the x-amz-checksum-crc32 header value)."""

# -- layer (rust/layer/): volume tree scans, tar+zstd pack / unpack ----------------------------

EntryKind = Literal["file", "dir", "symlink", "fifo", "char", "block"]

class Scan:
    """A scanned tree (or a decoded index): sorted entries kept in Rust."""

    @property
    def root(self) -> str | None: ...
    def __len__(self) -> int: ...
    @property
    def files(self) -> int:
        """Number of regular files."""
    @property
    def bytes(self) -> int:
        """Bytes of regular files (each hardlinked inode counted once)."""
    def encode(self) -> bytes:
        """The serialised index (zstd-compressed binary records, version 2)."""
    def fingerprint(self, content: bool = False) -> str:
        """sha256 of the paths and the metadata `diff` compares: equal means an empty diff."""
    def entries(self) -> list[tuple[str, EntryKind, int, int, int, str | None, str | None]]:
        """(path, kind, size, mode, mtime_ns, link target, content digest) for every entry."""
    def rebased(self, base: Scan) -> Scan:
        """`base`'s entries with inode, device, ctime and link count taken from this scan where
        the path exists in both."""
    def diff(self, old: Scan, content: bool = False) -> Delta:
        """What changed from `old` (e.g. a decoded parent index) to this tree."""

class Delta:
    """The difference between two scans: what an incremental layer packs."""

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

def scan_tree(root: str | PathLike[str], content_digests: bool = False, algorithm: str = "sha256") -> Scan:
    """Scan `root` (symlinks never followed); with `content_digests`, hash every regular file too."""

def decode_index(data: Buffer) -> Scan:
    """Decode a serialised index (version 2 binary or version 1 JSON) into a Scan without a root
    (InvalidManifestError if damaged)."""

def pack_to_file(
    scan: Scan,
    path: str | PathLike[str],
    delta: Delta | None = None,
    level: int = 3,
    threads: int = 0,
    readers: int = 0,
    algorithm: str = "sha256",
) -> dict[str, Any]:
    """Pack a scan (or its delta) into a new file at `path`: digest, diff_id, size,
    uncompressed_size, entries, files, file_bytes."""

class PackStream:
    """A layer being packed on a Rust thread, read as a binary stream (bounded memory)."""

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
    def readinto(self, buffer: Buffer) -> int:
        """Next bytes of the layer; 0 at the end; OSError if packing failed."""
    def read(self, size: int = -1) -> bytes: ...
    @property
    def progress(self) -> tuple[int, int, int]:
        """(entries, files, file bytes) packed so far."""
    def result(self) -> dict[str, Any]:
        """The pack_to_file result dict, once the stream was read to the end."""
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> PackStream: ...
    def __exit__(
        self, a: type[BaseException] | None, b: BaseException | None, c: TracebackType | None
    ) -> None: ...

class Unpacker:
    """Applies layers in order to a directory (refusing unsafe archives); `finish()` sets
    directory metadata. `dest` is a path (its last component must not be a symlink) or an open
    directory descriptor; either way it is opened once and every write goes through directory
    handles from there, never following a symlink."""

    def __init__(
        self,
        dest: str | PathLike[str] | int,
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
        source: str | PathLike[str] | BinaryIO,
        *,
        digest: str | None = None,
        diff_id: str | None = None,
        size: int | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> dict[str, Any]:
        """Apply one layer, verifying `digest` (compressed), `diff_id` and `size` (uncompressed)
        when given. The uncompressed tar is hashed only to check a given `diff_id` (the result's
        "diff_id" is None otherwise)."""
    def finish(self) -> dict[str, int]:
        """Wait for all writes, set directory metadata; totals."""

# -- checkpoint (rust/checkpoint.rs): framed packs read one file at a time ---------------------

CheckpointScanEntry = tuple[str, Literal["file", "dir", "symlink"], int, int, int, int, int, int, str | None]

def checkpoint_scan(root: str | PathLike[str]) -> list[CheckpointScanEntry]:
    """Sorted (path, kind, size, mode, mtime_ns, ctime_ns, ino, dev, link target) of every file,
    directory and symlink below `root` (symlinks never followed; other types skipped).
    ValueError for a name that is not UTF-8."""

def checkpoint_pack(
    root: str | PathLike[str],
    files: list[tuple[str, int, int]],
    group_bytes: int = 262144,
    level: int = 3,
) -> tuple[bytes, list[tuple[str, int, int, int, int, int, int, int, int] | None]]:
    """Pack (path, dev, ino) files into a tar+zstd pack cut into independent frames: the pack and,
    per file, (digest, size, mode, mtime_ns, ctime_ns, ino, frame_off, frame_len, data_off), or
    None when it vanished or is no longer the scanned inode (opened with O_NOFOLLOW)."""

def checkpoint_extract(
    frame: Buffer, data_off: int, size: int, digest: str, path: str, max_frame: int = ...
) -> bytes:
    """One file's body out of its zstd frame, verified against `digest` (DigestMismatchError);
    UnsafeArchiveError when the location lies outside the frame."""

def checkpoint_layer(
    items: list[tuple[str, str, int, int, int, str | None, str | None, tuple[int, int, int, int] | None]],
    ranges: list[bytes],
    max_frame: int = ...,
) -> bytes:
    """A tar (one zstd frame of raw blocks) of `items` (path, kind, mode, mtime_ns, size, digest,
    link target, (range, frame offset, frame length, body offset)), bodies taken from the
    fetched `ranges` and verified against their digests: what restore feeds the Unpacker."""

def checkpoint_member_header(
    path: str, kind: str, mode: int, mtime_ns: int, size: int, link: str | None = None
) -> bytes:
    """The tar header block(s) (PAX where ustar does not fit) of one member, owner 0:0."""

def zstd_compress(data: Buffer, level: int = 3) -> bytes: ...
def zstd_decompress(data: Buffer, limit: int) -> bytes:
    """ValueError when the data is not zstd or decompresses past `limit` bytes."""
