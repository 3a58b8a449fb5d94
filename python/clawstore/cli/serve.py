"""`clawstore serve`: run the OCI registry (`clawstore.registry`) with uvicorn.

Same store and catalog as every other command (`--store`/`$CLAWSTORE_URL`, `--catalog`/
`$CLAWSTORE_CATALOG`). Several processes (`--workers`, or several `serve` commands on other
hosts) on one catalog and store are one registry.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import click

from clawstore.cli.common import CliContext, pass_cli
from clawstore.cli.hub import DURATION
from clawstore.errors import ClawstoreError

#: S3 tunables a registry needs other than the store's defaults, unless the URL sets them: every
#: chunk a client sends is a stream of unknown length, which the S3 backend cuts into
#: `stream_part_size` parts with `concurrency` in flight, and a registry takes many such
#: streams at once (skopeo pushes several layers in parallel). 8 MiB x 4 keeps a push's memory
#: near 32 MiB per layer instead of 256.
S3_REGISTRY_DEFAULTS = {"stream_part_size": "8MiB", "concurrency": "4"}


def with_registry_defaults(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        return url
    query = parse_qsl(parsed.query, keep_blank_values=True)
    given = {k for k, _v in query}
    query += [(k, v) for k, v in S3_REGISTRY_DEFAULTS.items() if k not in given]
    return urlunparse(parsed._replace(query=urlencode(query, safe=":/")))


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


@click.command("serve")
@click.option(
    "--listen",
    default="127.0.0.1:5000",
    show_default=True,
    envvar="CLAWSTORE_LISTEN",
    metavar="HOST:PORT",
    help="Address to listen on [env CLAWSTORE_LISTEN]; port 0 picks a free one.",
)
@click.option(
    "--catalog",
    "catalog_url",
    metavar="URL",
    default=None,
    help="Catalog database URL [env CLAWSTORE_CATALOG; default <store>/catalog.sqlite]",
)
@click.option(
    "--create-catalog", is_flag=True, help="Start a new catalog at --catalog for a store with content."
)
@click.option(
    "--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Server processes."
)
@click.option(
    "--service", default="clawstore", show_default=True, help="Service name in tokens and challenges."
)
@click.option(
    "--realm",
    default=None,
    metavar="URL",
    help="Token endpoint URL in challenges [default: <base URL>/token].",
)
@click.option(
    "--token-ttl", type=DURATION, default="5m", show_default=True, help="Lifetime of /token tokens."
)
@click.option(
    "--upload-ttl",
    type=DURATION,
    default="1h",
    show_default=True,
    help="An upload session expires this long after its last chunk; a pushed blob stays held as long.",
)
@click.option(
    "--blob-redirect",
    type=DURATION,
    default=None,
    metavar="TTL",
    help="Answer blob GETs with a 307 to a presigned URL valid TTL (S3 stores; the client then "
    "reads S3 directly and checks the digest itself). Default: stream verified bytes.",
)
@click.option("--log-level", default="warning", show_default=True, help="uvicorn log level.")
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Serve https with this PEM certificate (chain); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM private key for --tls-cert.",
)
@pass_cli
def serve(
    cli_ctx: CliContext,
    listen: str,
    catalog_url: str | None,
    create_catalog: bool,
    workers: int,
    service: str,
    realm: str | None,
    token_ttl: float,
    upload_ttl: float,
    blob_redirect: float | None,
    log_level: str,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Serve the store as an OCI registry (Distribution Spec v1.1) over the hub's grants.

    Credentials: a hub token (`clawstore token issue NAME`) as the Basic password, or as a
    Bearer token, or a token from /token. Anonymous callers may do what is granted to the
    principal `anonymous` (`clawstore grant add anonymous pull '**'`)."""
    import uvicorn

    import clawstore
    from clawstore.backends.base import PresignedReads
    from clawstore.backends.s3 import S3Backend
    from clawstore.hub import Hub
    from clawstore.registry.app import OPTIONS_ENV, RegistryOptions, create_app

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    host, port = _listen(listen)
    catalog = catalog_url or os.environ.get("CLAWSTORE_CATALOG")
    # A bad store or catalog URL fails here with one line, and migrations run before any worker
    # starts. The store the registry serves, opened (an S3 server probed) once, here: one worker uses
    # it as is; several get the probe's findings and open the store without probing again (a
    # worker whose probe failed would exit with connections already queued on the socket).
    given = cli_ctx.store_url or os.environ.get("CLAWSTORE_URL")
    if given is not None and urlparse(given).scheme == "s3":
        # The URL as given (the store's own url keeps only endpoint and region, not tunables).
        store_url = with_registry_defaults(given)
        store = clawstore.open(store_url)
    else:
        store = cli_ctx.store
        store_url = store.url
    hub = Hub(store, catalog, create_catalog=create_catalog)
    if blob_redirect is not None and not isinstance(store.backend, PresignedReads):
        raise click.UsageError(f"--blob-redirect needs a store that presigns URLs (S3), not {store.url}")
    options = RegistryOptions(
        store_url=store_url,
        catalog_url=catalog,
        create_catalog=False,
        service=service,
        realm=realm,
        token_ttl=token_ttl,
        upload_ttl=upload_ttl,
        blob_redirect=blob_redirect,
        store_caps=asdict(store.backend.caps) if isinstance(store.backend, S3Backend) else None,
    )
    os.environ[OPTIONS_ENV] = options.to_env()
    # Bind here (port 0 works, and the line below says which port was taken), then hand the
    # socket to uvicorn and its workers.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise ClawstoreError(f"cannot listen on {listen}: {e.strerror or e}") from None
    sock.listen(2048)  # connections queue from now on: the line below means "ready"
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    scheme = "https" if tls_cert else "http"
    click.echo(f"clawstore registry: serving {store.url} on {scheme}://{shown}:{bound}", err=True)
    if workers == 1:  # this process serves, with the hub opened above
        app: Any = create_app(hub, options, close_hub=True)
        factory = False
    else:  # worker processes, each opening its own hub from the options (probe findings included)
        hub.close()
        app, factory = "clawstore.registry.app:from_env", True
    config = uvicorn.Config(
        app,
        factory=factory,
        workers=workers,
        log_level=log_level,
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=1 << 20,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
    # The bound socket itself goes to uvicorn, not its descriptor: uvicorn wraps a descriptor
    # as an AF_UNIX socket, so the event loop served it as a Unix socket and never set
    # TCP_NODELAY on its connections; every small response then waited out the client's
    # delayed ACK (Nagle): ~40 ms per request, 650 requests/s over 32 connections whatever
    # the CPU.
    server = uvicorn.Server(config)
    if workers == 1:
        server.run(sockets=[sock])
        if not server.started:
            raise SystemExit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
    else:
        import inspect

        from uvicorn.supervisors import Multiprocess

        # uvicorn < 0.30 took the worker function as `target`; later ones build it from config.
        extra = {"target": server.run} if "target" in inspect.signature(Multiprocess).parameters else {}
        Multiprocess(config, sockets=[sock], **extra).run()


__all__ = ["serve"]
