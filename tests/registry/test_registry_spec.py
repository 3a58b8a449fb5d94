"""The Distribution spec v1.1 over HTTP against a real `clawstore serve` process (local store +
SQLite catalog, moto S3 + PostgreSQL catalog): uploads, manifests, tags, referrers, errors.
Every refused request is checked to leave nothing behind."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
from urllib.parse import urlparse

import httpx
import pytest
from clawstore.hub import Principal
from conftest import ADMIN, Registry
from regclient import (
    OCI_INDEX,
    OCI_MANIFEST,
    error_codes,
    manifest_bytes,
    patch,
    push_blob,
    push_chunked,
    push_image,
    sha256,
    sha512,
    start_upload,
)

ALL = (("pull", "**"), ("push", "**"), ("delete", "**"))


@pytest.fixture
def c(registry: Registry) -> httpx.Client:
    return registry.client(registry.user("alice", *ALL))


def linked(registry: Registry, repo: str, digest: str) -> bool:
    """Whether `digest` is served in `repo` (what a refused request must never create)."""
    with registry.client(registry.user(f"check{os.urandom(3).hex()}", ("pull", "**"))) as c:
        return c.head(f"/v2/{repo}/blobs/{digest}").status_code == 200


def stored(registry: Registry, digest: str) -> bool:
    return registry.hub.store.has_blob(digest)


# -- base and blobs ---------------------------------------------------------------------------
def test_base_endpoint_challenges_and_accepts_tokens(registry: Registry, c: httpx.Client) -> None:
    r = httpx.get(registry.url + "/v2/")
    assert r.status_code == 401
    ch = r.headers["WWW-Authenticate"]
    assert ch.startswith("Bearer realm=") and "/token" in ch and 'service="clawstore"' in ch
    assert error_codes(r) == ["UNAUTHORIZED"]
    assert c.get("/v2/").status_code == 200
    assert c.get("/v2/").headers["Docker-Distribution-API-Version"] == "registry/2.0"
    bad = httpx.get(registry.url + "/v2/", auth=("u", "cst_0123456789abcdef_nope"))
    assert bad.status_code == 401


def test_monolithic_upload_then_head_get_and_range(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(300_000)
    d = push_blob(c, "demo/app", data)
    h = c.head(f"/v2/demo/app/blobs/{d}")
    assert h.status_code == 200
    assert int(h.headers["Content-Length"]) == len(data)
    assert h.headers["Docker-Content-Digest"] == d
    g = c.get(f"/v2/demo/app/blobs/{d}")
    assert g.status_code == 200 and g.content == data
    part = c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    tail = c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    bad = c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    assert c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": "bytes=-0"}).status_code == 416
    # last before first: 416 as distribution and the OCI conformance suite have it
    assert c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": "bytes=3-1"}).status_code == 416
    # RFC 9110 §14.2: a Range of another unit, of several ranges (no multipart/byteranges
    # here) or without positions is ignored: the whole blob, 200
    for ignored in ("items=0-1", "bytes=0-1,5-9", "bytes=-"):
        whole = c.get(f"/v2/demo/app/blobs/{d}", headers={"Range": ignored})
        assert whole.status_code == 200 and whole.content == data, ignored
    # a suffix of an empty blob is satisfiable but has no bytes for a 206 to carry: 200
    empty = push_blob(c, "demo/app", b"")
    r = c.get(f"/v2/demo/app/blobs/{empty}", headers={"Range": "bytes=-1"})
    assert r.status_code == 200 and r.content == b"" and "Content-Range" not in r.headers
    assert c.get(f"/v2/demo/app/blobs/{empty}", headers={"Range": "bytes=0-"}).status_code == 416


def test_post_then_put_with_body_and_sha512(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(70_000)
    loc = start_upload(c, "demo/app")
    r = c.put(loc, params={"digest": sha512(data)}, content=data)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha512(data)
    g = c.get(f"/v2/demo/app/blobs/{sha512(data)}")
    assert g.content == data
    assert hashlib.sha512(g.content).hexdigest() == sha512(data).split(":")[1]


def test_empty_blob(registry: Registry, c: httpx.Client) -> None:
    d = push_blob(c, "demo/app", b"")
    assert c.get(f"/v2/demo/app/blobs/{d}").content == b""


def test_chunked_upload_with_status_and_sha512(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(6 * 1024 * 1024 + 123)  # over an S3 part, with a short tail
    d = push_chunked(c, "demo/app", data, 2 * 1024 * 1024 + 7)
    assert c.get(f"/v2/demo/app/blobs/{d}").content == data
    d512 = push_chunked(c, "demo/other", data[:100_000], 30_000, digest=sha512(data[:100_000]))
    assert c.get(f"/v2/demo/other/blobs/{d512}").content == data[:100_000]


def test_chunk_status_and_final_chunk_in_put(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(50_000)
    loc = start_upload(c, "demo/app")
    r = patch(c, loc, data[:20_000], 0)
    assert r.status_code == 202
    st = c.get(r.headers["Location"])
    assert st.status_code == 204
    assert st.headers["Range"] == "0-19999"
    r = c.put(
        st.headers["Location"],
        params={"digest": sha256(data)},
        content=data[20_000:],
        headers={"Content-Range": f"20000-{len(data) - 1}"},
    )
    assert r.status_code == 201, r.text
    assert c.get(f"/v2/demo/app/blobs/{sha256(data)}").content == data


def test_out_of_order_chunk_is_416_and_changes_nothing(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(40_000)
    loc = start_upload(c, "demo/app")
    r = patch(c, loc, data[:10_000], 0)
    loc = r.headers["Location"]
    skipped = patch(c, loc, data[20_000:30_000], 20_000)
    assert skipped.status_code == 416
    assert skipped.headers["Range"] == "0-9999"
    again = patch(c, loc, data[:10_000], 0)  # a repeat of the first chunk is out of order too
    assert again.status_code == 416
    assert not stored(registry, sha256(data[20_000:30_000]))
    assert c.get(loc).headers["Range"] == "0-9999"
    r = patch(c, loc, data[10_000:], 10_000)
    assert r.status_code == 202
    assert c.put(loc, params={"digest": sha256(data)}).status_code == 201
    assert c.get(f"/v2/demo/app/blobs/{sha256(data)}").content == data


def test_wrong_digest_stores_nothing(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(10_000)
    wrong = sha256(b"something else")
    r = c.post("/v2/demo/app/blobs/uploads/", params={"digest": wrong}, content=data)
    assert r.status_code == 400 and error_codes(r) == ["DIGEST_INVALID"]
    assert not stored(registry, wrong) and not stored(registry, sha256(data))
    loc = start_upload(c, "demo/app")
    patch(c, loc, data, 0)
    r = c.put(loc, params={"digest": wrong})
    assert r.status_code == 400 and error_codes(r) == ["DIGEST_INVALID"]
    assert not stored(registry, wrong)
    assert not linked(registry, "demo/app", sha256(data))


@pytest.mark.parametrize(
    "digest", ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256" + "0" * 64]
)
def test_malformed_digest(registry: Registry, c: httpx.Client, digest: str) -> None:
    r = c.post("/v2/demo/app/blobs/uploads/", params={"digest": digest}, content=b"x")
    assert r.status_code == 400 and error_codes(r) == ["DIGEST_INVALID"]
    assert c.head(f"/v2/demo/app/blobs/{digest}").status_code == 400
    assert registry.hub.store.list_repos() == []


def test_upload_session_of_another_repository(registry: Registry, c: httpx.Client) -> None:
    data = os.urandom(5000)
    loc = start_upload(c, "demo/app")
    upload_id = loc.rsplit("/", 1)[1]
    other = f"/v2/demo/other/blobs/uploads/{upload_id}"
    r = patch(c, other, data, 0)
    assert r.status_code == 404 and error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"]
    r = c.put(other, params={"digest": sha256(data)}, content=data)
    assert r.status_code == 404
    assert not stored(registry, sha256(data))
    # and another principal's session is unknown too, even in the same repository
    bob = registry.client(registry.user("bob", ("push", "**"), ("pull", "**")))
    assert patch(bob, loc, data, 0).status_code == 404
    assert c.get(loc).status_code == 204  # the session itself is intact
    assert c.get("/v2/demo/app/blobs/uploads/nonexistent").status_code == 404


def test_cancel_upload(registry: Registry, c: httpx.Client) -> None:
    loc = start_upload(c, "demo/app")
    patch(c, loc, b"abc", 0)
    assert c.delete(loc).status_code == 204
    r = c.put(loc, params={"digest": sha256(b"abc")})
    assert r.status_code == 404 and error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"]


def _raw(registry: Registry, method: str, path: str, token: str) -> int:
    """A request with the path exactly as given (httpx would normalise dot segments)."""
    u = urlparse(registry.url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    import base64

    auth = base64.b64encode(f"u:{token}".encode()).decode()
    conn.request(method, path, headers={"Authorization": f"Basic {auth}", "Content-Length": "0"})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../etc/blobs/uploads/",
        "/v2/demo/../../x/blobs/uploads/",
        "/v2/Demo/App/blobs/uploads/",
        "/v2/demo//app/blobs/uploads/",
        "/v2/demo/%2e%2e/x/blobs/uploads/",
        "/v2/_x/blobs/uploads/",
    ],
)
def test_traversal_and_bad_names(registry: Registry, path: str) -> None:
    token = registry.user("carol", *ALL)
    status = _raw(registry, "POST", path, token)
    assert status in (400, 404)
    assert registry.hub.store.list_repos() == []
    assert not list(registry.hub.uploads.iter_live())


def test_name_invalid_code(registry: Registry, c: httpx.Client) -> None:
    r = c.get("/v2/UPPER/tags/list")
    assert r.status_code == 400 and error_codes(r) == ["NAME_INVALID"]


# -- manifests --------------------------------------------------------------------------------
def test_manifest_put_get_head_by_tag_and_digest(registry: Registry, c: httpx.Client) -> None:
    d, data = push_image(c, "demo/app", "v1", [b"layer one", b"layer two"])
    for ref in ("v1", d):
        g = c.get(f"/v2/demo/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert g.status_code == 200 and g.content == data
        assert g.headers["Content-Type"] == OCI_MANIFEST
        assert g.headers["Docker-Content-Digest"] == d
        h = c.head(f"/v2/demo/app/manifests/{ref}")
        assert h.status_code == 200 and int(h.headers["Content-Length"]) == len(data)
    assert c.get("/v2/demo/app/tags/list").json() == {"name": "demo/app", "tags": ["v1"]}
    # unknown ones
    r = c.get("/v2/demo/app/manifests/nope")
    assert r.status_code == 404 and error_codes(r) == ["MANIFEST_UNKNOWN"]
    r = c.get(f"/v2/demo/other/manifests/{d}")  # not linked to demo/other
    assert r.status_code == 404


def test_manifest_by_sha512_reference(registry: Registry, c: httpx.Client) -> None:
    push_blob(c, "demo/app", b"{}")
    layer = push_blob(c, "demo/app", b"abc")
    data = manifest_bytes([(layer, 3)])
    r = c.put(f"/v2/demo/app/manifests/{sha512(data)}", content=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha512(data)
    assert c.get(f"/v2/demo/app/manifests/{sha512(data)}").content == data


def test_docker_schema2_manifest_and_list(registry: Registry, c: httpx.Client) -> None:
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    cd = push_blob(c, "demo/docker", cfg)
    ld = push_blob(c, "demo/docker", b"layer")
    m = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": cd,
                "size": len(cfg),
            },
            "layers": [
                {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": ld, "size": 5},
                {
                    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "digest": sha256(b"elsewhere"),
                    "size": 9,
                    "urls": ["https://example.invalid/layer"],
                },
            ],
        }
    ).encode()
    mt = "application/vnd.docker.distribution.manifest.v2+json"
    r = c.put("/v2/demo/docker/manifests/amd64", content=m, headers={"Content-Type": mt})
    assert r.status_code == 201, r.text
    lst = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [
                {
                    "mediaType": mt,
                    "digest": sha256(m),
                    "size": len(m),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    lmt = "application/vnd.docker.distribution.manifest.list.v2+json"
    r = c.put("/v2/demo/docker/manifests/latest", content=lst, headers={"Content-Type": lmt})
    assert r.status_code == 201, r.text
    g = c.get("/v2/demo/docker/manifests/latest")
    assert g.headers["Content-Type"] == lmt and g.content == lst


def test_manifest_with_missing_blob_or_wrong_size_stores_nothing(registry: Registry, c: httpx.Client) -> None:
    push_blob(c, "demo/app", b"{}")
    layer = push_blob(c, "demo/app", b"abc")
    missing = manifest_bytes([(sha256(b"never pushed"), 12)])
    r = c.put("/v2/demo/app/manifests/v1", content=missing, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    wrong_size = manifest_bytes([(layer, 4)])
    r = c.put("/v2/demo/app/manifests/v1", content=wrong_size, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_INVALID"]
    r = c.put("/v2/demo/app/manifests/v1", content=b"{not json", headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_INVALID"]
    for data in (missing, wrong_size):
        assert not registry.hub.store.has_manifest(sha256(data))
    assert c.get("/v2/demo/app/tags/list").json()["tags"] == []
    # a blob of a repository the pusher may not pull is not there for its manifests
    other = push_blob(c, "demo/other", b"other layer")
    m = manifest_bytes([(other, 11)])
    dave = registry.client(registry.user("dave", ("pull", "demo/app"), ("push", "demo/app")))
    r = dave.put("/v2/demo/app/manifests/v2", content=m, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    assert dave.get("/v2/demo/app/tags/list").json()["tags"] == []


def test_oversized_manifest_is_refused(registry: Registry, c: httpx.Client) -> None:
    push_blob(c, "demo/app", b"{}")
    big = manifest_bytes([], annotations={"pad": "x" * (4 * 1024 * 1024)})
    r = c.put("/v2/demo/app/manifests/big", content=big, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 413 and error_codes(r) == ["MANIFEST_INVALID"]
    assert not registry.hub.store.has_manifest(sha256(big))
    assert c.get("/v2/demo/app/tags/list").json()["tags"] == []


def test_tag_compare_and_swap(registry: Registry, c: httpx.Client) -> None:
    d1, m1 = push_image(c, "demo/app", "v1", [b"one"])
    d2, m2 = push_image(c, "demo/app", None, [b"two"])
    h = {"Content-Type": OCI_MANIFEST}
    r = c.put("/v2/demo/app/manifests/v1", content=m2, headers={**h, "If-None-Match": "*"})
    assert r.status_code == 412 and error_codes(r) == ["TAG_CONFLICT"]
    r = c.put("/v2/demo/app/manifests/v1", content=m2, headers={**h, "If-Match": f'"{d2}"'})
    assert r.status_code == 412
    assert c.get("/v2/demo/app/manifests/v1").headers["Docker-Content-Digest"] == d1
    r = c.put("/v2/demo/app/manifests/v1", content=m2, headers={**h, "If-Match": f'"{d1}"'})
    assert r.status_code == 201
    assert c.get("/v2/demo/app/manifests/v1").headers["Docker-Content-Digest"] == d2
    r = c.put("/v2/demo/app/manifests/v2", content=m1, headers={**h, "If-None-Match": "*"})
    assert r.status_code == 201


def test_delete_manifest_and_tag_need_the_delete_grant(registry: Registry, c: httpx.Client) -> None:
    d, _ = push_image(c, "demo/app", "v1", [b"one"])
    pusher = registry.client(registry.user("pusher", ("pull", "**"), ("push", "**")))
    r = pusher.delete(f"/v2/demo/app/manifests/{d}")
    assert r.status_code == 403 and error_codes(r) == ["DENIED"]
    assert c.get("/v2/demo/app/manifests/v1").status_code == 200
    assert c.delete(f"/v2/demo/app/manifests/{d}").status_code == 202
    assert c.get(f"/v2/demo/app/manifests/{d}").status_code == 404
    assert c.get("/v2/demo/app/manifests/v1").status_code == 404
    d2, _ = push_image(c, "demo/app", "v2", [b"two"])
    assert c.delete("/v2/demo/app/manifests/v2").status_code == 202  # a tag
    assert c.get("/v2/demo/app/manifests/v2").status_code == 404
    assert c.get(f"/v2/demo/app/manifests/{d2}").status_code == 200


def test_delete_blob(registry: Registry, c: httpx.Client) -> None:
    d = push_blob(c, "demo/app", b"loose")
    assert c.delete(f"/v2/demo/app/blobs/{d}").status_code == 202
    assert c.head(f"/v2/demo/app/blobs/{d}").status_code == 404
    assert c.delete(f"/v2/demo/app/blobs/{d}").status_code == 404


# -- mount, referrers, lists ------------------------------------------------------------------
def test_cross_repository_mount_only_from_what_the_caller_may_pull(
    registry: Registry, c: httpx.Client
) -> None:
    d = push_blob(c, "team/a/app", b"shared layer")
    r = c.post("/v2/team/b/app/blobs/uploads/", params={"mount": d, "from": "team/a/app"})
    assert r.status_code == 201 and r.headers["Docker-Content-Digest"] == d
    assert c.get(f"/v2/team/b/app/blobs/{d}").content == b"shared layer"
    bob = registry.client(registry.user("bob", ("push", "bob/**"), ("pull", "bob/**")))
    r = bob.post("/v2/bob/app/blobs/uploads/", params={"mount": d, "from": "team/a/app"})
    assert r.status_code == 202  # not mountable for bob: an ordinary upload session instead
    assert bob.head(f"/v2/bob/app/blobs/{d}").status_code == 404
    r = bob.post("/v2/bob/app/blobs/uploads/", params={"mount": d, "from": "bob/other"})
    assert r.status_code == 202
    assert bob.head(f"/v2/bob/app/blobs/{d}").status_code == 404
    # a registry token must cover the source as well: alice may pull team/a/app, but a token
    # scoped to team/c/app alone is answered 401 with a challenge naming both scopes (what
    # distribution does), and nothing is mounted; the token the challenge asks for mounts
    alice = registry.user("alice", ("pull", "team/**"), ("push", "team/**"))
    url = f"{registry.url}/v2/team/c/app/blobs/uploads/"
    h = {"Authorization": f"Bearer {_token(registry, 'repository:team/c/app:pull,push', ('alice', alice))}"}
    r = httpx.post(url, params={"mount": d, "from": "team/a/app"}, headers=h)
    assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
    challenge = r.headers["WWW-Authenticate"]
    assert 'scope="repository:team/c/app:pull,push repository:team/a/app:pull"' in challenge
    assert 'error="insufficient_scope"' in challenge
    assert httpx.head(f"{registry.url}/v2/team/c/app/blobs/{d}", headers=h).status_code == 404
    assert not [u for u in registry.hub.uploads.iter_live() if u.repository == "team/c/app"]
    scope = re.search(r'scope="([^"]+)"', challenge).group(1)  # type: ignore[union-attr]
    h = {"Authorization": f"Bearer {_token(registry, scope, ('alice', alice))}"}
    r = httpx.post(url, params={"mount": d, "from": "team/a/app"}, headers=h)
    assert r.status_code == 201
    assert httpx.head(f"{registry.url}/v2/team/c/app/blobs/{d}", headers=h).status_code == 200


def test_referrers_with_artifact_type_filter(registry: Registry, c: httpx.Client) -> None:
    d, data = push_image(c, "demo/app", "v1", [b"image"])
    subject = (d, len(data))
    sig, _ = push_image(
        c,
        "demo/app",
        None,
        [b"sig"],
        artifact_type="application/vnd.test.sig",
        subject=subject,
        annotations={"k": "v"},
    )
    sbom, _ = push_image(
        c, "demo/app", None, [b"sbom"], artifact_type="application/vnd.test.sbom", subject=subject
    )
    r = c.get(f"/v2/demo/app/referrers/{d}")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(OCI_INDEX)
    got = {m["digest"]: m for m in r.json()["manifests"]}
    assert set(got) == {sig, sbom}
    assert got[sig]["artifactType"] == "application/vnd.test.sig"
    assert got[sig]["annotations"] == {"k": "v"}
    f = c.get(f"/v2/demo/app/referrers/{d}", params={"artifactType": "application/vnd.test.sbom"})
    assert [m["digest"] for m in f.json()["manifests"]] == [sbom]
    assert f.headers["OCI-Filters-Applied"] == "artifactType"
    none = c.get(f"/v2/demo/app/referrers/{sha256(b'nothing')}")
    assert none.status_code == 200 and none.json()["manifests"] == []
    assert c.get(f"/v2/demo/other/referrers/{d}").json()["manifests"] == []


def test_subject_header_and_referrer_pushed_before_subject(registry: Registry, c: httpx.Client) -> None:
    push_blob(c, "demo/app", b"{}")
    layer = push_blob(c, "demo/app", b"x")
    subject = (sha256(b"not yet"), 7)
    data = manifest_bytes([(layer, 1)], artifact_type="application/vnd.test.sig", subject=subject)
    r = c.put(f"/v2/demo/app/manifests/{sha256(data)}", content=data, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201
    assert r.headers["OCI-Subject"] == subject[0]


def test_tag_and_catalog_pagination(registry: Registry, c: httpx.Client) -> None:
    _d, data = push_image(c, "demo/app", "t0", [b"one"])
    for i in range(1, 5):
        r = c.put(f"/v2/demo/app/manifests/t{i}", content=data, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201
    seen = []
    url = "/v2/demo/app/tags/list?n=2"
    while url:
        r = c.get(url)
        seen += r.json()["tags"]
        link = r.headers.get("Link")
        url = link.split(";")[0].strip("<>") if link else ""
    assert seen == [f"t{i}" for i in range(5)]
    assert c.get("/v2/demo/app/tags/list", params={"n": 2, "last": "t1"}).json()["tags"] == ["t2", "t3"]
    for repo in ("a/one", "b/two", "c/three"):
        push_image(c, repo, "v1", [b"x"])
    r = c.get("/v2/_catalog", params={"n": 2})
    assert r.json()["repositories"] == ["a/one", "b/two"] and "Link" in r.headers
    r = c.get("/v2/_catalog", params={"n": 10, "last": "b/two"})
    assert r.json()["repositories"] == ["c/three", "demo/app"]


# -- auth ---------------------------------------------------------------------------------------
def _token(registry: Registry, scope: str, creds: tuple[str, str] | None) -> str:
    r = httpx.get(registry.url + "/token", params={"service": "clawstore", "scope": scope}, auth=creds)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def test_bearer_flow_scopes_and_denials(registry: Registry) -> None:
    alice = registry.user("alice", ("pull", "team/**"), ("push", "team/**"))
    bob = registry.user("bob", ("pull", "team/**"))
    with registry.client(alice) as c:
        push_image(c, "team/app", "v1", [b"x"])
    # a pull-only token cannot push: 403 insufficient_scope with the challenge for push
    t = _token(registry, "repository:team/app:pull", ("alice", alice))
    hb = {"Authorization": f"Bearer {t}"}
    assert httpx.get(registry.url + "/v2/team/app/manifests/v1", headers=hb).status_code == 200
    r = httpx.post(registry.url + "/v2/team/app/blobs/uploads/", headers=hb)
    assert r.status_code == 403
    assert 'scope="repository:team/app:pull,push"' in r.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # a pull token may ask where its own upload stands, and do nothing else with it: HEAD
    # (however it is dressed up) never finishes it
    with registry.client(alice) as c:
        loc = c.post("/v2/team/app/blobs/uploads/").headers["Location"]
        assert c.patch(loc, content=b"abc", headers={"Content-Range": "0-2"}).status_code == 202
    up = registry.url + loc
    assert httpx.get(up, headers=hb).status_code == 204
    assert httpx.head(up, headers=hb, params={"digest": sha256(b"abc")}).status_code == 204
    assert httpx.put(up, headers=hb, params={"digest": sha256(b"abc")}).status_code == 403
    assert httpx.patch(up, headers=hb, content=b"d").status_code == 403
    assert httpx.delete(up, headers=hb).status_code == 403
    assert httpx.get(up, headers=hb).headers["Range"] == "0-2"
    with registry.client(alice) as c:
        assert c.head(f"/v2/team/app/blobs/{sha256(b'abc')}").status_code == 404
        assert c.delete(loc).status_code == 204
    # bob asks for push: the token carries only what his grants allow
    tb = _token(registry, "repository:team/app:pull,push", ("bob", bob))
    r = httpx.post(registry.url + "/v2/team/app/blobs/uploads/", headers={"Authorization": f"Bearer {tb}"})
    assert r.status_code == 403
    assert not list(registry.hub.uploads.iter_live())
    # with Basic, the hub decides: 403 DENIED
    r = httpx.post(registry.url + "/v2/team/app/blobs/uploads/", auth=("bob", bob))
    assert r.status_code == 403 and error_codes(r) == ["DENIED"]
    # a tampered token is refused
    r = httpx.get(registry.url + "/v2/team/app/manifests/v1", headers={"Authorization": f"Bearer {t[:-2]}xx"})
    assert r.status_code == 401
    # revoking the hub token ends its registry tokens at once
    registry.hub.revoke_token(ADMIN, alice)
    assert httpx.get(registry.url + "/v2/team/app/manifests/v1", headers=hb).status_code in (401, 403)
    assert httpx.get(registry.url + "/token", auth=("alice", alice)).status_code == 401
    # the oauth2 form
    r = httpx.post(
        registry.url + "/token",
        data={
            "grant_type": "password",
            "username": "bob",
            "password": bob,
            "scope": "repository:team/app:pull",
            "service": "clawstore",
        },
    )
    assert r.status_code == 200 and r.json()["access_token"]


def test_anonymous_pull_only_where_granted(registry: Registry, c: httpx.Client) -> None:
    push_image(c, "public/app", "v1", [b"pub"])
    push_image(c, "private/app", "v1", [b"priv"])
    anon = httpx.Client(base_url=registry.url)
    r = anon.get("/v2/public/app/manifests/v1")
    assert r.status_code == 401 and "repository:public/app:pull" in r.headers["WWW-Authenticate"]
    registry.hub.grant(ADMIN, "anonymous", "pull", "public/**")
    t = _token(registry, "repository:public/app:pull", None)
    assert (
        anon.get("/v2/public/app/manifests/v1", headers={"Authorization": f"Bearer {t}"}).status_code == 200
    )
    assert anon.get("/v2/public/app/manifests/v1").status_code == 200  # no credentials at all
    r = anon.get("/v2/private/app/manifests/v1")
    assert r.status_code == 401
    r = anon.post("/v2/public/app/blobs/uploads/")
    assert r.status_code == 401 and "repository:public/app:pull,push" in r.headers["WWW-Authenticate"]
    # an anonymous token without push (what docker fetches before logging in) is 401 as well:
    # authenticating may help, so the client is told to
    t = _token(registry, "repository:public/app:pull,push", None)
    r = anon.post("/v2/public/app/blobs/uploads/", headers={"Authorization": f"Bearer {t}"})
    assert r.status_code == 401 and error_codes(r) == ["UNAUTHORIZED"]
    assert "repository:public/app:pull,push" in r.headers["WWW-Authenticate"]
    assert not list(registry.hub.uploads.iter_live())


def test_principal_without_grants_sees_nothing(registry: Registry, c: httpx.Client) -> None:
    d = push_blob(c, "demo/app", b"secret")
    nobody = registry.client(registry.user("nobody"))
    assert nobody.get(f"/v2/demo/app/blobs/{d}").status_code == 403
    assert nobody.get("/v2/_catalog").json()["repositories"] == []
    assert Principal.anonymous().is_anonymous


def test_unknown_repository_tags(registry: Registry, c: httpx.Client) -> None:
    r = c.get("/v2/never/pushed/tags/list")
    assert r.status_code == 404 and error_codes(r) == ["NAME_UNKNOWN"]
    push_blob(c, "only/blobs", b"x")
    assert c.get("/v2/only/blobs/tags/list").json() == {"name": "only/blobs", "tags": []}


def test_streamed_patch_without_content_range(registry: Registry, c: httpx.Client) -> None:
    """What docker and skopeo send: one PATCH, chunked transfer encoding, no Content-Range."""
    parts = [os.urandom(100_000) for _ in range(7)]
    loc = start_upload(c, "demo/app")
    r = c.patch(loc, content=iter(parts), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    data = b"".join(parts)
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    assert c.put(r.headers["Location"], params={"digest": sha256(data)}).status_code == 201
    assert c.get(f"/v2/demo/app/blobs/{sha256(data)}").content == data


def test_corrupt_stored_blob_is_never_served_whole(local_registry: Registry) -> None:
    registry = local_registry
    with registry.client(registry.user("alice", *ALL)) as c:
        for size in (1000, 3 * 1024 * 1024):  # read whole in one trip / streamed
            data = os.urandom(size)
            d = push_blob(c, "demo/app", data)
            path = registry.hub.store.blob_local_path(d)
            assert path is not None
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            try:
                r = c.get(f"/v2/demo/app/blobs/{d}")
            except httpx.HTTPError:
                continue  # cut short: the client sees a broken response
            assert r.status_code == 500, r.status_code


def test_put_by_digest_with_tag_parameters(registry: Registry, c: httpx.Client) -> None:
    push_blob(c, "demo/app", b"{}")
    layer = push_blob(c, "demo/app", b"abc")
    data = manifest_bytes([(layer, 3)])
    r = c.put(
        f"/v2/demo/app/manifests/{sha256(data)}",
        params=[("tag", "a"), ("tag", "b")],
        content=data,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201, r.text
    assert r.headers["OCI-Tag"] == "a, b"
    assert c.get("/v2/demo/app/tags/list").json()["tags"] == ["a", "b"]
    bad = c.put(
        f"/v2/demo/app/manifests/{sha256(data)}",
        params={"tag": "-bad"},
        content=data,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert bad.status_code == 400
