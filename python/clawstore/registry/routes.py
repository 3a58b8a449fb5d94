"""The Distribution spec v1.1 endpoints, each a thin translation of HTTP to a `Hub` call.

Every handler names the repository and the action it needs (`Need`), so that the caller's
token scopes are checked before anything runs and a refusal gets the right challenge; the hub
then checks the grants again and decides what is linked to what. Nothing here knows where the
bytes live.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from clawstore import mediatypes as mt
from clawstore.digest import Digest
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidNameError,
    RefNotFoundError,
)
from clawstore.hub import Hub
from clawstore.manifest import MAX_MANIFEST_SIZE, parse_manifest
from clawstore.names import validate_repository, validate_tag
from clawstore.registry.auth import Identity
from clawstore.registry.errors import RegistryError, translate
from clawstore.registry.pagination import paginate
from clawstore.registry.streams import body_file, read_limited, run_blocking, send_reader
from clawstore.types import ANY, MISSING

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
#: Blobs up to this size are read and verified whole before the response starts.
SMALL_BLOB = 256 * 1024

_ROUTES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<name>.+)/tags/list$"), "tags"),
    (re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)$"), "manifest"),
    (re.compile(r"^(?P<name>.+)/blobs/uploads/?$"), "uploads"),
    (re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<id>[^/]+)$"), "upload"),
    (re.compile(r"^(?P<name>.+)/blobs/(?P<digest>[^/]+)$"), "blob"),
    (re.compile(r"^(?P<name>.+)/referrers/(?P<digest>[^/]+)$"), "referrers"),
]

#: Which action each (route, method) needs on the repository.
_ACTION = {
    ("tags", "GET"): "pull",
    ("manifest", "GET"): "pull",
    ("manifest", "HEAD"): "pull",
    ("manifest", "PUT"): "push",
    ("manifest", "DELETE"): "delete",
    ("uploads", "POST"): "push",
    # An upload's status is asked with the token the client pulls with (the OCI conformance
    # suite keeps one token per repository for GET and HEAD); the hub still checks the push
    # grant and that the upload is the caller's own.
    ("upload", "GET"): "pull",
    ("upload", "PATCH"): "push",
    ("upload", "PUT"): "push",
    ("upload", "DELETE"): "push",
    ("blob", "GET"): "pull",
    ("blob", "HEAD"): "pull",
    ("blob", "DELETE"): "delete",
    ("referrers", "GET"): "pull",
}


@dataclass(frozen=True)
class Match:
    route: str
    repo: str
    params: dict[str, str]
    action: str


def match(path: str, method: str) -> Match | None:
    """Route `path` (below /v2/). RegistryError NAME_INVALID for a malformed repository name,
    UNSUPPORTED for a method the route does not take; None if no route matches."""
    for pattern, route in _ROUTES:
        m = pattern.match(path)
        if m is None:
            continue
        params = m.groupdict()
        name = params.pop("name")
        try:
            validate_repository(name)
        except InvalidNameError as e:
            raise RegistryError("NAME_INVALID", str(e)) from None
        action = _ACTION.get((route, "GET" if method == "HEAD" and route != "manifest" else method))
        if route == "blob" and method == "HEAD":
            action = "pull"
        if action is None:
            raise RegistryError("UNSUPPORTED", f"{method} not allowed here", status=405)
        return Match(route, name, params, action)
    return None


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigestError as e:
        raise RegistryError("DIGEST_INVALID", str(e)) from None


def _upload_headers(repo: str, upload_id: str, offset: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{repo}/blobs/uploads/{quote(upload_id)}",
        "Range": f"0-{max(offset - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
        "OCI-Chunk-Min-Length": "0",
    }


def _content_range(header: str | None) -> tuple[int, int] | None:
    if not header:
        return None
    m = re.fullmatch(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})(?:/\d{1,19}|/\*)?", header.strip())
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise RegistryError("BLOB_UPLOAD_INVALID", f"malformed Content-Range {header!r}", status=416)
    return int(m.group(1)), int(m.group(2))


def _content_length(request: Request) -> int | None:
    v = request.headers.get("content-length")
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise RegistryError("SIZE_INVALID", f"bad Content-Length {v!r}") from None
    if n < 0:
        raise RegistryError("SIZE_INVALID", f"bad Content-Length {v!r}")
    return n


def _has_body(request: Request) -> bool:
    n = _content_length(request)
    if n is not None:
        return n > 0
    return "chunked" in request.headers.get("transfer-encoding", "").lower()


class Handlers:
    """The endpoints over one hub. Every method takes the request, the caller and the match,
    runs the hub in worker threads, and returns a response or raises RegistryError."""

    def __init__(self, hub: Hub, *, blob_redirect: float | None = None) -> None:
        self.hub = hub
        self.blob_redirect = blob_redirect

    async def call(self, fn: Any, *args: Any, what: str = "blob") -> Any:
        try:
            return await run_blocking(fn, *args)
        except ClawstoreError as e:
            raise translate(e, what=what) from None

    # -- blobs -------------------------------------------------------------------------------
    async def blob(self, request: Request, who: Identity, m: Match) -> Response:
        d = _digest(m.params["digest"])
        p = who.principal
        if request.method == "DELETE":
            await self.call(self.hub.unlink_blob, p, m.repo, d)
            return Response(status_code=202, headers={"Docker-Content-Digest": d})
        rng = request.headers.get("range")
        if request.method == "GET" and self.blob_redirect is not None:
            # The client reads the backend directly (a Range header goes along: S3 honours it)
            # and checks the digest itself, as with distribution's redirecting storage drivers.
            url = await self.call(self.hub.blob_url, p, m.repo, d, self.blob_redirect)
            if url is not None:
                headers = {"Location": url, "Docker-Content-Digest": d, "Cache-Control": "no-store"}
                return Response(status_code=307, headers=headers)
        if request.method == "GET" and not rng:
            return await self._whole_blob(p, m.repo, d)
        size: int = await self.call(self.hub.stat_blob, p, m.repo, d)
        headers = self._blob_headers(d)
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(size)})
        span = self._range(rng or "", size)
        if span is None:
            return await self._whole_blob(p, m.repo, d)
        start, end = span
        length = end - start + 1
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(length)})

        async def part() -> Any:
            off = start
            while off <= end:
                n = min(1 << 20, end + 1 - off)
                data = await self.call(self.hub.read_blob_range, p, m.repo, d, off, n)
                if not data:
                    break
                off += len(data)
                yield data

        return StreamingResponse(part(), status_code=206, headers=headers)

    async def _whole_blob(self, p: Any, repo: str, d: Digest) -> Response:
        """200 with the whole blob, verified as it streams. One hub call: the verifying reader
        knows the size. A small blob is read (and verified) whole in the same worker thread:
        one trip instead of three."""
        reader, body = await self.call(self._open_blob, p, repo, d)
        if body is not None:
            return Response(body, status_code=200, headers=self._blob_headers(d))
        return StreamingResponse(
            send_reader(reader, reader.size),
            status_code=200,
            headers={**self._blob_headers(d), "Content-Length": str(reader.size)},
        )

    def _open_blob(self, p: Any, repo: str, d: Digest) -> tuple[Any, bytes | None]:
        reader = self.hub.get_blob(p, repo, d)
        if reader.size is not None and reader.size <= SMALL_BLOB:
            with reader:
                try:
                    return reader, reader.read()
                except DigestMismatchError as e:  # the store's copy is damaged: our fault, not the client's
                    raise RegistryError("BLOB_UNKNOWN", f"stored blob is damaged: {e}", status=500) from None
        return reader, None

    @staticmethod
    def _blob_headers(d: Digest) -> dict[str, str]:
        return {
            "Docker-Content-Digest": d,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{d}"',
            "Cache-Control": "max-age=31536000",
        }

    @staticmethod
    def _range(header: str, size: int) -> tuple[int, int] | None:
        """The byte span a `Range` header asks of a blob of `size` bytes (RFC 9110 §14), or None
        when the header is to be ignored and the whole blob served: another unit, several
        ranges (no multipart/byteranges here), or a suffix range of an empty blob (satisfiable,
        but a 206 cannot say zero bytes). A range starting at or past the end, a zero-length
        suffix, or one whose last byte is before its first is 416 with `Content-Range: bytes
        */size` (the last: RFC 9110 would ignore it; Go's net/http, so distribution, and the OCI
        conformance suite answer 416)."""
        m = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", header.strip())
        if m is None or (not m.group(1) and not m.group(2)):
            return None
        bad = RegistryError(
            "SIZE_INVALID",
            f"unsatisfiable range {header!r}",
            status=416,
            headers={"Content-Range": f"bytes */{size}"},
        )
        if not m.group(1):  # the last N bytes
            n = int(m.group(2))
            if n == 0:
                raise bad
            if size == 0:
                return None
            return max(size - n, 0), size - 1
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else None
        if start >= size or (end is not None and end < start):
            raise bad
        return start, size - 1 if end is None else min(end, size - 1)

    # -- uploads -----------------------------------------------------------------------------
    async def uploads(self, request: Request, who: Identity, m: Match) -> Response:
        """POST: start a session; with `digest=`, a monolithic upload; with `mount=`, a
        cross-repository mount (falling back to a session when it cannot be mounted)."""
        q = request.query_params
        p = who.principal
        mount = q.get("mount")
        if mount is not None:
            d = _digest(mount)
            source = q.get("from")
            # (A registry token without pull on the source was answered 401 before this
            # handler: app.py asks for both scopes. The hub checks the grants.)
            if source:
                try:
                    await run_blocking(self.hub.mount_blob, p, m.repo, d, source)
                except ClawstoreError:
                    pass  # not mountable for this caller: an ordinary upload session instead
                else:
                    return Response(
                        status_code=201,
                        headers={"Location": f"/v2/{m.repo}/blobs/{d}", "Docker-Content-Digest": d},
                    )
        digest = q.get("digest")
        if digest is not None:
            d = _digest(digest)
            st = await self.call(self.hub.start_upload, p, m.repo)
            try:
                desc = await self.call(
                    self.hub.finish_upload, p, m.repo, st.id, d, body_file(request), what="upload"
                )
            except RegistryError:
                await run_blocking(self._cancel_quietly, p, m.repo, st.id)
                raise
            return Response(
                status_code=201,
                headers={
                    "Location": f"/v2/{m.repo}/blobs/{desc.digest}",
                    "Docker-Content-Digest": desc.digest,
                },
            )
        st = await self.call(self.hub.start_upload, p, m.repo)
        if _has_body(request):  # a POST carrying the first chunk
            st = await self.call(self.hub.upload_chunk, p, m.repo, st.id, body_file(request), what="upload")
        return Response(status_code=202, headers=_upload_headers(m.repo, st.id, st.offset))

    def _cancel_quietly(self, p: Any, repo: str, upload_id: str) -> None:
        with contextlib.suppress(ClawstoreError):
            self.hub.cancel_upload(p, repo, upload_id)

    async def upload(self, request: Request, who: Identity, m: Match) -> Response:
        p = who.principal
        uid = m.params["id"]
        if request.method in ("GET", "HEAD"):  # status: needs pull in a token (the hub: push)
            st = await self.call(self.hub.upload_status, p, m.repo, uid, what="upload")
            return Response(status_code=204, headers=_upload_headers(m.repo, st.id, st.offset))
        if request.method == "DELETE":
            await self.call(self.hub.cancel_upload, p, m.repo, uid, what="upload")
            return Response(status_code=204)
        if request.method == "PATCH":
            rng = _content_range(request.headers.get("content-range"))
            start = None
            if rng is not None:
                start = rng[0]
                n = _content_length(request)
                if n is not None and n != rng[1] - rng[0] + 1:
                    raise RegistryError(
                        "BLOB_UPLOAD_INVALID",
                        f"Content-Range {rng[0]}-{rng[1]} does not match Content-Length {n}",
                        status=416,
                    )
            st = await self.call(
                self.hub.upload_chunk, p, m.repo, uid, body_file(request), start, what="upload"
            )
            return Response(status_code=202, headers=_upload_headers(m.repo, st.id, st.offset))
        if request.method != "PUT":  # (match() routes nothing else here: say so, not finish)
            raise RegistryError("UNSUPPORTED", f"{request.method} not allowed here", status=405)
        # PUT ?digest=: the last chunk (if any) and the end of the upload
        digest = request.query_params.get("digest")
        if digest is None:
            raise RegistryError("DIGEST_INVALID", "PUT of an upload needs ?digest=")
        d = _digest(digest)
        rng = _content_range(request.headers.get("content-range"))
        src = body_file(request) if _has_body(request) else None
        if rng is not None and src is not None:
            st = await self.call(self.hub.upload_status, p, m.repo, uid, what="upload")
            if rng[0] != st.offset:
                raise translate_range(st.offset, rng[0])
        desc = await self.call(self.hub.finish_upload, p, m.repo, uid, d, src, what="upload")
        return Response(
            status_code=201,
            headers={"Location": f"/v2/{m.repo}/blobs/{desc.digest}", "Docker-Content-Digest": desc.digest},
        )

    # -- manifests ---------------------------------------------------------------------------
    def _reference(self, ref: str, method: str) -> tuple[str | None, Digest | None]:
        if ":" in ref:
            return None, _digest(ref)
        try:
            return validate_tag(ref), None
        except InvalidNameError as e:
            if method == "PUT":
                raise RegistryError("MANIFEST_INVALID", str(e)) from None
            raise RegistryError("MANIFEST_UNKNOWN", str(e)) from None

    async def manifest(self, request: Request, who: Identity, m: Match) -> Response:
        p = who.principal
        tag, digest = self._reference(m.params["ref"], request.method)
        if request.method == "PUT":
            return await self._put_manifest(request, who, m, tag, digest)
        if request.method == "DELETE":
            if tag is not None:
                await self.call(self.hub.untag, p, m.repo, tag, what="manifest")
            else:
                await self.call(self.hub.delete_manifest, p, m.repo, digest, what="manifest")
            return Response(status_code=202)
        if digest is None:
            digest = await self.call(self.hub.resolve, p, m.repo, tag, what="manifest")
        data: bytes = await self.call(self.hub.get_manifest, p, m.repo, digest, what="manifest")
        headers = {
            "Docker-Content-Digest": digest,
            "Content-Type": _media_type(data),
            "ETag": f'"{digest}"',
            "Content-Length": str(len(data)),
        }
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return Response(data, status_code=200, headers=headers)

    async def _put_manifest(
        self, request: Request, who: Identity, m: Match, tag: str | None, digest: Digest | None
    ) -> Response:
        p = who.principal
        n = _content_length(request)
        if n is not None and n > MAX_MANIFEST_SIZE:
            raise RegistryError(
                "MANIFEST_INVALID", f"manifest is {n} bytes, over the {MAX_MANIFEST_SIZE} limit", status=413
            )
        data = await read_limited(request, MAX_MANIFEST_SIZE)
        if data is None:
            raise RegistryError(
                "MANIFEST_INVALID", f"manifest is over the {MAX_MANIFEST_SIZE} byte limit", status=413
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip() or None
        if content_type is not None and content_type not in mt.MANIFEST_TYPES:
            content_type = None  # e.g. application/json: the manifest's own mediaType decides
        expect = self._tag_expectation(request, tag)
        if tag is not None and expect is not ANY:
            await self.call(self._check_expectation, p, m.repo, tag, expect, what="manifest")

        # PUT by digest with ?tag=a&tag=b (distribution-spec 1.1.1): tag it in the same push.
        extra_tags = request.query_params.getlist("tag") if digest is not None else []
        for t in extra_tags:
            try:
                validate_tag(t)
            except InvalidNameError as e:
                raise RegistryError("MANIFEST_INVALID", str(e)) from None

        def put() -> tuple[Any, Any]:
            manifest = parse_manifest(data, content_type)
            with self.hub.session(p, m.repo, kind="registry-push") as s:
                desc = s.put_manifest(data, content_type, expected=digest)
                if tag is not None:
                    s.tag(m.repo, tag, desc.digest, expect)
                for t in extra_tags:
                    s.tag(m.repo, t, desc.digest)
            return desc, manifest

        desc, manifest = await self.call(put, what="manifest")
        headers = {
            "Location": f"/v2/{m.repo}/manifests/{desc.digest}",
            "Docker-Content-Digest": desc.digest,
        }
        if extra_tags:
            headers["OCI-Tag"] = ", ".join(extra_tags)
        if manifest.subject is not None:
            headers["OCI-Subject"] = manifest.subject.digest
        return Response(status_code=201, headers=headers)

    @staticmethod
    def _tag_expectation(request: Request, tag: str | None) -> Any:
        """`If-None-Match: *`: create only; `If-Match: "<digest>"`: only if the tag points at
        it now (compare-and-swap)."""
        inm = request.headers.get("if-none-match")
        im = request.headers.get("if-match")
        if (inm or im) and tag is None:
            raise RegistryError("UNSUPPORTED", "If-Match / If-None-Match need a tag reference", status=400)
        if inm is not None:
            if inm.strip() != "*":
                raise RegistryError("UNSUPPORTED", "only If-None-Match: * is supported", status=400)
            return MISSING
        if im is not None:
            value = im.strip()
            if value.startswith("W/"):
                value = value[2:]
            return _digest(value.strip('"'))
        return ANY

    def _check_expectation(self, p: Any, repo: str, tag: str, expect: Any) -> None:
        from clawstore.errors import TagConflictError

        try:
            current = self.hub.resolve(p, repo, tag)
        except RefNotFoundError:
            current = None
        if expect is MISSING and current is not None:
            raise TagConflictError(f"{repo}:{tag} exists (points at {current})")
        if expect is not MISSING and current != expect:
            raise TagConflictError(f"{repo}:{tag} points at {current}, not {expect}")

    # -- listing -----------------------------------------------------------------------------
    async def tags(self, request: Request, who: Identity, m: Match) -> Response:
        names = await self.call(self.hub.list_tags, who.principal, m.repo, what="manifest")
        if not names and not await self.call(self.hub.has_repository, who.principal, m.repo):
            raise RegistryError("NAME_UNKNOWN", f"repository {m.repo} not known")
        page, headers = paginate(names, request, f"/v2/{m.repo}/tags/list")
        return JSONResponse({"name": m.repo, "tags": page}, headers=headers)

    async def catalog(self, request: Request, who: Identity) -> Response:
        names = await self.call(self.hub.list_repos, who.principal)
        page, headers = paginate(names, request, "/v2/_catalog")
        return JSONResponse({"repositories": page}, headers=headers)

    async def referrers(self, request: Request, who: Identity, m: Match) -> Response:
        d = _digest(m.params["digest"])
        want = request.query_params.get("artifactType")

        def collect() -> list[dict[str, Any]]:
            out = []
            for row in self.hub.referrers(who.principal, m.repo, d):
                try:
                    data = self.hub.get_manifest(who.principal, m.repo, row["digest"])
                except ClawstoreError:
                    continue
                obj = json.loads(data)
                artifact_type = obj.get("artifactType") or (obj.get("config") or {}).get("mediaType")
                desc: dict[str, Any] = {
                    "mediaType": obj.get("mediaType") or row["media_type"],
                    "digest": row["digest"],
                    "size": len(data),
                }
                if artifact_type:
                    desc["artifactType"] = artifact_type
                if obj.get("annotations"):
                    desc["annotations"] = obj["annotations"]
                out.append(desc)
            return sorted(out, key=lambda x: x["digest"])

        descs = await self.call(collect, what="manifest")
        headers = {"Content-Type": mt.OCI_INDEX}
        if want is not None:
            descs = [x for x in descs if x.get("artifactType") == want]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": descs}
        return Response(json.dumps(body).encode(), status_code=200, headers=headers, media_type=mt.OCI_INDEX)


def translate_range(offset: int, start: int) -> RegistryError:
    return RegistryError(
        "BLOB_UPLOAD_INVALID",
        f"chunk starts at {start}, the upload is at {offset}",
        status=416,
        headers={"Range": f"0-{max(offset - 1, 0)}"},
    )


def _media_type(data: bytes) -> str:
    try:
        obj = json.loads(data)
    except ValueError:
        return mt.OCI_MANIFEST
    declared = obj.get("mediaType") if isinstance(obj, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    return mt.OCI_INDEX if isinstance(obj, dict) and "manifests" in obj else mt.OCI_MANIFEST


__all__ = ["API_VERSION", "Handlers", "Match", "match"]
