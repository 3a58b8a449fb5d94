"""Uploads: single PUTs, multipart uploads from the Rust part stager, staging + server-side copy.

Invariant: nothing appears at a digest key unless its bytes hash to that digest.

* Known digest (bytes and files are hashed first; or ``expected`` given): upload straight to the
  digest key. Parts come from the Rust stager (`clawstore._core.PartStager`), which hashes the
  whole object over exactly the bytes handed out; the upload is completed only if that digest is
  the one named by the key, otherwise it is aborted (nothing ever becomes visible).
* Unknown digest (a stream): multipart upload to ``uploads/<uuid>``, then a server-side copy to
  the digest key (CopyObject, or UploadPartCopy above 5 GiB) guarded by the staging ETag, then the
  staging object is deleted.
* Every part carries a checksum the server verifies (see `probe` for which): x-amz-checksum-crc32
  on servers that refuse a wrong one, else the part's SHA-256 signed as its SigV4 payload hash on
  servers that check it (``signed``: see `signing`), else Content-MD5 with the part ETags
  compared with our MD5s. The composite checksum (or multipart ETag) of the completed object is
  compared with ours as a second check where there is one; a mismatch removes the object.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from clawstore import _core
from clawstore.digest import Digest
from clawstore.errors import DigestMismatchError
from clawstore.types import BlobSource

from .layout import S3Layout
from .options import MAX_PARTS, MAX_SINGLE_COPY, MIN_PART_SIZE, MiB
from .probe import PAYLOAD_REFUSALS, S3Capabilities
from .signing import PAYLOAD_PARAM
from .transport import (
    PartCorrupted,
    S3Error,
    StoredCorrupted,
    Transport,
    bare,
    is_error,
    precondition_failed,
)

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MULTI_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
#: The S3 checksum algorithm each part_checksum declares (md5: Content-MD5 instead; signed: none).
_S3_CHECKSUM = {"crc32": "CRC32", "sha256": "SHA256"}
#: What the Rust stager computes per part for each part_checksum.
_STAGER_CHECKSUM = {"signed": "sha256"}


def composite(mode: str, sums: list[str]) -> str:
    """S3's composite checksum of a multipart object (without the ``-N``): the checksum of the
    concatenated binary part checksums."""
    raw = b"".join(base64.b64decode(s) for s in sums)
    if mode == "crc32":
        return _core.crc32_base64(raw)
    return base64.b64encode(hashlib.sha256(raw).digest()).decode()


_MULTI_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")


class Prepend(io.RawIOBase):
    """`head` bytes followed by the rest of `src` (a stream we already peeked into)."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            n = readinto(view)
            if n is None:
                raise BlockingIOError("non-blocking source not supported")
            return int(n)
        data = self._src.read(len(view))
        view[: len(data)] = data
        return len(data)


class SourceChanged(S3Error):
    """The file being uploaded changed after it was hashed (nothing was stored)."""


def read_up_to(src: BinaryIO, limit: int) -> bytes:
    """Read until `limit` bytes or end of stream."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = src.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class Uploader:
    """Writes blobs to their digest keys (see the module docstring)."""

    def __init__(self, t: Transport, layout: S3Layout, caps: S3Capabilities) -> None:
        self.t = t
        self.layout = layout
        self.caps = caps

    def _part_size_for(self, size: int | None) -> int:
        ps = self.t.options.part_size
        if size is not None and size > ps * MAX_PARTS:
            ps = -(-size // MAX_PARTS)
            ps = -(-ps // MiB) * MiB
        return ps

    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if isinstance(src, bytes | bytearray | memoryview):
            return self._write_buffer(memoryview(src).cast("B"), algorithm, expected)
        if isinstance(src, str | os.PathLike):
            return self._write_path(os.fspath(src), algorithm, expected)
        return self._write_stream(src, algorithm, expected)

    @staticmethod
    def _check(digest: Digest, expected: Digest | None) -> None:
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")

    def _write_buffer(self, data: memoryview, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        digest = Digest.from_hex(algorithm, _core.digest_bytes(data, algorithm))
        self._check(digest, expected)
        key = self.layout.blob(digest)
        if self.t.head(key) is None:
            if len(data) <= self.t.options.multipart_threshold:
                self.put_small(key, data)
            else:
                self._upload_known(
                    key, lambda: self._stager(data, self._part_size_for(len(data)), algorithm), digest
                )
        return digest, len(data)

    def _upload_known(self, key: str, make_stager: Callable[[], Any], digest: Digest) -> tuple[Digest, int]:
        """Multipart upload of a re-readable source (file, buffer) to its digest key. If the
        server turns out to have stored other bytes than were sent (a server that checks part
        checksums only at Complete), the object was removed: send it again, up to max_attempts."""
        return self.t.run(
            f"upload {key}",
            lambda _: self.multipart(key, make_stager(), digest),
            retry_on=lambda e: isinstance(e, StoredCorrupted),
        )

    def put_small(self, key: str, data: bytes | memoryview, **kw: Any) -> dict[str, Any]:
        """Single PUT with Content-MD5. If the server stored other bytes than we sent (its ETag is
        not our MD5: a server that does not check Content-MD5, e.g. moto), remove them (guarded
        by that ETag) and send again."""
        body = bytes(data)  # botocore wants bytes (it may sign and re-send them on retry)
        md5 = _core.content_md5(body)
        md5_hex = base64.b64decode(md5).hex()

        def once(_: int) -> dict[str, Any]:
            resp = self.t.client.put_object(Bucket=self.t.bucket, Key=key, Body=body, ContentMD5=md5, **kw)
            got = bare(str(resp.get("ETag", "")))
            if self.t.options.verify_etags and _HEX32.match(got) and got != md5_hex:
                with contextlib.suppress(Exception):
                    self.t.client.delete_object(
                        Bucket=self.t.bucket, Key=key, IfMatch=self.caps.if_match(got)
                    )
                raise PartCorrupted(f"PUT {key}: server stored MD5 {got}, we sent {md5_hex}")
            return resp

        return self.t.run(f"PUT {key}", once)

    def _write_path(self, path: str, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        size = os.stat(path).st_size
        if expected is not None:
            head = self.t.head(self.layout.blob(expected))
            if head is not None and head["ContentLength"] == size:
                return expected, size  # already stored under the digest the caller vouches for
        if size <= self.t.options.multipart_threshold:
            with open(path, "rb") as f:
                data = f.read(size + 1)
            if len(data) != size:
                raise S3Error(f"{path} changed size while being read")
            return self._write_buffer(memoryview(data), algorithm, expected)
        part_size = self._part_size_for(size)
        if expected is None and self.caps.part_checksum == "signed":
            return self._write_path_signed(path, algorithm, part_size)
        if expected is None:
            # Hash first (Rust, GIL released, page cache): an existing blob is then not uploaded
            # at all, and a new one goes straight to its digest key (no staging copy).
            hexd, _ = _core.digest_file(path, algorithm)
            digest = Digest.from_hex(algorithm, hexd)
            if self.t.head(self.layout.blob(digest)) is not None:
                return digest, size
        else:
            digest = expected
        return self._upload_known(
            self.layout.blob(digest), lambda: self._stager(path, part_size, algorithm), digest
        )

    def _write_path_signed(self, path: str, algorithm: str, part_size: int) -> tuple[Digest, int]:
        """A file to a server that checks signed payloads, hashed once: one read gives the digest
        (to find the key; an existing blob is not uploaded) and every part's SHA-256 (the whole
        hash on one thread, the parts' on another). The parts are then sent as read, each signed
        with the SHA-256 computed with the digest; the server refuses a part whose bytes are not
        those (a file changed meanwhile: a clear error), so what is stored hashes to the digest
        without the stager hashing anything again."""
        hexd, size, sums = _core.digest_file_parts(path, algorithm, part_size, "sha256")
        digest = Digest.from_hex(algorithm, hexd)
        key = self.layout.blob(digest)
        if self.t.head(key) is not None:
            return digest, size

        def stager() -> Any:
            try:
                return _core.PartStager(path, part_size, algorithm, "sha256", (hexd, size, sums))
            except ValueError as e:
                raise SourceChanged(f"{path} changed while being uploaded: {e}") from None

        return self._upload_known(key, stager, digest)

    def _write_stream(self, src: BinaryIO, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        head = read_up_to(src, self.t.options.multipart_threshold + 1)
        if len(head) <= self.t.options.multipart_threshold:
            return self._write_buffer(memoryview(head), algorithm, expected)
        # Size unknown: stream_part_size, so that 10,000 parts reach far enough.
        stager = self._stager(Prepend(head, src), self.t.options.stream_part_size, algorithm)
        del head
        if expected is not None:
            if self.t.head(self.layout.blob(expected)) is not None:
                # Stored already; still consume and verify the stream so a wrong `expected` is
                # reported rather than silently accepted.
                digest, size = self._drain(stager)
                self._check(digest, expected)
                return digest, size
            return self.multipart(self.layout.blob(expected), stager, expected)
        staging = self.layout.new_upload()
        digest, size = self.multipart(staging, stager, None)
        try:
            final = self.layout.blob(digest)
            if self.t.head(final) is None:
                self.copy(staging, final, size)
        finally:
            with contextlib.suppress(Exception):
                self.t.call("delete_object", Key=staging)
        return digest, size

    def _stager(self, source: Any, part_size: int, algorithm: str) -> Any:
        mode = self.caps.part_checksum
        return _core.PartStager(source, part_size, algorithm, _STAGER_CHECKSUM.get(mode, mode))

    @staticmethod
    def _drain(stager: Any) -> tuple[Digest, int]:
        while stager.next_part() is not None:
            pass
        hexd, size, _ = stager.finish()
        return Digest.from_hex(stager.algorithm, hexd), size

    def multipart(self, key: str, stager: Any, expected: Digest | None) -> tuple[Digest, int]:
        """Upload the stager's parts to `key` from `concurrency` threads; complete only if the
        whole digest equals `expected` (when given). Aborts the upload on any failure."""
        mode = self.caps.part_checksum
        if _STAGER_CHECKSUM.get(mode, mode) != stager.checksum:
            raise ValueError(f"stager computes {stager.checksum} parts, part_checksum is {mode}")
        s3alg = _S3_CHECKSUM.get(mode)
        # The S3 checksum declared at Create and repeated at Complete: the part checksum itself,
        # or (md5 on a server that takes declared checksums) a CRC-32 sent beside Content-MD5.
        declared = s3alg or ("CRC32" if mode == "md5" and self.caps.md5_with_crc32 else None)
        extra = {"ChecksumAlgorithm": declared} if declared else {}
        mpu = self.t.call("create_multipart_upload", Key=key, **extra)
        upload_id = mpu["UploadId"]
        etags: dict[int, str] = {}
        sums: dict[int, str] = {}
        crcs: dict[int, str] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker() -> None:
            try:
                while True:
                    part = stager.next_part()
                    if part is None:
                        return
                    number, data, checksum = part
                    crc = _core.crc32_base64(data) if declared and not s3alg else None
                    etag = self._upload_part(key, upload_id, number, data, checksum, mode, crc)
                    del data, part
                    with lock:
                        etags[number] = etag
                        sums[number] = checksum
                        if crc is not None:
                            crcs[number] = crc
            except BaseException as e:
                stager.abort(f"{type(e).__name__}: {e}")
                with lock:
                    errors.append(e)

        try:
            threads = [
                threading.Thread(target=worker, name=f"clawstore-s3-part-{i}", daemon=True)
                for i in range(self.t.options.concurrency)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                # The first real error, not the "failed in another worker" echoes of it.
                primary = next((e for e in errors if not isinstance(e, RuntimeError)), errors[0])
                raise primary
            hexd, size, nparts = stager.finish()
            digest = Digest.from_hex(stager.algorithm, hexd)
            if expected is not None and digest != expected:
                raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")
            if len(etags) != nparts:
                raise S3Error(f"upload of {key}: {len(etags)} parts uploaded, {nparts} staged")
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            if declared:
                listed = sums if s3alg else crcs
                for p in parts:
                    p[f"Checksum{declared}"] = listed[p["PartNumber"]]
            resp = self._complete(key, upload_id, parts, size)
            in_order = [sums[n] for n in sorted(sums)]
            if s3alg:
                self._check_composite(key, resp, mode, in_order)
            elif mode == "md5":
                self._check_multipart_etag(key, resp.get("ETag", ""), [base64.b64decode(m) for m in in_order])
            return digest, size
        except BaseException as e:
            stager.abort(f"upload of {key} failed: {type(e).__name__}")  # stop workers still running
            with contextlib.suppress(Exception):
                self.t.call("abort_multipart_upload", Key=key, UploadId=upload_id)
            raise

    def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        data: bytes,
        checksum: str,
        mode: str = "md5",
        crc32: str | None = None,
    ) -> str:
        md5_hex = base64.b64decode(checksum).hex() if mode == "md5" else ""
        kw: dict[str, str]
        if mode == "md5":
            kw = {"ContentMD5": checksum}
        elif mode == "signed":  # the server checks the body against this signed hash
            kw = {PAYLOAD_PARAM: base64.b64decode(checksum).hex()}
        else:
            kw = {f"Checksum{_S3_CHECKSUM[mode]}": checksum}
        if crc32 is not None:
            kw["ChecksumCRC32"] = crc32

        def once(_: int) -> str:
            try:
                resp = self.t.client.upload_part(
                    Bucket=self.t.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, **kw
                )
            except Exception as e:
                # A refused signed part is damage on the way (sent again), unless its bytes are no
                # longer those hashed with the digest: the source changed meanwhile.
                if (
                    mode == "signed"
                    and is_error(e, *PAYLOAD_REFUSALS)
                    and _core.digest_bytes(data, "sha256") != kw[PAYLOAD_PARAM]
                ):
                    raise SourceChanged(
                        f"part {number} of {key}: the source changed while being uploaded (its bytes "
                        "no longer hash to what was computed with the digest)"
                    ) from e
                raise
            etag = str(resp["ETag"])
            got = bare(etag)
            if md5_hex and self.t.options.verify_etags and _HEX32.match(got) and got != md5_hex:
                raise PartCorrupted(f"part {number} of {key}: server has MD5 {got}, we sent {md5_hex}")
            return etag

        return self.t.run(f"UploadPart {key} #{number}", once)

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> dict[str, Any]:
        def once(attempt: int) -> dict[str, Any]:
            try:
                return dict(
                    self.t.client.complete_multipart_upload(
                        Bucket=self.t.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                )
            except Exception as e:
                if attempt > 1 and is_error(e, "NoSuchUpload", status_code=404):
                    # An earlier attempt completed but its response was lost.
                    head = self.t.head(key)
                    if head is not None and head["ContentLength"] == size:
                        return {"ETag": head.get("ETag", "")}
                raise

        return self.t.run(f"Complete {key}", once)

    def _stored_checksum(self, key: str, resp: dict[str, Any], s3alg: str) -> str | None:
        """The composite checksum the server reports for a just-completed object: from the
        Complete response, else from a HEAD with checksum mode on (pinned to the completed
        ETag). None when it reports none; "" when there is nothing to compare with: the server
        keeps a full-object checksum instead, or a concurrent writer of the same digest key
        completed after us (its own upload was verified)."""
        if resp.get("ChecksumType") == "FULL_OBJECT":
            return ""
        got = resp.get(f"Checksum{s3alg}")
        if got:
            return str(got)
        kw: dict[str, Any] = {"IfMatch": resp["ETag"]} if resp.get("ETag") else {}
        try:
            head = self.t.call("head_object", Key=key, ChecksumMode="ENABLED", **kw)
        except Exception as e:
            if precondition_failed(e):
                return ""
            raise
        if head.get("ChecksumType") == "FULL_OBJECT":
            return ""
        got = head.get(f"Checksum{s3alg}")
        return str(got) if got else None

    def _check_composite(self, key: str, resp: dict[str, Any], mode: str, sums: list[str]) -> None:
        """Compare the composite checksum the server computed over the bytes it stored with the
        one of the parts we sent: defence in depth (a server we send checksums to refuses a bad
        part before Complete). A mismatch removes the object; a server that reports no checksum
        at all does not support them, and part_checksum=md5 is what it needs."""
        got = self._stored_checksum(key, resp, _S3_CHECKSUM[mode])
        if got == "" or (got is None and self.caps.verifies_checksums):
            return  # (a server that verified every part but reports no composite: nothing to add)
        want = composite(mode, sums)
        if got is not None:
            value, _, count = got.partition("-")
            if value == want and (not count or int(count) == len(sums)):
                return
        with contextlib.suppress(Exception):
            guard = (
                {"IfMatch": self.caps.if_match(resp["ETag"])}
                if resp.get("ETag") and self.caps.conditional_delete
                else {}
            )
            self.t.call("delete_object", Key=key, **guard)
        if got is None:
            raise S3Error(
                f"{key}: the server reports no {mode} checksum for the completed upload: it does not "
                f"support S3 checksums, so the parts were not verified (removed); use part_checksum=md5"
            )
        raise StoredCorrupted(
            f"{key}: the server stored other bytes than were sent (composite {mode} {got}, "
            f"sent {want}-{len(sums)}); removed"
        )

    def _check_multipart_etag(self, key: str, etag: str, md5s: list[bytes]) -> None:
        m = _MULTI_ETAG.match(bare(etag))
        if not self.t.options.verify_etags or not m:
            return
        want = hashlib.md5(b"".join(md5s)).hexdigest()
        if m.group(1) != want or int(m.group(2)) != len(md5s):
            # The assembled object is not what we uploaded: remove it (it sits at a digest key).
            with contextlib.suppress(Exception):
                self.t.call("delete_object", Key=key, IfMatch=self.caps.if_match(etag))
            raise S3Error(f"{key}: completed ETag {bare(etag)} is not {want}-{len(md5s)}; removed")

    def copy(self, src: str, dst: str, size: int) -> None:
        """Server-side copy of a verified staging object to its digest key, pinned to the staged
        version by ETag. UploadPartCopy above the single-copy limit."""
        head = self.t.head(src)
        if head is None or head["ContentLength"] != size:
            raise S3Error(f"staging object {src} vanished or changed before copy")
        etag = head["ETag"]
        source = {"Bucket": self.t.bucket, "Key": src}
        if size <= self.max_single_copy:
            self.t.call("copy_object", Key=dst, CopySource=source, CopySourceIfMatch=etag)
            return
        ps = max(self._part_size_for(size), MIN_PART_SIZE)
        mpu = self.t.call("create_multipart_upload", Key=dst)
        upload_id = mpu["UploadId"]
        try:
            parts = []
            for i, start in enumerate(range(0, size, ps), start=1):
                end = min(size, start + ps) - 1
                r = self.t.call(
                    "upload_part_copy",
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=i,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                    CopySourceIfMatch=etag,
                )
                parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            self._complete(dst, upload_id, parts, size)
        except BaseException:
            with contextlib.suppress(Exception):
                self.t.call("abort_multipart_upload", Key=dst, UploadId=upload_id)
            raise

    #: Objects above this size are copied with UploadPartCopy (S3's CopyObject limit is 5 GiB).
    max_single_copy = MAX_SINGLE_COPY
