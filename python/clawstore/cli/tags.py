"""`clawstore tag|untag|resolve|tags|repos`: references to manifests."""

from __future__ import annotations

import click

from clawstore.cli.common import CliContext, existing_store, pass_cli
from clawstore.digest import Digest
from clawstore.errors import InvalidNameError, ManifestNotFoundError
from clawstore.names import Reference
from clawstore.types import ANY, MISSING


def _repo_tag(text: str) -> tuple[str, str]:
    ref = Reference.parse(text)
    if ref.tag is None:
        raise InvalidNameError(f"{text!r}: expected REPO:TAG, not a digest reference")
    return ref.repository, ref.tag


@existing_store
@click.command("tag")
@click.argument("ref", metavar="REPO:TAG")
@click.argument("digest")
@click.option("--expect", metavar="DIGEST", help="Only if the tag points at DIGEST now (compare-and-swap).")
@click.option("--create", is_flag=True, help="Only if the tag does not exist yet.")
@pass_cli
def tag_cmd(ctx: CliContext, ref: str, digest: str, expect: str | None, create: bool) -> None:
    """Point REPO:TAG at the stored manifest DIGEST.

    With --expect or --create the update is a compare-and-swap: it fails (exit 1, tag unchanged)
    when another writer got there first.
    """
    repo, tag = _repo_tag(ref)
    d = Digest.parse(digest)
    if expect is not None and create:
        raise click.UsageError("--expect and --create exclude each other")
    exp: object = MISSING if create else (Digest.parse(expect) if expect is not None else ANY)
    found = ctx.hub()
    if found is not None:  # through the catalog: leased against GC, recorded, permission-checked
        hub, principal = found
        hub.tag(principal, repo, tag, d, expect=exp)
        return
    ctx.store.tag(repo, tag, d, expect=exp)


@existing_store
@click.command("untag")
@click.argument("ref", metavar="REPO:TAG")
@click.option("--expect", metavar="DIGEST", help="Only if the tag points at DIGEST now.")
@pass_cli
def untag_cmd(ctx: CliContext, ref: str, expect: str | None) -> None:
    """Remove REPO:TAG (the manifest stays until gc)."""
    repo, tag = _repo_tag(ref)
    exp: object = Digest.parse(expect) if expect is not None else ANY
    found = ctx.hub()
    if found is not None:
        hub, principal = found
        hub.untag(principal, repo, tag, expect=exp)
        return
    ctx.store.untag(repo, tag, expect=exp)


@existing_store
@click.command("resolve")
@click.argument("ref", metavar="REPO:TAG")
@pass_cli
def resolve_cmd(ctx: CliContext, ref: str) -> None:
    """Print the manifest digest REPO:TAG points at (REPO@DIGEST: check it exists)."""
    parsed = Reference.parse(ref)
    digest = ctx.store.resolve_ref(parsed)
    if parsed.digest is not None and not ctx.store.has_manifest(digest):
        raise ManifestNotFoundError(f"manifest {digest} not found")
    click.echo(digest)


@existing_store
@click.command("tags")
@click.argument("repo")
@pass_cli
def tags_cmd(ctx: CliContext, repo: str) -> None:
    """List the tags of REPO, one per line."""
    for t in ctx.store.list_tags(repo):
        click.echo(t)


@existing_store
@click.command("repos")
@pass_cli
def repos_cmd(ctx: CliContext) -> None:
    """List repositories that have tags, one per line."""
    for r in ctx.store.list_repos():
        click.echo(r)
