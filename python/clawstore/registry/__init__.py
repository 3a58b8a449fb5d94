"""`clawstore serve`: the OCI Distribution Spec v1.1 HTTP API over the hub.

    app.py         the ASGI application (Starlette), options, uvicorn factory
    routes.py      the endpoints, each a translation of HTTP to a Hub call
    auth.py        Basic / Bearer credentials, the /token endpoint, challenges
    errors.py      the spec's JSON error codes and the mapping from clawstore errors
    pagination.py  n / last and Link for tag lists and _catalog
    streams.py     request bodies as blocking files, blocking readers as streamed responses

Upload sessions live in the catalog and the store (`clawstore.hub.uploads`), never in a
process: several `serve` processes on one catalog and store are one registry.
"""

from clawstore.registry.app import RegistryOptions, create_app

__all__ = ["RegistryOptions", "create_app"]
