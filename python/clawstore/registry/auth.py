"""Who is calling, and what a request may do: the registry's side of the hub's tokens and grants.

Credentials a request may carry:
- none: the anonymous principal, which may do what the hub grants to `anonymous`
  (`clawstore grant add anonymous pull 'public/**'`; no grant, no anonymous access);
- `Basic` with a hub token (`cst_...`) as the password (the user name is not checked);
- `Bearer` with a hub token itself, or with a token from this registry's `/token` endpoint: a
  short-lived JWT (HS256, signed by a key kept in the catalog, so every `serve` process on it
  accepts every other's tokens) naming the principal, its hub token id (revocation stays
  immediate: the hub re-checks it on every call) and the scopes granted, each a repository and
  the actions the principal's grants allow on it.

A request outside its token's scopes, or refused to an anonymous caller, gets `401` with the
challenge clients follow: `WWW-Authenticate: Bearer realm="<base>/token",service="...",
scope="repository:NAME:pull,push"`. A refusal to an authenticated caller is `403 DENIED`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from clawstore.errors import PermissionDeniedError
from clawstore.hub import Hub, Principal
from clawstore.names import validate_repository
from clawstore.registry.errors import RegistryError

SIGNING_KEY_SETTING = "registry.token_signing_key"
ISSUER = "clawstore"
REPO_ACTIONS = ("pull", "push", "delete")
CATALOG_SCOPE = "registry:catalog:*"


@dataclass(frozen=True, slots=True)
class Scope:
    """`repository:NAME:ACTIONS` (or `registry:catalog:*`)."""

    type: str
    name: str
    actions: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Scope:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not name:
            raise RegistryError("UNSUPPORTED", f"malformed scope {text!r}", status=400)
        acts = {a for a in actions.split(",") if a}
        if "*" in acts:
            acts = (acts - {"*"}) | set(REPO_ACTIONS)
        return cls(kind.split("(")[0], name, frozenset(acts))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"


@dataclass(frozen=True)
class Identity:
    """The caller: a hub principal, and for a registry token the scopes it carries (None: any,
    the hub's grants decide)."""

    principal: Principal
    scopes: dict[tuple[str, str], frozenset[str]] | None = None
    credentials: bool = False  # the request carried credentials (else: anonymous)
    extra: dict[str, Any] = field(default_factory=dict)

    def allows(self, repo: str, action: str) -> bool:
        if self.scopes is None:
            return True
        return action in self.scopes.get(("repository", repo), frozenset())

    def allows_catalog(self) -> bool:
        return self.scopes is None or ("registry", "catalog") in self.scopes


class Authenticator:
    def __init__(self, hub: Hub, *, service: str = "clawstore", token_ttl: float = 300.0) -> None:
        self.hub = hub
        self.service = service
        self.token_ttl = token_ttl
        self.key = base64.b64decode(
            hub.setting(SIGNING_KEY_SETTING, lambda: base64.b64encode(secrets.token_bytes(32)).decode())
        )

    # -- credentials -------------------------------------------------------------------------
    def identify(self, authorization: str | None) -> Identity:
        """The caller of a request; RegistryError UNAUTHORIZED for credentials that do not hold."""
        if not authorization:
            return Identity(Principal.anonymous())
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if scheme == "basic":
            return Identity(self._hub_token(self._basic_password(value)), credentials=True)
        if scheme == "bearer":
            if value.startswith("cst_"):
                return Identity(self._hub_token(value), credentials=True)
            return self._registry_token(value)
        raise RegistryError("UNAUTHORIZED", f"unsupported authorization scheme {scheme!r}")

    @staticmethod
    def is_local(authorization: str | None) -> bool:
        """Whether `identify` needs no catalog for these credentials (none, or a registry token:
        a signature check)."""
        if not authorization:
            return True
        scheme, _, value = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and not value.strip().startswith("cst_")

    @staticmethod
    def _basic_password(value: str) -> str:
        try:
            text = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError("UNAUTHORIZED", "malformed basic credentials") from None
        _user, sep, password = text.partition(":")
        if not sep:
            raise RegistryError("UNAUTHORIZED", "malformed basic credentials")
        return password

    def _hub_token(self, token: str) -> Principal:
        try:
            return self.hub.authenticate(token)
        except PermissionDeniedError as e:
            raise RegistryError("UNAUTHORIZED", str(e)) from None

    def _registry_token(self, value: str) -> Identity:
        try:
            claims = jwt.decode(
                value,
                self.key,
                algorithms=["HS256"],
                audience=self.service,
                issuer=ISSUER,
                options={"require": ["exp", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as e:
            raise RegistryError("UNAUTHORIZED", f"invalid registry token: {e}") from None
        tid = claims.get("tid")
        principal = Principal.anonymous() if tid is None else Principal(str(claims["sub"]), str(tid))
        scopes: dict[tuple[str, str], frozenset[str]] = {}
        for a in claims.get("access", []):
            key = (str(a.get("type")), str(a.get("name")))
            scopes[key] = scopes.get(key, frozenset()) | frozenset(map(str, a.get("actions", [])))
        return Identity(principal, scopes, credentials=tid is not None)

    # -- the token endpoint ------------------------------------------------------------------
    def issue(self, identity: Identity, scopes: list[Scope]) -> tuple[str, int, list[dict[str, Any]]]:
        """A registry token for `identity` carrying, of each requested scope, the actions its
        grants allow (possibly none: the token then proves identity only). Returns the token,
        its lifetime in seconds and the access granted."""
        access: list[dict[str, Any]] = []
        for s in scopes:
            if s.type == "repository":
                try:
                    validate_repository(s.name)
                except Exception:
                    continue
                allowed = self.hub.allowed_actions(
                    identity.principal, s.name, set(s.actions) & set(REPO_ACTIONS)
                )
                access.append({"type": "repository", "name": s.name, "actions": sorted(allowed)})
            elif s.type == "registry" and s.name == "catalog":
                access.append({"type": "registry", "name": "catalog", "actions": ["*"]})
        now = int(time.time())
        ttl = int(self.token_ttl)
        p = identity.principal
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": p.name,
            "aud": self.service,
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        if p.token_id is not None:
            claims["tid"] = p.token_id
        return jwt.encode(claims, self.key, algorithm="HS256"), ttl, access

    # -- challenges --------------------------------------------------------------------------
    def challenge(self, realm: str, scope: str | None, error: str | None = None) -> str:
        parts = [f'realm="{realm}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)


def parse_scopes(values: list[str]) -> list[Scope]:
    out = []
    for v in values:
        for item in v.split():
            out.append(Scope.parse(item))
    return out


__all__ = ["CATALOG_SCOPE", "Authenticator", "Identity", "Scope", "parse_scopes"]
