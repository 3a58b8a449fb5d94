"""Principals, API tokens and grants.

A token is `cst_<id>_<secret>`: `id` (16 hex) names the row, `secret` is 32 random bytes
(url-safe base64). Only sha256(secret) is stored: the secret has 256 bits of entropy, so a
fast hash is as good as a slow KDF here (there is nothing to brute-force), and verification is
`hmac.compare_digest` on the hashes. Tokens are never logged: `Principal` and errors carry the
token id at most.

Grants give one action on a repository pattern. Actions: pull, push, delete, admin (admin
implies the other three and hub administration). Patterns are globs over repository names:
`*` matches within one path component, `**` across components, `?` one character; an exact
name matches itself.

Anonymous access (the registry's unauthenticated requests) is whatever is granted to the
principal named `anonymous` (`clawstore grant add anonymous pull 'public/**'`): no grant, no
anonymous access. `Principal.anonymous()` needs no token; every other principal does.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from sqlalchemy import Connection, delete, select, update

from clawstore.errors import ClawstoreError, PermissionDeniedError
from clawstore.hub import catalog as c

ACTIONS: Final = ("pull", "push", "delete", "admin")
TOKEN_PREFIX: Final = "cst_"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,127}")
#: The principal whose grants say what callers without credentials may do.
ANONYMOUS: Final = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `token_id` is checked again on every call, so revocation is immediate."""

    name: str
    token_id: str | None = None
    system: bool = False

    def __repr__(self) -> str:
        return f"Principal({self.name!r})"

    @classmethod
    def local_admin(cls) -> Principal:
        """The operator on the machine that holds the catalog (CLI without a token)."""
        return cls("local-admin", None, True)

    @classmethod
    def anonymous(cls) -> Principal:
        """A caller without credentials: it may do what the `anonymous` principal is granted."""
        return cls(ANONYMOUS, None, False)

    @property
    def is_anonymous(self) -> bool:
        return self.name == ANONYMOUS and self.token_id is None and not self.system


@lru_cache(maxsize=1024)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def pattern_matches(pattern: str, repo: str) -> bool:
    return pattern_regex(pattern).fullmatch(repo) is not None


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_principal_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ClawstoreError(f"invalid principal name {name!r}")
    return name


def validate_action(action: str) -> str:
    if action not in ACTIONS:
        raise ClawstoreError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    return action


class Permissions:
    """Principal, token and grant storage plus the checks every Hub method runs first."""

    def __init__(self, catalog: c.Catalog) -> None:
        self.catalog = catalog

    # -- administration ----------------------------------------------------------------------
    def create_principal(self, name: str) -> None:
        validate_principal_name(name)
        with self.catalog.tx() as conn:
            c.upsert(conn, c.principals, [{"name": name, "created_at": c.now(), "disabled": False}], ["name"])

    def issue_token(self, name: str) -> str:
        """A new token for `name` (created if absent). The only time the secret is visible."""
        self.create_principal(name)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self.catalog.tx() as conn:
            conn.execute(
                c.tokens.insert().values(
                    id=token_id, principal=name, secret_hash=_hash_secret(secret), created_at=c.now()
                )
            )
        return f"{TOKEN_PREFIX}{token_id}_{secret}"

    def revoke_token(self, token_or_id: str) -> bool:
        token_id = _split(token_or_id)[0] if token_or_id.startswith(TOKEN_PREFIX) else token_or_id
        with self.catalog.tx() as conn:
            r = conn.execute(
                update(c.tokens)
                .where(c.tokens.c.id == token_id, c.tokens.c.revoked_at.is_(None))
                .values(revoked_at=c.now())
            )
            return bool(r.rowcount)

    def disable_principal(self, name: str) -> None:
        with self.catalog.tx() as conn:
            conn.execute(update(c.principals).where(c.principals.c.name == name).values(disabled=True))
            conn.execute(
                update(c.tokens)
                .where(c.tokens.c.principal == name, c.tokens.c.revoked_at.is_(None))
                .values(revoked_at=c.now())
            )

    def grant(self, name: str, action: str, pattern: str) -> None:
        validate_principal_name(name)
        validate_action(action)
        pattern_regex(pattern)
        if name == ANONYMOUS:
            if action == "admin":
                raise ClawstoreError("anonymous callers may not be granted admin")
            self.create_principal(name)  # it has no token to be issued: granting creates it
        with self.catalog.tx() as conn:
            if conn.execute(select(c.principals.c.name).where(c.principals.c.name == name)).first() is None:
                raise ClawstoreError(f"no principal {name!r}")
            c.upsert(
                conn,
                c.grants,
                [{"principal": name, "action": action, "pattern": pattern}],
                ["principal", "action", "pattern"],
            )

    def revoke_grant(self, name: str, action: str, pattern: str) -> bool:
        with self.catalog.tx() as conn:
            r = conn.execute(
                delete(c.grants).where(
                    c.grants.c.principal == name, c.grants.c.action == action, c.grants.c.pattern == pattern
                )
            )
            return bool(r.rowcount)

    def list_grants(self, name: str | None = None) -> list[tuple[str, str, str]]:
        q = select(c.grants.c.principal, c.grants.c.action, c.grants.c.pattern).order_by(
            c.grants.c.principal, c.grants.c.action, c.grants.c.pattern
        )
        if name is not None:
            q = q.where(c.grants.c.principal == name)
        with self.catalog.read() as conn:
            return [tuple(r) for r in conn.execute(q)]  # type: ignore[misc]

    # -- authentication and checks -----------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        token_id, secret = _split(token)
        with self.catalog.read() as conn:
            name = self._valid_token(conn, token_id, secret)
        return Principal(name, token_id)

    def _valid_token(self, conn: Connection, token_id: str, secret: str | None) -> str:
        row = conn.execute(
            select(
                c.tokens.c.principal, c.tokens.c.secret_hash, c.tokens.c.revoked_at, c.principals.c.disabled
            )
            .join(c.principals, c.principals.c.name == c.tokens.c.principal)
            .where(c.tokens.c.id == token_id)
        ).first()
        # Compare against a dummy hash when the id is unknown, so timing does not tell ids apart.
        stored = row.secret_hash if row is not None else "0" * 64
        ok = secret is None or hmac.compare_digest(stored, _hash_secret(secret))
        if row is None or not ok or row.revoked_at is not None or row.disabled:
            raise PermissionDeniedError(f"invalid or revoked token (id {token_id})")
        return str(row.principal)

    def authenticated(self, principal: Principal) -> None:
        """PermissionDeniedError unless `principal` carries a live token that is its own (a
        `Principal` is a plain value: anyone can build one with another's name)."""
        if principal.system:
            return
        with self.catalog.read() as conn:
            self._own_token(conn, principal)

    def _own_token(self, conn: Connection, principal: Principal) -> None:
        if principal.is_anonymous:
            disabled = conn.execute(
                select(c.principals.c.disabled).where(c.principals.c.name == ANONYMOUS)
            ).scalar()
            if disabled is None or disabled:
                raise PermissionDeniedError("anonymous access is not enabled")
            return
        if principal.token_id is None:
            raise PermissionDeniedError(f"{principal.name}: no credentials")
        owner = self._valid_token(conn, principal.token_id, None)
        if not hmac.compare_digest(owner, principal.name):
            raise PermissionDeniedError(f"token {principal.token_id} does not belong to {principal.name}")

    def check(self, principal: Principal, action: str, repo: str | None = None) -> None:
        """PermissionDeniedError unless `principal` may do `action` on `repo` (None: hub-wide,
        which only admin on `**` grants). The token is re-checked on every call (revocation is
        immediate) and must belong to the principal it is presented with."""
        validate_action(action)
        if principal.system:
            return
        for pattern in self._patterns(principal, action):
            if repo is None:
                if pattern == "**":
                    return
            elif pattern_matches(pattern, repo):
                return
        where = f"on {repo}" if repo else "on the hub"
        raise PermissionDeniedError(f"{principal.name} may not {action} {where}")

    def may(self, principal: Principal, action: str, repos: set[str] | list[str]) -> bool:
        """Whether `principal` may do `action` on at least one of `repos` (one token check and
        one grants query for all of them)."""
        validate_action(action)
        if principal.system:
            return True
        if not repos:
            return False
        patterns = self._patterns(principal, action)
        return any(pattern_matches(p, r) for p in patterns for r in repos)

    def _patterns(self, principal: Principal, action: str) -> list[str]:
        """The repository patterns `principal` holds `action` (or admin) on, after checking its
        token: one read transaction."""
        with self.catalog.read() as conn:
            self._own_token(conn, principal)
            rows = conn.execute(
                select(c.grants.c.action, c.grants.c.pattern).where(c.grants.c.principal == principal.name)
            ).all()
        return [p for a, p in rows if a in (action, "admin")]


def _split(token: str) -> tuple[str, str]:
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise PermissionDeniedError("malformed token")
    body = token[len(TOKEN_PREFIX) :]
    token_id, sep, secret = body.partition("_")
    if not sep or len(token_id) != 16 or not secret:
        raise PermissionDeniedError("malformed token")
    return token_id, secret


__all__ = ["ACTIONS", "ANONYMOUS", "Permissions", "Principal", "pattern_matches"]
