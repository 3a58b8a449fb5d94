"""Several `serve` processes on one catalog and one store are one registry: an upload started on
one continues and ends on another, tokens of one are good on the other, and GC at grace 0
running while both take pushes never breaks a pushed image. Abandoned uploads expire and GC
removes them."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator

import httpx
import pytest
from clawstore.hub import catalog as c
from conftest import ADMIN, Registry, Server
from regclient import error_codes, patch, push_chunked, push_image, sha256, start_upload
from sqlalchemy import update

ALL = (("pull", "**"), ("push", "**"), ("delete", "**"))


@pytest.fixture
def second(registry: Registry) -> Iterator[Server]:
    s = Server(registry.store_url, registry.catalog_url)
    yield s
    s.stop()


def test_upload_started_on_one_server_finished_on_the_other(registry: Registry, second: Server) -> None:
    token = registry.user("alice", *ALL)
    a = registry.client(token)
    b = httpx.Client(base_url=second.url, auth=("u", token), timeout=60)
    data = os.urandom(7 * 1024 * 1024 + 5)
    loc = start_upload(a, "demo/app")
    third = len(data) // 3
    assert patch(a, loc, data[:third], 0).status_code == 202
    r = patch(b, loc, data[third : 2 * third], third)
    assert r.status_code == 202, r.text
    assert a.get(loc).headers["Range"] == f"0-{2 * third - 1}"
    assert patch(a, loc, data[:10], 0).status_code == 416  # out of order on either server
    r = a.put(loc, params={"digest": sha256(data)}, content=data[2 * third :])
    assert r.status_code == 201, r.text
    for cl in (a, b):
        got = cl.get(f"/v2/demo/app/blobs/{sha256(data)}").content
        assert hashlib.sha256(got).hexdigest() == sha256(data).split(":")[1]
    # a single-chunk upload started on b, finished on a
    small = os.urandom(1000)
    loc = start_upload(b, "demo/app")
    assert patch(b, loc, small, 0).status_code == 202
    assert a.put(loc, params={"digest": sha256(small)}).status_code == 201
    assert b.get(f"/v2/demo/app/blobs/{sha256(small)}").content == small


def test_a_token_from_one_server_is_good_on_the_other(registry: Registry, second: Server) -> None:
    token = registry.user("alice", *ALL)
    with registry.client(token) as a:
        push_image(a, "demo/app", "v1", [b"x"])
    r = httpx.get(
        registry.url + "/token",
        params={"service": "clawstore", "scope": "repository:demo/app:pull"},
        auth=("u", token),
    )
    t = r.json()["token"]
    g = httpx.get(second.url + "/v2/demo/app/manifests/v1", headers={"Authorization": f"Bearer {t}"})
    assert g.status_code == 200


def test_gc_at_grace_zero_while_two_servers_take_pushes(registry: Registry, second: Server) -> None:
    token = registry.user("alice", *ALL)
    urls = [registry.url, second.url]
    pushed: dict[str, tuple[str, list[bytes]]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def pusher(k: int) -> None:
        try:
            with httpx.Client(base_url=urls[k % 2], auth=("u", token), timeout=120) as cl:
                for i in range(6):
                    payloads = [os.urandom(20_000 + i), f"shared-{i % 2}".encode()]
                    if i % 3 == 0:  # a chunked layer too
                        big = os.urandom(300_000)
                        push_chunked(cl, f"gc/p{k}", big, 100_000)
                        payloads.append(big)
                    d, _ = push_image(cl, f"gc/p{k}", f"v{i}", payloads)
                    with lock:
                        pushed[f"gc/p{k}:v{i}"] = (d, payloads)
        except BaseException as e:
            errors.append(e)

    gc_runs = 0

    def collector() -> None:
        nonlocal gc_runs
        try:
            while not stop.is_set():
                registry.hub.gc(ADMIN, grace=0)
                gc_runs += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(4)]
    g = threading.Thread(target=collector)
    g.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    g.join()
    assert not errors, errors
    assert gc_runs >= 1
    registry.hub.gc(ADMIN, grace=0)
    with httpx.Client(base_url=second.url, auth=("u", token), timeout=120) as cl:
        for ref, (d, payloads) in pushed.items():
            repo, tag = ref.split(":")
            m = cl.get(f"/v2/{repo}/manifests/{tag}")
            assert m.status_code == 200 and m.headers["Docker-Content-Digest"] == d
            for p in payloads:
                r = cl.get(f"/v2/{repo}/blobs/{sha256(p)}")
                assert r.status_code == 200 and r.content == p, ref


def test_abandoned_upload_expires_and_gc_removes_it(registry: Registry) -> None:
    token = registry.user("alice", *ALL)
    a = registry.client(token)
    chunk = os.urandom(50_000)
    loc = start_upload(a, "demo/app")
    assert patch(a, loc, chunk, 0).status_code == 202
    assert registry.hub.store.has_blob(sha256(chunk))
    (st,) = registry.hub.uploads.iter_live()
    # The session's lease runs out (as if its TTL passed with no chunk).
    with registry.hub.catalog.tx() as conn:
        conn.execute(update(c.leases).where(c.leases.c.id == st.lease_id).values(expires_at=c.now() - 1))
    r = a.put(loc, params={"digest": sha256(chunk)})
    assert r.status_code == 404 and error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"]
    registry.hub.gc(ADMIN, grace=0)
    assert list(registry.hub.uploads.iter_live()) == []
    assert not registry.hub.store.has_blob(sha256(chunk))
    assert a.head(f"/v2/demo/app/blobs/{sha256(chunk)}").status_code == 404


def test_refused_requests_leave_nothing_for_gc_to_find(registry: Registry) -> None:
    """After refused pushes and an expired session, GC at grace 0 finds the store as it was."""
    token = registry.user("alice", *ALL)
    a = registry.client(token)
    before = set(registry.hub.store.iter_blobs())
    data = os.urandom(10_000)
    assert (
        a.post("/v2/demo/app/blobs/uploads/", params={"digest": sha256(b"x")}, content=data).status_code
        == 400
    )
    assert (
        a.put(
            "/v2/demo/app/manifests/v1",
            content=b"{}",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        ).status_code
        == 400
    )
    assert set(registry.hub.store.iter_blobs()) == before
    assert list(registry.hub.store.iter_manifests()) == []
    assert registry.hub.store.list_repos() == []
