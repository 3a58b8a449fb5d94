"""The `clawstore` command line (click + rich). See `clawstore --help`.

Each area lives in its own module with a `register(group)`; add new areas to `_AREAS`.
"""

from __future__ import annotations

import importlib

import click

from clawstore.cli.common import CliContext, existing_store, run_main

#: Subcommand modules under clawstore.cli, each exposing register(group).
_AREAS: tuple[str, ...] = ("blob", "manifest", "tags", "fsck", "volume", "hub")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store_url",
    envvar="CLAWSTORE_URL",
    metavar="URL",
    help="Store URL: file:///path or s3://bucket/prefix?endpoint_url=... "
    "[env CLAWSTORE_URL; default: a local store in the user data directory]",
)
@click.version_option(package_name="clawstore")
@click.pass_context
def cli(ctx: click.Context, store_url: str | None) -> None:
    """Content-addressed artifact store with OCI semantics."""
    obj = CliContext(store_url)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


for _area in _AREAS:
    importlib.import_module(f"clawstore.cli.{_area}").register(cli)

#: Commands of other areas that only work on an existing store (they read it, or delete from
#: it): marked here with `existing_store` until their own modules carry the decorator, so that a
#: mistyped store path fails instead of becoming an empty store. tests/test_cli.py checks that
#: every path still names a command.
EXISTING_STORE_COMMANDS: tuple[str, ...] = (
    "gc",
    "volume restore",
    "volume ls",
    "volume history",
    "checkpoint restore",
    "checkpoint ls",
    "checkpoint diff",
    "retention ls",
    "retention apply",
    "export",
    "grant ls",
    "lease ls",
    "lease release",
    "catalog fsck",
    "catalog history",
)


def _command(path: str) -> click.Command | None:
    cmd: click.Command | None = cli
    for name in path.split():
        cmd = cmd.commands.get(name) if isinstance(cmd, click.Group) else None
    return cmd


for _path in EXISTING_STORE_COMMANDS:
    if (_cmd := _command(_path)) is not None:
        existing_store(_cmd)


def main() -> None:
    run_main(cli)


__all__ = ["cli", "main"]
