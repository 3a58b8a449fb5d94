"""Request and response bodies between the event loop and the worker threads the hub runs in:
a request body read by blocking code as a file (never whole in memory), and a blocking reader
served as a streamed response."""

from __future__ import annotations

import io
import queue
import threading
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


#: Chunks a blob's reader thread may run ahead of the socket.
AHEAD = 4


async def send_reader(reader: Any, length: int | None = None) -> AsyncIterator[bytes]:
    """Stream a blocking reader (the store's verifying reader: a mismatch raises before the last
    byte, and the connection is cut short), closing it at the end.

    The reader runs in a thread of its own, up to AHEAD chunks ahead of the socket: reading the
    backend (an S3 GET body, a file) and hashing it overlap with sending the previous chunk,
    where a read-then-send loop would leave one idle while the other works. A client that goes
    away stops the thread at its next chunk."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(AHEAD)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            left = length
            while left is None or left > 0:
                data = reader.read(SEND if left is None else min(SEND, left))
                if not data:
                    break
                if left is not None:
                    left -= len(data)
                if not put(data):
                    return
            put(None)
        except BaseException as e:  # handed to the event loop, raised there
            put(e)
        finally:
            reader.close()

    thread = threading.Thread(target=pump, name="registry-send", daemon=True)
    thread.start()
    try:
        while True:
            try:  # no thread trip while the reader is ahead
                item = chunks.get_nowait()
            except queue.Empty:
                item = await anyio.to_thread.run_sync(chunks.get)
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await anyio.to_thread.run_sync(thread.join)


__all__ = ["BodyReader", "body_file", "read_limited", "run_blocking", "send_reader"]
