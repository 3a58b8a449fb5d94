"""Permission matrix: every Hub action allowed with the right grant and denied without it;
revoked tokens and disabled principals stop working at once; secrets are stored hashed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import PermissionDeniedError
from clawstore.hub import Hub
from clawstore.hub import catalog as c
from clawstore.hub.permissions import pattern_matches
from clawstore.hub.retention import Policy
from hubutil import ADMIN, push_artifact
from sqlalchemy import select

REPO = "team/app"


def _setup(hub: Hub) -> clawstore.Descriptor:
    with hub.session(ADMIN, REPO) as s:
        return push_artifact(s, REPO, "v1", [b"payload"])


# action name -> (grant needed, callable(hub, principal, digest, tmp))
ACTIONS: dict[str, tuple[str, Callable[[Hub, Any, str, Path], object]]] = {
    "resolve": ("pull", lambda h, p, d, t: h.resolve(p, REPO, "v1")),
    "get_manifest": ("pull", lambda h, p, d, t: h.get_manifest(p, REPO, "v1")),
    "get_blob": ("pull", lambda h, p, d, t: h.get_blob(p, REPO, clawstore.digest_bytes(b"payload")).close()),
    "list_tags": ("pull", lambda h, p, d, t: h.list_tags(p, REPO)),
    "tag_history": ("pull", lambda h, p, d, t: h.tag_history(p, REPO)),
    "export": ("pull", lambda h, p, d, t: h.export_oci(p, f"{REPO}:v1", t / "oci")),
    "push_blob": ("push", lambda h, p, d, t: h.push_blob(p, REPO, b"new")),
    "push_manifest": ("push", lambda h, p, d, t: h.push_manifest(p, REPO, h.store.get_manifest(d), tag="v2")),
    "tag": ("push", lambda h, p, d, t: h.tag(p, REPO, "v3", d)),
    "session": ("push", lambda h, p, d, t: h.session(p, REPO).__enter__().close()),
    "volume_rw": ("push", lambda h, p, d, t: h.acquire_volume(p, REPO, "rw").release()),
    "volume_ro": ("pull", lambda h, p, d, t: h.acquire_volume(p, REPO, "ro").release()),
    "untag": ("delete", lambda h, p, d, t: h.untag(p, REPO, "v1")),
    "gc": ("admin", lambda h, p, d, t: h.gc(p, grace=3600, dry_run=True)),
    "fsck": ("admin", lambda h, p, d, t: h.fsck(p)),
    "retention": ("admin", lambda h, p, d, t: h.apply_retention(p, dry_run=True)),
    "set_policy": ("admin", lambda h, p, d, t: h.set_policy(p, Policy("x/**", keep_last=1))),
    "pin": ("admin", lambda h, p, d, t: h.pin(p, d)),
    "issue_token": ("admin", lambda h, p, d, t: h.issue_token(p, "someone")),
    "grant": ("admin", lambda h, p, d, t: h.grant(p, "user", "pull", "**")),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_permission_matrix(hub: Hub, action: str, tmp_path: Path) -> None:
    needed, call = ACTIONS[action]
    d = _setup(hub).digest
    token = hub.issue_token(ADMIN, "user")
    user = hub.authenticate(token)
    # Denied with every other grant (admin grants everything, so leave it out unless needed),
    # and with the needed grant on a different repository.
    for other in ("pull", "push", "delete"):
        if other != needed:
            hub.grant(ADMIN, "user", other, "**")
    hub.grant(ADMIN, "user", needed, "other/*")
    with pytest.raises(PermissionDeniedError):
        call(hub, user, d, tmp_path)
    # Allowed with exactly the needed grant on a matching pattern.
    hub.grant(ADMIN, "user", needed, "**" if needed == "admin" else "team/*")
    call(hub, user, d, tmp_path)


def test_admin_implies_everything_but_only_where_granted(hub: Hub, tmp_path: Path) -> None:
    d = _setup(hub).digest
    hub.issue_token(ADMIN, "ops")
    ops = hub.authenticate(hub.issue_token(ADMIN, "ops"))
    hub.grant(ADMIN, "ops", "admin", "team/**")
    hub.resolve(ops, REPO, "v1")
    hub.tag(ops, REPO, "x", d)
    hub.untag(ops, REPO, "x")
    with pytest.raises(PermissionDeniedError):
        hub.gc(ops, dry_run=True)  # hub-wide needs admin on **
    with pytest.raises(PermissionDeniedError):
        hub.resolve(ops, "elsewhere", "v1")


def test_revoked_token_stops_working_immediately(hub: Hub) -> None:
    _setup(hub)
    token = hub.issue_token(ADMIN, "user")
    hub.grant(ADMIN, "user", "pull", "**")
    user = hub.authenticate(token)
    hub.resolve(user, REPO, "v1")
    token_id = token.split("_")[1]
    assert hub.revoke_token(ADMIN, token_id)
    with pytest.raises(PermissionDeniedError):
        hub.resolve(user, REPO, "v1")  # the Principal obtained before revocation
    with pytest.raises(PermissionDeniedError):
        hub.authenticate(token)
    # Another token of the same principal keeps working.
    other = hub.authenticate(hub.issue_token(ADMIN, "user"))
    hub.resolve(other, REPO, "v1")
    hub.permissions.disable_principal("user")
    with pytest.raises(PermissionDeniedError):
        hub.resolve(other, REPO, "v1")


def test_bad_tokens_are_rejected(hub: Hub) -> None:
    token = hub.issue_token(ADMIN, "user")
    for bad in (
        "",
        "nope",
        "cst_",
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        "cst_0000000000000000_x",
    ):
        with pytest.raises(PermissionDeniedError):
            hub.authenticate(bad)


def test_tokens_are_stored_hashed_and_never_in_errors(hub: Hub) -> None:
    token = hub.issue_token(ADMIN, "user")
    secret = token.split("_", 2)[2]
    with hub.catalog.tx() as conn:
        rows = [tuple(map(str, r)) for r in conn.execute(select(c.tokens))]
    assert rows and not any(secret in v for r in rows for v in r)
    with pytest.raises(PermissionDeniedError) as e:
        hub.authenticate(token[:-2] + "zz")
    assert secret[:10] not in str(e.value)
    assert secret not in repr(hub.authenticate(token))


def test_unauthenticated_principal_is_denied(hub: Hub) -> None:
    from clawstore.hub import Principal

    with pytest.raises(PermissionDeniedError):
        hub.resolve(Principal("mallory"), REPO, "v1")


@pytest.mark.parametrize(
    ("pattern", "repo", "ok"),
    [
        ("team/app", "team/app", True),
        ("team/*", "team/app", True),
        ("team/*", "team/app/sub", False),
        ("team/**", "team/app/sub", True),
        ("**", "anything/at/all", True),
        ("team/a?p", "team/app", True),
        ("team.x/*", "teamyx/app", False),  # '.' is literal
    ],
)
def test_patterns(pattern: str, repo: str, ok: bool) -> None:
    assert pattern_matches(pattern, repo) is ok
