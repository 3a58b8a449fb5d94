"""`clawstore volume ...`: snapshot a directory to REPO:TAG, restore it, list and show history."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from clawstore import volumes
from clawstore.cli.common import CliContext, Progress, existing_store, human_size, pass_cli
from clawstore.names import Reference


class _Bar:
    """Feeds volumes.ProgressEvent into one rich bar (bytes, throughput) with a file count."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.bar = Progress(verb, None, unit="bytes")

    def __call__(self, ev: volumes.ProgressEvent) -> None:
        files = f"{ev.files}/{ev.total_files}" if ev.total_files is not None else f"{ev.files}"
        self.bar.update(
            description=f"{self.verb} ({ev.phase}) {files} files",
            completed=ev.bytes,
            total=ev.total_bytes,
        )


def _snapshot_line(s: volumes.Snapshot) -> str:
    kinds = "+".join((d.annotations or {}).get(volumes.ANNOTATION_LAYER_KIND, "?") for d in s.layers)
    return (
        f"{s.digest}  {s.created or '-':20}  {s.files:>8} files  {human_size(s.bytes):>10}  "
        f"{len(s.layers)} layers ({kinds}), {human_size(s.stored_size)} stored"
    )


@click.group("volume")
def volume_group() -> None:
    """Workspace volume snapshots (tar+zstd layers, incremental)."""


@volume_group.command("snapshot")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref")
@click.option("--full", is_flag=True, help="Pack everything, even if REF has a previous snapshot.")
@click.option("--content-digests", is_flag=True, help="Detect changes by content too (reads every file).")
@click.option(
    "--max-chain",
    type=click.IntRange(min=1),
    default=volumes.DEFAULT_MAX_CHAIN,
    show_default=True,
    help="Squash into one full layer past this many layers.",
)
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstd level.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="zstd threads (0: one per CPU).")
@pass_cli
def snapshot_cmd(
    cli: CliContext,
    directory: Path,
    ref: str,
    full: bool,
    content_digests: bool,
    max_chain: int,
    level: int,
    threads: int,
) -> None:
    """Snapshot DIRECTORY to REF (REPO:TAG); incremental when REF exists. Prints the digest."""
    bar = _Bar("snapshot")
    found = cli.hub()
    with contextlib.ExitStack() as stack:
        store = cli.store
        if found is not None:  # a hub session: leased against GC, recorded, permission-checked
            hub, principal = found
            store = stack.enter_context(hub.session(principal, Reference.parse(ref).repository))
        stack.enter_context(bar.bar)
        snap = volumes.snapshot(
            store,
            directory,
            ref,
            full=full,
            content_digests=content_digests,
            max_chain=max_chain,
            level=level,
            threads=threads,
            progress=bar,
        )
    if snap.lost_parent is not None:
        click.echo(
            f"warning: the previous snapshot {snap.lost_parent} at {ref} has lost content; "
            "took a full snapshot instead of building on it",
            err=True,
        )
    if not snap.created_now:
        click.echo(f"unchanged: {ref} is already {snap.digest}", err=True)
    elif snap.new_layer is not None:
        kind = (snap.new_layer.annotations or {}).get(volumes.ANNOTATION_LAYER_KIND, "?")
        click.echo(
            f"{ref}: {snap.files} files, {human_size(snap.bytes)}; "
            f"new {kind} layer {human_size(snap.new_layer.size)}, {len(snap.layers)} layers",
            err=True,
        )
    click.echo(str(snap.digest))


@existing_store
@volume_group.command("restore")
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace DIRECTORY if it is not empty.")
@click.option("--allow-devices", is_flag=True, help="Create device nodes and FIFOs from the layers.")
@click.option(
    "--verify-diff-id",
    is_flag=True,
    help="Also hash the uncompressed layers and check their diff_ids (the blob digests are always checked).",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Refuse past this many uncompressed bytes [default: 1 TiB]; never taken from the snapshot.",
)
@click.option(
    "--max-ratio",
    type=click.IntRange(min=0),
    default=None,
    help="Refuse a layer that decompresses more than this many times its size, past 64 MiB "
    "[default: 1000; 0: no ratio check].",
)
@pass_cli
def restore_cmd(
    cli: CliContext,
    ref: str,
    directory: Path,
    force: bool,
    allow_devices: bool,
    verify_diff_id: bool,
    max_bytes: int | None,
    max_ratio: int | None,
) -> None:
    """Restore REF (REPO:TAG or REPO@DIGEST) into DIRECTORY (created; must be empty unless --force)."""
    bar = _Bar("restore")
    found = cli.hub()
    with contextlib.ExitStack() as stack:
        if found is not None:
            # Through the catalog: pull on the repository, REPO@DIGEST only for a digest of it,
            # and what is restored held by a lease until the restore ends.
            hub, principal = found
            parsed = Reference.parse(ref)
            digest = parsed.digest or cli.store.resolve(parsed.repository, parsed.tag or "latest")
            hub.require_in_repository(principal, parsed.repository, digest)
            lease = stack.enter_context(hub.lease(principal, parsed.repository, "restore"))
            lease.add([digest])
            lease.add([d.digest for d in volumes.load(cli.store, digest).manifest.blobs()])
            ref = f"{parsed.repository}@{digest}"
        stack.enter_context(bar.bar)
        r = volumes.restore(
            cli.store,
            ref,
            directory,
            force=force,
            allow_devices=allow_devices,
            verify_diff_id=verify_diff_id,
            max_bytes=max_bytes,
            max_ratio=max_ratio,
            progress=bar,
        )
    rate = r.bytes / r.seconds if r.seconds > 0 else 0.0
    click.echo(
        f"restored {r.snapshot.digest} to {r.dest}: {r.files} files, {human_size(r.bytes)} "
        f"in {r.seconds:.2f}s ({human_size(rate)}/s)",
        err=True,
    )


@existing_store
@volume_group.command("ls")
@click.argument("repo", required=False)
@pass_cli
def ls_cmd(cli: CliContext, repo: str | None) -> None:
    """List tagged volume snapshots (of REPO, or of every repository)."""
    for s in volumes.ls(cli.store, repo):
        click.echo(f"{s.ref}  {_snapshot_line(s)}")


@existing_store
@volume_group.command("history")
@click.argument("ref")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Show at most N snapshots.")
@pass_cli
def history_cmd(cli: CliContext, ref: str, limit: int | None) -> None:
    """Show the snapshot at REF and its parents, newest first."""
    for s in volumes.history(cli.store, ref, limit=limit):
        click.echo(_snapshot_line(s))
