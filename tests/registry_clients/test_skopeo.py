"""skopeo against each registry: OCI layouts (built here with tarfile + hashlib) to the registry and
back with identical digests and bytes; `inspect --raw`, `list-tags`, pull by digest, multi-platform
indexes with `--all`, delete; `--dest-creds`/`--src-creds` on a registry with auth; S3 backends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import Tools
from oci_layout import (
    Layout,
    all_blobs,
    image_files,
    random_files,
    sha256,
    write_image,
    write_index,
)
from registry_servers import RegistryServer

TLS = "--tls-verify=false"


def small_image(root: Path, ref: str = "v1", seed: int = 1) -> tuple[Layout, dict]:
    """Three layers of different sizes (one over the 4 MiB mark so it is sent in several reads)."""
    layout = Layout(root)
    desc = write_image(
        layout,
        ref,
        [
            random_files(seed, 3, 70_000),
            random_files(seed + 1000, 1, 5 << 20),
            [("etc/hello.txt", f"hello from image {seed}\n".encode())],
        ],
    )
    return layout, desc


def assert_same_image(src: Layout, src_ref: str, dst: Layout, dst_ref: str) -> None:
    src_desc, dst_desc = src.descriptor_for(src_ref), dst.descriptor_for(dst_ref)
    assert dst_desc["digest"] == src_desc["digest"]
    assert dst_desc["size"] == src_desc["size"]
    src_blobs, dst_blobs = all_blobs(src, src_desc["digest"]), all_blobs(dst, dst_desc["digest"])
    assert sorted(dst_blobs) == sorted(src_blobs)
    for digest, data in dst_blobs.items():
        assert sha256(data) == digest
        assert data == src_blobs[digest]


def roundtrip(server: RegistryServer, skopeo: Tools, tmp_path: Path, repo: str) -> None:
    src, desc = small_image(tmp_path / "src")
    remote = f"docker://{server.host}/{repo}:v1"
    skopeo.skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src.root}:v1", remote)

    raw = skopeo.skopeo("inspect", "--raw", TLS, remote).stdout.encode()
    assert raw == src.read_blob(desc["digest"]), "inspect --raw must return the pushed manifest bytes"
    info = json.loads(skopeo.skopeo("inspect", TLS, remote).stdout)
    assert info["Digest"] == desc["digest"]
    assert info["Layers"] == [layer["digest"] for layer in json.loads(raw)["layers"]]

    dst = Layout(tmp_path / "dst")
    skopeo.skopeo("copy", "--preserve-digests", "--src-tls-verify=false", remote, f"oci:{dst.root}:back")
    assert_same_image(src, "v1", dst, "back")
    assert image_files(dst, "back") == image_files(src, "v1")


def test_copy_layout_to_registry_and_back(
    registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str
) -> None:
    roundtrip(registry, skopeo, tmp_path, repo_name)


@pytest.mark.s3
def test_copy_layout_to_s3_registry_and_back(
    s3_registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str
) -> None:
    roundtrip(s3_registry, skopeo, tmp_path, repo_name)


def test_list_tags_and_pull_by_digest(
    registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str
) -> None:
    src, desc = small_image(tmp_path / "src", seed=7)
    base = f"docker://{registry.host}/{repo_name}"
    for tag in ("v1", "v2", "latest"):
        skopeo.skopeo(
            "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src.root}:v1", f"{base}:{tag}"
        )
    listed = json.loads(skopeo.skopeo("list-tags", TLS, base).stdout)
    assert listed["Repository"] == f"{registry.host}/{repo_name}"
    assert sorted(listed["Tags"]) == ["latest", "v1", "v2"]

    dst = Layout(tmp_path / "dst")
    skopeo.skopeo("copy", "--src-tls-verify=false", f"{base}@{desc['digest']}", f"oci:{dst.root}:bydigest")
    assert_same_image(src, "v1", dst, "bydigest")


def test_unknown_tag_and_repository_fail(registry: RegistryServer, skopeo: Tools, repo_name: str) -> None:
    missing_repo = skopeo.skopeo(
        "inspect", "--raw", TLS, f"docker://{registry.host}/{repo_name}:nope", check=False
    )
    assert missing_repo.returncode != 0
    assert "manifest unknown" in missing_repo.stderr.lower() or "name unknown" in missing_repo.stderr.lower()


def test_multi_platform_index_with_all(
    registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str
) -> None:
    src = Layout(tmp_path / "src")
    amd = write_image(src, "amd64", [random_files(21, 2, 50_000)], architecture="amd64")
    arm = write_image(src, "arm64", [random_files(22, 2, 50_000)], architecture="arm64")
    index = write_index(src, "multi", [(amd, "amd64"), (arm, "arm64")])
    remote = f"docker://{registry.host}/{repo_name}:multi"
    skopeo.skopeo(
        "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src.root}:multi", remote
    )

    raw = skopeo.skopeo("inspect", "--raw", TLS, remote).stdout.encode()
    assert raw == src.read_blob(index["digest"])
    # Each platform's manifest is there by digest, and skopeo picks the right one per arch.
    for desc, arch in ((amd, "amd64"), (arm, "arm64")):
        info = json.loads(skopeo.skopeo("--override-arch", arch, "inspect", TLS, remote).stdout)
        assert info["Digest"] == index["digest"]  # skopeo reports the digest of what the tag names
        assert info["Architecture"] == arch
        child = json.loads(src.read_blob(desc["digest"]))
        assert info["Layers"] == [layer["digest"] for layer in child["layers"]]
        by_digest = f"docker://{registry.host}/{repo_name}@{desc['digest']}"
        assert skopeo.skopeo("inspect", "--raw", TLS, by_digest).stdout.encode() == src.read_blob(
            desc["digest"]
        )

    dst = Layout(tmp_path / "dst")
    skopeo.skopeo(
        "copy", "--all", "--preserve-digests", "--src-tls-verify=false", remote, f"oci:{dst.root}:multi"
    )
    assert_same_image(src, "multi", dst, "multi")


def test_delete_manifest(registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str) -> None:
    src, desc = small_image(tmp_path / "src", seed=31)
    remote = f"docker://{registry.host}/{repo_name}:todelete"
    skopeo.skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src.root}:v1", remote)
    skopeo.skopeo("delete", TLS, f"docker://{registry.host}/{repo_name}@{desc['digest']}")
    gone = skopeo.skopeo("inspect", "--raw", TLS, remote, check=False)
    assert gone.returncode != 0
    by_digest = skopeo.skopeo(
        "inspect", "--raw", TLS, f"docker://{registry.host}/{repo_name}@{desc['digest']}", check=False
    )
    assert by_digest.returncode != 0


def test_credentials(auth_registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str) -> None:
    creds = auth_registry.credentials
    assert creds is not None
    src, desc = small_image(tmp_path / "src", seed=41)
    remote = f"docker://{auth_registry.host}/{repo_name}:v1"
    source = f"oci:{src.root}:v1"

    anonymous = skopeo.skopeo("copy", "--dest-tls-verify=false", source, remote, check=False)
    assert anonymous.returncode != 0
    assert re.search(r"unauthorized|authentication required|403|denied", anonymous.stderr, re.I), (
        anonymous.stderr
    )
    wrong = skopeo.skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"{creds.user}:not-the-password",
        source,
        remote,
        check=False,
    )
    assert wrong.returncode != 0

    skopeo.skopeo(
        "copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", creds.colon, source, remote
    )

    assert skopeo.skopeo("inspect", "--raw", TLS, remote, check=False).returncode != 0
    raw = skopeo.skopeo("inspect", "--raw", TLS, "--creds", creds.colon, remote).stdout.encode()
    assert raw == src.read_blob(desc["digest"])
    tags = json.loads(
        skopeo.skopeo(
            "list-tags", TLS, "--creds", creds.colon, f"docker://{auth_registry.host}/{repo_name}"
        ).stdout
    )
    assert tags["Tags"] == ["v1"]

    dst = Layout(tmp_path / "dst")
    skopeo.skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", creds.colon, remote, f"oci:{dst.root}:back"
    )
    assert_same_image(src, "v1", dst, "back")


@pytest.mark.s3
def test_pull_follows_blob_redirects_to_s3(
    s3_redirect_registry: RegistryServer, skopeo: Tools, tmp_path: Path, repo_name: str
) -> None:
    """With `--blob-redirect`, skopeo pushes through the registry and pulls every blob from S3
    by the presigned URL it is redirected to (its registry credentials stay behind: S3 would
    refuse a request carrying both), with identical digests."""
    import httpx

    server = s3_redirect_registry
    creds = server.credentials
    assert creds is not None
    src, desc = small_image(tmp_path / "src", seed=53)
    remote = f"docker://{server.host}/{repo_name}:v1"
    login = f"{creds.user}:{creds.password}"
    skopeo.skopeo(
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        login,
        f"oci:{src.root}:v1",
        remote,
    )
    layer = json.loads(src.read_blob(desc["digest"]))["layers"][1]["digest"]
    r = httpx.get(f"{server.url}/v2/{repo_name}/blobs/{layer}", auth=(creds.user, creds.password))
    assert r.status_code == 307 and "Signature=" in r.headers["location"], r.headers
    dst = Layout(tmp_path / "dst")
    skopeo.skopeo(
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--src-creds",
        login,
        remote,
        f"oci:{dst.root}:back",
    )
    assert_same_image(src, "v1", dst, "back")
