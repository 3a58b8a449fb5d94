"""`clawstore log ...`: append stdin to a log, cat / follow / verify / list logs."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

from clawstore import logs
from clawstore.cli.common import CliContext, existing_store, human_size, pass_cli
from clawstore.cli.hub import parse_duration


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time: ISO 8601 (UTC unless it says otherwise), `@EPOCH` seconds, or a duration
    ago (`90s`, `15m`, `2h`, `1d`)."""
    t = text.strip()
    if t.startswith("@"):
        try:
            return float(t[1:])
        except ValueError:
            raise click.BadParameter(f"not a time: {text!r}") from None
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        try:
            return (now if now is not None else time.time()) - parse_duration(t)
        except click.BadParameter:
            raise click.BadParameter(
                f"not a time: {text!r} (ISO 8601, @EPOCH seconds, or a duration ago like 15m)"
            ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class TimeParam(click.ParamType):
    name = "TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, int | float):
            return float(value)
        return parse_time(str(value))


TIME = TimeParam()


def _out(chunk: bytes) -> None:
    out = sys.stdout.buffer
    out.write(chunk)
    out.flush()


@click.group("log")
def log_group() -> None:
    """Append-only logs stored as zstd segments (one writer, many readers)."""


@log_group.command("append")
@click.argument("ref")
@click.option(
    "--segment-size",
    type=click.IntRange(min=1),
    default=logs.DEFAULT_SEGMENT_BYTES,
    show_default=True,
    help="Seal a segment at this many bytes.",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=logs.DEFAULT_MAX_AGE,
    show_default=True,
    help="Seal buffered bytes after this many seconds.",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=logs.DEFAULT_LEASE_TTL,
    show_default=True,
    help="Seconds another writer must wait after this one dies.",
)
@pass_cli
def append_cmd(cli: CliContext, ref: str, segment_size: int, max_age: float, lease_ttl: float) -> None:
    """Append standard input to the log REF (REPO:TAG), sealing segments as it goes; closes the
    log at end of input. Prints the log's manifest digest."""
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    # read1: whatever is available now (a pipe from a running agent), not a full 1 MiB
    read = getattr(stdin, "read1", stdin.read)
    w = logs.LogWriter(cli.store, ref, segment_bytes=segment_size, max_age=max_age, lease_ttl=lease_ttl)
    try:
        while True:
            data = read(1 << 20)
            if not data:
                break
            w.append(data)
    except KeyboardInterrupt:
        w.flush()
        raise
    w.close()
    log = logs.load(cli.store, ref)
    click.echo(f"{ref}: {human_size(log.bytes)}, {log.lines} lines, {len(log.segments)} segments", err=True)
    click.echo(str(w.digest))


@log_group.command("cat")
@click.argument("ref")
@click.option("--since", type=TIME, default=None, help="Lines written at or after TIME.")
@click.option("--until", type=TIME, default=None, help="Lines written at or before TIME.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
@existing_store
@pass_cli
def cat_cmd(cli: CliContext, ref: str, since: float | None, until: float | None, tail: int | None) -> None:
    """Print the log REF (REPO:TAG or REPO@DIGEST); a time window reads only its segments."""
    for chunk in logs.read(cli.store, ref, since=since, until=until, tail=tail):
        _out(chunk)


@log_group.command("follow")
@click.argument("ref")
@click.option("--poll", type=click.FloatRange(min=0.01), default=0.2, show_default=True, help="Seconds.")
@existing_store
@pass_cli
def follow_cmd(cli: CliContext, ref: str, poll: float) -> None:
    """Print the log REF and then each segment as it is sealed; ends when the log is closed."""
    for chunk in logs.follow(cli.store, ref, poll=poll):
        _out(chunk)


@log_group.command("verify")
@click.argument("ref")
@existing_store
@pass_cli
def verify_cmd(cli: CliContext, ref: str) -> None:
    """Re-read every segment of REF and check it against the manifest; exit 1 naming each bad one."""
    r = logs.verify(cli.store, ref)
    if r.ok:
        click.echo(f"ok: {r.digest}: {r.segments} segments, {human_size(r.bytes)}, {r.lines} lines")
        return
    for pos, msg in r.problems:
        click.echo(f"bad segment {pos}: {msg}")
    click.echo(f"error: {len(r.problems)} of {r.segments} segments of {ref} failed verification", err=True)
    sys.exit(1)


@log_group.command("ls")
@click.argument("repo", required=False)
@existing_store
@pass_cli
def ls_cmd(cli: CliContext, repo: str | None) -> None:
    """List tagged logs (of REPO, or of every repository)."""
    for lg in logs.ls(cli.store, repo):
        click.echo(
            f"{lg.ref}  {lg.state:6}  {human_size(lg.bytes):>10}  {lg.lines:>9} lines  "
            f"{len(lg.segments):>5} segments  {human_size(lg.stored_size)} stored"
        )
