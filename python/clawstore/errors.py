"""The clawstore error hierarchy: the one list of error classes.

Errors the Rust core raises are created there (`clawstore._core`, rust/errors.rs) so that Rust
and Python raise the same classes; errors only the hub raises are defined here, subclassing the
same base. Everyone imports errors from this module (the package root re-exports `__all__`).

    ClawstoreError
    ├── NotFoundError ── BlobNotFoundError, ManifestNotFoundError, RefNotFoundError
    ├── DigestMismatchError, InvalidDigestError, InvalidNameError, InvalidManifestError
    ├── TagConflictError, UnsafeArchiveError
    └── PermissionDeniedError, LeaseConflictError          (hub only, defined here)
        UploadNotFoundError (a NotFoundError), UploadRangeError (hub uploads, defined here)
"""

from clawstore._core import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidManifestError,
    InvalidNameError,
    ManifestNotFoundError,
    NotFoundError,
    RefNotFoundError,
    TagConflictError,
    UnsafeArchiveError,
)


class PermissionDeniedError(ClawstoreError):
    """The principal lacks the grant for this action."""

    __module__ = "clawstore"


class LeaseConflictError(ClawstoreError):
    """A lease is held by someone else."""

    __module__ = "clawstore"


class UploadNotFoundError(NotFoundError):
    """No live upload session by that id in that repository (never started, expired, finished,
    cancelled, or another repository's)."""

    __module__ = "clawstore"


class UploadRangeError(ClawstoreError):
    """A chunk does not start where the upload session stands (out of order, or another writer
    appended first). `offset` is where the session stands."""

    __module__ = "clawstore"

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


__all__ = [
    "BlobNotFoundError",
    "ClawstoreError",
    "DigestMismatchError",
    "InvalidDigestError",
    "InvalidManifestError",
    "InvalidNameError",
    "LeaseConflictError",
    "ManifestNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RefNotFoundError",
    "TagConflictError",
    "UnsafeArchiveError",
    "UploadNotFoundError",
    "UploadRangeError",
]
