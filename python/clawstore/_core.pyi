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
    ) -> None: ...
    @property
    def checksum(self) -> str:
        """ "md5" (Content-MD5) or "sha256" (x-amz-checksum-sha256): the third element of a part."""
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

def content_md5(data: Buffer) -> str:
    """Base64 MD5 of a bytes-like object (the Content-MD5 header value)."""
