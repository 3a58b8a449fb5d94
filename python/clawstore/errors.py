"""The clawstore error hierarchy.

The classes are created in the Rust core (`clawstore._core`) so that errors raised from Rust and
from Python are the same classes; this module is their one public home.

    ClawstoreError
    ├── NotFoundError ── BlobNotFoundError, ManifestNotFoundError, RefNotFoundError
    ├── DigestMismatchError, InvalidDigestError, InvalidNameError, InvalidManifestError
    ├── TagConflictError, UnsafeArchiveError
    └── PermissionDeniedError, LeaseConflictError
"""

from clawstore._core import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidManifestError,
    InvalidNameError,
    LeaseConflictError,
    ManifestNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RefNotFoundError,
    TagConflictError,
    UnsafeArchiveError,
)

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
]
