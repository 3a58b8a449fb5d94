"""clawstore: a content-addressed artifact store with OCI semantics.

import clawstore
store = clawstore.open("file:///var/lib/clawstore")
d = store.put_blob(b"hello")
with store.get_blob(d.digest) as r:
    data = r.read()
"""

from clawstore import errors
from clawstore.digest import Digest, Hasher, digest_bytes, digest_file
from clawstore.errors import *  # noqa: F403  (the one list: errors.__all__)
from clawstore.manifest import Descriptor, ImageManifest, Index, canonical_json, parse_manifest
from clawstore.names import Reference
from clawstore.reader import VerifyingReader
from clawstore.store import ArtifactStore, open
from clawstore.types import ANY, MISSING, BlobSource, CleanupReport, Expectation

__version__ = "0.1.0"

__all__ = [
    *errors.__all__,
    "ANY",
    "MISSING",
    "ArtifactStore",
    "BlobSource",
    "CleanupReport",
    "Descriptor",
    "Digest",
    "Expectation",
    "Hasher",
    "ImageManifest",
    "Index",
    "Reference",
    "VerifyingReader",
    "canonical_json",
    "digest_bytes",
    "digest_file",
    "open",
    "parse_manifest",
]
