"""Hub commands: gc, checkpoint, retention, export/import, token/grant, catalog fsck.

The catalog is `--catalog URL` / `$CLAWSTORE_CATALOG`, default `<store root>/catalog.sqlite`.
With `$CLAWSTORE_TOKEN` the commands run as that token's principal (and need its grants);
without, as the local administrator (whoever can open the catalog already owns it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from clawstore.cli.common import CliContext, existing_store, human_size, pass_cli, progress
from clawstore.errors import ClawstoreError

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d', '1w', or combinations like '1h30m' -> seconds."""
    t = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw]?)", t)
    if not t or "".join(a + b for a, b in parts) != t:
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 0, 90s, 15m, 2h, 7d)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, int | float):
            return float(value)
        return parse_duration(str(value))


DURATION = Duration()


def _hub(cli_ctx: CliContext, catalog: str | None, create_catalog: bool = False) -> tuple[Any, Any]:
    from clawstore.hub import Hub, Principal

    hub = getattr(cli_ctx, "_hub", None)
    if hub is None:
        hub = Hub(
            cli_ctx.store, catalog or os.environ.get("CLAWSTORE_CATALOG"), create_catalog=create_catalog
        )
        cli_ctx._hub = hub  # type: ignore[attr-defined]
        click.get_current_context().call_on_close(hub.catalog.close)
    token = os.environ.get("CLAWSTORE_TOKEN")
    principal = hub.authenticate(token) if token else Principal.local_admin()
    return hub, principal


def with_hub(f: F) -> F:
    @click.option(
        "--catalog",
        "catalog_url",
        metavar="URL",
        default=None,
        help="Catalog database URL [env CLAWSTORE_CATALOG; default <store>/catalog.sqlite]",
    )
    @click.option(
        "--create-catalog",
        is_flag=True,
        help="Start a new catalog at --catalog even though the store already has content.",
    )
    @pass_cli
    @wraps(f)
    def wrapper(
        cli_ctx: CliContext, catalog_url: str | None, create_catalog: bool, *args: Any, **kwargs: Any
    ) -> Any:
        hub, principal = _hub(cli_ctx, catalog_url, create_catalog)
        return f(hub, principal, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- gc -------------------------------------------------------------------------------------------
@existing_store
@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option(
    "--grace",
    type=DURATION,
    default="1h",
    show_default=True,
    help="Keep unreferenced objects seen within this long.",
)
@click.option("--no-scan", is_flag=True, help="Do not scan the store for objects the catalog lacks.")
@click.option("--list", "list_", is_flag=True, help="List every digest that goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@with_hub
def gc_cmd(
    hub: Any, principal: Any, dry_run: bool, grace: float, no_scan: bool, list_: bool, as_json: bool
) -> None:
    """Mark and sweep: delete manifests and blobs no tag, pin or lease reaches."""
    r = hub.gc(principal, grace=grace, dry_run=dry_run, scan_store=not no_scan)
    if as_json:
        d = {k: v for k, v in r.__dict__.items() if k != "garbage"}
        if list_:
            d["garbage"] = r.garbage
        click.echo(json.dumps(d, indent=2))
        return
    if list_:
        for kind, digest, size in r.garbage:
            click.echo(f"{kind}\t{digest}\t{size}")
    click.echo(r.summary() + f" [{human_size(r.bytes)}]")


# -- checkpoints ---------------------------------------------------------------------------------
@click.group("checkpoint")
def checkpoint() -> None:
    """Agent session checkpoints (per-file deduplicated OCI artifacts)."""


@checkpoint.command("create")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("ref")
@click.option(
    "--parent",
    default="auto",
    show_default=True,
    help="Parent checkpoint (REF or digest); 'auto' = what REF points at now; 'none'.",
)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Session metadata (repeatable).")
@click.option("--volume", default=None, metavar="REF", help="Volume snapshot this checkpoint goes with.")
@click.option(
    "--threshold",
    type=int,
    default=None,
    metavar="BYTES",
    help="Files smaller than this go into packs, larger ones are blobs of their own [default 1 MiB].",
)
@with_hub
def checkpoint_create(
    hub: Any,
    principal: Any,
    directory: str,
    ref: str,
    parent: str,
    meta: tuple[str, ...],
    volume: str | None,
    threshold: int | None,
) -> None:
    """Checkpoint DIRECTORY as REF (REPO:TAG); prints the manifest digest."""
    from clawstore import checkpoints
    from clawstore.names import Reference

    session: dict[str, str] = {}
    for kv in meta:
        k, sep, v = kv.partition("=")
        if not sep:
            raise click.BadParameter(f"--meta {kv!r}: expected KEY=VALUE")
        session[k] = v
    if threshold is not None and threshold < 0:
        raise click.BadParameter("--threshold must be >= 0")
    r = Reference.parse(ref)
    with hub.session(principal, r.repository, kind="checkpoint") as s, progress("checkpoint", None) as bar:
        res = checkpoints.create(
            s,
            ref,
            directory,
            session=session,
            parent=None if parent == "none" else parent,
            volume=volume,
            threshold=checkpoints.DEFAULT_THRESHOLD if threshold is None else threshold,
            progress=bar.advance,
        )
    click.echo(res.digest)
    note = ", repacked" if res.compacted else ""
    click.echo(
        f"{res.files} files ({human_size(res.bytes)}): {res.reused_files} unchanged, "
        f"{res.hashed_files} read, "
        f"{res.uploaded_blobs} blobs uploaded ({human_size(res.uploaded_bytes)}){note}",
        err=True,
    )
    if res.skipped:
        click.echo(f"skipped {len(res.skipped)} files that changed type or vanished while read", err=True)


def _linked_checkpoint(hub: Any, principal: Any, ref: str) -> Any:
    """REF's manifest digest, once the principal may pull its repository and the digest is
    linked to it (REPO@DIGEST of another repository answers "not found")."""
    from clawstore import checkpoints
    from clawstore.names import Reference

    repo = Reference.parse(ref).repository
    hub.permissions.check(principal, "pull", repo)
    digest = checkpoints.resolve_ref(hub.store, ref)
    hub.require_in_repository(principal, repo, digest)
    return digest


@existing_store
@checkpoint.command("restore")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--path", "prefix", default=None, metavar="PATH", help="Restore only PATH (and below).")
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@click.option("--special-bits", is_flag=True, help="Keep setuid/setgid/sticky bits (dropped by default).")
@with_hub
def checkpoint_restore(
    hub: Any, principal: Any, ref: str, directory: str, prefix: str | None, force: bool, special_bits: bool
) -> None:
    """Restore checkpoint REF into DIRECTORY (absent or empty, unless --force)."""
    from clawstore import checkpoints
    from clawstore.names import Reference

    repo = Reference.parse(ref).repository
    hub.permissions.check(principal, "pull", repo)
    with hub.lease(principal, repo, "restore") as lease, progress("restore", None) as bar:
        digest = checkpoints.resolve_ref(hub.store, ref)
        hub.require_in_repository(principal, repo, digest)  # REPO@DIGEST of another repository
        lease.add([digest])
        r = checkpoints.restore(
            hub.store,
            digest,
            directory,
            path=prefix,
            force=force,
            special_bits=special_bits,
            progress=bar.advance,
        )
    click.echo(f"restored {r.files} files ({human_size(r.bytes)}) from {digest}", err=True)


@existing_store
@checkpoint.command("cat")
@click.argument("ref")
@click.argument("path")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write to FILE.")
@with_hub
def checkpoint_cat(hub: Any, principal: Any, ref: str, path: str, output: str | None) -> None:
    """Print one file of checkpoint REF (one ranged read, verified by its digest)."""
    import shutil
    import sys

    from clawstore import checkpoints

    with checkpoints.open_file(hub.store, _linked_checkpoint(hub, principal, ref), path) as src:
        if output is None:
            shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        else:
            with open(output, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


@existing_store
@checkpoint.command("ls")
@click.argument("repo")
@with_hub
def checkpoint_ls(hub: Any, principal: Any, repo: str) -> None:
    """List the checkpoints tagged in REPO."""
    from clawstore import checkpoints

    hub.permissions.check(principal, "pull", repo)
    for i in checkpoints.ls(hub.store, repo):
        parent = i.parent[:19] if i.parent else "-"
        click.echo(
            f"{i.tag}\t{i.digest}\t{i.created}\t{i.files} files\t{human_size(i.bytes)}\tparent {parent}"
        )


@existing_store
@checkpoint.command("files")
@click.argument("ref")
@with_hub
def checkpoint_files(hub: Any, principal: Any, ref: str) -> None:
    """List the entries of checkpoint REF: type, mode, size, path."""
    from clawstore import checkpoints

    for e in checkpoints.load(hub.store, _linked_checkpoint(hub, principal, ref)).entries:
        extra = f" -> {e['l']}" if e["t"] == "symlink" else ""
        click.echo(f"{e['t'][0]}\t{e.get('m', 0):04o}\t{e.get('s', 0)}\t{e['p']}{extra}")


@existing_store
@checkpoint.command("diff")
@click.argument("a")
@click.argument("b")
@with_hub
def checkpoint_diff(hub: Any, principal: Any, a: str, b: str) -> None:
    """What changed from checkpoint A to checkpoint B (A, B: REPO:TAG or REPO@DIGEST)."""
    from clawstore import checkpoints

    d = checkpoints.diff(
        hub.store, _linked_checkpoint(hub, principal, a), _linked_checkpoint(hub, principal, b)
    )
    for p in d.added:
        click.echo(f"A\t{p}")
    for p in d.removed:
        click.echo(f"D\t{p}")
    for p in d.modified:
        click.echo(f"M\t{p}")


# -- retention -----------------------------------------------------------------------------------
@click.group("retention")
def retention() -> None:
    """Retention policies per repository pattern, and applying them."""


@retention.command("set")
@click.argument("pattern")
@click.option("--keep-last", type=int, default=None, help="Keep the N most recently moved tags.")
@click.option("--keep-within", type=DURATION, default=None, help="Keep tags moved within DURATION.")
@click.option("--keep-tags", default=None, metavar="REGEX", help="Keep tags matching REGEX.")
@click.option(
    "--untagged-grace", type=DURATION, default=None, help="Delete untagged manifests after DURATION."
)
@with_hub
def retention_set(
    hub: Any,
    principal: Any,
    pattern: str,
    keep_last: int | None,
    keep_within: float | None,
    keep_tags: str | None,
    untagged_grace: float | None,
) -> None:
    """Set the policy for repositories matching PATTERN (glob: *, **)."""
    from clawstore.hub.retention import Policy

    hub.set_policy(principal, Policy(pattern, keep_last, keep_within, keep_tags, untagged_grace))


@retention.command("rm")
@click.argument("pattern")
@with_hub
def retention_rm(hub: Any, principal: Any, pattern: str) -> None:
    """Remove the policy for PATTERN."""
    if not hub.remove_policy(principal, pattern):
        raise ClawstoreError(f"no policy for {pattern!r}")


@existing_store
@retention.command("ls")
@with_hub
def retention_ls(hub: Any, principal: Any) -> None:
    """List policies."""
    for p in hub.policies(principal):
        click.echo(
            f"{p.pattern}\tkeep_last={p.keep_last}\tkeep_within={p.keep_within}\t"
            f"keep_tags={p.keep_tags}\tuntagged_grace={p.untagged_grace}"
        )


@existing_store
@retention.command("apply")
@click.option("--dry-run", is_flag=True, help="List what would go and how many bytes; change nothing.")
@click.option("--grace", type=DURATION, default="1h", show_default=True, help="GC grace for the sweep.")
@with_hub
def retention_apply(hub: Any, principal: Any, dry_run: bool, grace: float) -> None:
    """Untag what the policies do not keep, delete expired untagged manifests, and GC."""
    r = hub.apply_retention(principal, dry_run=dry_run, grace=grace)
    verb = "would untag" if dry_run else "untagged"
    for repo, tag, digest in r.tags:
        click.echo(f"{verb}\t{repo}:{tag}\t{digest}")
    for d in r.manifests:
        click.echo(f"{'would delete' if dry_run else 'deleted'}\tuntagged\t{d}")
    reclaim = "would reclaim" if dry_run else "reclaimed"
    click.echo(
        f"{len(r.tags)} tags, {len(r.manifests)} untagged manifests; GC {reclaim} "
        f"{r.gc_manifests} manifests and {r.gc_blobs} blobs, {r.bytes} bytes ({human_size(r.bytes)})"
    )


# -- export / import -----------------------------------------------------------------------------
@existing_store
@click.command("export")
@click.argument("ref")
@click.option(
    "--oci-layout", "layout", required=True, type=click.Path(file_okay=False), help="Target directory."
)
@with_hub
def export_cmd(hub: Any, principal: Any, ref: str, layout: str) -> None:
    """Write REF (REPO:TAG) into an OCI image layout directory."""
    d = hub.export_oci(principal, ref, layout)
    click.echo(d.digest)


@click.command("import")
@click.argument("layout", type=click.Path(exists=True, file_okay=False))
@click.argument("repo")
@click.option("--tag", "tags", multiple=True, help="Only these refs (default: every named ref).")
@with_hub
def import_cmd(hub: Any, principal: Any, layout: str, repo: str, tags: tuple[str, ...]) -> None:
    """Import the named refs of an OCI image layout into REPO."""
    for name, digest in hub.import_oci(principal, layout, repo, tags=list(tags) or None):
        click.echo(f"{repo}:{name}\t{digest}")


# -- principals ----------------------------------------------------------------------------------
@click.group("token")
def token() -> None:
    """API tokens (stored hashed; shown once)."""


@token.command("issue")
@click.argument("principal_name")
@with_hub
def token_issue(hub: Any, principal: Any, principal_name: str) -> None:
    """Issue a token for PRINCIPAL_NAME (created if absent); prints it once."""
    click.echo(hub.issue_token(principal, principal_name))


@token.command("revoke")
@click.argument("token_id")
@with_hub
def token_revoke(hub: Any, principal: Any, token_id: str) -> None:
    """Revoke a token by its id (the 16 hex after 'cst_') or the token itself."""
    if not hub.revoke_token(principal, token_id):
        raise ClawstoreError("no such live token")


# -- leases --------------------------------------------------------------------------------------
@click.group("lease")
def lease() -> None:
    """GC and volume leases held by work in progress (an admin sees all, others their own)."""


@existing_store
@lease.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@with_hub
def lease_ls(hub: Any, principal: Any, as_json: bool) -> None:
    """List leases: id, kind, holder, expiry (s from now), digests held."""
    import time

    rows = hub.list_leases(principal)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    now = time.time()
    for r in rows:
        where = f"\t{r['volume']}" if r["type"] == "volume" else ""
        left = float(r["expires_at"]) - now
        state = f"{left:.0f}s" if left > 0 else "expired"
        click.echo(f"{r['id']}\t{r['kind']}\t{r['holder'] or '-'}\t{state}\t{r['resources']}{where}")


@existing_store
@lease.command("release")
@click.argument("lease_id")
@with_hub
def lease_release(hub: Any, principal: Any, lease_id: str) -> None:
    """Release LEASE_ID (e.g. one a killed process left); GC may then collect what it held."""
    if not hub.release_lease(principal, lease_id):
        raise ClawstoreError(f"no lease {lease_id}")


@click.group("grant")
def grant() -> None:
    """Grants of pull/push/delete/admin on repository patterns."""


@grant.command("add")
@click.argument("principal_name")
@click.argument("action", type=click.Choice(["pull", "push", "delete", "admin"]))
@click.argument("pattern")
@with_hub
def grant_add(hub: Any, principal: Any, principal_name: str, action: str, pattern: str) -> None:
    """Grant ACTION on repositories matching PATTERN."""
    hub.grant(principal, principal_name, action, pattern)


@grant.command("rm")
@click.argument("principal_name")
@click.argument("action")
@click.argument("pattern")
@with_hub
def grant_rm(hub: Any, principal: Any, principal_name: str, action: str, pattern: str) -> None:
    """Remove a grant."""
    if not hub.revoke_grant(principal, principal_name, action, pattern):
        raise ClawstoreError("no such grant")


@existing_store
@grant.command("ls")
@click.argument("principal_name", required=False)
@with_hub
def grant_ls(hub: Any, principal: Any, principal_name: str | None) -> None:
    """List grants."""
    hub.permissions.check(principal, "admin")
    for name, action, pattern in hub.permissions.list_grants(principal_name):
        click.echo(f"{name}\t{action}\t{pattern}")


# -- catalog -------------------------------------------------------------------------------------
@click.group("catalog")
def catalog() -> None:
    """The hub catalog: consistency with the store, tag history."""


@existing_store
@catalog.command("fsck")
@click.option("--rebuild", is_flag=True, help="Rebuild the catalog's content tables from the store.")
@click.option("--verify-blobs", is_flag=True, help="Re-hash every blob.")
@with_hub
def catalog_fsck(hub: Any, principal: Any, rebuild: bool, verify_blobs: bool) -> None:
    """Report drift between catalog and store (exit 1 if any), or rebuild the catalog."""
    r = hub.fsck(principal, rebuild=rebuild, verify_blobs=verify_blobs)
    for kind, detail in r.problems:
        click.echo(f"{kind}\t{detail}")
    click.echo(
        f"{r.manifests} manifests, {r.blobs} blobs, {r.tags} tags; "
        f"{'rebuilt' if r.rebuilt else f'{len(r.problems)} problems'}",
        err=True,
    )
    if r.problems and not rebuild:
        raise SystemExit(1)


@existing_store
@catalog.command("history")
@click.argument("ref")
@with_hub
def catalog_history(hub: Any, principal: Any, ref: str) -> None:
    """Every move of a tag (REPO:TAG) or of all tags of REPO."""
    import datetime as _dt

    repo, _, tag = ref.partition(":")
    for h in hub.tag_history(principal, repo, tag or None):
        at = _dt.datetime.fromtimestamp(h["at"], _dt.UTC).isoformat(timespec="seconds")
        click.echo(
            f"{at}\t{h['repository']}:{h['tag']}\t{h['old_digest'] or '-'} -> {h['new_digest'] or '-'}"
            f"\t{h['actor'] or ''}"
        )


__all__ = ["parse_duration"]
