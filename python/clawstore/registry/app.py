"""The ASGI application: `create_app(hub)`, and `from_env()` for uvicorn's factory mode (what
`clawstore serve` runs, one hub per process).

Routing is by hand below `/v2/` because repository names contain slashes; see `routes.match`.
`/token` issues registry tokens (see `clawstore.registry.auth`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawstore.errors import ClawstoreError, InvalidNameError, PermissionDeniedError
from clawstore.hub import Hub
from clawstore.names import validate_repository
from clawstore.registry.auth import CATALOG_SCOPE, Authenticator, Identity, parse_scopes
from clawstore.registry.errors import RegistryError
from clawstore.registry.routes import API_VERSION, Handlers, Match, match
from clawstore.registry.streams import run_blocking

log = logging.getLogger("clawstore.registry")

#: The environment variable `clawstore serve` passes the options in (JSON of RegistryOptions).
OPTIONS_ENV = "CLAWSTORE_REGISTRY_OPTIONS"


@dataclass
class RegistryOptions:
    store_url: str | None = None
    catalog_url: str | None = None
    create_catalog: bool = False
    #: `service` in challenges and tokens (the audience a token is for)
    service: str = "clawstore"
    #: token endpoint URL in challenges; default: `<the request's base URL>/token`
    realm: str | None = None
    token_ttl: float = 300.0
    upload_ttl: float = 3600.0
    #: blob GETs answered with a 307 to a presigned URL valid this long (None: streamed)
    blob_redirect: float | None = None
    #: an S3 store's capabilities as the parent's open-time probe found them (fields of
    #: S3Capabilities): workers open the store without probing the server again
    store_caps: dict[str, Any] | None = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> RegistryOptions:
        return cls(**json.loads(os.environ.get(OPTIONS_ENV, "{}")))


class Registry:
    def __init__(self, hub: Hub, options: RegistryOptions) -> None:
        self.hub = hub
        self.options = options
        hub.uploads.ttl = options.upload_ttl
        self.auth = Authenticator(hub, service=options.service, token_ttl=options.token_ttl)
        self.handlers = Handlers(hub, blob_redirect=options.blob_redirect)

    def realm(self, request: Request) -> str:
        if self.options.realm:
            return self.options.realm
        return str(request.base_url).rstrip("/") + "/token"

    def unauthorized(
        self,
        request: Request,
        scope: str | None,
        message: str,
        *,
        status: int = 401,
        insufficient_scope: bool = False,
    ) -> Response:
        """401 (or 403 insufficient_scope) with the Bearer challenge for `scope`. `message`
        must not be the code's default text: docker decodes such an error as a bare code and
        retries it (four times, 50 s) instead of reporting it."""
        error = "insufficient_scope" if status == 403 or insufficient_scope else None
        err = RegistryError(
            "UNAUTHORIZED" if status == 401 else "DENIED",
            message,
            status=status,
            headers={
                "WWW-Authenticate": self.auth.challenge(self.realm(request), scope, error),
                **API_VERSION,
            },
        )
        return err.response(head=request.method == "HEAD")

    async def v2(self, request: Request) -> Response:
        head = request.method == "HEAD"
        try:
            who = await self._identify(request)
        except RegistryError as e:
            return self.unauthorized(request, None, e.message)
        path = request.url.path[len("/v2/") :]
        try:
            if path == "":
                if not who.credentials and who.scopes is None:
                    return self.unauthorized(request, None, "authentication required")
                return JSONResponse({}, headers=API_VERSION)
            if path in ("_catalog", "_catalog/"):
                if not who.allows_catalog() or (not who.credentials and who.scopes is None):
                    return self.unauthorized(request, CATALOG_SCOPE, "authentication required")
                return self._headers(await self.handlers.catalog(request, who))
            m = match(path, request.method)
            if m is None:
                raise RegistryError("NAME_UNKNOWN", f"no such endpoint {request.url.path}", status=404)
            scope = f"repository:{m.repo}:{_scope_actions(m.action, request.method)}"
            if not who.allows(m.repo, m.action):
                # RFC 6750: a token without the scope is 403 insufficient_scope, with the
                # challenge for the scope needed (clients fetch a new token and retry). A token
                # issued to nobody (an anonymous client's) is 401: authenticating may help, and
                # clients say "authentication required" (docker push, not logged in).
                if not who.credentials:
                    return self.unauthorized(
                        request, scope, f"authentication required to {m.action} {m.repo}"
                    )
                return self.unauthorized(
                    request, scope, f"token does not allow {m.action} on {m.repo}", status=403
                )
            source = _mount_source(request, m)
            if source is not None and not who.allows(source, "pull"):
                # A mount reads the source: a scoped token must cover pulling it (as with
                # distribution). 401 with both scopes, so the client fetches a token for both
                # and retries (clients refetch on 401, not on 403); without it the mount would
                # quietly become an ordinary upload.
                return self.unauthorized(
                    request,
                    f"{scope} repository:{source}:pull",
                    f"token does not allow pull on {source}, the mount's source",
                    insufficient_scope=True,
                )
            handler = getattr(self.handlers, m.route)
            resp = await handler(request, who, m)
            return self._headers(resp)
        except RegistryError as e:
            if e.code == "DENIED" and not who.credentials:
                scope = None
                m2 = None
                with suppress(RegistryError):
                    m2 = match(path, request.method)
                if m2 is not None:
                    scope = f"repository:{m2.repo}:{_scope_actions(m2.action, request.method)}"
                return self.unauthorized(request, scope, e.message)
            e.headers.update(API_VERSION)
            return e.response(head=head)
        except Exception:
            # A failure of ours (a catalog or store error no handler translated): log it with
            # its traceback and answer 500 UNKNOWN. Left to uvicorn, it would send a bare 500
            # and close the connection with the client's body unread, which the client sees as
            # "connection reset by peer" instead of an error it can report or retry.
            log.exception("%s %s failed", request.method, request.url.path)
            err = RegistryError("UNKNOWN", "internal server error (see the server log)", headers=API_VERSION)
            return err.response(head=head)

    @staticmethod
    def _headers(resp: Response) -> Response:
        for k, v in API_VERSION.items():
            resp.headers[k] = v
        return resp

    async def _identify(self, request: Request) -> Identity:
        authorization = request.headers.get("authorization")
        if self.auth.is_local(authorization):  # no catalog trip: no worker thread
            return self.auth.identify(authorization)
        return await run_blocking(self.auth.identify, authorization)

    async def token(self, request: Request) -> Response:
        """GET (docker token protocol) or POST (OAuth2 password / refresh_token grant)."""
        authorization = request.headers.get("authorization")
        scopes_text = request.query_params.getlist("scope")
        oauth = request.method == "POST"
        if oauth:
            # OAuth2 token requests are application/x-www-form-urlencoded (RFC 6749 4.3.2)
            raw = await request.body()
            form = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
            grant = form.get("grant_type")
            secret = form.get("password") if grant == "password" else form.get("refresh_token")
            if grant not in ("password", "refresh_token") or not isinstance(secret, str):
                return RegistryError("UNSUPPORTED", "unsupported grant_type", status=400).response()
            authorization = f"Bearer {secret}"
            scope_field = form.get("scope")
            scopes_text = [scope_field] if isinstance(scope_field, str) else []
        try:
            who = (
                await self._identify(request)
                if not oauth
                else await run_blocking(self.auth.identify, authorization)
            )
            scopes = parse_scopes(scopes_text)
            token, ttl, _access = await run_blocking(self.auth.issue, who, scopes)
        except RegistryError as e:
            if e.code == "UNAUTHORIZED":
                return self.unauthorized(request, None, e.message)
            return e.response()
        except PermissionDeniedError as e:
            return self.unauthorized(request, None, str(e))
        except ClawstoreError as e:
            return RegistryError("UNSUPPORTED", str(e), status=400).response()
        body: dict[str, Any] = {"token": token, "access_token": token, "expires_in": ttl}
        if oauth:
            body["token_type"] = "Bearer"
            body["scope"] = " ".join(str(s) for s in scopes)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _scope_actions(action: str, method: str) -> str:
    """The actions a challenge asks for. Every DELETE (an upload's cancel needs push, a blob or
    manifest delete needs delete) asks for all three: clients that keep one token per
    repository and method, as the OCI conformance suite does, reuse one for the other. A token
    carries only what is granted."""
    if method == "DELETE":
        return "delete,pull,push"
    return "pull,push" if action == "push" else action


def _mount_source(request: Request, m: Match) -> str | None:
    """The repository a cross-repository mount (`POST .../blobs/uploads/?mount=&from=`) reads,
    when it is a valid name (an invalid one mounts nothing: the handler starts an upload)."""
    if m.route != "uploads" or request.method != "POST":
        return None
    q = request.query_params
    source = q.get("from")
    if not q.get("mount") or not source:
        return None
    try:
        return validate_repository(source)
    except InvalidNameError:
        return None


def create_app(hub: Hub, options: RegistryOptions | None = None, *, close_hub: bool = False) -> Starlette:
    """The registry over `hub`; `close_hub`: close it when the application shuts down."""
    reg = Registry(hub, options or RegistryOptions())

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_hub:
                hub.close()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(
        routes=[
            Route("/v2", reg.v2, methods=methods),
            Route("/v2/{rest:path}", reg.v2, methods=methods),
            Route("/token", reg.token, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.registry = reg
    return app


def from_env() -> Starlette:
    """uvicorn factory: the options `clawstore serve` put in $CLAWSTORE_REGISTRY_OPTIONS."""
    import clawstore

    o = RegistryOptions.from_env()
    extra: dict[str, Any] = {}
    if o.store_caps is not None:
        from clawstore.backends.s3.probe import S3Capabilities

        extra["caps"] = S3Capabilities(**o.store_caps)
    hub = Hub(clawstore.open(o.store_url, **extra), o.catalog_url, create_catalog=o.create_catalog)
    return create_app(hub, o, close_hub=True)


__all__ = ["OPTIONS_ENV", "Registry", "RegistryOptions", "create_app", "from_env"]
