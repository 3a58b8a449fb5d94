"""S3 backend options: every tunable, parsed from the URL query or keywords, checked once."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from clawstore import _core
from clawstore.errors import ClawstoreError

MiB = 1 << 20
GiB = 1 << 30
#: S3 limits (defined once, in the Rust core that stages the parts).
MIN_PART_SIZE: int = _core.MIN_PART_SIZE
MAX_PARTS: int = _core.MAX_PARTS
#: CopyObject's limit: larger objects are copied with UploadPartCopy.
MAX_SINGLE_COPY = 5 * GiB
#: part_checksum values.
PART_CHECKSUMS = ("auto", "crc32", "md5", "sha256", "signed")


def parse_size(value: int | str) -> int:
    """``33554432``, ``"32MiB"``, ``"32M"``, ``"1GiB"`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {value!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class S3Options:
    """Tunables; each can be given in the URL query or as a keyword to `clawstore.open`."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Multipart part size (S3: >= 5 MiB; grown automatically to stay under 10,000 parts).
    #: 8 MiB like boto3 and the AWS CLI: the fastest choice measured against moto (whose cost per
    #: byte grows with the part size) and plenty for S3 (80 GB before parts must grow).
    part_size: int = 8 * MiB
    #: Parts (and ranged GETs) in flight per operation; memory is about concurrency x part_size.
    concurrency: int = 8
    #: Objects up to this size use a single PUT.
    multipart_threshold: int = 8 * MiB
    #: Part size for streams of unknown length (no growing it later): 32 MiB x 10,000 parts
    #: = 312 GiB at most; memory is about concurrency x this.
    stream_part_size: int = 32 * MiB
    #: Parallel ranged GETs when downloading to a path (1: one streamed GET).
    download_concurrency: int = 8
    #: Size of each ranged GET when downloading to a path.
    download_part_size: int = 32 * MiB
    #: Attempts per request (1 = no retry).
    max_attempts: int = 8
    retry_base: float = 0.1
    retry_cap: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: Compare part/object ETags with our MD5s (turn off only for servers with non-MD5 ETags).
    verify_etags: bool = True
    #: Per-part checksum the server verifies: "crc32" (x-amz-checksum-crc32, the AWS SDKs' default;
    #: nearly free to compute; AWS S3, MinIO, recent RGW), "md5" (Content-MD5, checked by most
    #: servers, and the returned ETags are checked against it too; ~0.7 GiB/s of client CPU),
    #: "sha256" (x-amz-checksum-sha256), "signed" (no checksum header: the part's SHA-256, from
    #: the Rust stager, is signed as the SigV4 payload hash, which S3, MinIO and RGW check before
    #: storing; ~0.85 s of client CPU per GiB against MD5's ~2, and the server hashes too) or
    #: "auto": crc32 if the open-time probe shows the server verifies it, else signed if it
    #: verifies signed payloads (RGW 16), else md5 (moto; md5 too when probe is off).
    part_checksum: str = "auto"
    #: Probe conditional-write support at open time.
    probe: bool = True
    #: Sign request payloads with SHA-256 (an extra hash pass in Python per part). Off by default:
    #: every body we send carries a checksum header (Content-MD5 or x-amz-checksum-*) that is
    #: itself signed, and what the server stored is checked against it (by the server, or by us
    #: through the returned MD5 ETags), so a changed body fails either way (the rule botocore
    #: applies over https). None: botocore's default (signed over http).
    payload_signing: bool | None = False
    addressing_style: str | None = None
    #: Keys per DeleteObjects request (GC's sweep): at most 1000 (S3's limit); lowered on its own
    #: for a server that refuses that many; 0: never DeleteObjects, single DELETEs.
    delete_batch: int = 1000

    @classmethod
    def build(cls, query: dict[str, str], options: dict[str, Any]) -> S3Options:
        known = {f.name: f for f in fields(cls)}
        merged: dict[str, Any] = {}
        for source in (query, options):
            for key, value in source.items():
                if key not in known:
                    raise ClawstoreError(f"unknown S3 option {key!r} (known: {', '.join(sorted(known))})")
                merged[key] = value
        out: dict[str, Any] = {}
        try:
            for key, value in merged.items():
                if value is None:
                    out[key] = None
                elif key in ("part_size", "multipart_threshold", "download_part_size", "stream_part_size"):
                    out[key] = parse_size(value)
                elif key in ("concurrency", "download_concurrency", "max_attempts", "delete_batch"):
                    out[key] = int(value)
                elif key in ("retry_base", "retry_cap", "connect_timeout", "read_timeout"):
                    out[key] = float(value)
                elif key in ("verify_etags", "probe", "payload_signing"):
                    out[key] = _parse_bool(value)
                else:
                    out[key] = str(value)
        except ValueError as e:
            raise ClawstoreError(f"bad S3 option: {e}") from None
        opts = cls(**out)
        if opts.download_part_size < MiB:
            raise ClawstoreError("download_part_size must be at least 1 MiB")
        if opts.part_size < MIN_PART_SIZE or opts.stream_part_size < MIN_PART_SIZE:
            raise ClawstoreError(
                f"part_size and stream_part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)"
            )
        if opts.part_checksum not in PART_CHECKSUMS:
            raise ClawstoreError(
                f"part_checksum must be one of {', '.join(PART_CHECKSUMS)}, not {opts.part_checksum!r}"
            )
        if not 0 <= opts.delete_batch <= 1000:
            raise ClawstoreError("delete_batch must be between 0 (single DELETEs) and 1000 (S3's limit)")
        if opts.concurrency < 1 or opts.download_concurrency < 1 or opts.max_attempts < 1:
            raise ClawstoreError("concurrency, download_concurrency and max_attempts must be >= 1")
        return opts
