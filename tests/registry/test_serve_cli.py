"""`clawstore serve` as a command: bad options fail with one line, several workers serve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Server


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clawstore", *args], capture_output=True, text=True, timeout=120
    )


def test_bad_listen_address(tmp_path: Path) -> None:
    r = run("--store", str(tmp_path / "s"), "serve", "--listen", "nonsense")
    assert r.returncode != 0 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    s = Server(str(tmp_path / "s"), None)
    try:
        port = s.url.rsplit(":", 1)[1]
        r = run("--store", str(tmp_path / "s"), "serve", "--listen", f"127.0.0.1:{port}")
        assert r.returncode == 1
        assert r.stderr.startswith("error: cannot listen on") and "Traceback" not in r.stderr
    finally:
        s.stop()


def test_bad_catalog_is_one_line(tmp_path: Path) -> None:
    r = run("--store", str(tmp_path / "s"), "serve", "--catalog", "nosuchdb://x", "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_workers_share_the_socket(tmp_path: Path) -> None:
    s = Server(str(tmp_path / "s"), None, "--workers", "2")
    try:
        for _ in range(20):
            r = httpx.get(s.url + "/v2/")
            assert r.status_code == 401 and r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    finally:
        s.stop()


def test_s3_registry_defaults_only_fill_what_the_url_leaves_out() -> None:
    from clawstore.cli.serve import with_registry_defaults

    u = with_registry_defaults("s3://b/p?endpoint_url=http://127.0.0.1:9000&concurrency=8")
    assert "concurrency=8" in u and "stream_part_size=8MiB" in u and "endpoint_url=http://127.0.0.1:9000" in u
    assert with_registry_defaults("/var/lib/clawstore") == "/var/lib/clawstore"


@pytest.mark.s3
def test_workers_open_an_s3_store_with_the_parents_probe_findings(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker opens the store with the capabilities the parent's probe found and never probes
    the server itself: a probe failing in a worker (moto answering 500 under load did) would end
    the worker with clients' connections already queued on the socket, each then reset."""
    import dataclasses

    import clawstore
    from clawstore.backends.s3 import backend as s3backend
    from clawstore.registry.app import OPTIONS_ENV, RegistryOptions, from_env
    from s3_server import store_url

    url = store_url(s3_endpoint, s3_bucket)
    found = clawstore.open(url).backend.caps  # the parent's probe
    caps = dataclasses.replace(found, if_match_quoted=not found.if_match_quoted)  # tell them apart

    def no_probe(*_a: object, **_k: object) -> None:
        raise AssertionError("a worker probed the S3 server")

    monkeypatch.setattr(s3backend, "probe", no_probe)
    catalog = f"sqlite:///{tmp_path / 'c.sqlite'}"
    options = RegistryOptions(
        store_url=url, catalog_url=catalog, create_catalog=True, store_caps=dataclasses.asdict(caps)
    )
    monkeypatch.setenv(OPTIONS_ENV, options.to_env())
    app = from_env()
    assert app.state.registry.hub.store.backend.caps == caps
    app.state.registry.hub.close()
