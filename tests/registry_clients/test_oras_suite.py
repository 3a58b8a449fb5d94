"""oras-py's own test suite (shipped in its wheel, `site-packages/oras/tests`) against each registry.

The suite finds its registry through ORAS_HOST / ORAS_PORT and runs its `with_auth(True)` tests
(Basic login with ORAS_USER / ORAS_PASS) when ORAS_AUTH=true, the anonymous ones otherwise; it
runs here in a child pytest with a private HOME, so its logins write no real docker config.
Left out: `test_chunked_push` (writes a 16 GiB file) and the tests that reach ghcr.io.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from registry_servers import RegistryServer

oras = pytest.importorskip("oras", reason="oras-py is a test dependency (pip install -e .[test])")

#: Tests that cannot run here: 16 GiB of data, or a registry on the internet.
EXCLUDED = [
    "test_provider.py::test_chunked_push",
    "test_oras.py::test_get_many_tags",
    "test_oras.py::test_ssl_no_verify",
    "test_oras.py::test_ssl_verify_fails_if_bad_ca",
    "test_oras.py::test_ssl_verify_fails_fast_if_bad_ca",
]

#: The suite's tests that talk to the registry, per mode; each must pass (not skip).
REGISTRY_TESTS_ANONYMOUS = {
    "test_oras.py::test_basic_oras",
    "test_oras.py::test_basic_push_pull",
    "test_oras.py::test_basic_push_pul_via_sha_ref",
    "test_oras.py::test_get_delete_tags",
    "test_oras.py::test_directory_push_pull",
    "test_provider.py::test_annotated_registry_push",
    "test_provider.py::test_file_contains_column",
    "test_provider.py::test_parse_manifest",
    "test_layout.py::test_push_from_layout_single_arch",
    "test_layout.py::test_push_from_layout_multi_arch",
    "test_layout.py::test_pull_to_layout_single_arch",
    "test_layout.py::test_pull_to_layout_multi_arch",
    "test_layout.py::test_pull_to_layout_custom_tag",
    "test_layout.py::test_pull_to_layout_by_digest",
}
REGISTRY_TESTS_AUTH = {
    "test_oras.py::test_login_logout",
    "test_oras.py::test_directory_push_pull_selfsigned_auth",
    "test_oras.py::test_custom_docker_config_path",
}


def run_suite(server: RegistryServer, tmp_path: Path, auth: bool) -> dict[str, str]:
    """Run the wheel's suite against `server`; outcome ("passed", "failed", "skipped", "error")
    by node id relative to the suite's directory."""
    suite = Path(oras.__file__).parent / "tests"
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\nmarkers =\n    with_auth: oras-py's auth mode marker\n")
    home = tmp_path / "home"
    home.mkdir()
    report = tmp_path / "junit.xml"
    env = dict(
        os.environ,
        ORAS_HOST="127.0.0.1",
        ORAS_PORT=str(server.port),
        HOME=str(home),
        DOCKER_CONFIG=str(home / ".docker"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    if auth:
        assert server.credentials is not None
        env.update(ORAS_AUTH="true", ORAS_USER=server.credentials.user, ORAS_PASS=server.credentials.password)
    else:
        env.pop("ORAS_AUTH", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(suite),
        "-c",
        str(ini),
        "--rootdir",
        str(suite),
        "-p",
        "no:cacheprovider",
        "-q",
        "--timeout",
        "300",
        f"--junitxml={report}",
    ]
    for node in EXCLUDED:
        cmd += ["--deselect", node]  # node ids are relative to --rootdir
    # The suite pushes files from its own directory and checks they lie under the working dir.
    proc = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), f"oras-py's suite did not run:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        module = module.split("oras/tests/", 1)[-1] if "oras/tests/" in module else module.rsplit("/", 1)[-1]
        node = f"{module}.py::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        outcomes[node] = outcome
    summary = "\n".join(f"  {o:8} {n}" for n, o in sorted(outcomes.items()))
    print(f"oras-py suite on {server.kind} (auth={auth}):\n{summary}")
    bad = {n: o for n, o in outcomes.items() if o in ("failed", "error")}
    assert not bad, f"oras-py tests failed on {server.kind}: {bad}\n{proc.stdout[-6000:]}"
    return outcomes


def test_oras_suite_anonymous(registry: RegistryServer, tmp_path: Path) -> None:
    outcomes = run_suite(registry, tmp_path, auth=False)
    assert {n: outcomes.get(n) for n in REGISTRY_TESTS_ANONYMOUS} == dict.fromkeys(
        REGISTRY_TESTS_ANONYMOUS, "passed"
    )
    assert not any(n.endswith(x.split("::")[1]) for n in outcomes for x in EXCLUDED)


def test_oras_suite_with_auth(tls_auth_registry: RegistryServer, tmp_path: Path) -> None:
    """The suite's auth tests speak https (they are written for a self-signed registry)."""
    outcomes = run_suite(tls_auth_registry, tmp_path, auth=True)
    assert {n: outcomes.get(n) for n in REGISTRY_TESTS_AUTH} == dict.fromkeys(REGISTRY_TESTS_AUTH, "passed")
