"""`clawstore fsck [--repair]`: verify every digest, manifest, reference and tag."""

from __future__ import annotations

import json

import click

from clawstore.cli.common import CliContext, Progress, existing_store, fail, pass_cli
from clawstore.fsck import DEFAULT_STALE_AFTER, fsck


class _PhaseBars:
    """One terminal progress bar per fsck phase (bytes for blobs, items for the rest)."""

    def __init__(self) -> None:
        self._phase: str | None = None
        self._bar: Progress | None = None
        self._done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self.close()
            self._phase, self._done = phase, 0
            self._bar = Progress(f"fsck {phase}", total, unit="bytes" if phase == "blobs" else "items")
            self._bar.__enter__()
        assert self._bar is not None
        self._bar.advance(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@existing_store
@click.command("fsck")
@click.option(
    "--repair",
    is_flag=True,
    help="Remove abandoned temp files and delete blobs/manifests whose bytes do not match their "
    "digest (so that re-pushing the content heals the store). Never touches tags or valid content.",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    default=DEFAULT_STALE_AFTER,
    show_default=True,
    metavar="SECONDS",
    help="With --repair: temp files older than this are abandoned (those of dead writers at any age).",
)
@click.option(
    "--sample",
    type=click.FloatRange(min=0, max=1),
    default=1.0,
    show_default=True,
    metavar="FRACTION",
    help="Re-hash only a random share of the blobs (0.05: 5%), for routine scrubbing of a large "
    "store; every blob is still listed and sized and every reference checked. 1 re-hashes all.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_cli
def fsck_cmd(ctx: CliContext, repair: bool, stale_after: float, sample: float, as_json: bool) -> None:
    """Re-hash every blob (or a --sample of them) and manifest, check references and tags;
    exit 1 on any error. Blobs are read several at a time (S3: the backend's concurrency), with
    a progress bar and ETA on a terminal.

    Temp files left by writers are listed as warnings; they do not fail the check.
    """
    bars = _PhaseBars()
    try:
        report = fsck(ctx.store, repair=repair, progress=bars, stale_after=stale_after, sample=sample)
    finally:
        bars.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"{p.severity.value}: {p}")
        click.echo(report.summary())
    if not report.ok:
        fail(f"fsck found {len(report.errors)} error(s) in {ctx.store.url}")
