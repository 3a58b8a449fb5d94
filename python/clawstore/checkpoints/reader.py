"""Reading files and listings of checkpoints: one file by a ranged read of its pack frame
(`cat`, `open_file`), the checkpoints of a repository (`ls`), a chain (`history`), and the
difference of two checkpoints (`diff`)."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from clawstore import _core
from clawstore.checkpoints.format import (
    ARTIFACT_TYPE,
    BYTES_ANNOTATION,
    CREATED_ANNOTATION,
    FILES_ANNOTATION,
    PARENT_ANNOTATION,
    SESSION_ANNOTATION,
    Checkpoint,
    CheckpointDiff,
    CheckpointInfo,
)
from clawstore.checkpoints.index import (
    load,
    resolve_ref,
)
from clawstore.digest import Digest
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    ManifestNotFoundError,
    NotFoundError,
    RefNotFoundError,
)
from clawstore.manifest import ImageManifest, parse_manifest
from clawstore.store import ArtifactStore


def _find(ck: Checkpoint, path: str) -> dict[str, Any]:
    want = path.strip("/")
    for e in ck.entries:
        if e["p"] == want:
            return e
    raise NotFoundError(f"{want!r} is not in checkpoint {ck.digest}")


def cat(store: ArtifactStore, ref: str | Digest, path: str) -> bytes:
    """The content of one file of a checkpoint: one ranged read of its pack frame (or its blob),
    verified against the file's content digest."""
    ck = load(store, ref)
    e = _find(ck, path)
    if e["t"] != "file":
        raise ClawstoreError(f"{e['p']!r} is a {e['t']}, not a file")
    if "k" not in e:
        return store.read_blob(e["h"])
    frame = store.get_blob_range(ck.packs[e["k"]].digest, e["f"], e["n"])
    if len(frame) != e["n"]:
        raise DigestMismatchError(f"{e['p']!r}: pack {ck.packs[e['k']].digest} is shorter than indexed")
    return bytes(_core.checkpoint_extract(frame, e["o"], e["s"], e["h"], e["p"]))


def open_file(store: ArtifactStore, ref: str | Digest, path: str) -> io.BufferedIOBase:
    """A verified binary reader of one file (large files stream from their blob)."""
    ck = load(store, ref)
    e = _find(ck, path)
    if e["t"] == "file" and "k" not in e:
        return store.get_blob(e["h"])  # type: ignore[return-value]
    return io.BytesIO(cat(store, ck.digest, path))


def _info(store: ArtifactStore, tag: str | None, digest: Digest) -> CheckpointInfo | None:
    m = parse_manifest(store.get_manifest(digest))
    if not isinstance(m, ImageManifest) or m.artifact_type != ARTIFACT_TYPE:
        return None
    a = m.annotations or {}
    if FILES_ANNOTATION in a and SESSION_ANNOTATION in a:
        try:
            session = json.loads(a[SESSION_ANNOTATION])
            return CheckpointInfo(
                tag,
                digest,
                a.get(CREATED_ANNOTATION, ""),
                a.get(PARENT_ANNOTATION),
                int(a[FILES_ANNOTATION]),
                int(a.get(BYTES_ANNOTATION, "0")),
                session if isinstance(session, dict) else {},
            )
        except ValueError:
            pass
    ck = load(store, digest)
    files = list(ck.files())
    return CheckpointInfo(
        tag,
        digest,
        str(ck.config.get("created", "")),
        ck.parent,
        len(files),
        sum(e["s"] for e in files),
        ck.config.get("session") or {},
    )


def ls(store: ArtifactStore, repo: str) -> list[CheckpointInfo]:
    """The checkpoints tagged in `repo` (from their manifests' annotations)."""
    out = []
    for tag in store.list_tags(repo):
        with contextlib.suppress(InvalidManifestError, RefNotFoundError, ManifestNotFoundError):
            info = _info(store, tag, store.resolve(repo, tag))
            if info is not None:
                out.append(info)
    return out


def history(store: ArtifactStore, ref: str | Digest, *, limit: int | None = None) -> list[CheckpointInfo]:
    """The checkpoint at `ref`, then its parent, and so on (as far as they are still stored)."""
    out: list[CheckpointInfo] = []
    digest: Digest | None = resolve_ref(store, ref)
    while digest is not None and (limit is None or len(out) < limit):
        try:
            info = _info(store, None, digest)
        except (ManifestNotFoundError, InvalidManifestError):
            break
        if info is None:
            break
        out.append(info)
        digest = Digest.parse(info.parent) if info.parent else None
    return out


def diff(store: ArtifactStore, a: str | Digest, b: str | Digest) -> CheckpointDiff:
    """What changed from checkpoint `a` to checkpoint `b` (paths of every entry type)."""
    fa = {e["p"]: _identity(e) for e in load(store, a).entries}
    fb = {e["p"]: _identity(e) for e in load(store, b).entries}
    d = CheckpointDiff()
    d.added = sorted(set(fb) - set(fa))
    d.removed = sorted(set(fa) - set(fb))
    d.modified = sorted(p for p in set(fa) & set(fb) if fa[p] != fb[p])
    return d


def _identity(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("t"), e.get("h"), e.get("m"), e.get("l"))
