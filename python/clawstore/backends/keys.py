"""The key layout every data plane shares: the names of blobs, manifests and tags relative to
the store's root (a directory for the local backend, a key prefix for S3), built and parsed in
one place (distribution's ``registry/storage/paths.go`` does the same).

    blobs/<alg>/<2 hex>/<hex>             blob bytes
    manifests/<alg>/<2 hex>/<hex>         manifest bytes
    refs/<repo>/_tags/<tag>               a tag: the manifest digest, one line

Tags live under ``_tags/`` (not ``refs/<repo>/<tag>``) because repository names nest: ``a/b``
is a repository and ``b`` could be a tag of ``a``. ``_`` cannot start a repository component or
a tag, so ``_tags`` never collides with a name.
"""

from __future__ import annotations

from clawstore.digest import ALGORITHMS, Digest
from clawstore.errors import ClawstoreError

BLOBS = "blobs"
MANIFESTS = "manifests"
REFS = "refs"
TAGS_DIR = "_tags"


def fanout(kind: str, digest: Digest) -> str:
    """``<kind>/<alg>/<2 hex>/<hex>`` (kind: BLOBS or MANIFESTS)."""
    enc = digest.encoded
    return f"{kind}/{digest.algorithm}/{enc[:2]}/{enc}"


def tags_dir(repo: str) -> str:
    return f"{REFS}/{repo}/{TAGS_DIR}"


def tag(repo: str, name: str) -> str:
    return f"{tags_dir(repo)}/{name}"


def parse_fanout(rel: str) -> Digest | None:
    """The digest named by ``<alg>/<2 hex>/<hex>`` (a name below BLOBS/ or MANIFESTS/), or None
    for anything else."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] not in ALGORITHMS or parts[2][:2] != parts[1]:
        return None
    try:
        return Digest.from_hex(parts[0], parts[2])
    except ClawstoreError:
        return None


def parse_tag(rel: str) -> tuple[str, str] | None:
    """``(repo, tag)`` of a name ``<repo>/_tags/<tag>`` below REFS/, or None."""
    repo, sep, name = rel.rpartition(f"/{TAGS_DIR}/")
    if not sep or not repo or not name or "/" in name:
        return None
    return repo, name
