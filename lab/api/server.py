"""The demo shop as a real deployment in the lab's server namespace: nginx terminates
TLS (HTTP/1.1 and HTTP/2, TLS 1.2 and 1.3) and proxies to the shop under uvicorn.

    client ns                     server ns
    curl, bots  --TLS-->  nginx 0.0.0.0:443, [::]:443
                            |  plaintext HTTP/1.0, one connection per request,
                            |  X-Forwarded-For / X-Forwarded-Port = the client
                            v
                          uvicorn 127.0.0.1:8000  (lab.api.app)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from lab.netns import LabError, Topology
from lab.records import SERVER_TIME_HEADER
from lab.tls_server import HOSTNAME, REPO_ROOT, Certificate, generate_certificate

NGINX: Final = "/usr/sbin/nginx"
# `http2 on;` arrived in nginx 1.25.1; older ones (Debian 12 ships 1.22) take
# `http2` as a parameter of `listen` instead.
HTTP2_DIRECTIVE_SINCE: Final = (1, 25, 1)
# Fields of nginx's JSON access log, in order: nginx variable names without '$'.
ACCESS_LOG_FIELDS: Final = (
    "remote_addr",
    "remote_port",
    "status",
    "request_method",
    "request_uri",
    "request_time",
    "msec",
    "server_protocol",
    "ssl_protocol",
    "http_user_agent",
)
# nginx writes every value as a string; these are numbers.
_INT_FIELDS: Final = ("remote_port", "status")
_FLOAT_FIELDS: Final = ("request_time", "msec")

_NGINX_CONFIG: Final = """\
# nginx in front of the botwall lab's demo shop; written by lab.api.server for one run.
user root;
worker_processes 1;
master_process on;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
worker_rlimit_nofile 16384;

events {{
    worker_connections 4096;
}}

http {{
    log_format shop_json escape=json '{log_format}';
    access_log {workdir}/access.jsonl shop_json;

    client_body_temp_path {workdir}/nginx-temp/client_body;
    proxy_temp_path {workdir}/nginx-temp/proxy;
    fastcgi_temp_path {workdir}/nginx-temp/fastcgi;
    uwsgi_temp_path {workdir}/nginx-temp/uwsgi;
    scgi_temp_path {workdir}/nginx-temp/scgi;

    default_type application/octet-stream;
    server_tokens off;
    keepalive_timeout 30s;

    server {{
        listen 0.0.0.0:{tls_port} ssl{listen_http2};
        listen [::]:{tls_port} ssl{listen_http2};
        {http2_directive}
        server_name {hostname};

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            # Plaintext HTTP/1.0 with "Connection: close" (nginx's defaults,
            # spelled out): every request opens a new upstream connection, and
            # the botwall sensor reads the request head at the start of each
            # upstream connection. Keep-alive upstream would hide all but the
            # first request of a connection from it.
            proxy_http_version 1.0;
            proxy_set_header Connection close;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # The CLIENT's source port (not the listener's port, which some
            # load balancers put here): botwall joins each request to the
            # client's own TLS connection by address and port.
            proxy_set_header X-Forwarded-Port $remote_port;
            proxy_set_header X-Forwarded-Proto https;
            # How long nginx itself took (lab.records.SERVER_TIME_HEADER), so
            # the lab tells a slow server from a delay botwall made.
            add_header {server_time_header} $request_time always;
        }}
    }}
}}
"""


def nginx_version(nginx: str = NGINX) -> tuple[int, ...]:
    """The version of the nginx binary, e.g. (1, 22, 1)."""
    try:
        done = subprocess.run(
            [nginx, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{nginx} not found: install the Debian package nginx") from None
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", done.stderr + done.stdout)
    if match is None:
        raise LabError(f"cannot tell the version of {nginx}: {done.stderr.strip()!r}")
    return tuple(int(part) for part in match.groups())


def nginx_config(
    *,
    workdir: Path,
    cert: Certificate,
    tls_port: int,
    upstream_port: int,
    hostname: str,
    version: tuple[int, ...],
) -> str:
    """The text of nginx.conf for one shop deployment."""
    log_format = "{" + ",".join(f'"{name}":"${name}"' for name in ACCESS_LOG_FIELDS) + "}"
    modern = version >= HTTP2_DIRECTIVE_SINCE
    return _NGINX_CONFIG.format(
        workdir=workdir,
        log_format=log_format,
        tls_port=tls_port,
        listen_http2="" if modern else " http2",
        http2_directive="http2 on;" if modern else "# http2: on the listen lines (nginx < 1.25.1)",
        hostname=hostname,
        cert=cert.cert_path,
        key=cert.key_path,
        upstream_port=upstream_port,
        server_time_header=SERVER_TIME_HEADER,
    )


class ShopServer:
    """nginx and the shop (uvicorn) inside `topo.server_ns`, for one lab run.

    `start()` returns once nginx listens on both families and uvicorn on
    127.0.0.1; `stop()` ends both. Clients trust `cert.ca_path` and reach the
    shop as https://api.botwall.test (resolved to `topo.server_v4` or
    `topo.server_v6`). As a context manager it also removes its own work
    directory. With `events_url` (and the agent's token in
    `events_token_file`) the shop reports application events to that agent.
    """

    def __init__(
        self,
        topo: Topology,
        *,
        tls_port: int = 443,
        upstream_port: int = 8000,
        workdir: Path | None = None,
        events_url: str | None = None,
        events_token_file: Path | str | None = None,
        products: int = 500,
        hostname: str = HOSTNAME,
        ready_timeout: float = 15.0,
    ) -> None:
        if (events_url is None) != (events_token_file is None):
            raise ValueError("events_url and events_token_file go together")
        self.topo = topo
        self.tls_port = tls_port
        self.upstream_port = upstream_port
        self.events_url = events_url
        # Absolute: uvicorn runs from the repository root, not from here.
        self.events_token_file = (
            Path(events_token_file).resolve() if events_token_file is not None else None
        )
        self.products = products
        self.hostname = hostname
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="botwall-shop-"))
        self.config_path = self.workdir / "nginx.conf"
        self.access_log_path = self.workdir / "access.jsonl"
        self.error_log_path = self.workdir / "nginx-error.log"
        self.nginx_stderr_path = self.workdir / "nginx.stderr"
        self.uvicorn_stderr_path = self.workdir / "uvicorn.stderr"
        self.cert: Certificate | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        self.uvicorn: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        # A `with` whose __enter__ raises never calls __exit__: clean up here.
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        """Start uvicorn, then nginx, and wait until both listen; on failure stop both."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert = generate_certificate(
            self.workdir / "pki", self.hostname, [self.topo.server_v4, self.topo.server_v6]
        )
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / "nginx-temp" / temp).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            nginx_config(
                workdir=self.workdir,
                cert=self.cert,
                tls_port=self.tls_port,
                upstream_port=self.upstream_port,
                hostname=self.hostname,
                version=nginx_version(),
            )
        )
        try:
            self.uvicorn = self._popen(
                self._shop_argv(), self.uvicorn_stderr_path, self._shop_env()
            )
            self.nginx = self._popen(
                [NGINX, "-c", str(self.config_path), "-p", str(self.workdir)],
                self.nginx_stderr_path,
                None,
            )
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _shop_argv(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "--factory", "lab.api.app:app_from_env",
            "--host", "127.0.0.1", "--port", str(self.upstream_port),
            "--no-access-log", "--log-level", "warning",
            # The shop reads X-Forwarded-For and -Port itself; uvicorn's proxy
            # middleware would rewrite the peer and drop the client's port.
            "--no-proxy-headers",
            "--timeout-graceful-shutdown", "3",
        ]  # fmt: skip

    def _shop_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
        env["SHOP_PRODUCTS"] = str(self.products)
        env["PYTHONUNBUFFERED"] = "1"
        if self.events_url is not None and self.events_token_file is not None:
            env["SHOP_EVENTS_URL"] = self.events_url
            env["SHOP_EVENTS_TOKEN_FILE"] = str(self.events_token_file)
        return env

    def _popen(
        self, argv: list[str], stderr_path: Path, env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        with stderr_path.open("wb") as stderr:
            return self.topo.popen(
                self.topo.server_ns,
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def _wait_until_listening(self) -> None:
        # `ss` rather than connecting: a probe connection would show up in
        # nginx's logs and in whatever a sensor on the server counts.
        assert self.nginx is not None and self.uvicorn is not None
        wanted = {
            "shop (uvicorn)": (f"127.0.0.1:{self.upstream_port}", self.uvicorn.pid),
            "nginx IPv4": (f"0.0.0.0:{self.tls_port}", self.nginx.pid),
            "nginx IPv6": (f"[::]:{self.tls_port}", self.nginx.pid),
        }
        deadline = time.monotonic() + self.ready_timeout
        while True:
            for name, process in (("nginx", self.nginx), ("shop (uvicorn)", self.uvicorn)):
                if process.poll() is not None:
                    raise LabError(
                        f"{name} exited with {process.returncode} before listening\n"
                        + self.diagnostics()
                    )
            listening = self._listening()
            # Our own process must hold the socket: another server already on
            # the port would otherwise pass for ours (nginx retries a busy
            # port for a few seconds before it gives up).
            missing = [
                name
                for name, (address, pid) in wanted.items()
                if pid not in listening.get(address, set())
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{', '.join(missing)} not listening after {self.ready_timeout}s\n"
                    + self.diagnostics()
                )
            time.sleep(0.1)

    def _listening(self) -> dict[str, set[int]]:
        """Listening TCP sockets in the server namespace: local address -> pids holding it."""
        done = self.topo.run(self.topo.server_ns, ["ss", "-ltnpH"], timeout=10)
        if done.returncode != 0:
            raise LabError(f"ss failed in {self.topo.server_ns}: {done.stderr.strip()}")
        sockets: dict[str, set[int]] = {}
        for line in done.stdout.splitlines():
            # LISTEN 0 511 0.0.0.0:443 0.0.0.0:* users:(("nginx",pid=42,fd=6),...)
            columns = line.split(maxsplit=5)
            if len(columns) == 6:
                pids = {int(pid) for pid in re.findall(r"pid=(\d+)", columns[5])}
                sockets.setdefault(columns[3], set()).update(pids)
        return sockets

    def stop(self, timeout: float = 5.0) -> None:
        """End nginx (workers included) and uvicorn: SIGTERM, then SIGKILL. Safe to call twice."""
        # nginx first, so no request reaches a shop that is going away.
        if self.nginx is not None:
            _terminate(self.nginx, timeout)
            self.nginx = None
        if self.uvicorn is not None:
            _terminate(self.uvicorn, timeout)
            self.uvicorn = None

    def cleanup(self) -> None:
        """Stop, and remove the work directory if this server made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what happened -----------------------------------------------------

    def requests(self) -> list[dict[str, Any]]:
        """nginx's access log, oldest first: one dict per request, keyed by ACCESS_LOG_FIELDS.

        remote_port and status are ints, request_time and msec floats (seconds).
        nginx writes the line when the response is done, so a request whose
        answer the client has just read may lag by a few milliseconds.
        """
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        entries = []
        for line in text.split("\n")[:-1]:  # the last line may be half written
            entry: dict[str, Any] = json.loads(line)
            for name in _INT_FIELDS:
                entry[name] = int(entry[name])
            for name in _FLOAT_FIELDS:
                entry[name] = float(entry[name])
            entries.append(entry)
        return entries

    def diagnostics(self, limit: int = 1500) -> str:
        """The tails of nginx's error log and both processes' stderr, for error messages."""
        parts = []
        for label, path in (
            ("nginx error log", self.error_log_path),
            ("nginx stderr", self.nginx_stderr_path),
            ("uvicorn stderr", self.uvicorn_stderr_path),
        ):
            with contextlib.suppress(FileNotFoundError):
                tail = path.read_text(errors="replace")[-limit:].strip()
                if tail:
                    parts.append(f"--- {label} ({path}):\n{tail}")
        return "\n".join(parts) or "(no output from nginx or uvicorn)"

    def __repr__(self) -> str:
        return f"ShopServer(ns={self.topo.server_ns!r}, tls_port={self.tls_port})"


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM `process`, SIGKILL it (and its children) if it lingers, and reap it."""
    if process.poll() is not None:
        return
    # Read now: once the nginx master is killed its workers are orphans no
    # one would end (the topology would, but only when it is torn down).
    children = _children(process.pid)
    process.terminate()
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in [process.pid, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=timeout)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []
