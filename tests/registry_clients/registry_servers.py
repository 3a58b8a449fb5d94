"""Registry server processes for the client tests and benches/bench_registry.py.

Two servers speak the OCI Distribution API here, each in a child process on a free loopback port:

    DistributionServer  Debian's `docker-registry` (CNCF distribution 2.8), the reference server,
                        with its own config file in a temp dir (filesystem or S3 storage driver,
                        optional htpasswd auth)
    ClawstoreServer     `clawstore serve` over a store URL (local path or s3://...)

`start()` returns once `GET /v2/` answers (200, or 401 when auth is on); a server that exits
before that raises with its log. Both are context managers and stop their process on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How long a server may take to answer /v2/ after its process started.
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    """What a client passes as `--creds USER:PASSWORD` (for clawstore the password is a token)."""

    user: str
    password: str

    @property
    def colon(self) -> str:
        return f"{self.user}:{self.password}"


@dataclass(frozen=True)
class S3Target:
    """Where an S3-backed server keeps its data: a bucket on an S3 endpoint (moto in the tests)."""

    endpoint: str
    bucket: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RegistryServer:
    """A registry in a child process. Subclasses say how to write its config and command line."""

    kind = "?"

    def __init__(self, workdir: Path, credentials: Credentials | None = None, tls: bool = False) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials = credentials
        #: (certificate, key) of a self-signed certificate for 127.0.0.1 when serving https.
        self.tls_files = self_signed_certificate(workdir) if tls else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "server.log"

    # -- what a subclass provides ------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_files else 'http'}://{self.host}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RegistryServer:
        # Another process may take the free port between our probe and the server's bind; then the
        # server exits at once and we try again on another port.
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(self.port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.environment(),
                    cwd=self.workdir,
                )
            try:
                self._wait_ready()
                return self
            except _ExitedEarly as e:
                last_error = str(e)
                if "address already in use" not in last_error.lower():
                    break
        raise RuntimeError(f"{self.kind} registry did not start:\n{last_error}")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self.proc.poll()
            if code is not None:
                raise _ExitedEarly(f"exit code {code}; log:\n{self.log()}")
            status = probe(self.url + "/v2/")
            if status in (200, 401):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.kind} registry: /v2/ did not answer in {START_TIMEOUT}s:\n{self.log()}"
                )
            # Polling a socket that is not listening yet: there is no event to wait on.
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{self.kind} registry at {self.host}>"


class _ExitedEarly(RuntimeError):
    pass


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 made by openssl (clients run with TLS checks off)."""
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def probe(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing answers (certificates are not checked)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, urllib.error.URLError):
        return None


# -- Debian's docker-registry -----------------------------------------------------------------


def distribution_binary() -> str | None:
    return shutil.which("docker-registry") or shutil.which("registry")


class DistributionServer(RegistryServer):
    """CNCF distribution 2.8 (`docker-registry serve CONFIG`), config and data in `workdir`."""

    kind = "distribution"

    def __init__(
        self,
        workdir: Path,
        credentials: Credentials | None = None,
        s3: S3Target | None = None,
        tls: bool = False,
        redirect: bool = False,
    ) -> None:
        super().__init__(workdir, credentials, tls)
        self.s3 = s3
        self.redirect = redirect

    def command(self, port: int) -> list[str]:
        binary = distribution_binary()
        if binary is None:
            raise RuntimeError("docker-registry is not installed (scripts/setup.sh installs it)")
        config = self.workdir / "config.yml"
        config.write_text(self._config(port))
        return [binary, "serve", str(config)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The aws-sdk-go in distribution 2.8 panics on a custom CA bundle with its own transport;
        # the S3 endpoint here is plain http on loopback, so no bundle is needed.
        env.pop("AWS_CA_BUNDLE", None)
        return env

    def _config(self, port: int) -> str:
        if self.s3 is None:
            storage = f"""  filesystem:
    rootdirectory: {self.workdir / "data"}
"""
        else:
            storage = f"""  s3:
    accesskey: {self.s3.access_key}
    secretkey: {self.s3.secret_key}
    region: {self.s3.region}
    regionendpoint: {self.s3.endpoint}
    bucket: {self.s3.bucket}
    rootdirectory: /distribution
    secure: false
    v4auth: true
    forcepathstyle: true
  redirect:
    disable: {"false" if self.redirect else "true"}
"""
        auth = ""
        if self.credentials is not None:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(htpasswd_line(self.credentials) + "\n")
            auth = f"""auth:
  htpasswd:
    realm: clawstore-tests
    path: {htpasswd}
"""
        tls = ""
        if self.tls_files is not None:
            tls = f"""  tls:
    certificate: {self.tls_files[0]}
    key: {self.tls_files[1]}
"""
        return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
{storage}  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
{tls}{auth}"""


def htpasswd_line(credentials: Credentials) -> str:
    """`user:$2b$...`: distribution's htpasswd accepts bcrypt hashes only."""
    import bcrypt

    hashed = bcrypt.hashpw(credentials.password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{credentials.user}:{hashed}"


# -- clawstore serve --------------------------------------------------------------------------


class ClawstoreServer(RegistryServer):
    """`clawstore --store URL serve --listen 127.0.0.1:0`; the port comes from the one line the
    server prints when it listens (`clawstore registry: serving URL on http://HOST:PORT`).

    With `credentials_user`, that principal gets a token (the password) and `grants` ((action,
    repository pattern) pairs; pull, push and delete on `**` by default) and anonymous clients
    get nothing; without, the principal `anonymous` may pull, push and delete everywhere.
    `catalog` is a catalog URL (default: the store's own SQLite file; S3 stores need one).
    """

    kind = "clawstore"

    def __init__(
        self,
        workdir: Path,
        store_url: str,
        credentials_user: str | None = None,
        grants: list[tuple[str, str]] | None = None,
        catalog: str | None = None,
        extra_args: list[str] | None = None,
        tls: bool = False,
    ) -> None:
        super().__init__(workdir, None, tls)
        self.store_url = store_url
        self.catalog = catalog
        self.extra_args = extra_args or []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        if credentials_user is None:
            for action in ("pull", "push", "delete"):
                self.admin("grant", "add", "anonymous", action, "**")
        else:
            token = self.admin("token", "issue", credentials_user).strip().splitlines()[-1].strip()
            assert token.startswith("cst_"), token
            for action, pattern in grants or [("pull", "**"), ("push", "**"), ("delete", "**")]:
                self.admin("grant", "add", credentials_user, action, pattern)
            self.credentials = Credentials(credentials_user, token)

    def base_args(self) -> list[str]:
        args = [sys.executable, "-m", "clawstore", "--store", self.store_url]
        return args

    def catalog_args(self) -> list[str]:
        return ["--catalog", self.catalog] if self.catalog else []

    def admin(self, *args: str) -> str:
        """A hub command as the local administrator, e.g. `admin("grant", "add", ...)`."""
        proc = subprocess.run(
            [*self.base_args(), *args, *self.catalog_args()],
            env=self.environment(),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"clawstore {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def command(self, port: int) -> list[str]:
        return [
            *self.base_args(),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *self.catalog_args(),
            *self.tls_args(),
            *self.extra_args,
        ]

    def tls_args(self) -> list[str]:
        if self.tls_files is None:
            return []
        return ["--tls-cert", str(self.tls_files[0]), "--tls-key", str(self.tls_files[1])]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CLAWSTORE_TOKEN", None)
        return env

    def start(self) -> RegistryServer:
        self._ready.clear()
        self.proc = subprocess.Popen(
            self.command(0),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            cwd=self.workdir,
        )
        self._reader = threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or self.port == 0:
            self.stop()
            raise RuntimeError(f"clawstore serve did not start:\n{self.log()}")
        self._wait_ready()
        return self

    def _read_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the server's stderr to the log file; note the port from the 'serving' line."""
        assert proc.stderr is not None
        with open(self.log_path, "ab") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace")
                if not self._ready.is_set() and " on http" in text and "serving" in text:
                    # "... on http://127.0.0.1:PORT" or "... on https://127.0.0.1:PORT"
                    self.port = int(text.strip().rsplit(":", 1)[1])
                    self._ready.set()
        self._ready.set()  # exited before (or after) it said it listens


def stop_all(servers: list[RegistryServer]) -> None:
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
