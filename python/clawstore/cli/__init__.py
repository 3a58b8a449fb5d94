"""The `clawstore` command line (click + rich). See `clawstore --help`.

Each area lives in its own module with a `register(group)`; add new areas to `_AREAS`. Each
command carries its own decorators there (`existing_store` on the ones that only read or delete,
so a mistyped store path fails instead of becoming an empty store).
"""

from __future__ import annotations

import importlib

import click

from clawstore.cli.common import CliContext, run_main

#: Subcommand modules under clawstore.cli, each exposing register(group).
_AREAS: tuple[str, ...] = ("blob", "manifest", "tags", "fsck", "volume", "hub", "log", "cache", "serve")


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


def main() -> None:
    run_main(cli)


__all__ = ["cli", "main"]
