"""Make small OCI image layouts on disk (what skopeo copies from `oci:DIR`), with hashlib as
the digest oracle."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path


def _blob(root: Path, data: bytes) -> dict[str, object]:
    h = hashlib.sha256(data).hexdigest()
    p = root / "blobs" / "sha256" / h
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"digest": f"sha256:{h}", "size": len(data)}


def layer_bytes(name: str, payload: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(raw.getvalue(), mtime=0)


def make_layout(root: Path, layers: list[bytes], *, tag: str = "latest") -> str:
    """An OCI layout at `root` holding one image whose layers are `layers` (already-compressed
    bytes); returns the manifest digest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(root, b)} for b in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(b).hexdigest()}" for b in layers]},
        "config": {},
    }
    cfg = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(root, json.dumps(config).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": descs,
    }
    m = _blob(root, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **m,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return str(m["digest"])


def random_layers(sizes: list[int], seed: int = 0) -> list[bytes]:
    out = []
    for i, n in enumerate(sizes):
        out.append(layer_bytes(f"f{i}", hashlib.shake_256(f"{seed}-{i}".encode()).digest(n) if n else b""))
    return out


if __name__ == "__main__":  # python ocilayout.py DIR SIZE...
    import sys

    print(make_layout(Path(sys.argv[1]), random_layers([int(x) for x in sys.argv[2:]], seed=os.getpid())))
