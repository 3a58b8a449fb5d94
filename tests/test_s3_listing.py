"""Listing an S3 store by its fanout prefixes in parallel: every object once, in key order, with
its size, no HEAD; keys outside the layout ignored; GC adopts orphans from it."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import clawstore
from clawstore.digest import Digest
from clawstore.hub import Hub, Principal
from s3_server import TEST_OPTIONS, store_url


def test_parallel_fanout_listing(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    store = clawstore.open(store_url(s3_endpoint, s3_bucket), **{**TEST_OPTIONS, "concurrency": 3})
    b = store.backend
    want: dict[str, int] = {}
    for i in range(300):  # spread over most of the 256 prefixes, two algorithms
        body = b"y" * (i % 17)
        alg = "sha256" if i % 3 else "sha512"
        h = hashlib.new(alg, str(i).encode()).hexdigest()
        d = Digest(f"{alg}:{h}")
        s3_client.put_object(Bucket=s3_bucket, Key=b.layout.blob(d), Body=body)  # type: ignore[attr-defined]
        want[d] = len(body)
    # Not at a fanout key: ignored.
    s3_client.put_object(Bucket=s3_bucket, Key="store/blobs/sha256/zz/nothing", Body=b"")
    s3_client.put_object(Bucket=s3_bucket, Key="store/blobs/stray", Body=b"")
    calls: Counter[str] = Counter()
    b.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))  # type: ignore[attr-defined]
    got = list(store.iter_blob_sizes())
    assert dict(got) == want and len(got) == len(want)
    assert [d for d, _ in got] == sorted(d for d, _ in got) == list(store.iter_blobs())[: len(got)]
    assert set(calls) == {"ListObjectsV2"}  # sizes from the listing: no HEAD
    assert list(clawstore.open(store_url(s3_endpoint, s3_bucket, "empty"), **TEST_OPTIONS).iter_blobs()) == []


def test_gc_adopts_orphans_from_the_parallel_listing(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = clawstore.open(store_url(s3_endpoint, s3_bucket), **TEST_OPTIONS)
    orphans = [store.put_blob(f"orphan {i}".encode()).digest for i in range(40)]
    hub = Hub(store, f"sqlite:///{tmp_path / 'catalog.sqlite'}", create_catalog=True)
    try:
        heads: list[str] = []
        store.backend.client.meta.events.register(  # type: ignore[attr-defined]
            "before-call.s3.HeadObject", lambda params, **_: heads.append(params["url"])
        )
        r = hub.gc(Principal.local_admin(), grace=0)
        assert r.adopted == 40 and r.blobs == 40
        assert [h for h in heads if "/blobs/" in h] == []
        assert not any(store.has_blob(d) for d in orphans)
    finally:
        hub.close()
