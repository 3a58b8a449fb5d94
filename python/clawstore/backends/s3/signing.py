"""Signing a part's payload with a SHA-256 computed by the Rust stager (``part_checksum=signed``).

SigV4 puts the hex SHA-256 of the body in ``x-amz-content-sha256`` and signs it; a server that
checks it (AWS S3, MinIO, Ceph RGW) refuses a body that does not hash to it
(``XAmzContentSHA256Mismatch``) before storing anything, so a signed part needs no Content-MD5:
that saves the client an MD5 of every byte (about 2.3x the cost of a SHA-256 with SHA extensions).

botocore would hash the body again in Python to sign it; instead, `upload_part` gets
``PayloadSHA256=<hex>`` (taken out of the parameters before validation, kept in the request
context) and the signer picked for that request (`PresetPayloadS3SigV4Auth`) signs that value.
Requests without it are signed as before (UNSIGNED-PAYLOAD, or botocore's own hash).
"""

from __future__ import annotations

from typing import Any

#: The upload_part keyword carrying the precomputed hex SHA-256 of the body.
PAYLOAD_PARAM = "PayloadSHA256"
#: Where it travels in the request context.
_CONTEXT_KEY = "clawstore_payload_sha256"
#: The signature version name registered with botocore for such requests.
SIGNER = "clawstore-s3v4"


def _signer_class() -> type:
    from botocore.auth import S3SigV4Auth

    class PresetPayloadS3SigV4Auth(S3SigV4Auth):  # type: ignore[misc]
        """S3 SigV4 that signs a precomputed payload SHA-256 when the request carries one."""

        def payload(self, request: Any) -> str:
            preset = request.context.get(_CONTEXT_KEY)
            if preset is not None:
                return str(preset)
            return str(super().payload(request))

    return PresetPayloadS3SigV4Auth


def _take_param(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    value = params.pop(PAYLOAD_PARAM, None)
    if value is not None:
        context[_CONTEXT_KEY] = value


def _choose_signer(context: dict[str, Any], signing_name: str, signature_version: str, **kw: Any) -> Any:
    if _CONTEXT_KEY not in context:
        return None
    from botocore.handlers import set_operation_specific_signer

    chosen = set_operation_specific_signer(context=context, signing_name=signing_name, **kw)
    version = chosen if chosen is not None else signature_version
    if version != "s3v4":
        from .transport import S3ConfigurationError

        raise S3ConfigurationError(
            f"part_checksum=signed needs SigV4 (s3v4) signing, but this request is signed with "
            f"{version!r}; use part_checksum=md5 or crc32"
        )
    return SIGNER


def install(client: Any) -> None:
    """Let `client.upload_part` take ``PayloadSHA256=<hex>`` and sign it as the body's hash."""
    import botocore.auth

    botocore.auth.AUTH_TYPE_MAPS.setdefault(SIGNER, _signer_class())
    events = client.meta.events
    events.register("before-parameter-build.s3.UploadPart", _take_param, unique_id=_CONTEXT_KEY)
    events.register("choose-signer.s3.UploadPart", _choose_signer, unique_id=SIGNER)
