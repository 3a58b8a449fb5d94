"""Build OCI image layouts with the standard library (tarfile, gzip, hashlib) and read them back.

A layout written here is the independent oracle for the client tests: every digest in it is
computed by hashlib over the bytes on disk, so a client that copies it to a registry and back
must return the same bytes under the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class Layout:
    """An OCI layout directory: `oci-layout`, `index.json`, `blobs/sha256/...`."""

    root: Path
    manifests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob_path(self, digest: str) -> Path:
        algo, hexpart = digest.split(":", 1)
        return self.root / "blobs" / algo / hexpart

    def add_blob(self, data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.write_bytes(data)
        return {"digest": digest, "size": len(data)}

    def add_blob_file(self, src: Path) -> dict[str, Any]:
        """A large blob: hashed while copied in 1 MiB pieces, never whole in memory."""
        h = hashlib.sha256()
        tmp = self.root / "blobs" / ".incoming"
        size = 0
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
        digest = "sha256:" + h.hexdigest()
        os.replace(tmp, self.blob_path(digest))
        return {"digest": digest, "size": size}

    def tag(self, descriptor: dict[str, Any], ref: str) -> None:
        entry = dict(descriptor, annotations={"org.opencontainers.image.ref.name": ref})
        self.manifests = [
            m
            for m in self.manifests
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != ref
        ]
        self.manifests.append(entry)
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": self.manifests}
        (self.root / "index.json").write_bytes(canonical(index))

    def read_index(self) -> dict[str, Any]:
        return dict(json.loads((self.root / "index.json").read_bytes()))

    def descriptor_for(self, ref: str) -> dict[str, Any]:
        for m in self.read_index()["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
                return dict(m)
        raise KeyError(ref)

    def read_blob(self, digest: str) -> bytes:
        data = self.blob_path(digest).read_bytes()
        assert sha256(data) == digest, f"blob {digest} in {self.root} does not match its digest"
        return data


def layer_tar(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of `files` with fixed metadata, so equal input gives equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def write_image(
    layout: Layout,
    ref: str,
    layers: list[list[tuple[str, bytes]]],
    architecture: str = "amd64",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An image whose layers hold `layers` (gzip'ed tars); tagged `ref`; returns its descriptor."""
    layer_descs = []
    diff_ids = []
    for files in layers:
        tar = layer_tar(files)
        diff_ids.append(sha256(tar))
        layer_descs.append(dict(layout.add_blob(gzip_bytes(tar)), mediaType=LAYER_GZIP))
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Labels": {"built-by": "clawstore tests"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = dict(layout.add_blob(canonical(config)), mediaType=CONFIG)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    if annotations:
        manifest["annotations"] = annotations
    desc = dict(layout.add_blob(canonical(manifest)), mediaType=MANIFEST)
    layout.tag(desc, ref)
    return desc


def random_files(seed: int, count: int, size: int) -> list[tuple[str, bytes]]:
    """`count` files of `size` pseudo-random (incompressible) bytes, reproducible from `seed`."""
    out = []
    for i in range(count):
        h = hashlib.shake_256(f"{seed}/{i}".encode())
        out.append((f"data/{seed}/file{i}.bin", h.digest(size)))
    return out


def image_files(layout: Layout, ref: str) -> dict[str, bytes]:
    """The merged file tree of image `ref` (later layers win), read with tarfile and gzip."""
    manifest = json.loads(layout.read_blob(layout.descriptor_for(ref)["digest"]))
    files: dict[str, bytes] = {}
    for layer in manifest["layers"]:
        data = layout.read_blob(layer["digest"])
        if layer["mediaType"].endswith("gzip"):
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    files[member.name.lstrip("./")] = f.read()
    return files


def write_index(layout: Layout, ref: str, images: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """An image index over `images` ((manifest descriptor, architecture) pairs), tagged `ref`."""
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": desc["mediaType"],
                "digest": desc["digest"],
                "size": desc["size"],
                "platform": {"architecture": arch, "os": "linux"},
            }
            for desc, arch in images
        ],
    }
    desc = dict(layout.add_blob(canonical(index)), mediaType=INDEX)
    layout.tag(desc, ref)
    return desc


def all_blobs(layout: Layout, digest: str) -> dict[str, bytes]:
    """Every blob reachable from manifest or index `digest`, itself included, by digest."""
    out: dict[str, bytes] = {}
    todo = [digest]
    while todo:
        d = todo.pop()
        if d in out:
            continue
        data = layout.read_blob(d)
        out[d] = data
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            continue
        if not isinstance(doc, dict) or "schemaVersion" not in doc:
            continue
        for m in doc.get("manifests", []):
            todo.append(m["digest"])
        if "config" in doc:
            out[doc["config"]["digest"]] = layout.read_blob(doc["config"]["digest"])
        for layer in doc.get("layers", []):
            out[layer["digest"]] = layout.read_blob(layer["digest"])
    return out
