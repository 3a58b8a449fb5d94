"""A real S3 HTTP server for the tests: moto's server in a child process on a free loopback port.

Run as a script it serves until killed and prints its port on the first line of stdout.
Imported by conftest.py it provides the fixtures:

    s3_endpoint   session-wide moto server: "http://127.0.0.1:PORT"
    s3_bucket     a fresh bucket per test (a boto3 client is `s3_client`)
    s3_store      an ArtifactStore on s3://<fresh bucket>/store (small parts, fast retries)

moto checks If-Match / If-None-Match and then writes in two steps, so two racing conditional
requests can both pass (real S3, MinIO and RGW decide atomically). To test *our* compare-and-swap
protocol rather than moto's race, the server serialises conditional requests with one lock.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

REGION = "us-east-1"


class SerialiseConditional:
    """WSGI middleware: requests carrying If-Match / If-None-Match run one at a time."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ:
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, port, SerialiseConditional(app), threaded=True)
    os.environ["MOTO_PORT"] = str(server.server_port)
    print(server.server_port, flush=True)
    server.serve_forever()


class MotoProcess:
    """moto's S3 server in a child process (so it does not share our GIL)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.proc.kill()
            raise RuntimeError(f"moto server did not start (got {line!r})")
        self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def set_fake_credentials() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(var, None)


def make_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def new_bucket(client: Any) -> str:
    name = f"clawstore-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    return name


def store_url(endpoint: str, bucket: str, prefix: str = "store") -> str:
    return f"s3://{bucket}/{prefix}?endpoint_url={endpoint}&region={REGION}"


#: Options the tests use: minimum part size so the multipart path runs on small data, fast retries.
TEST_OPTIONS: dict[str, Any] = {
    "part_size": 5 << 20,
    "stream_part_size": 5 << 20,
    "multipart_threshold": 5 << 20,
    "concurrency": 4,
    "download_concurrency": 4,
    "download_part_size": 4 << 20,
    "retry_base": 0.01,
    "retry_cap": 0.2,
    "read_timeout": 15.0,
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    external = os.environ.get("CLAWSTORE_TEST_S3_ENDPOINT")
    if external:
        # Another S3 implementation, run by the caller (credentials from the environment).
        yield external
        return
    set_fake_credentials()
    server = MotoProcess()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    return make_client(s3_endpoint)


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[str]:
    name = new_bucket(s3_client)
    yield name
    # Free moto's memory: delete what the test left (multipart uploads included).
    with contextlib.suppress(Exception):
        for up in s3_client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3_client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        paginator = s3_client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for obj in page.get("Contents", []):
                s3_client.delete_object(Bucket=name, Key=obj["Key"])
        s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_store(s3_endpoint: str, s3_bucket: str) -> Iterator[Any]:
    import clawstore

    with clawstore.open(store_url(s3_endpoint, s3_bucket), **TEST_OPTIONS) as s:
        yield s


if __name__ == "__main__":
    serve()
