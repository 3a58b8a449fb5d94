"""Batched deletes on S3 (GC's sweep): DeleteObjects in batches with no HEAD, per-key errors
retried or reported, and servers without DeleteObjects or with a smaller batch limit (imitated
with botocore hooks on a real moto server, like the conditional-write probe tests)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from clawstore.backends.s3 import S3Backend, S3Error, S3Options
from clawstore.digest import Digest
from clawstore.errors import PermissionDeniedError
from s3_server import REGION, TEST_OPTIONS, make_client


def _digests(n: int) -> list[Digest]:
    import hashlib

    return [Digest(f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}") for i in range(n)]


def _backend(endpoint: str, bucket: str, client: Any = None, **options: Any) -> S3Backend:
    opts = S3Options(endpoint_url=endpoint, region=REGION, **{**TEST_OPTIONS, **options})
    return S3Backend(bucket, "store", opts, client=client)


def _fill(s3_client: Any, bucket: str, b: S3Backend, digests: list[Digest]) -> None:
    for d in digests:
        s3_client.put_object(Bucket=bucket, Key=b.layout.blob(d), Body=b"x")


def _stored(s3_client: Any, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="store/blobs/"):
        out |= {o["Key"] for o in page.get("Contents", [])}
    return out


class Ops:
    """Counts the operations a client sends (a botocore hook)."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        client.meta.events.register("before-call.s3", self)

    def __call__(self, model: Any, params: Any, **_: Any) -> None:
        self.calls[model.name] += 1


def _answer(params: dict[str, Any], status: int, code: str) -> Any:
    from botocore.awsrequest import AWSResponse

    return AWSResponse(params["url"], status, {}, None), {
        "Error": {"Code": code, "Message": "imitated"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }


def test_delete_objects_in_batches_without_head(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    b = _backend(s3_endpoint, s3_bucket, delete_batch=100)
    ds = _digests(450)
    _fill(s3_client, s3_bucket, b, ds[:400])  # the last 50 are absent: no error
    keep = _digests(460)[450:]
    _fill(s3_client, s3_bucket, b, keep)
    ops = Ops(b.client)
    assert b.remove_batch == 100
    assert b.remove_blobs(ds) == 450  # acknowledged: S3 does not tell absent keys apart
    assert _stored(s3_client, s3_bucket) == {b.layout.blob(d) for d in keep}
    assert ops.calls == Counter({"DeleteObjects": 5})  # no HEAD, no single DELETE


def test_per_key_transient_errors_are_retried(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    """The server fails some keys of a DeleteObjects with InternalError (a 200 response with
    <Error> entries): only those keys are sent again, until they go."""
    client = make_client(s3_endpoint)
    b = _backend(s3_endpoint, s3_bucket, client=client)
    ds = _digests(30)
    _fill(s3_client, s3_bucket, b, ds)
    failing: list[list[str]] = [[b.layout.blob(d) for d in ds[::3]], [b.layout.blob(ds[0])]]
    held: list[str] = []
    sent: list[int] = []

    def drop(params: dict[str, Any], **_: Any) -> None:
        objs = params["Delete"]["Objects"]
        sent.append(len(objs))
        held[:] = failing.pop(0) if failing else []
        params["Delete"]["Objects"] = [o for o in objs if o["Key"] not in held]

    def fail(parsed: dict[str, Any], **_: Any) -> None:
        parsed.setdefault("Errors", []).extend(
            {"Key": k, "Code": "InternalError", "Message": "imitated"} for k in held
        )

    client.meta.events.register("before-parameter-build.s3.DeleteObjects", drop)
    client.meta.events.register("after-call.s3.DeleteObjects", fail)
    assert b.remove_blobs(ds) == 30
    assert sent == [30, 10, 1]  # everything, then the failed keys, then the one failing twice
    assert _stored(s3_client, s3_bucket) == set()


def test_per_key_access_denied_is_reported(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    client = make_client(s3_endpoint)
    b = _backend(s3_endpoint, s3_bucket, client=client)
    ds = _digests(5)
    _fill(s3_client, s3_bucket, b, ds)
    denied = b.layout.blob(ds[2])

    def drop(params: dict[str, Any], **_: Any) -> None:
        params["Delete"]["Objects"] = [o for o in params["Delete"]["Objects"] if o["Key"] != denied]

    def fail(parsed: dict[str, Any], **_: Any) -> None:
        parsed.setdefault("Errors", []).append({"Key": denied, "Code": "AccessDenied", "Message": "no"})

    client.meta.events.register("before-parameter-build.s3.DeleteObjects", drop)
    client.meta.events.register("after-call.s3.DeleteObjects", fail)
    with pytest.raises(PermissionDeniedError, match=denied):
        b.remove_blobs(ds)
    assert _stored(s3_client, s3_bucket) == {denied}  # the others went


def test_transient_errors_exhaust_the_retry_budget(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    client = make_client(s3_endpoint)
    b = _backend(s3_endpoint, s3_bucket, client=client, max_attempts=3)
    ds = _digests(4)
    _fill(s3_client, s3_bucket, b, ds)
    stuck = b.layout.blob(ds[1])

    def drop(params: dict[str, Any], **_: Any) -> None:
        # The stuck key is not deleted: a key beside it is named instead (never an empty request).
        for o in params["Delete"]["Objects"]:
            if o["Key"] == stuck:
                o["Key"] = stuck + "-elsewhere"

    def fail(parsed: dict[str, Any], **_: Any) -> None:
        parsed.setdefault("Errors", []).append({"Key": stuck, "Code": "SlowDown", "Message": "imitated"})

    client.meta.events.register("before-parameter-build.s3.DeleteObjects", drop)
    client.meta.events.register("after-call.s3.DeleteObjects", fail)
    with pytest.raises(S3Error, match="after 3 attempts"):
        b.remove_blobs(ds)
    assert _stored(s3_client, s3_bucket) == {stuck}


def test_server_without_delete_objects_gets_single_deletes(
    s3_endpoint: str, s3_bucket: str, s3_client: Any
) -> None:
    """A server that answers DeleteObjects with NotImplemented: the open-time probe finds it,
    and batched deletes become single DELETEs (several in flight), no HEAD."""
    client = make_client(s3_endpoint)
    client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: _answer(params, 501, "NotImplemented")
    )
    b = _backend(s3_endpoint, s3_bucket, client=client)
    assert b.caps.delete_objects is False and b.remove_batch == 1
    ds = _digests(25)
    _fill(s3_client, s3_bucket, b, ds)
    ops = Ops(client)
    assert b.remove_blobs(ds) == 25
    assert _stored(s3_client, s3_bucket) == set()
    assert ops.calls == Counter({"DeleteObject": 25})
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0  # the probe left nothing


def test_unprobed_backend_falls_back_at_the_first_refusal(
    s3_endpoint: str, s3_bucket: str, s3_client: Any
) -> None:
    client = make_client(s3_endpoint)
    client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda params, **_: _answer(params, 501, "NotImplemented")
    )
    b = _backend(s3_endpoint, s3_bucket, client=client, probe=False)
    assert b.caps.delete_objects is True
    ds = _digests(7)
    _fill(s3_client, s3_bucket, b, ds)
    assert b.remove_blobs(ds) == 7
    assert _stored(s3_client, s3_bucket) == set() and b.remove_batch == 1


def test_smaller_server_limit_is_learned(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    """A server that takes at most 64 keys per DeleteObjects (refusing more as MalformedXML):
    the batch is halved until it is taken, and the smaller size is kept."""
    client = make_client(s3_endpoint)
    sizes: list[int] = []

    def limit(params: dict[str, Any], **_: Any) -> None:
        sizes.append(len(params["Delete"]["Objects"]))

    def refuse(params: dict[str, Any], **_: Any) -> Any:
        return _answer(params, 400, "MalformedXML") if sizes[-1] > 64 else None

    client.meta.events.register("before-parameter-build.s3.DeleteObjects", limit)
    client.meta.events.register("before-call.s3.DeleteObjects", refuse)
    b = _backend(s3_endpoint, s3_bucket, client=client, delete_batch=200, concurrency=1)
    ds = _digests(300)
    _fill(s3_client, s3_bucket, b, ds)
    del sizes[:]
    assert b.remove_blobs(ds) == 300
    assert _stored(s3_client, s3_bucket) == set()
    assert b.remove_batch == 50  # 200 -> 100 -> 50
    assert max(s for s in sizes[2:]) <= 64 and sizes[:2] == [200, 100]


def test_delete_batch_zero_means_single_deletes(s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    b = _backend(s3_endpoint, s3_bucket, delete_batch=0)
    ds = _digests(6)
    _fill(s3_client, s3_bucket, b, ds)
    ops = Ops(b.client)
    assert b.remove_blobs(ds) == 6 and ops.calls == Counter({"DeleteObject": 6})


def test_delete_batch_option_is_checked() -> None:
    from clawstore.errors import ClawstoreError

    with pytest.raises(ClawstoreError, match="delete_batch"):
        S3Options.build({"delete_batch": "1001"}, {})
    assert S3Options.build({"delete_batch": "10"}, {}).delete_batch == 10
