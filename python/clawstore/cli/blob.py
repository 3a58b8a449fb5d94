"""`clawstore blob put|get|stat|rm`: content-addressed blobs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

import click

from clawstore.atomic import atomic_file
from clawstore.cli.common import CliContext, Progress, existing_store, is_interactive, pass_cli
from clawstore.digest import ALGORITHMS, Digest
from clawstore.errors import ClawstoreError
from clawstore.manifest import Descriptor, parse_manifest, references
from clawstore.store import ArtifactStore

#: Below this size a progress bar is just flicker.
PROGRESS_MIN = 8 << 20
CHUNK = 1 << 20


class _ProgressReader:
    """A binary reader that advances a progress bar as it is read (terminal-only slow path)."""

    def __init__(self, raw: BinaryIO, bar: Progress) -> None:
        self._raw = raw
        self._bar = bar

    def readinto(self, buf: bytearray | memoryview) -> int | None:
        n = self._raw.readinto(buf)  # type: ignore[attr-defined]
        if n:
            self._bar.advance(n)
        return n  # None (a non-blocking source with no data yet) is not end of data: pass it on

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._bar.advance(len(data))
        return data


@click.group("blob")
def blob_group() -> None:
    """Store, fetch, inspect and remove blobs by digest."""


@blob_group.command("put")
@click.argument("source", metavar="FILE|-")
@click.option(
    "--expected", metavar="DIGEST", help="Refuse (nothing stored) unless the content has this digest."
)
@click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default=None,
    help="Digest algorithm [default: sha256, or that of --expected].",
)
@click.option(
    "--repo",
    metavar="REPO",
    help="The repository the blob is pushed to; required when the store has a catalog.",
)
@click.option(
    "--trust-size",
    is_flag=True,
    help="With --expected: if a blob of that digest and FILE's size is stored, do not read FILE.",
)
@pass_cli
def blob_put(
    ctx: CliContext,
    source: str,
    expected: str | None,
    repo: str | None,
    algorithm: str | None,
    trust_size: bool,
) -> None:
    """Store FILE (or standard input with -) as a blob and print its digest.

    With --expected the content is hashed and nothing is stored unless it matches (even when a
    blob of that digest is already stored, unless --trust-size). Beside a catalog the blob is
    pushed through the hub to --repo: permission-checked, recorded and leased."""
    exp = Digest.parse(expected) if expected is not None else None  # validate before any I/O
    if trust_size and exp is None:
        raise ClawstoreError("--trust-size needs --expected")
    kw: dict[str, Any] = {"algorithm": algorithm} if algorithm else {}
    if trust_size:
        kw["trust_size"] = True
    with ctx.writing_store(repo, "the blob") as store:
        desc = _put(store, source, exp, kw)
        if store is not ctx.store:  # a hub session (beside a catalog): the blob belongs to --repo
            store.backend.link_written([desc.digest])  # type: ignore[attr-defined]
    click.echo(desc.digest)


def _put(store: ArtifactStore, source: str, exp: Digest | None, kw: dict[str, Any]) -> Descriptor:
    """Store FILE or stdin (`-`) into `store`: the Rust fast path from a file when piped."""
    if source == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise ClawstoreError("standard input is closed (blob put - reads the blob from it)")
        with Progress("put stdin", None) as bar:
            src: BinaryIO = _ProgressReader(sys.stdin.buffer, bar) if is_interactive() else sys.stdin.buffer  # type: ignore[assignment]
            desc = store.put_blob(src, exp, **kw)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {source}")
        if path.is_dir():
            raise IsADirectoryError(f"is a directory: {source}")
        size = path.stat().st_size
        if is_interactive() and size >= PROGRESS_MIN:
            # On a terminal, stream through Python to drive the bar; piped, the Rust fast path.
            with open(path, "rb", buffering=0) as f, Progress(f"put {path.name}", size) as bar:
                desc = store.put_blob(_ProgressReader(f, bar), exp, **kw)  # type: ignore[arg-type]
        else:
            desc = store.put_blob(path, exp, **kw)
    return desc


@existing_store
@blob_group.command("get")
@click.argument("digest")
@click.option(
    "-o", "--output", metavar="FILE", help="Write to FILE (atomically, only if verified) instead of stdout."
)
@pass_cli
def blob_get(ctx: CliContext, digest: str, output: str | None) -> None:
    """Write a blob to stdout or FILE, verifying its digest as it streams.

    With -o the file appears only once the whole content is verified; on a mismatch nothing is
    left behind. To stdout the bytes are streamed as read: on a mismatch the command fails at the
    end (exit 1) and the output must be discarded.
    """
    d = Digest.parse(digest)
    store = ctx.store
    size = store.stat_blob(d)
    if output is None or output == "-":
        try:
            _copy_out(store.get_blob(d), sys.stdout.buffer, size)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): not our error. Silence the flush at exit too.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        return
    with atomic_file(output) as out:
        _copy_out(store.get_blob(d), out, size)


def _copy_out(reader: BinaryIO, out: BinaryIO, size: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with reader, Progress("get", size if size >= PROGRESS_MIN else None) as bar:
        show = size >= PROGRESS_MIN
        while n := reader.readinto(buf):  # type: ignore[attr-defined]
            out.write(view[:n])
            if show:
                bar.advance(n)


@existing_store
@blob_group.command("stat")
@click.argument("digest")
@pass_cli
def blob_stat(ctx: CliContext, digest: str) -> None:
    """Print the size in bytes of a stored blob (exit 1 if it is absent)."""
    click.echo(ctx.store.stat_blob(Digest.parse(digest)))


@existing_store
@blob_group.command("rm")
@click.argument("digest")
@click.option(
    "--force",
    is_flag=True,
    help="Remove even if a stored manifest references the blob (that manifest then dangles).",
)
@pass_cli
def blob_rm(ctx: CliContext, digest: str, force: bool) -> None:
    """Remove a blob. Refuses while a stored manifest references it, unless --force.

    Unreferenced blobs are normally removed by `clawstore gc`; this is for operators.
    """
    d = Digest.parse(digest)
    store = ctx.store
    store.stat_blob(d)  # BlobNotFoundError before the scan
    if not force:
        users = _referrers(ctx, d)
        if users:
            more = f" and {len(users) - 1} more" if len(users) > 1 else ""
            raise ClawstoreError(f"blob {d} is referenced by manifest {users[0]}{more} (use --force)")
    store.delete_blob(d)


def _referrers(ctx: CliContext, blob: Digest) -> list[Digest]:
    store = ctx.store
    out = []
    for m in store.iter_manifests():
        try:
            refs = references(parse_manifest(store.get_manifest(m)))
        except ClawstoreError:
            continue  # fsck reports those
        if any(desc.digest == blob for desc in refs.blobs):
            out.append(m)
    return out
