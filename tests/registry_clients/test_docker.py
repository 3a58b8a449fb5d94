"""docker (Debian's docker.io: the docker CLI and dockerd) against each registry.

A private dockerd runs for this module (its own data root, exec root and socket under a temp dir;
vfs storage, no bridge, no iptables: nothing on the host is touched, and no container is ever
started, so no runtime is needed). Images are loaded from a docker-archive made here with
tarfile (two layers of known files), pushed with `docker push`, removed, pulled back with
`docker pull`, and checked three ways: the pushed manifest digest is the pulled RepoDigest, the
pulled image's layer diff_ids are the loaded ones, and its files (`docker create` + `docker
export`) are the files that went in. The docker CLI logs in with the registry's credentials (for
clawstore: a hub token as the password) in a private DOCKER_CONFIG.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from oci_layout import layer_tar
from registry_servers import ClawstoreServer, RegistryServer

#: Files docker puts into every container's root filesystem (empty at create time).
DOCKER_MADE = frozenset({".dockerenv", "dev/console", "etc/hostname", "etc/hosts", "etc/resolv.conf"})
#: How long dockerd may take to answer on its socket.
DOCKERD_START = 60.0


def _binaries() -> tuple[str, str] | None:
    """(dockerd, docker): Debian's pair (the CLI that came with the daemon) when installed."""
    dockerd = shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None
    )
    if dockerd is None:
        return None
    beside = Path("/usr/bin/docker")
    docker = str(beside) if os.access(beside, os.X_OK) else shutil.which("docker")
    return (dockerd, docker) if docker else None


@dataclass
class Docker:
    """The docker CLI talking to the module's private dockerd, with a private config dir."""

    cli: str
    env: dict[str, str]

    def __call__(
        self, *args: str, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.cli, *args],
            env=self.env,
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                f"stderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def login(self, host: str, user: str, password: str) -> None:
        self("login", host, "-u", user, "--password-stdin", stdin=password.encode())


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    found = _binaries()
    if found is None:
        pytest.skip("dockerd is not installed (scripts/setup.sh installs docker.io from Debian)")
    if os.geteuid() != 0:
        pytest.skip("dockerd runs as root (rootless docker needs a setup of its own)")
    daemon, cli = found
    # A unix socket path must stay under 108 bytes: the run state lives in a short /tmp dir.
    run = Path(tempfile.mkdtemp(prefix="csd-", dir="/tmp"))
    data = tmp_path_factory.mktemp("dockerd")
    sock = run / "docker.sock"
    # Not the host's /etc/docker/daemon.json: its settings could clash with the flags below.
    (run / "daemon.json").write_text("{}")
    log = open(data / "dockerd.log", "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            daemon,
            "--config-file", str(run / "daemon.json"),
            "--data-root", str(data / "root"),
            "--exec-root", str(run / "exec"),
            "--pidfile", str(run / "dockerd.pid"),
            "--host", f"unix://{sock}",
            "--storage-driver", "vfs",
            "--bridge", "none",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
    env.pop("DOCKER_CONFIG", None)

    def tail() -> str:
        return (data / "dockerd.log").read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + DOCKERD_START
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dockerd exited {proc.returncode}:\n{tail()}")
            probe = subprocess.run([cli, "version"], env=env, capture_output=True, timeout=30)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not answer in {DOCKERD_START}s:\n{tail()}")
            time.sleep(0.2)  # polling a socket that is not there yet: no event to wait on
        yield cli, env
    finally:
        # dockerd stops the containerd it started; the session is killed if it lingers.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def docker(dockerd: tuple[str, dict[str, str]], tmp_path: Path) -> Docker:
    cli, env = dockerd
    config = tmp_path / "docker-config"
    config.mkdir()
    return Docker(cli, dict(env, DOCKER_CONFIG=str(config)))


def image_files(seed: str) -> list[dict[str, bytes]]:
    """Two layers: a small text file, then a few MiB of pseudo-random bytes and a small file."""
    return [
        {"etc/motd": f"pushed by docker in the registry client tests ({seed})\n".encode()},
        {
            "data/big.bin": hashlib.shake_256(seed.encode()).digest(3 << 20),
            "data/small.bin": hashlib.shake_256((seed + "s").encode()).digest(4096),
        },
    ]


def load_image(docker: Docker, workdir: Path, name: str, layers: list[dict[str, bytes]]) -> list[str]:
    """`docker load` a docker-archive of `layers` tagged `name`; returns the layers' diff_ids."""
    archive = workdir / "image.tar"
    diff_ids = []
    with tarfile.open(archive, "w") as out:

        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        layer_names = []
        for i, files in enumerate(layers):
            data = layer_tar(sorted(files.items()))
            diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
            layer_names.append(f"layer{i}.tar")
            add(layer_names[-1], data)
        config = json.dumps(
            {
                "architecture": {"aarch64": "arm64"}.get(platform.machine(), "amd64"),
                "os": "linux",
                "config": {"Labels": {"test": name}},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
            }
        ).encode()
        add("config.json", config)
        add(
            "manifest.json",
            json.dumps([{"Config": "config.json", "RepoTags": [name], "Layers": layer_names}]).encode(),
        )
    docker("load", "-i", str(archive))
    return diff_ids


def pushed_digest(output: str) -> str:
    """The manifest digest `docker push` reports (`TAG: digest: sha256:... size: N`)."""
    m = re.search(r"digest: (sha256:[0-9a-f]{64}) size: \d+", output)
    assert m, output
    return m.group(1)


def exported_files(docker: Docker, image: str) -> dict[str, bytes]:
    """The regular files of `image`'s root filesystem (`docker create` + `docker export`)."""
    container = docker("create", image, "/none").stdout.strip()
    try:
        data = subprocess.run(
            [docker.cli, "export", container], env=docker.env, capture_output=True, check=True, timeout=300
        ).stdout
    finally:
        docker("rm", container)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            f = tar.extractfile(member) if member.isfile() else None
            if f is not None and member.name not in DOCKER_MADE:
                files[member.name] = f.read()
    return files


def login(docker: Docker, server: RegistryServer) -> None:
    assert server.credentials is not None
    docker.login(server.host, server.credentials.user, server.credentials.password)


def test_docker_push_then_pull_into_an_empty_daemon(
    auth_registry: RegistryServer, docker: Docker, tmp_path: Path, repo_name: str
) -> None:
    layers = image_files(repo_name)
    diff_ids = load_image(docker, tmp_path, "local/built:1", layers)
    remote = f"{auth_registry.host}/{repo_name}:v1"
    docker("tag", "local/built:1", remote)

    # Without logging in, the push is refused (both registries require auth here).
    refused = docker("push", remote, check=False)
    assert refused.returncode != 0
    # refused at once, not after docker's retries (it retries an error it cannot decode)
    assert "Retrying" not in refused.stdout, refused.stdout
    assert re.search(r"unauthorized|authentication required|no basic auth", refused.stderr, re.I), (
        refused.stderr
    )

    login(docker, auth_registry)
    digest = pushed_digest(docker("push", remote).stdout)

    docker("rmi", remote, "local/built:1")
    assert docker("image", "inspect", remote, check=False).returncode != 0
    docker("pull", remote)
    assert docker(
        "image", "inspect", "--format", "{{json .RepoDigests}}", remote
    ).stdout.strip() == json.dumps([f"{auth_registry.host}/{repo_name}@{digest}"])
    assert (
        json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", remote).stdout)
        == diff_ids
    )
    want = {name: data for files in layers for name, data in files.items()}
    assert exported_files(docker, remote) == want

    # Pull by digest as well.
    docker("rmi", remote)
    docker("pull", f"{auth_registry.host}/{repo_name}@{digest}")


def test_docker_push_to_a_second_repository_mounts_the_layers(
    auth_registry: RegistryServer, docker: Docker, tmp_path: Path, repo_name: str
) -> None:
    load_image(docker, tmp_path, "local/mount:1", image_files(repo_name + "m"))
    login(docker, auth_registry)
    first, second = f"{auth_registry.host}/{repo_name}:v1", f"{auth_registry.host}/{repo_name}-b:v1"
    docker("tag", "local/mount:1", first)
    docker("tag", "local/mount:1", second)
    digest = pushed_digest(docker("push", first).stdout)
    out = docker("push", second).stdout
    assert pushed_digest(out) == digest
    # docker asks for a cross-repository mount of each layer it pushed to `first`.
    assert out.count(f"Mounted from {repo_name}") == 2, out
    docker("rmi", first, second, "local/mount:1")
    docker("pull", second)


def test_docker_is_held_to_the_hub_grants(docker: Docker, tmp_path: Path) -> None:
    """A principal that may pull everything but push only under `team/`: docker pushes there,
    is denied elsewhere (and nothing is stored there), and pulls what another pushed."""
    work = tmp_path / "server"
    work.mkdir()
    server = ClawstoreServer(
        work, (work / "store").as_uri(), credentials_user="dev", grants=[("pull", "**"), ("push", "team/**")]
    )
    with server:
        load_image(docker, tmp_path, "local/granted:1", image_files("grants"))
        login(docker, server)
        allowed, denied = f"{server.host}/team/app:v1", f"{server.host}/other/app:v1"
        docker("tag", "local/granted:1", allowed)
        docker("tag", "local/granted:1", denied)
        digest = pushed_digest(docker("push", allowed).stdout)
        refused = docker("push", denied, check=False)
        assert refused.returncode != 0
        assert "denied" in refused.stderr.lower(), refused.stderr
        assert "other/app" not in server.admin("repos").split(), "a denied push left a repository"

        docker("rmi", allowed, denied, "local/granted:1")
        docker("pull", allowed)
        assert digest in docker("image", "inspect", "--format", "{{json .RepoDigests}}", allowed).stdout

        # Logged out, an anonymous pull is refused: anonymous has no grant on this hub.
        docker("logout", server.host)
        docker("rmi", allowed)
        anonymous = docker("pull", allowed, check=False)
        assert anonymous.returncode != 0
        assert re.search(r"unauthorized|denied|authentication required", anonymous.stderr, re.I), (
            anonymous.stderr
        )
