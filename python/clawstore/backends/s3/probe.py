"""The open-time probe: what the server accepts as well as what it refuses, as one frozen value.

Conditional writes (tag compare-and-swap needs them): ``If-None-Match: *`` creates and then
refuses; ``If-Match`` with the object's current ETag replaces it (quoted first, as RFC 9110 and
S3 have it, then bare, which Ceph RGW 16 wants on PUT) and with a stale ETag is refused;
conditional DELETE likewise. A server that gets a PUT precondition wrong is refused at open with
one line naming the behaviour. Part checksums: whether the server refuses a part whose
x-amz-checksum-crc32 is wrong, and whether it reports the composite checksum of an upload.
Batched deletes: whether the server implements DeleteObjects (the probe's own cleanup asks).
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
from typing import Any, NoReturn

from clawstore import _core

from .delete import probe_delete_objects
from .transport import (
    S3ConfigurationError,
    Transport,
    bare,
    code,
    not_implemented,
    precondition_failed,
    quoted,
)

#: Error codes with which servers refuse a part whose checksum does not match its bytes.
CHECKSUM_REFUSALS = frozenset(
    {"BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest", "InvalidChecksum"}
)


@dataclass(frozen=True)
class S3Capabilities:
    """What the server was found to do by the open-time probe (or, without one, what is assumed:
    S3's documented behaviour and Content-MD5 parts)."""

    #: If-Match takes the ETag quoted, as RFC 9110 and S3 have it (False: bare, as Ceph RGW 16
    #: wants on PUT).
    if_match_quoted: bool = True
    #: DELETE honours If-Match (False: `untag` checks then deletes; a racing writer can be lost).
    conditional_delete: bool = True
    #: Per-part checksum: "crc32" / "sha256" (x-amz-checksum-*, verified by the server) or "md5".
    part_checksum: str = "md5"
    #: md5 parts on a server that takes declared S3 checksums without verifying them (moto):
    #: declare CRC-32 and send it with each part too (spares moto a full-object pass of its own).
    md5_with_crc32: bool = False
    #: The server reports the composite checksum of a completed multipart upload (S3, MinIO,
    #: moto; not RGW 16): needed by part_checksum=crc32|sha256 on a server that does not verify
    #: them per part. True without a probe (S3's documented behaviour).
    reports_checksums: bool = True
    #: The server refuses a part whose x-amz-checksum-crc32 is wrong (S3, MinIO, RGW >= Squid).
    verifies_checksums: bool = False
    #: The server implements DeleteObjects (batched deletes, GC's sweep); False: single DELETEs,
    #: several in flight. How many keys one request takes is learned on use (see `delete.py`).
    delete_objects: bool = True
    #: The server refuses a body that does not hash to its signed x-amz-content-sha256 (S3,
    #: MinIO, RGW; not moto): what part_checksum=signed relies on.
    verifies_signed_payloads: bool = False

    def if_match(self, etag: str) -> str:
        """`etag` in the form this server's If-Match takes."""
        return quoted(etag) if self.if_match_quoted else bare(etag)


def probe(t: Transport, probe_key: Any, part_checksum: str) -> S3Capabilities:
    """Probe the server behind `t` (`probe_key()` gives fresh keys under the store's uploads/);
    `part_checksum` is the configured mode ("auto" resolved here)."""
    if_match_quoted, conditional_delete = probe_conditional_writes(t, probe_key())
    key = probe_key()
    found, md5_with_crc32, reports = probe_part_checksums(t, key)
    # The checksum probe may leave its key behind (a completed upload): removing it with a
    # DeleteObjects answers whether the server has one, for no extra request.
    delete_objects = probe_delete_objects(t, key, t.delete)
    # Signed part payloads: cheaper than Content-MD5 for the client, where crc32 is not verified.
    signed = (
        found != "crc32" and part_checksum in ("auto", "signed") and probe_signed_payloads(t, probe_key())
    )
    if part_checksum == "signed" and not signed:
        raise S3ConfigurationError(
            f"s3://{t.bucket}: part_checksum=signed, but the server stores a part whose body does not "
            "hash to its signed x-amz-content-sha256: nothing would check the parts; use md5"
        )
    if part_checksum == "auto":
        mode = "signed" if signed else found
        md5_with_crc32 = md5_with_crc32 and mode == "md5"
    else:
        mode, md5_with_crc32 = part_checksum, False  # a forced mode sends exactly what is asked
    return S3Capabilities(
        if_match_quoted,
        conditional_delete,
        mode,
        md5_with_crc32,
        reports,
        found == "crc32",
        delete_objects=delete_objects,
        verifies_signed_payloads=signed,
    )


def probe_conditional_writes(t: Transport, key: str) -> tuple[bool, bool]:
    """Returns ``(if_match_quoted, conditional_delete)``. Raises S3ConfigurationError, naming
    the behaviour, when a conditional PUT is ignored or a correct one is refused: tag
    compare-and-swap would then lose updates, or never move a tag. A server that ignores
    If-Match on DELETE (RGW 16) gets check-then-delete for `untag` (see README)."""
    where = f"s3://{t.bucket}"

    def refuse(behaviour: str, cause: BaseException | None = None) -> NoReturn:
        raise S3ConfigurationError(
            f"{where}: the server {behaviour}; tag compare-and-swap needs conditional writes "
            "(AWS S3, MinIO >= 2024, Ceph RGW). Pass probe=false only if no two writers ever "
            "update the same tag."
        ) from cause

    def current_etag() -> str | None:
        head = t.head(key)
        return None if head is None else str(head["ETag"])

    def put(body: bytes, **kw: Any) -> str | None:
        """A conditional PUT: the new ETag, or None when the precondition failed (unless the
        object now holds `body`: a retried attempt whose first one landed, response lost)."""
        try:
            resp = t.call("put_object", Key=key, Body=body, **kw)
        except Exception as e:
            if precondition_failed(e):
                now = current_etag()
                mine = base64.b64decode(_core.content_md5(body)).hex()
                return now if now is not None and bare(now) == mine else None
            if not_implemented(e):
                refuse(f"does not implement {', '.join(kw)} on PUT", e)
            raise
        return str(resp.get("ETag", ""))

    try:
        # A fresh random key: a failed precondition on a *retried* attempt is our own first
        # attempt having landed with its response lost; the ETag read back settles it.
        if put(b"1\n", IfNoneMatch="*") is None:
            refuse("refused If-None-Match: * on a key that does not exist")
        etag = current_etag()
        if etag is None:
            refuse("lost an object just created with If-None-Match: *")
        if put(b"2\n", IfNoneMatch="*") is not None:
            refuse("ignored If-None-Match: * on an existing object (it overwrote it)")
        if put(b"3\n", IfMatch=quoted("0" * 32)) is not None:
            refuse("ignored If-Match with a stale ETag (it overwrote the object)")
        is_quoted = True
        if put(b"4\n", IfMatch=quoted(etag)) is None:
            is_quoted = False
            if put(b"4\n", IfMatch=bare(etag)) is None:
                refuse(f"refused If-Match with the object's current ETag {etag} (quoted and unquoted)")
        now = current_etag()
        if now is None or bare(now) == bare(etag):
            refuse("accepted If-Match with the current ETag but did not replace the object")
        form = quoted if is_quoted else bare
        if put(b"5\n", IfMatch=form(etag)) is not None:
            refuse("ignored If-Match with the previous (stale) ETag (it overwrote the object)")
        # DELETE: a stale ETag must be refused, the current one accepted.
        try:
            t.delete(key, IfMatch=form(etag))
        except Exception as e:
            if not_implemented(e):
                return is_quoted, False
            if not precondition_failed(e):
                raise
        if current_etag() is None:
            return is_quoted, False  # the precondition was ignored: the object is gone
        try:
            t.delete(key, IfMatch=form(now))
        except Exception as e:
            if precondition_failed(e):
                refuse(f"refused a DELETE with If-Match of the current ETag {now}", e)
            raise
        if current_etag() is not None:
            refuse("answered a DELETE with If-Match of the current ETag but kept the object")
        return is_quoted, True
    finally:
        with contextlib.suppress(Exception):
            t.delete(key)


def probe_part_checksums(t: Transport, key: str) -> tuple[str, bool, bool]:
    """Which per-part checksum to send: "crc32" only if the server refuses a part whose
    x-amz-checksum-crc32 is wrong and takes the same part with the right one (S3, MinIO,
    RGW >= Squid), so that no damaged part can ever be completed; else "md5" (Content-MD5,
    which most servers check, plus our ETag comparisons, which also cover moto). A server that
    accepts the wrong CRC (moto, RGW 16) gets md5: a check only after Complete would leave
    damaged bytes at a digest key for a moment (or for good, after a crash).

    Returns ``(mode, md5_with_crc32, reports_checksums)``: whether md5 parts should carry a
    declared CRC-32 too (a server that takes declared checksums without verifying them), and
    whether the server reports the composite checksum of a completed upload (found by
    completing the probe upload when the wrong CRC was accepted; S3 and MinIO report it)."""
    from botocore.exceptions import ClientError

    body = b"clawstore part-checksum probe\n" * 8
    true, wrong = _core.crc32_base64(body), _core.crc32_base64(body + b"!")
    try:
        mpu = t.call("create_multipart_upload", Key=key, ChecksumAlgorithm="CRC32")
    except ClientError:
        return "md5", False, False
    common = {"Key": key, "UploadId": mpu["UploadId"]}

    def wrong_part(_: int) -> str | None:
        # A refusal (BadDigest) is the answer here, not a fault to retry.
        try:
            resp = t.client.upload_part(
                Bucket=t.bucket, PartNumber=1, Body=body, ChecksumCRC32=wrong, **common
            )
        except ClientError as e:
            if code(e) in CHECKSUM_REFUSALS:
                return None
            raise
        return str(resp["ETag"])

    try:
        try:
            etag = t.run(f"UploadPart {key} (checksum probe)", wrong_part)
        except ClientError:
            return "md5", False, False
        if etag is not None:
            # A wrong checksum was accepted: parts are not verified by it. The server does take
            # declared checksums, though: send them along with Content-MD5. Does it report a
            # composite checksum after Complete?
            part = {"PartNumber": 1, "ETag": etag, "ChecksumCRC32": wrong}
            try:
                resp = t.call("complete_multipart_upload", MultipartUpload={"Parts": [part]}, **common)
                reports = bool(resp.get("ChecksumCRC32"))
                if not reports:
                    reports = bool(
                        t.call("head_object", Key=key, ChecksumMode="ENABLED").get("ChecksumCRC32")
                    )
            except ClientError:
                reports = False
            return "md5", True, reports
        try:
            t.call("upload_part", PartNumber=1, Body=body, ChecksumCRC32=true, **common)
        except ClientError:
            return "md5", False, False
        return "crc32", False, True
    finally:
        with contextlib.suppress(Exception):
            t.client.abort_multipart_upload(Bucket=t.bucket, **common)
        # The completed probe object (if any) is removed by the caller (`probe_delete_objects`).


#: Error codes with which servers refuse a body that does not hash to its signed SHA-256.
PAYLOAD_REFUSALS = frozenset(
    {"XAmzContentSHA256Mismatch", "BadDigest", "InvalidDigest", "SignatureDoesNotMatch"}
)


def probe_signed_payloads(t: Transport, key: str) -> bool:
    """Whether the server refuses a part whose signed x-amz-content-sha256 is wrong and takes
    it with the right one (S3, MinIO, RGW check the payload hash of a signed request; moto
    does not): then part_checksum=signed protects every part before it is stored."""
    import hashlib

    from botocore.exceptions import ClientError

    from .signing import PAYLOAD_PARAM

    body = b"clawstore signed-payload probe\n" * 8
    try:
        mpu = t.call("create_multipart_upload", Key=key)
    except ClientError:
        return False
    common = {"Key": key, "UploadId": mpu["UploadId"], "PartNumber": 1, "Body": body}

    def send(sha256_hex: str) -> bool:
        def once(_: int) -> bool:
            try:
                t.client.upload_part(Bucket=t.bucket, **{PAYLOAD_PARAM: sha256_hex}, **common)
            except ClientError as e:
                if code(e) in PAYLOAD_REFUSALS:
                    return False  # a refusal is the answer here, not a fault to retry
                raise
            return True

        return t.run(f"UploadPart {key} (signed-payload probe)", once)

    try:
        try:
            if send(hashlib.sha256(body + b"!").hexdigest()):
                return False
            return send(hashlib.sha256(body).hexdigest())
        except ClientError:
            return False
    finally:
        with contextlib.suppress(Exception):
            t.client.abort_multipart_upload(Bucket=t.bucket, Key=key, UploadId=mpu["UploadId"])
