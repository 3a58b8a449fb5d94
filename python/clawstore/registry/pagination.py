"""`n` / `last` pagination of sorted name lists (tags, `_catalog`) with the `Link` header."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request

from clawstore.registry.errors import RegistryError

#: Largest page served (a client asking for more gets this many and a Link to the rest).
MAX_PAGE = 10000


def paginate(names: list[str], request: Request, path: str) -> tuple[list[str], dict[str, str]]:
    """The page of sorted `names` after `last`, at most `n`; a `Link: <...>; rel="next"` header
    when more remain."""
    q = request.query_params
    last = q.get("last")
    n_text = q.get("n")
    out = sorted(names)
    if last is not None:
        out = [x for x in out if x > last]
    limit = MAX_PAGE
    if n_text is not None:
        try:
            limit = int(n_text)
        except ValueError:
            raise RegistryError("UNSUPPORTED", f"n must be an integer, not {n_text!r}", status=400) from None
        if limit < 0:
            raise RegistryError("UNSUPPORTED", "n must not be negative", status=400)
        limit = min(limit, MAX_PAGE)
    page = out[:limit]
    headers = {}
    if len(out) > len(page) and page:
        headers["Link"] = f'<{path}?{urlencode({"n": limit, "last": page[-1]})}>; rel="next"'
    return page, headers


__all__ = ["MAX_PAGE", "paginate"]
