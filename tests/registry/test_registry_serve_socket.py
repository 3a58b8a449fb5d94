"""`clawstore serve` hands uvicorn its listening socket as a TCP socket.

uvicorn wraps a bare descriptor (`fd=`) as an AF_UNIX socket; the event loop then serves it as a
Unix socket and never sets TCP_NODELAY on accepted connections, so every small response waited
for the client's delayed ACK (~40 ms: 650 requests/s over 32 connections on an idle machine).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvicorn.supervisors
from clawstore.cli import cli
from click.testing import CliRunner


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_gives_uvicorn_a_tcp_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    seen: list[socket.socket] = []

    def fake_run(self: Any, sockets: list[socket.socket] | None = None, **_: Any) -> None:
        assert sockets, "no socket handed to uvicorn"
        seen.extend(sockets)
        self.started = True

    class FakeMultiprocess:
        def __init__(self, config: Any, sockets: list[socket.socket], **_: Any) -> None:
            self.sockets = sockets

        def run(self) -> None:
            seen.extend(self.sockets)

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # a descriptor, not a socket
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", FakeMultiprocess)
    result = CliRunner().invoke(
        cli,
        [
            "--store",
            (tmp_path / "store").as_uri(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            str(workers),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert len(seen) == 1
    sock = seen[0]
    try:
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    finally:
        sock.close()
