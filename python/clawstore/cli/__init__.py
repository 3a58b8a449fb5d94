"""The `clawstore` command line (click + rich). See `clawstore --help`.

Each area lives in its own module (`clawstore/cli/<area>.py`) defining click commands. The
top-level group loads a command's module only when that command runs (or when help lists it):
`clawstore volume snapshot ...` imports the volume code and nothing of the catalog, S3, logs or
caches, so a local command starts in the time Python needs for what it uses. Add new commands to
`_COMMANDS`. Each command carries its own decorators there (`existing_store` on the ones that
only read or delete, so a mistyped store path fails instead of becoming an empty store).
"""

from __future__ import annotations

import importlib

import click

from clawstore.cli.common import CliContext, run_main

#: Top-level command name -> "module:attribute" of its click command or group (under
#: clawstore.cli), imported on first use.
_COMMANDS: dict[str, str] = {
    "blob": "blob:blob_group",
    "manifest": "manifest:manifest_group",
    "tag": "tags:tag_cmd",
    "untag": "tags:untag_cmd",
    "resolve": "tags:resolve_cmd",
    "tags": "tags:tags_cmd",
    "repos": "tags:repos_cmd",
    "fsck": "fsck:fsck_cmd",
    "volume": "volume:volume_group",
    "gc": "hub:gc_cmd",
    "checkpoint": "hub:checkpoint",
    "retention": "hub:retention",
    "export": "hub:export_cmd",
    "import": "hub:import_cmd",
    "token": "hub:token",
    "grant": "hub:grant",
    "lease": "hub:lease",
    "catalog": "hub:catalog",
    "log": "log:log_group",
    "cache": "cache:cache_group",
    "serve": "serve:serve",
}


def load_command(name: str) -> click.Command:
    """The click command registered as `name` in `_COMMANDS` (importing its module)."""
    module, attr = _COMMANDS[name].split(":")
    cmd = getattr(importlib.import_module(f"clawstore.cli.{module}"), attr)
    if not isinstance(cmd, click.Command) or cmd.name != name:
        raise RuntimeError(f"clawstore.cli.{module}.{attr} is not the `{name}` command")
    return cmd


class LazyGroup(click.Group):
    """A group whose subcommands (`_COMMANDS`) are imported when first looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and cmd_name in _COMMANDS:
            cmd = load_command(cmd_name)
            self.add_command(cmd)
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def main() -> None:
    run_main(cli)


__all__ = ["cli", "load_command", "main"]
