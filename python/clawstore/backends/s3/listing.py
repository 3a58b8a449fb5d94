"""Listing the store's objects with the fanout's prefixes in parallel.

One `ListObjectsV2` walk of `blobs/` returns 1,000 keys per request, one request after the
other: minutes for tens of millions of objects. The key layout fans out over 256 prefixes per
algorithm (`blobs/<alg>/<2 hex>/`), so the walk is split there: the prefixes present are found
with two delimiter listings (algorithms, then their two-hex directories), and then listed
`concurrency` at a time. Results come out in key order (prefix by prefix), with each object's
size from the listing (no HEAD per object), holding at most `concurrency` prefixes' listings in
memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from clawstore.digest import Digest

from .layout import S3Layout
from .transport import Transport


class FanoutLister:
    def __init__(self, transport: Transport, layout: S3Layout, *, concurrency: int = 8) -> None:
        self.transport = transport
        self.layout = layout
        self.concurrency = max(1, concurrency)

    def prefixes(self, prefix: str) -> list[str]:
        """The "directories" right below `prefix` (CommonPrefixes of a delimiter listing)."""
        out: list[str] = []
        kw: dict[str, str] = {"Prefix": prefix, "Delimiter": "/"}
        while True:
            resp = self.transport.call("list_objects_v2", **kw)
            out += [p["Prefix"] for p in resp.get("CommonPrefixes", []) or []]
            if not resp.get("IsTruncated"):
                return sorted(out)
            kw["ContinuationToken"] = resp["NextContinuationToken"]

    def _list(self, base: str, prefix: str) -> list[tuple[Digest, int]]:
        out = []
        for obj in self.transport.iter_keys(prefix):
            d = self.layout.parse_fanout(base, obj["Key"])
            if d is not None:
                out.append((d, int(obj.get("Size", 0))))
        return out

    def iter_sized(self, base: str) -> Iterator[tuple[Digest, int]]:
        """(digest, size) of every object under `base` (layout.blobs or layout.manifests) at its
        fanout key, in key order."""
        fanout = [p for alg in self.prefixes(base) for p in self.prefixes(alg)]
        if not fanout:
            return
        if self.concurrency == 1 or len(fanout) == 1:
            for p in fanout:
                yield from self._list(base, p)
            return
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-list") as ex:
            window: deque[Future[list[tuple[Digest, int]]]] = deque()
            todo = iter(fanout)
            try:
                for p in todo:
                    window.append(ex.submit(self._list, base, p))
                    if len(window) >= self.concurrency:
                        break
                while window:
                    got = window.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        window.append(ex.submit(self._list, base, nxt))
                    yield from got
            finally:
                for f in window:
                    f.cancel()


__all__ = ["FanoutLister"]
