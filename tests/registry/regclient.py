"""A minimal Distribution-spec client over httpx for the tests (hashlib as the digest oracle)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"

#: distribution-spec v1.1, "Error Codes": "The `code` field MUST be one of the following".
SPEC_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
    }
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def push_blob(c: httpx.Client, repo: str, data: bytes, digest: str | None = None) -> str:
    d = digest or sha256(data)
    r = c.post(
        f"/v2/{repo}/blobs/uploads/",
        params={"digest": d},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == d
    return d


def start_upload(c: httpx.Client, repo: str) -> str:
    r = c.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    return str(r.headers["Location"])


def patch(c: httpx.Client, location: str, data: bytes, start: int | None) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    return c.patch(location, content=data, headers=headers)


def push_chunked(c: httpx.Client, repo: str, data: bytes, chunk: int, digest: str | None = None) -> str:
    d = digest or sha256(data)
    loc = start_upload(c, repo)
    for off in range(0, len(data), chunk):
        r = patch(c, loc, data[off : off + chunk], off)
        assert r.status_code == 202, r.text
        assert r.headers["Range"] == f"0-{off + len(data[off : off + chunk]) - 1}"
        loc = r.headers["Location"]
    r = c.put(loc, params={"digest": d})
    assert r.status_code == 201, r.text
    return d


def manifest_bytes(
    layers: list[tuple[str, int]],
    config: tuple[str, int] | None = None,
    *,
    artifact_type: str | None = None,
    subject: tuple[str, int] | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    m: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": EMPTY if config is None else "application/vnd.oci.image.config.v1+json",
            "digest": config[0]
            if config
            else "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": config[1] if config else 2,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n} for d, n in layers
        ],
    }
    if artifact_type or config is None:
        m["artifactType"] = artifact_type or "application/vnd.test.artifact"
    if subject:
        m["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject[0], "size": subject[1]}
    if annotations:
        m["annotations"] = annotations
    return json.dumps(m).encode()


def push_image(
    c: httpx.Client, repo: str, tag: str | None, payloads: list[bytes], **kw: Any
) -> tuple[str, bytes]:
    """Blobs (+ the empty config) and a manifest; returns (manifest digest, manifest bytes)."""
    push_blob(c, repo, b"{}")
    layers = [(push_blob(c, repo, p), len(p)) for p in payloads]
    data = manifest_bytes(layers, **kw)
    ref = tag or sha256(data)
    r = c.put(f"/v2/{repo}/manifests/{ref}", content=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(data)
    return sha256(data), data


def error_codes(r: httpx.Response) -> list[str]:
    return [e["code"] for e in r.json()["errors"]]
