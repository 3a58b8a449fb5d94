"""oras-py against each registry: artifacts with a `subject`, the referrers API (with artifactType
filtering), pull by tag and digest; login with credentials on a registry with auth."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
from registry_servers import RegistryServer

oras_client = pytest.importorskip(
    "oras.client", reason="oras-py is a test dependency (pip install -e .[test])"
)
import oras.oci  # noqa: E402

SIGNATURE = "application/vnd.clawstore.test.signature.v1+json"
SBOM = "application/vnd.clawstore.test.sbom.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def client_for(server: RegistryServer) -> Any:
    return oras_client.OrasClient(hostname=server.host, insecure=True)


def raw_manifest(client: Any, server: RegistryServer, repo: str, ref: str) -> tuple[bytes, Any]:
    response = client.do_request(
        f"http://{server.host}/v2/{repo}/manifests/{ref}", "GET", headers={"Accept": f"{MANIFEST}, {INDEX}"}
    )
    assert response.status_code == 200, response.text
    return response.content, response


def push_file(
    client: Any,
    tmp_path: Path,
    target: str,
    name: str,
    content: bytes,
    artifact_type: str | None = None,
    subject: oras.oci.Subject | None = None,
) -> Any:
    path = tmp_path / name
    path.write_bytes(content)
    config = None
    if artifact_type is not None:
        # The config's media type is the artifact type the referrers API reports.
        config_path = tmp_path / f"{name}.config.json"
        config_path.write_text(json.dumps({"made-by": "tests"}))
        config = f"{config_path}:{artifact_type}"
    response = client.push(
        files=[str(path)],
        target=target,
        disable_path_validation=True,
        manifest_config=config,
        subject=subject,
        quiet=True,
    )
    assert response.status_code == 201, response.text
    return response


def test_push_with_subject_referrers_and_pull(
    registry: RegistryServer, tmp_path: Path, repo_name: str
) -> None:
    client = client_for(registry)
    base = f"{registry.host}/{repo_name}"
    response = push_file(client, tmp_path, f"{base}:app", "app.bin", b"the subject artifact\n")
    subject_digest = response.headers["Docker-Content-Digest"]
    data, _ = raw_manifest(client, registry, repo_name, "app")
    assert "sha256:" + hashlib.sha256(data).hexdigest() == subject_digest
    subject = oras.oci.Subject(MANIFEST, subject_digest, len(data))

    signed = push_file(
        client, tmp_path, f"{base}:app-sig", "sig.json", b'{"signed": true}\n', SIGNATURE, subject
    )
    sbom = push_file(client, tmp_path, f"{base}:app-sbom", "sbom.json", b'{"packages": []}\n', SBOM, subject)

    pulled = client.pull(target=f"{base}:app-sig", outdir=str(tmp_path / "pulled"))
    assert [Path(p).read_bytes() for p in pulled] == [b'{"signed": true}\n']
    by_digest = client.pull(
        target=f"{base}@{sbom.headers['Docker-Content-Digest']}", outdir=str(tmp_path / "by-digest")
    )
    assert [Path(p).read_bytes() for p in by_digest] == [b'{"packages": []}\n']

    referrers_url = f"http://{registry.host}/v2/{repo_name}/referrers/{subject_digest}"
    listing = client.do_request(referrers_url, "GET", headers={"Accept": INDEX})
    if registry.kind == "distribution" and listing.status_code == 404:
        pytest.skip("distribution 2.8 predates the referrers API (OCI Distribution v1.1)")
    # A registry that processes `subject` says so on the manifest PUT.
    assert signed.headers.get("OCI-Subject") == subject_digest
    assert listing.status_code == 200, listing.text
    assert listing.headers["Content-Type"].split(";")[0] == INDEX
    index = listing.json()
    assert index["mediaType"] == INDEX
    found = {m["digest"]: m for m in index["manifests"]}
    assert set(found) == {signed.headers["Docker-Content-Digest"], sbom.headers["Docker-Content-Digest"]}
    assert found[signed.headers["Docker-Content-Digest"]]["artifactType"] == SIGNATURE
    assert found[sbom.headers["Docker-Content-Digest"]]["artifactType"] == SBOM

    # Encoded as clients do ("+" in a query string decodes as a space).
    filtered = client.do_request(
        f"{referrers_url}?{urllib.parse.urlencode({'artifactType': SIGNATURE})}", "GET"
    )
    assert filtered.status_code == 200
    assert [m["digest"] for m in filtered.json()["manifests"]] == [signed.headers["Docker-Content-Digest"]]
    assert filtered.headers.get("OCI-Filters-Applied") == "artifactType"


def test_tags_and_delete(registry: RegistryServer, tmp_path: Path, repo_name: str) -> None:
    client = client_for(registry)
    target = f"{registry.host}/{repo_name}:one"
    push_file(client, tmp_path, target, "one.txt", b"one\n")
    push_file(client, tmp_path, f"{registry.host}/{repo_name}:two", "two.txt", b"two\n")
    assert sorted(client.get_tags(target)) == ["one", "two"]
    assert client.get_tags(target, N=1) == ["one"]
    assert client.delete_tags(target, "one") == ["one"]
    assert client.get_tags(target) == ["two"]


@pytest.mark.parametrize("backend", ["basic", "token"])
def test_login_and_push_with_credentials(
    auth_registry: RegistryServer, tmp_path: Path, repo_name: str, backend: str
) -> None:
    """oras-py's two auth backends: Basic on every request, or the Bearer token flow."""
    creds = auth_registry.credentials
    assert creds is not None
    if backend == "token" and auth_registry.kind == "distribution":
        pytest.skip("distribution's htpasswd auth is Basic only (the token flow needs a token server)")
    client = oras_client.OrasClient(
        hostname=auth_registry.host, insecure=True, tls_verify=False, auth_backend=backend
    )
    config = tmp_path / "docker-config.json"
    login = client.login(
        hostname=auth_registry.host, username=creds.user, password=creds.password, config_path=str(config)
    )
    assert login["Status"] == "Login Succeeded"
    target = f"{auth_registry.host}/{repo_name}:v1"
    (tmp_path / "a.txt").write_bytes(b"with credentials\n")
    response = client.push(
        files=[str(tmp_path / "a.txt")], target=target, disable_path_validation=True, config_path=str(config)
    )
    assert response.status_code == 201
    files = client.pull(target=target, outdir=str(tmp_path / "out"), config_path=str(config))
    assert [Path(p).read_bytes() for p in files] == [b"with credentials\n"]

    # Without credentials the same manifest is refused with the spec's 401 and a challenge (asked
    # with httpx: oras-py retries a refused request for minutes before it gives up).
    anonymous = httpx.get(
        f"http://{auth_registry.host}/v2/{repo_name}/manifests/v1", headers={"Accept": MANIFEST}, timeout=30
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].split()[0] in ("Basic", "Bearer")
    assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
