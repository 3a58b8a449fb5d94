"""S3-compatible data plane (AWS S3, Ceph RGW, MinIO, moto).

URL: ``s3://BUCKET/PREFIX?endpoint_url=http://HOST:PORT&region=REGION&part_size=8MiB&concurrency=8``.
Credentials come from the boto3 chain (environment, ``profile=`` / ``AWS_PROFILE``, config files,
instance metadata); secrets never go in the URL.

The package, along the lines of obstore's and distribution's:

    options     every tunable (`S3Options`), parsed and checked once; S3's limits
    transport   the client, error classification, and the one retry policy every request uses
    layout      every key (the shared layout of `clawstore.backends.keys` under a prefix)
    probe       what the server accepts and refuses, found at open time: `S3Capabilities`
    signing     parts signed with their Rust-computed SHA-256 (part_checksum=signed)
    upload      single PUTs, multipart uploads from the Rust stager, staging + server-side copy
    download    the resuming GET body; verified downloads (hashed and written by the Rust core)
    backend     `S3Backend`: the `Backend` protocol methods

Invariant: nothing appears at a digest key unless its bytes hash to that digest (see `upload`).
Tags use conditional writes: ``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace
and to delete, in the form the probe found the server takes.
"""

from .backend import S3Backend
from .layout import S3Layout
from .options import S3Options, parse_size
from .probe import S3Capabilities
from .transport import RetryPolicy, S3ConfigurationError, S3Error

__all__ = [
    "RetryPolicy",
    "S3Backend",
    "S3Capabilities",
    "S3ConfigurationError",
    "S3Error",
    "S3Layout",
    "S3Options",
    "parse_size",
]
