"""The Distribution spec's error responses: `{"errors": [{"code", "message", "detail"}]}` with
the status each code goes with, and the mapping from clawstore's errors to them."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidManifestError,
    InvalidNameError,
    LeaseConflictError,
    ManifestNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RefNotFoundError,
    TagConflictError,
    UploadNotFoundError,
    UploadRangeError,
)

#: code -> HTTP status (OCI distribution-spec v1.1, "Error Codes"; TAG_CONFLICT is ours: a
#: manifest PUT whose If-Match / If-None-Match no longer holds). A range that cannot be served
#: or appended is 416 with the spec's code (BLOB_UPLOAD_INVALID for an upload, as distribution
#: answers; SIZE_INVALID for a blob GET), so clients that know only the spec's codes parse it.
STATUS: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "TAG_CONFLICT": 412,
    # distribution's errcode.ErrorCodeUnknown: the server failed, not the request
    "UNKNOWN": 500,
}


class RegistryError(Exception):
    """An error response: spec `code`, HTTP `status` (default: the code's), extra headers."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS[code]
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self, *, head: bool = False) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        resp = JSONResponse({"errors": [body]}, status_code=self.status, headers=self.headers)
        if head:  # a HEAD answer has the headers only
            resp.body = b""
        return resp


def translate(e: ClawstoreError, *, what: str = "blob") -> RegistryError:
    """The registry error for a clawstore error. `what`: "blob", "manifest" or "upload", which
    says what a not-found means."""
    msg = str(e)
    if isinstance(e, UploadRangeError):
        end = max(e.offset - 1, 0)
        return RegistryError("BLOB_UPLOAD_INVALID", msg, status=416, headers={"Range": f"0-{end}"})
    if isinstance(e, UploadNotFoundError | LeaseConflictError):
        return RegistryError("BLOB_UPLOAD_UNKNOWN", msg)
    if isinstance(e, BlobNotFoundError):
        return RegistryError("BLOB_UNKNOWN", msg)
    if isinstance(e, ManifestNotFoundError | RefNotFoundError):
        return RegistryError("MANIFEST_UNKNOWN", msg)
    if isinstance(e, NotFoundError):
        code = {"manifest": "MANIFEST_UNKNOWN", "upload": "BLOB_UPLOAD_UNKNOWN"}.get(what, "BLOB_UNKNOWN")
        return RegistryError(code, msg)
    if isinstance(e, InvalidDigestError | DigestMismatchError):
        return RegistryError("DIGEST_INVALID", msg)
    if isinstance(e, InvalidNameError):
        return RegistryError("NAME_INVALID", msg)
    if isinstance(e, InvalidManifestError):
        if "references missing" in msg:
            return RegistryError("MANIFEST_BLOB_UNKNOWN", msg)
        return RegistryError("MANIFEST_INVALID", msg)
    if isinstance(e, TagConflictError):
        return RegistryError("TAG_CONFLICT", msg)
    if isinstance(e, PermissionDeniedError):
        return RegistryError("DENIED", msg)
    return RegistryError("UNKNOWN", msg)


__all__ = ["STATUS", "RegistryError", "translate"]
