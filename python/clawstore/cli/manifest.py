"""`clawstore manifest put|get`: OCI image manifests and indexes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clawstore.atomic import atomic_file
from clawstore.cli.common import CliContext, existing_store, pass_cli
from clawstore.digest import Digest
from clawstore.errors import InvalidManifestError
from clawstore.manifest import MAX_MANIFEST_SIZE


def _read_limited(source: str) -> bytes:
    """Read at most the manifest limit (+1 byte to detect oversize) from FILE or stdin."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_MANIFEST_SIZE + 1)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {source}")
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_SIZE + 1)
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidManifestError(f"manifest is larger than the {MAX_MANIFEST_SIZE} byte limit")
    return data


@click.group("manifest")
def manifest_group() -> None:
    """Store and fetch OCI manifests (validated; every referenced blob must exist)."""


@manifest_group.command("put")
@click.argument("source", metavar="FILE|-")
@click.option("--media-type", metavar="TYPE", help="Media type, when the JSON has no mediaType field.")
@click.option("--expected", metavar="DIGEST", help="Refuse unless the manifest has this digest.")
@click.option(
    "--repo",
    metavar="REPO",
    help="The repository the manifest is pushed to; required when the store has a catalog.",
)
@pass_cli
def manifest_put(
    ctx: CliContext, source: str, media_type: str | None, expected: str | None, repo: str | None
) -> None:
    """Validate and store the manifest in FILE (or stdin with -); print its digest.

    The exact bytes are stored: the digest is that of the file as given. Beside a catalog the
    manifest is pushed through the hub to --repo (permission-checked, recorded, linked to REPO).
    """
    exp = Digest.parse(expected) if expected is not None else None
    data = _read_limited(source)
    with ctx.writing_store(repo, "the manifest") as store:
        click.echo(store.put_manifest(data, media_type, expected=exp).digest)


@existing_store
@manifest_group.command("get")
@click.argument("digest")
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of stdout.")
@pass_cli
def manifest_get(ctx: CliContext, digest: str, output: str | None) -> None:
    """Print a manifest's exact bytes (verified against DIGEST)."""
    data = ctx.store.get_manifest(Digest.parse(digest))
    if output is None or output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with atomic_file(output) as out:
            out.write(data)
