"""`clawstore cache ...`: save / restore directories by key (actions/cache semantics), list,
remove, budgets and LRU eviction.

With a hub catalog (a local store's `catalog.sqlite`, or `--catalog` / `$CLAWSTORE_CATALOG`) saves
and restores are recorded there (last use, for eviction under a scope's byte budget); without one
(an S3 store and no catalog URL) they work on the store alone.

`cache restore` prints `hit KEY`, `partial KEY` or `miss` and exits 0 on a hit, 3 on a partial
hit and 4 on a miss (1 is an error, 2 a usage error).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from clawstore import caches
from clawstore.cli.common import CliContext, existing_store, human_size, pass_cli
from clawstore.errors import ClawstoreError

EXIT_HIT = 0
EXIT_PARTIAL = 3
EXIT_MISS = 4

_scope_option = click.option(
    "--scope", default=caches.DEFAULT_SCOPE, show_default=True, help="Cache scope (e.g. org/repo/branch)."
)
_catalog_option = click.option(
    "--catalog",
    "catalog_url",
    metavar="URL",
    default=None,
    help="Catalog database URL [env CLAWSTORE_CATALOG; default <store>/catalog.sqlite if local]",
)


def parse_size(text: str) -> int:
    """'500', '64K', '10MiB', '2G' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for i, u in enumerate("KMGT", start=1):
        if t.endswith(u):
            mult, t = 1024**i, t[:-1]
            break
    try:
        n = float(t)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 500M, 10GiB)") from None
    if n < 0:
        raise click.BadParameter("size must be >= 0")
    return int(n * mult)


def _cache_catalog(cli: CliContext, catalog_url: str | None, *, required: bool = False) -> tuple[Any, Any]:
    """(CacheCatalog, principal), or (None, None) when the store has no catalog and none is named."""
    url = catalog_url or os.environ.get("CLAWSTORE_CATALOG")
    if url is None and getattr(cli.store.backend, "root", None) is None:
        if required:
            raise ClawstoreError("this command needs a catalog: pass --catalog URL or set CLAWSTORE_CATALOG")
        return None, None
    from clawstore.cli.hub import _hub
    from clawstore.hub.caches import CacheCatalog

    hub, principal = _hub(cli, url)
    return CacheCatalog(hub), principal


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group("cache")
def cache_group() -> None:
    """Dependency and build caches: immutable entries by key, restore-key prefixes, budgets."""


@cache_group.command("save")
@click.argument("key")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_scope_option
@click.option("--base", default="auto", show_default=True, help="Key to pack a delta over; 'auto' or 'none'.")
@_catalog_option
@pass_cli
def save_cmd(
    cli: CliContext, key: str, directory: Path, scope: str, base: str, catalog_url: str | None
) -> None:
    """Save DIRECTORY as the cache entry KEY (a no-op if KEY exists: entries are immutable)."""
    caches.validate_key(key)
    kw: dict[str, Any] = {"scope": scope, "base": None if base == "none" else base}
    cc, principal = _cache_catalog(cli, catalog_url)
    if cc is not None:
        r = cc.save(principal, key, directory, **kw)
    else:
        r = caches.save(cli.store, key, directory, **kw)
    e = r.entry
    if not r.created_now:
        click.echo(f"exists: {key} is already {e.digest} (entries are immutable)", err=True)
    else:
        over = f" over {r.base!r}" if r.base else ""
        click.echo(
            f"saved {key}: {e.files} files, {human_size(e.bytes)}; {human_size(r.new_bytes)} new{over} "
            f"in {r.seconds:.2f}s",
            err=True,
        )
    click.echo(str(e.digest))


@cache_group.command("restore")
@click.argument("key")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--restore-key",
    "restore_keys",
    multiple=True,
    metavar="PREFIX",
    help="Fallback prefix (repeatable, in order).",
)
@_scope_option
@_catalog_option
@existing_store
@pass_cli
def restore_cmd(
    cli: CliContext,
    key: str,
    directory: Path,
    restore_keys: tuple[str, ...],
    scope: str,
    catalog_url: str | None,
) -> None:
    """Restore KEY (exact), else the newest entry whose key starts with KEY, else with each
    --restore-key in turn. Prints `hit KEY`, `partial KEY` or `miss`; exits 0, 3 or 4."""
    cc, principal = _cache_catalog(cli, catalog_url)
    if cc is not None:
        r = cc.restore(principal, key, directory, restore_keys=restore_keys, scope=scope)
    else:
        r = caches.restore(cli.store, key, directory, restore_keys=restore_keys, scope=scope)
    if r.kind == "miss":
        click.echo("miss")
        sys.exit(EXIT_MISS)
    click.echo(f"{r.kind} {r.key}")
    click.echo(
        f"restored {r.key!r} into {r.dest}: {r.written} entries written, "
        f"{r.removed} removed in {r.seconds:.2f}s",
        err=True,
    )
    sys.exit(EXIT_HIT if r.kind == "hit" else EXIT_PARTIAL)


@cache_group.command("ls")
@_scope_option
@click.option("--all", "all_scopes", is_flag=True, help="Every scope.")
@_catalog_option
@existing_store
@pass_cli
def ls_cmd(cli: CliContext, scope: str, all_scopes: bool, catalog_url: str | None) -> None:
    """List entries, newest first: key, created, last used (with a catalog), stored size."""
    cc, _principal = _cache_catalog(cli, catalog_url)
    for sc in caches.scopes(cli.store) if all_scopes else [scope]:
        used: dict[str, float] = {}
        if cc is not None:
            cc.sync(sc)
            used = {r.key: r.last_used_at for r in cc.entries(sc)}
        entries = caches.entries(cli.store, scope=sc)
        total = caches.unique_bytes(entries)
        budget = cc.budget(sc) if cc is not None else None
        head = f"scope {sc}: {len(entries)} entries, {human_size(total)} stored"
        click.echo(head + (f" (budget {human_size(budget)})" if budget is not None else ""))
        for e in entries:
            last = _when(used[e.key]) if e.key in used else "-"
            click.echo(
                f"  {e.key}  created {_when(e.created_at)}  used {last}  "
                f"{e.files} files  {human_size(e.stored_size)}"
            )


@cache_group.command("rm")
@click.argument("key")
@_scope_option
@_catalog_option
@existing_store
@pass_cli
def rm_cmd(cli: CliContext, key: str, scope: str, catalog_url: str | None) -> None:
    """Remove the entry KEY (its bytes go at the next gc unless another entry shares them)."""
    cc, _principal = _cache_catalog(cli, catalog_url)
    e = caches.delete(cli.store, key, scope=scope)
    if cc is not None:
        cc.forget(scope, key)
    click.echo(f"removed {key} ({e.digest})", err=True)


@cache_group.command("budget")
@click.argument("scope", required=False)
@click.argument("size", required=False)
@_catalog_option
@pass_cli
def budget_cmd(cli: CliContext, scope: str | None, size: str | None, catalog_url: str | None) -> None:
    """Show budgets, or set SCOPE's byte budget to SIZE (e.g. 10GiB; 'none' removes it)."""
    cc, _principal = _cache_catalog(cli, catalog_url, required=True)
    if scope is None:
        for sc, b in cc.budgets().items():
            click.echo(f"{sc}  {human_size(b)}")
        return
    if size is None:
        b = cc.budget(scope)
        click.echo(f"{scope}  {human_size(b) if b is not None else 'none'}")
        return
    cc.set_budget(scope, None if size.lower() == "none" else parse_size(size))


@cache_group.command("evict")
@click.option("--scope", default=None, help="Only this scope (default: every scope with a budget).")
@click.option("--dry-run", is_flag=True, help="Show what would be evicted.")
@_catalog_option
@existing_store
@pass_cli
def evict_cmd(cli: CliContext, scope: str | None, dry_run: bool, catalog_url: str | None) -> None:
    """Untag least-recently-used entries until each scope fits its budget (then `clawstore gc`)."""
    cc, _principal = _cache_catalog(cli, catalog_url, required=True)
    reports = [cc.evict(scope, dry_run=dry_run)] if scope is not None else cc.evict_all(dry_run=dry_run)
    verb = "would evict" if dry_run else "evicted"
    for r in reports:
        for key, digest in r.evicted:
            click.echo(f"{verb} {r.scope} {key} {digest}")
        click.echo(
            f"scope {r.scope}: {human_size(r.bytes_before)} -> {human_size(r.bytes_after)}"
            + (f" (budget {human_size(r.budget)})" if r.budget is not None else " (no budget)"),
            err=True,
        )
