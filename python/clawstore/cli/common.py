"""What every `clawstore` subcommand shares: the store option, one-line errors, progress bars.

Subcommand modules (`clawstore/cli/<area>.py`) define click commands; `clawstore/cli/__init__.py`
names each top-level command in `_COMMANDS` and imports its module when the command is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

import clawstore
from clawstore.errors import ClawstoreError

F = TypeVar("F", bound=Callable[..., Any])


_EXISTING_STORE = "__clawstore_existing_store__"


def existing_store(cmd: F) -> F:
    """Mark a command that can only work on a store that exists (it reads, or changes what is
    there): against a path that holds no store it fails with `error: no clawstore store at PATH`
    instead of creating an empty store behind a typo and reporting success. Unmarked commands
    (the writers: `blob put`, `volume snapshot`...) create a new store on first use."""
    setattr(cmd, _EXISTING_STORE, True)
    return cmd


def _needs_existing_store(ctx: click.Context | None) -> bool:
    """The running command is marked `existing_store`, or is a `--dry-run` (which must change
    nothing, so must not create a store either)."""
    if ctx is None:
        return False
    cmd = ctx.command
    if getattr(cmd, _EXISTING_STORE, False) or getattr(
        getattr(cmd, "callback", None), _EXISTING_STORE, False
    ):
        return True
    return bool(ctx.params.get("dry_run"))


@dataclass
class CliContext:
    """Per-invocation state: the store URL and the store, opened on first use (created only for
    commands that may write: see `existing_store`)."""

    store_url: str | None
    _store: clawstore.ArtifactStore | None = field(default=None, repr=False)

    @property
    def store(self) -> clawstore.ArtifactStore:
        if self._store is None:
            create = not _needs_existing_store(click.get_current_context(silent=True))
            self._store = clawstore.open(self.store_url, create=create)
        return self._store

    def hub(self) -> tuple[Any, Any] | None:
        """(hub, principal) when this store has a catalog (`$CLAWSTORE_CATALOG`, or the
        `catalog.sqlite` beside a local store), else None. Writers use it so that a write is
        leased against GC, recorded and permission-checked like a hub push: a tag or snapshot
        written beside the catalog is what GC's roots were missing."""
        url = os.environ.get("CLAWSTORE_CATALOG")
        if not url:
            from clawstore.backends.base import LocalRoot

            backend = self.store.backend
            if not isinstance(backend, LocalRoot) or not (Path(backend.root) / "catalog.sqlite").exists():
                return None
        from clawstore.cli.hub import _hub

        return _hub(self, url or None)

    @contextmanager
    def writing_store(self, repo: str | None, what: str) -> Iterator[clawstore.ArtifactStore]:
        """The store a loose write (`blob put`, `manifest put`) goes into: beside a catalog, a
        hub session on `repo` (push permission-checked, the content recorded and leased like
        any hub push, a manifest linked to `repo`); without one, the store itself. Beside a
        catalog the repository must be named: a write the catalog cannot attribute is one its
        permissions and GC roots would not see."""
        found = self.hub()
        if found is None:
            yield self.store
            return
        if repo is None:
            raise ClawstoreError(
                f"this store has a catalog: name the repository {what} is pushed to with --repo "
                "REPO (the write is then permission-checked, recorded and leased like a hub push)"
            )
        hub, principal = found
        with hub.session(principal, repo) as session:
            yield session

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


pass_cli = click.make_pass_decorator(CliContext)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` to stderr and exit non-zero (no traceback)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def is_interactive() -> bool:
    """Progress bars only on a terminal; quiet when piped or in CI."""
    return sys.stderr.isatty()


class Progress:
    """A rich progress bar on a terminal, nothing otherwise. `advance(n)` per unit of work."""

    def __init__(self, description: str, total: int | None, *, unit: str = "bytes") -> None:
        self._bar: Any = None
        self._task: Any = None
        if not is_interactive():
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [MofNCompleteColumn()]
        columns.append(TimeRemainingColumn())
        self._bar = RichProgress(*columns, transient=True, console=_stderr_console())
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, **kw)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress(description: str, total: int | None, *, unit: str = "bytes") -> Iterator[Progress]:
    with Progress(description, total, unit=unit) as p:
        yield p


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unicode_message(e: UnicodeError) -> str:
    """Which name was not valid UTF-8, escaped (never a surrogate or a raw byte on the terminal)."""
    obj = getattr(e, "object", None)
    start = getattr(e, "start", 0)
    end = getattr(e, "end", 0)
    if isinstance(obj, str):
        lo = max(0, start - 40)
        snippet = obj[lo : end + 8].encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        return f"not valid UTF-8 (file names must be UTF-8): ...{snippet}..."
    if isinstance(obj, bytes | bytearray):
        snippet = bytes(obj[max(0, start - 40) : end + 8]).decode("utf-8", "backslashreplace")
        return f"not valid UTF-8 (file names must be UTF-8): ...{snippet}..."
    return f"not valid UTF-8: {e}"


def run_main(group: click.Group, argv: list[str] | None = None) -> NoReturn:
    """Run the CLI: clawstore errors and OS errors become one `error:` line and exit 1."""
    try:
        rv = group.main(args=argv, prog_name="clawstore", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ClawstoreError as e:
        fail(f"{e}" if str(e) else type(e).__name__)
    except OSError as e:
        fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except UnicodeError as e:
        fail(_unicode_message(e))
    except (ValueError, ImportError) as e:
        # Bad input as libraries report it (an endpoint that is not a URL, a file name that is
        # not UTF-8, a driver that is not installed): one line, like our own errors.
        fail(_first_line(e))
    except Exception as e:
        family = type(e).__module__.split(".")[0]
        if family in ("botocore", "boto3", "s3transfer"):
            fail(f"S3: {_first_line(e)}")
        if family in ("sqlalchemy", "psycopg", "psycopg2", "alembic"):
            fail(f"catalog: {_first_line(e)}")
        raise
    sys.exit(rv if isinstance(rv, int) else 0)


def human_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 3.2 GiB (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
