"""Real client stacks (curl, openssl s_client, Python ssl, a bare TCP connect) run from a namespace.

Each returns a `ClientResult`. Every call has explicit time limits: the tool's
own (connect and total) and a hard subprocess limit a little above them, so a
hung client can never hang a test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.netns import Topology, call_in
from lab.pyclient import classify
from lab.tls_server import HOSTNAME, REPO_ROOT

# Seconds the hard subprocess limit leaves the tool to report its own timeout.
GRACE = 2.0
# curl exit codes (curl(1), EXIT CODES).
CURL_COULDNT_CONNECT = 7
CURL_OPERATION_TIMEDOUT = 28
# Handshake, certificate, cipher and pinning failures.
CURL_TLS_ERRORS = frozenset({35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91})


@dataclass(frozen=True)
class ClientResult:
    """What one client run did.

    outcome is one of: ok, timeout, refused, unreachable, tls, error.
    returncode is None when the hard limit killed the tool (or for tcp_connect).
    """

    tool: str
    ok: bool
    outcome: str
    elapsed: float
    returncode: int | None
    body: str = ""
    stderr_tail: str = ""
    local_address: str | None = None

    def json(self) -> Any:
        """The response body parsed as JSON (the lab servers answer JSON)."""
        return json.loads(self.body)


def _tail(text: str, limit: int = 1500) -> str:
    return text.strip()[-limit:]


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _run(
    topo: Topology, ns: str | None, argv: Sequence[str], *, timeout: float, stdin: str | None = None
) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """Run in `ns` (default: the client namespace); None when the hard limit hit."""
    started = time.monotonic()
    feed: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    try:
        done = topo.run(ns or topo.client_ns, argv, timeout=timeout, cwd=REPO_ROOT, **feed)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started
    return done, time.monotonic() - started


def curl(
    topo: Topology,
    address: str,
    port: int,
    *,
    https: bool = True,
    servername: str | None = HOSTNAME,
    cafile: Path | str | None = None,
    insecure: bool = False,
    source: str | None = None,
    tls_max: str | None = None,
    path: str = "/",
    connect_timeout: float = 3.0,
    max_time: float = 10.0,
    extra_args: Sequence[str] = (),
    ns: str | None = None,
) -> ClientResult:
    """GET with curl. With `servername`, the URL names it and --resolve pins it to `address`.

    `source` binds the connection to that local address (curl --interface
    accepts an address). `tls_max` is "1.2" or "1.3".
    """
    scheme = "https" if https else "http"
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*"]
    if https and servername:
        url = f"{scheme}://{servername}:{port}{path}"
        argv += ["--resolve", f"{servername}:{port}:{_url_host(address)}"]
    else:
        url = f"{scheme}://{_url_host(address)}:{port}{path}"
    if cafile is not None:
        argv += ["--cacert", str(cafile)]
    if insecure:
        argv.append("--insecure")
    if source is not None:
        argv += ["--interface", source]
    if tls_max is not None:
        argv += [f"--tlsv{tls_max}", "--tls-max", tls_max]
    argv += ["--connect-timeout", str(connect_timeout), "--max-time", str(max_time)]
    with tempfile.TemporaryDirectory(prefix="botwall-curl-") as tmp:
        body_path = Path(tmp) / "body"
        # Body to a file, and curl's own report (%{json}: status, addresses) to stdout.
        argv += ["--output", str(body_path), "--write-out", "%{json}", *extra_args, url]
        done, elapsed = _run(topo, ns, argv, timeout=max_time + GRACE)
        body = body_path.read_text(errors="replace") if body_path.exists() else ""
    if done is None:
        return ClientResult("curl", False, "timeout", elapsed, None, body)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {}
    status = report.get("http_code", 0)
    if done.returncode == 0 and status == 200:
        outcome = "ok"
    elif done.returncode == CURL_OPERATION_TIMEDOUT:
        outcome = "timeout"
    elif done.returncode == CURL_COULDNT_CONNECT and "refused" in done.stderr.lower():
        outcome = "refused"
    elif done.returncode in CURL_TLS_ERRORS:
        outcome = "tls"
    else:
        outcome = "error"
    return ClientResult(
        "curl",
        outcome == "ok",
        outcome,
        elapsed,
        done.returncode,
        body,
        _tail(done.stderr),
        report.get("local_ip") or None,
    )


def openssl_s_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    servername: str = HOSTNAME,
    cafile: Path | str | None = None,
    source: str | None = None,
    tls_version: str | None = None,
    path: str = "/",
    timeout: float = 10.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET through `openssl s_client`, verifying the chain and the name when `cafile` is set.

    `tls_version` ("1.2" or "1.3") pins the protocol. s_client has no
    connect timeout of its own: `timeout` bounds the whole run.
    """
    argv = ["openssl", "s_client", "-connect", f"{_url_host(address)}:{port}"]
    argv += ["-servername", servername, "-quiet", "-alpn", "http/1.1"]
    if cafile is not None:
        argv += ["-CAfile", str(cafile), "-verify_return_error", "-verify_hostname", servername]
    if source is not None:
        argv += ["-bind", f"{_url_host(source)}:0"]
    if tls_version is not None:
        argv.append("-tls" + tls_version.replace(".", "_"))
    # -quiet: stdout carries only the server's bytes (and implies -ign_eof, so
    # s_client keeps reading after stdin ends); Connection: close makes the
    # server end the session after its answer.
    request = f"GET {path} HTTP/1.1\r\nHost: {servername}\r\nConnection: close\r\n\r\n"
    done, elapsed = _run(topo, ns, argv, timeout=timeout, stdin=request)
    if done is None:
        return ClientResult("openssl", False, "timeout", elapsed, None)
    # Text mode turned the response's CRLFs into plain newlines.
    head, _, body = done.stdout.partition("\n\n")
    status_ok = head.startswith("HTTP/1.1 200")
    if done.returncode == 0 and status_ok:
        outcome = "ok"
    elif "refused" in done.stderr.lower():
        outcome = "refused"
    elif "verify error" in done.stderr.lower() or "ssl routines" in done.stderr.lower():
        outcome = "tls"
    else:
        outcome = "error"
    return ClientResult(
        "openssl", outcome == "ok", outcome, elapsed, done.returncode, body, _tail(done.stderr)
    )


def python_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    https: bool = True,
    servername: str | None = HOSTNAME,
    cafile: Path | str | None = None,
    insecure: bool = False,
    source: str | None = None,
    tls_max: str | None = None,
    path: str = "/",
    timeout: float = 5.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET from Python's ssl module (`python -m lab.pyclient`) in the namespace.

    `timeout` applies to each socket operation; the whole run is bounded too.
    """
    argv = [sys.executable, "-m", "lab.pyclient", "--host", address, "--port", str(port)]
    argv += ["--timeout", str(timeout), "--path", path]
    if not https:
        argv.append("--plain")
    if servername:
        argv += ["--servername", servername]
    if cafile is not None:
        argv += ["--cafile", str(cafile)]
    if insecure:
        argv.append("--insecure")
    if source is not None:
        argv += ["--source", source]
    if tls_max is not None:
        argv += ["--tls-max", tls_max]
    # Connect, handshake, send and read each get `timeout`; plus interpreter start-up.
    done, elapsed = _run(topo, ns, argv, timeout=4 * timeout + GRACE)
    if done is None:
        return ClientResult("python", False, "timeout", elapsed, None)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        report = {"ok": False, "outcome": "error"}
    return ClientResult(
        "python",
        bool(report["ok"]),
        report["outcome"],
        elapsed,
        done.returncode,
        report.get("body", ""),
        _tail(done.stderr or report.get("error", "")),
        report.get("local"),
    )


def _connect(address: str, port: int, source: str | None, timeout: float) -> tuple[str, str | None]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        try:
            sock.connect((address, port))
        except OSError as exc:
            return classify(exc), None
        return "ok", sock.getsockname()[0]


def tcp_connect(
    topo: Topology,
    address: str,
    port: int,
    *,
    timeout: float,
    source: str | None = None,
    ns: str | None = None,
) -> ClientResult:
    """A bare TCP connect (no payload) from a thread inside the namespace.

    outcome: ok (handshake completed), refused (RST), timeout (no answer
    within `timeout` seconds), unreachable (ICMP or no route), error.
    """
    started = time.monotonic()
    outcome, local = call_in(
        ns or topo.client_ns, _connect, address, port, source, timeout, timeout=timeout + GRACE
    )
    elapsed = time.monotonic() - started
    return ClientResult("tcp", outcome == "ok", outcome, elapsed, None, local_address=local)
