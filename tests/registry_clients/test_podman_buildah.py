"""buildah and podman against each registry, as root on `--storage-driver vfs` with `--tls-verify=false`.

Images are built from scratch with `buildah copy` + `buildah commit` only (no RUN, so no container
runtime is needed); every pull goes into a fresh image store, and what arrived is checked against
the files that went in (read from the mounted image) and the digest the pusher wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import Tools
from registry_servers import RegistryServer

TLS = "--tls-verify=false"


def build_image(
    buildah: Tools, workdir: Path, name: str, files: dict[str, bytes], arch: str = "amd64"
) -> None:
    """A scratch image of `arch` holding `files`, one layer per file (a commit after each copy)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = "scratch"
    for i, (path, data) in enumerate(sorted(files.items())):
        src = workdir / f"src{i}"
        src.write_bytes(data)
        args = ["from", "--arch", arch, base] if base == "scratch" else ["from", base]
        container = buildah.buildah(*args).stdout.strip().splitlines()[-1]
        buildah.buildah("copy", container, str(src), path)
        buildah.buildah("config", "--arch", arch, "--os", "linux", "--label", f"layer={i}", container)
        base = f"localhost/{name}:step{i}"
        buildah.buildah("commit", "-q", container, base)
        buildah.buildah("rm", container)
    buildah.buildah("tag", base, f"localhost/{name}:built")


def image_tree(tools: Tools, image: str) -> dict[str, bytes]:
    """The files of a pulled `image`, read from its root filesystem mounted by podman."""
    mountpoint = Path(tools.podman("image", "mount", image).stdout.strip())
    try:
        return {
            "/" + str(p.relative_to(mountpoint)): p.read_bytes() for p in mountpoint.rglob("*") if p.is_file()
        }
    finally:
        tools.podman("image", "unmount", image)


def some_files(seed: str) -> dict[str, bytes]:
    return {
        "/etc/motd": f"pushed by the registry client tests ({seed})\n".encode(),
        "/data/big.bin": hashlib.shake_256(seed.encode()).digest(3 << 20),
        "/data/small.bin": hashlib.shake_256((seed + "s").encode()).digest(4096),
    }


def test_buildah_push_podman_pull(
    registry: RegistryServer, buildah: Tools, podman: Tools, tmp_path: Path, repo_name: str
) -> None:
    files = some_files(repo_name)
    build_image(buildah, tmp_path / "build", "img", files)
    remote = f"{registry.host}/{repo_name}:v1"
    digestfile = tmp_path / "digest"
    buildah.buildah("push", TLS, "--digestfile", str(digestfile), "localhost/img:built", f"docker://{remote}")
    pushed = digestfile.read_text().strip()

    puller = podman.with_storage("puller")
    puller.podman("pull", TLS, "-q", remote)
    assert puller.podman("image", "inspect", "--format", "{{.Digest}}", remote).stdout.strip() == pushed
    assert image_tree(puller, remote) == files
    assert len(json.loads(puller.podman("image", "inspect", remote).stdout)[0]["RootFS"]["Layers"]) == 3

    # podman pushes what it pulled to another repository (cross-repository blob reuse or mount),
    # and buildah pulls that into a third store.
    copy = f"{registry.host}/{repo_name}-copy:v1"
    puller.podman("push", TLS, remote, f"docker://{copy}")
    third = buildah.with_storage("third")
    third.buildah("pull", TLS, "-q", copy)
    assert image_tree(third, copy) == files


def test_buildah_manifest_push_all(
    registry: RegistryServer, buildah: Tools, podman: Tools, tmp_path: Path, repo_name: str
) -> None:
    per_arch = {arch: {"/arch.txt": f"{arch} {repo_name}\n".encode()} for arch in ("amd64", "arm64")}
    for arch, files in per_arch.items():
        build_image(buildah, tmp_path / arch, f"multi-{arch}", files, arch=arch)
    buildah.buildah("manifest", "create", "localhost/mlist")
    for arch in per_arch:
        buildah.buildah(
            "manifest", "add", "localhost/mlist", f"containers-storage:localhost/multi-{arch}:built"
        )
    remote = f"{registry.host}/{repo_name}:multi"
    buildah.buildah("manifest", "push", "--all", TLS, "localhost/mlist", f"docker://{remote}")

    index = json.loads(buildah.skopeo("inspect", "--raw", TLS, f"docker://{remote}").stdout)
    platforms = sorted(m["platform"]["architecture"] for m in index["manifests"])
    assert platforms == ["amd64", "arm64"]

    for arch, files in per_arch.items():
        puller = podman.with_storage(f"pull-{arch}")
        puller.podman("pull", TLS, "-q", "--arch", arch, remote)
        assert (
            puller.podman("image", "inspect", "--format", "{{.Architecture}}", remote).stdout.strip() == arch
        )
        assert image_tree(puller, remote) == files
        child = next(m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == arch)
        raw = puller.skopeo("inspect", "--raw", TLS, f"docker://{registry.host}/{repo_name}@{child}").stdout
        assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == child


def test_push_and_pull_with_credentials(
    auth_registry: RegistryServer, buildah: Tools, podman: Tools, tmp_path: Path, repo_name: str
) -> None:
    creds = auth_registry.credentials
    assert creds is not None
    files = some_files("auth" + repo_name)
    build_image(buildah, tmp_path / "build", "authimg", files)
    remote = f"{auth_registry.host}/{repo_name}:v1"

    refused = buildah.buildah("push", TLS, "localhost/authimg:built", f"docker://{remote}", check=False)
    assert refused.returncode != 0
    buildah.buildah("push", TLS, "--creds", creds.colon, "localhost/authimg:built", f"docker://{remote}")

    puller = podman.with_storage("puller")
    assert puller.podman("pull", TLS, "-q", remote, check=False).returncode != 0
    login = puller.run(
        "podman",
        *puller.storage_args(),
        "login",
        TLS,
        "-u",
        creds.user,
        "-p",
        creds.password,
        auth_registry.host,
    )
    assert "Login Succeeded" in login.stdout
    puller.podman("pull", TLS, "-q", remote)
    assert image_tree(puller, remote) == files
    puller.podman("logout", auth_registry.host)
    assert (
        puller.podman("pull", TLS, "-q", f"{auth_registry.host}/{repo_name}:nope", check=False).returncode
        != 0
    )
