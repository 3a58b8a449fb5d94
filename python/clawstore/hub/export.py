"""OCI image layout export and import (image-spec `image-layout.md`).

Export writes `oci-layout`, `index.json` (one entry per exported ref, named by the
`org.opencontainers.image.ref.name` annotation; existing entries for other names are kept) and
`blobs/<alg>/<hex>` for the manifest, its config and layers, and recursively for index children.
Files are written to a temp name and renamed; blobs already present with the right size are
skipped. Import reads such a layout (ours or any other tool's), pushes blobs and manifests
children-first with their digests verified, and tags them.
"""

from __future__ import annotations

import json
from pathlib import Path

from clawstore import mediatypes as mt
from clawstore.atomic import write_atomic
from clawstore.digest import Digest
from clawstore.errors import ClawstoreError, InvalidManifestError
from clawstore.manifest import Descriptor, ImageManifest, Index, canonical_json, parse_manifest
from clawstore.names import validate_tag
from clawstore.store import ArtifactStore

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT = {"imageLayoutVersion": "1.0.0"}


def _blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.algorithm / digest.encoded


def _copy_blob(store: ArtifactStore, root: Path, d: Descriptor) -> None:
    dest = _blob_path(root, d.digest)
    if dest.is_file() and dest.stat().st_size == d.size:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.get_blob_to_path(d.digest, dest)  # verified, atomic; parallel ranged GETs on S3


def _export_manifest(store: ArtifactStore, root: Path, digest: Digest) -> Descriptor:
    data = store.get_manifest(digest)
    m = parse_manifest(data)
    if isinstance(m, Index):
        for child in m.manifests:
            _export_manifest(store, root, child.digest)
    else:
        for b in m.blobs():
            _copy_blob(store, root, b)
    write_atomic(_blob_path(root, digest), data, make_parents=True)
    return Descriptor(digest, len(data), m.media_type, artifact_type=m.artifact_type)


def export_oci(
    store: ArtifactStore, digest: Digest | str, directory: Path, *, ref_name: str | None
) -> Descriptor:
    """Write the manifest `digest` (and everything it needs) into an OCI image layout."""
    directory.mkdir(parents=True, exist_ok=True)
    layout_file = directory / "oci-layout"
    if layout_file.exists() and json.loads(layout_file.read_text()).get("imageLayoutVersion") != "1.0.0":
        raise ClawstoreError(f"{directory} is not an OCI image layout 1.0.0")
    desc = _export_manifest(store, directory, Digest.parse(digest))
    index_file = directory / "index.json"
    entries: list[dict[str, object]] = []
    if index_file.exists():
        entries = list(json.loads(index_file.read_text()).get("manifests", []))
    entry_annotations = {REF_NAME: ref_name} if ref_name else None
    entry = Descriptor(
        desc.digest,
        desc.size,
        desc.media_type,
        artifact_type=desc.artifact_type,
        annotations=entry_annotations,
    ).to_dict()
    entries = [
        e for e in entries if not (ref_name and (e.get("annotations") or {}).get(REF_NAME) == ref_name)
    ]
    entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries}
    write_atomic(layout_file, canonical_json(LAYOUT))
    write_atomic(index_file, canonical_json(index))
    return desc


def _import_manifest(store: ArtifactStore, root: Path, d: Descriptor) -> Digest:
    path = _blob_path(root, d.digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClawstoreError(f"layout lacks manifest {d.digest}") from None
    m = parse_manifest(data)
    if isinstance(m, Index):
        for child in m.manifests:
            _import_manifest(store, root, child)
    elif isinstance(m, ImageManifest):
        for b in m.blobs():
            if store.has_blob(b.digest) and store.stat_blob(b.digest) == b.size:
                continue
            bp = _blob_path(root, b.digest)
            if not bp.is_file():
                raise ClawstoreError(f"layout lacks blob {b.digest}")
            got = store.put_blob(bp, expected=b.digest, media_type=b.media_type)
            if got.size != b.size:
                raise InvalidManifestError(f"blob {b.digest} is {got.size} bytes, descriptor says {b.size}")
    return store.put_manifest(data, m.media_type, expected=d.digest).digest


def import_oci(
    store: ArtifactStore, directory: Path, repo: str, *, tags: list[str] | None = None
) -> list[tuple[str, Digest]]:
    """Import the layout's refs (all, or those named in `tags`) into `repo`. Returns (tag, digest)."""
    try:
        index = json.loads((directory / "index.json").read_text())
        layout = json.loads((directory / "oci-layout").read_text())
    except FileNotFoundError as e:
        raise ClawstoreError(f"{directory} is not an OCI image layout: {e.filename} missing") from None
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise ClawstoreError(f"unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}")
    out: list[tuple[str, Digest]] = []
    for i, raw in enumerate(index.get("manifests", [])):
        d = Descriptor.from_dict(raw, f"index.json manifests[{i}]")
        name = (d.annotations or {}).get(REF_NAME)
        if name is None or (tags is not None and name not in tags):
            continue
        validate_tag(name)
        digest = _import_manifest(store, directory, d)
        store.tag(repo, name, digest)
        out.append((name, digest))
    if tags is not None and len(out) != len(set(tags)):
        missing = set(tags) - {n for n, _ in out}
        raise ClawstoreError(f"layout has no ref named {', '.join(sorted(missing))}")
    return out


__all__ = ["export_oci", "import_oci"]
