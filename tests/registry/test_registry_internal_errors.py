"""A failure of the server's own (not of the request) is a spec error response, 500 UNKNOWN,
on a connection that stays usable: never uvicorn's bare 500 with the connection closed under
a client still sending its body (which the client reports as "connection reset by peer")."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore.errors import ClawstoreError
from clawstore.hub import Hub, Principal
from clawstore.registry.app import create_app

with warnings.catch_warnings():  # starlette 1.x deprecates its httpx-based client: still fine here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ADMIN = Principal.local_admin()


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    catalog = f"sqlite:///{tmp_path / 'c.sqlite'}"
    h = Hub(clawstore.open(str(tmp_path / "store")), catalog, create_catalog=True)
    yield h
    h.close()


def _client(hub: Hub) -> tuple[TestClient, str]:
    token = hub.issue_token(ADMIN, "alice")
    for action in ("pull", "push", "delete"):
        hub.grant(ADMIN, "alice", action, "**")
    return TestClient(create_app(hub), raise_server_exceptions=False), token


def test_an_unexpected_exception_is_500_unknown(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    client, token = _client(hub)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("catalog connection lost")

    monkeypatch.setattr(hub, "start_upload", broken)
    r = client.post("/v2/demo/app/blobs/uploads/", auth=("u", token), content=os.urandom(100_000))
    assert r.status_code == 500
    assert r.json()["errors"][0]["code"] == "UNKNOWN"
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert "catalog connection lost" not in r.text  # internals go to the log, not the client
    # HEAD answers carry no body
    monkeypatch.setattr(hub, "stat_blob", broken)
    r = client.head(f"/v2/demo/app/blobs/sha256:{'0' * 64}", auth=("u", token))
    assert r.status_code == 500 and r.content == b""


def test_an_untranslated_store_error_is_500_unknown(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    client, token = _client(hub)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise ClawstoreError("backend unavailable")

    monkeypatch.setattr(hub, "stat_blob", broken)
    r = client.head(f"/v2/demo/app/blobs/sha256:{'0' * 64}", auth=("u", token))
    assert r.status_code == 500
    r = client.get(f"/v2/demo/app/blobs/sha256:{'0' * 64}", auth=("u", token), headers={"Range": "bytes=0-1"})
    assert r.status_code == 500 and r.json()["errors"][0]["code"] == "UNKNOWN"
