"""A loopback HTTP/1.1 proxy that injects S3 faults between a client and a server.

For a seeded, bounded fraction of requests it:

    500        answers InternalError itself (the request never reaches the server)
    503        answers SlowDown itself
    reset      resets the connection before forwarding (RST, no response)
    lost       forwards the request, then resets instead of relaying the response: the write
               happened but the client cannot know (the ambiguous case retries must handle)
    truncate   relays the response head and half of the body, then resets (large GETs)
    corrupt    flips one byte of the request body before forwarding (large PUTs: the server
               stores bad bytes under an ETag that is not our MD5)

Only what the test asks for is injected; `counts` records what happened, so a test can check that
faults really occurred. (Servers that treat conditional headers differently are imitated with
client hooks in test_s3.py instead: a proxy that changed signed headers would break SigV4 on any
server that checks signatures.)
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable

FAULTS = ("500", "503", "reset", "lost", "truncate", "corrupt")

_ERROR_BODY = {
    "500": (
        b"500 Internal Server Error",
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
        b"<Message>injected</Message></Error>",
    ),
    "503": (
        b"503 Slow Down",
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
        b"<Message>Please reduce your request rate.</Message></Error>",
    ),
}


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(max(1 << 16, n - len(self.buf)))
            if not data:
                raise ConnectionError("peer closed mid-body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _headers(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    hdrs: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        rate: float = 0.0,
        faults: Iterable[str] = FAULTS,
        seed: int = 0,
        max_faults: int = 1000,
        min_body_for_corrupt: int = 1 << 20,
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate = rate
        self.faults = tuple(faults)
        self.rng = random.Random(seed)
        self.max_faults = max_faults
        self.min_body_for_corrupt = min_body_for_corrupt
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def injected(self) -> int:
        return sum(v for k, v in self.counts.items() if k in FAULTS)

    def _choose(self, method: bytes, body_len: int) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.injected() >= self.max_faults or self.rng.random() >= self.rate:
                return None
            options = [
                f
                for f in self.faults
                if not (f == "truncate" and method != b"GET")
                and not (f == "corrupt" and body_len < self.min_body_for_corrupt)
            ]
            if not options:
                return None
            fault = self.rng.choice(options)
            self.counts[fault] += 1
            return fault

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client_sock: socket.socket) -> None:
        client = _Conn(client_sock)
        upstream: _Conn | None = None
        try:
            while True:
                head = client.read_until(b"\r\n\r\n")
                if head is None:
                    return
                request_line, hdrs = _headers(head[:-4])
                method = request_line.split(b" ", 1)[0]
                length = int(hdrs.get(b"content-length", b"0"))
                if b"chunked" in hdrs.get(b"transfer-encoding", b""):
                    raise ConnectionError("chunked request bodies are not supported by the proxy")
                if hdrs.get(b"expect", b"").lower() == b"100-continue":
                    client_sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = client.read_exact(length) if length else b""
                # We forward the whole body at once: no Expect handshake upstream.
                drop = (b"expect:",)
                lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(drop)]
                head = b"\r\n".join(lines) + b"\r\n\r\n"
                fault = self._choose(method, len(body))
                if fault in _ERROR_BODY:
                    status, payload = _ERROR_BODY[fault]
                    client_sock.sendall(
                        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
                    )
                    continue
                if fault == "reset":
                    _rst(client_sock)
                    return
                if fault == "corrupt":
                    i = len(body) // 2
                    body = body[:i] + bytes([body[i] ^ 0x40]) + body[i + 1 :]
                if upstream is None:
                    upstream = _Conn(socket.create_connection(self.upstream))
                upstream.sock.sendall(head + body)
                while True:
                    resp_head = upstream.read_until(b"\r\n\r\n")
                    if resp_head is None:
                        raise ConnectionError("upstream closed")
                    status_line, rh = _headers(resp_head[:-4])
                    code = int(status_line.split(b" ")[1])
                    if not 100 <= code < 200:
                        break  # interim responses are not relayed
                no_body = method == b"HEAD" or code in (204, 304)
                if no_body:
                    resp_body = b""
                elif b"content-length" in rh:
                    resp_body = upstream.read_exact(int(rh[b"content-length"]))
                elif b"chunked" in rh.get(b"transfer-encoding", b""):
                    resp_body = self._read_chunked(upstream)
                else:  # body until close
                    chunks = [upstream.buf]
                    upstream.buf = b""
                    while data := upstream.sock.recv(1 << 16):
                        chunks.append(data)
                    resp_body = b"".join(chunks)
                    upstream.sock.close()
                    upstream = None
                if fault == "lost":
                    _rst(client_sock)
                    return
                if fault == "truncate" and len(resp_body) > 1:
                    client_sock.sendall(resp_head + resp_body[: len(resp_body) // 2])
                    _rst(client_sock)
                    return
                client_sock.sendall(resp_head + resp_body)
        except (OSError, ConnectionError, ValueError, IndexError):
            return
        finally:
            if upstream is not None:
                upstream.sock.close()
            with contextlib.suppress(OSError):
                client_sock.close()

    @staticmethod
    def _read_chunked(conn: _Conn) -> bytes:
        out = []
        while True:
            line = conn.read_until(b"\r\n")
            if line is None:
                raise ConnectionError("upstream closed in chunked body")
            out.append(line)
            size = int(line.strip().split(b";")[0], 16)
            out.append(conn.read_exact(size + 2))
            if size == 0:
                return b"".join(out)

    def close(self) -> None:
        self._stop = True
        self.listener.close()
