"""Every key of an S3 store: the shared key layout (`clawstore.backends.keys`) under a prefix,
plus the S3-only staging names.

    PREFIX/blobs/<alg>/<2 hex>/<hex>       blob bytes
    PREFIX/manifests/<alg>/<2 hex>/<hex>   manifest bytes
    PREFIX/refs/<repo>/_tags/<tag>         a tag: the manifest digest, one line
    PREFIX/uploads/<uuid>                  staging objects of streams whose digest is not known yet
    PREFIX/uploads/probe-<uuid>            the open-time probes
"""

from __future__ import annotations

import uuid

from clawstore.backends import keys
from clawstore.digest import Digest


class S3Layout:
    """Every key of the store, built in one place from validated digests and names."""

    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.blobs = f"{self.prefix}{keys.BLOBS}/"
        self.manifests = f"{self.prefix}{keys.MANIFESTS}/"
        self.refs = f"{self.prefix}{keys.REFS}/"
        self.uploads = f"{self.prefix}uploads/"

    def blob(self, digest: Digest) -> str:
        return self.prefix + keys.fanout(keys.BLOBS, digest)

    def manifest(self, digest: Digest) -> str:
        return self.prefix + keys.fanout(keys.MANIFESTS, digest)

    def tags_prefix(self, repo: str) -> str:
        return f"{self.prefix}{keys.tags_dir(repo)}/"

    def tag(self, repo: str, tag: str) -> str:
        return self.prefix + keys.tag(repo, tag)

    def new_upload(self) -> str:
        return f"{self.uploads}{uuid.uuid4().hex}"

    def new_probe(self) -> str:
        return f"{self.uploads}probe-{uuid.uuid4().hex}"

    def parse_fanout(self, base: str, key: str) -> Digest | None:
        """The digest named by a key under `base` (self.blobs or self.manifests), or None."""
        return keys.parse_fanout(key[len(base) :]) if key.startswith(base) else None

    def parse_repo(self, key: str) -> str | None:
        """The repository of a tag key ``refs/<repo>/_tags/<tag>``."""
        if not key.startswith(self.refs):
            return None
        parsed = keys.parse_tag(key[len(self.refs) :])
        return None if parsed is None else parsed[0]
