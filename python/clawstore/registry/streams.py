"""Request and response bodies between the event loop and the worker threads the hub runs in:
a request body read by blocking code as a file (never whole in memory), and a blocking reader
served as a streamed response."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from starlette.requests import Request

#: Bytes gathered from the request per trip between the worker thread and the event loop.
FILL = 1 << 20
#: Bytes read per trip when sending a blob.
SEND = 1 << 20


class BodyReader(io.RawIOBase):
    """A request body as a blocking binary file, for code running in a worker thread started by
    `anyio.to_thread.run_sync`: each read brings up to FILL bytes over from the event loop."""

    def __init__(self, request: Request) -> None:
        super().__init__()
        self._it = request.stream().__aiter__()
        # Made in the event loop; read from any thread (the S3 uploader reads parts from its own
        # pool, not from the anyio worker thread), so the loop is named explicitly.
        self._token = anyio.lowlevel.current_token()
        self._buf = memoryview(b"")
        self._eof = False
        self.received = 0

    def readable(self) -> bool:
        return True

    async def _fill(self) -> bytes:
        parts = []
        n = 0
        while n < FILL:
            try:
                chunk = await self._it.__anext__()
            except StopAsyncIteration:
                self._eof = True
                break
            if chunk:
                parts.append(chunk)
                n += len(chunk)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._buf:
            if self._eof:
                return 0
            self._buf = memoryview(anyio.from_thread.run(self._fill, token=self._token))
            if not self._buf:
                return 0
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.received += n
        return n


def body_file(request: Request) -> io.BufferedReader:
    return io.BufferedReader(BodyReader(request), FILL)


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (the rest is not read)."""
    parts = []
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


async def send_reader(reader: Any, length: int | None = None) -> AsyncIterator[bytes]:
    """Stream a blocking reader (the store's verifying reader: a mismatch raises before the last
    byte, and the connection is cut short) from a worker thread, closing it at the end."""
    try:
        left = length
        while left is None or left > 0:
            want = SEND if left is None else min(SEND, left)
            data = await anyio.to_thread.run_sync(reader.read, want)
            if not data:
                break
            if left is not None:
                left -= len(data)
            yield data
    finally:
        await anyio.to_thread.run_sync(reader.close)


__all__ = ["BodyReader", "body_file", "read_limited", "run_blocking", "send_reader"]
