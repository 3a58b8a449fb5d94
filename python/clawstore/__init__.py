"""clawstore: a content-addressed artifact store with OCI semantics.

import clawstore
store = clawstore.open("file:///var/lib/clawstore")
d = store.put_blob(b"hello")
with store.get_blob(d.digest) as r:
    data = r.read()
"""

from clawstore.digest import Digest, Hasher, digest_bytes, digest_file
from clawstore.errors import (
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
from clawstore.manifest import Descriptor, ImageManifest, Index, canonical_json, parse_manifest
from clawstore.names import Reference
from clawstore.reader import VerifyingReader
from clawstore.store import ArtifactStore, open
from clawstore.types import ANY, MISSING

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "MISSING",
    "ArtifactStore",
    "BlobNotFoundError",
    "ClawstoreError",
    "Descriptor",
    "Digest",
    "DigestMismatchError",
    "Hasher",
    "ImageManifest",
    "Index",
    "InvalidDigestError",
    "InvalidManifestError",
    "InvalidNameError",
    "LeaseConflictError",
    "ManifestNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RefNotFoundError",
    "Reference",
    "TagConflictError",
    "UnsafeArchiveError",
    "VerifyingReader",
    "canonical_json",
    "digest_bytes",
    "digest_file",
    "open",
    "parse_manifest",
]
