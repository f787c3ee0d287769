"""Real client stacks (curl, openssl, gnutls-cli, Python, Node, Go, Chromium) run from a namespace.

Each returns a `ClientResult`. Every call has explicit time limits: the tool's
own (connect and total) and a hard subprocess limit a little above them, so a
hung client can never hang a test. The Node and Go clients are the programs in
lab/stacks/; `lab.splithello` sends a Python ClientHello split in two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
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
    alpn: str | None = "http/1.1",
    path: str = "/",
    timeout: float = 10.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET through `openssl s_client`, verifying the chain and the name when `cafile` is set.

    `tls_version` ("1.2" or "1.3") pins the protocol. `alpn` None sends no
    ALPN extension, s_client's own default (its JA4 in client_stacks.toml).
    s_client has no connect timeout of its own: `timeout` bounds the whole run.
    """
    argv = ["openssl", "s_client", "-connect", f"{_url_host(address)}:{port}"]
    argv += ["-servername", servername, "-quiet"]
    if alpn is not None:
        argv += ["-alpn", alpn]
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


# -- more client stacks: Node, Go, GnuTLS, Chromium, and split ClientHellos ----

STACKS = REPO_ROOT / "lab" / "stacks"
GO_CLIENT_SOURCE = STACKS / "client.go"
NODE_CLIENT = STACKS / "client.mjs"
# Built clients live outside the source tree; the first writable one wins.
CACHE_DIRS = (Path("/var/cache/botwall"), Path(tempfile.gettempdir()) / f"botwall-{os.getuid()}")
GO_BUILD_TIMEOUT = 180.0  # a cold build compiles net/http and crypto/tls


def _outcome_from_text(text: str) -> str:
    """Classify a failed run of a client with no machine-readable report of its own."""
    lowered = text.lower()
    if "refused" in lowered:
        return "refused"
    if "timeout" in lowered or "timed out" in lowered or "deadline exceeded" in lowered:
        return "timeout"
    if "unreachable" in lowered:
        return "unreachable"
    if "tls" in lowered or "ssl" in lowered or "handshake" in lowered or "certificate" in lowered:
        return "tls"
    return "error"


def _status_result(
    tool: str, done: subprocess.CompletedProcess[str] | None, elapsed: float
) -> ClientResult:
    """For the lab/stacks clients: stdout is the status line, then the body."""
    if done is None:
        return ClientResult(tool, False, "timeout", elapsed, None)
    status, _, body = done.stdout.partition("\n")
    ok = done.returncode == 0 and status.strip() == "200"
    outcome = "ok" if ok else _outcome_from_text(done.stderr)
    return ClientResult(tool, ok, outcome, elapsed, done.returncode, body, _tail(done.stderr))


def _cache_dir() -> Path:
    for candidate in CACHE_DIRS:
        with contextlib.suppress(OSError):
            candidate.mkdir(mode=0o755, parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
    raise OSError(f"no writable cache directory among {[str(d) for d in CACHE_DIRS]}")


def build_go_client() -> Path:
    """lab/stacks/client.go built (once per source and Go version) into the cache directory.

    Offline: the program uses only the standard library, so `go build` of the
    file needs no go.mod and no module proxy. Built in the host namespace;
    only running it needs the client one.
    """
    cache = _cache_dir()
    env = {
        **os.environ,
        # pytest under sudo or CI may have no HOME; Go wants one for its caches.
        "HOME": os.environ.get("HOME") or str(cache),
        "GOCACHE": str(cache / "go-build"),
        "GOPATH": str(cache / "gopath"),
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",  # Go >= 1.21 would otherwise fetch a newer toolchain
        "GOFLAGS": "",
        # No cgo: nothing but the Go toolchain is needed, and crypto/tls,
        # which writes the ClientHello, is pure Go either way.
        "CGO_ENABLED": "0",
    }
    try:
        version = subprocess.run(
            ["go", "version"], capture_output=True, text=True, timeout=30, check=True, env=env
        ).stdout
    except FileNotFoundError:
        raise OSError("the Go toolchain is missing: install golang-go") from None
    digest = hashlib.sha256(GO_CLIENT_SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = cache / f"go-client-{digest}"
    if binary.exists():
        return binary
    partial = cache / f".go-client-{digest}-{os.getpid()}"
    built = subprocess.run(
        ["go", "build", "-o", str(partial), str(GO_CLIENT_SOURCE)],
        capture_output=True, text=True, timeout=GO_BUILD_TIMEOUT, check=False, env=env,
        cwd=cache,
    )  # fmt: skip
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OSError(f"go build {GO_CLIENT_SOURCE} failed: {_tail(built.stderr)}")
    os.replace(partial, binary)  # atomic: a concurrent run sees no half-written binary
    return binary


def go_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    servername: str = HOSTNAME,
    path: str = "/",
    timeout: float = 10.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET from Go's net/http (lab/stacks/client.go) to `address`, SNI `servername`."""
    argv = [str(build_go_client()), "-connect", address, "-timeout", f"{timeout}s"]
    argv.append(f"https://{servername}:{port}{path}")
    done, elapsed = _run(topo, ns, argv, timeout=timeout + GRACE)
    return _status_result("go", done, elapsed)


def node_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    mode: str = "https",
    servername: str = HOSTNAME,
    path: str = "/",
    timeout: float = 10.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET from Node.js (lab/stacks/client.mjs): `mode` "https" (https.get) or "fetch"."""
    if mode not in ("https", "fetch"):
        raise ValueError(f"mode must be https or fetch, not {mode!r}")
    argv = ["node", str(NODE_CLIENT), "--mode", mode, "--connect", address]
    argv += ["--timeout-ms", str(int(timeout * 1000)), f"https://{servername}:{port}{path}"]
    done, elapsed = _run(topo, ns, argv, timeout=timeout + GRACE)
    return _status_result(f"node-{mode}", done, elapsed)


def gnutls_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    servername: str = HOSTNAME,
    path: str = "/",
    timeout: float = 10.0,
    ns: str | None = None,
) -> ClientResult:
    """One GET through `gnutls-cli --insecure` with SNI `servername` and its default ALPN (none).

    gnutls-cli has no timeout of its own: `timeout` bounds the whole run.
    """
    with tempfile.TemporaryDirectory(prefix="botwall-gnutls-") as tmp:
        log = Path(tmp) / "log"
        # --logfile keeps gnutls-cli's own chatter off stdout, which then is the response.
        argv = ["gnutls-cli", "--insecure", "--sni-hostname", servername, "--logfile", str(log)]
        argv += ["-p", str(port), address]
        request = f"GET {path} HTTP/1.1\r\nHost: {servername}\r\nConnection: close\r\n\r\n"
        done, elapsed = _run(topo, ns, argv, timeout=timeout, stdin=request)
        chatter = log.read_text(errors="replace") if log.exists() else ""
    if done is None:
        return ClientResult("gnutls", False, "timeout", elapsed, None, "", _tail(chatter))
    head, _, body = done.stdout.partition("\n\n")
    ok = done.returncode == 0 and head.startswith("HTTP/1.1 200")
    if ok:
        outcome = "ok"
    elif "Handshake was completed" in chatter:
        outcome = "error"  # TLS worked; the HTTP exchange did not
    else:
        outcome = _outcome_from_text(done.stderr + chatter)
    return ClientResult(
        "gnutls", ok, outcome, elapsed, done.returncode, body, _tail(done.stderr + chatter)
    )


def _end_session(pid: int) -> None:
    """Kill what is left of a process group we started with start_new_session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def chromium_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    servername: str = HOSTNAME,
    path: str = "/",
    timeout: float = 30.0,
    ns: str | None = None,
) -> ClientResult:
    """Load https://servername:port/path in headless Chromium (Debian's `chromium`) as root.

    --host-resolver-rules maps the name to `address`, so SNI carries the real
    name; background networking is off, so every connection it makes is the
    page load's. Body is the DOM it dumps (the JSON answer inside <pre>).
    """
    with tempfile.TemporaryDirectory(prefix="botwall-chromium-") as profile:
        argv = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-breakpad", "--ignore-certificate-errors",
            f"--user-data-dir={profile}",
            f"--host-resolver-rules=MAP {servername} {_url_host(address)}",
            "--dump-dom", f"https://{servername}:{port}{path}",
        ]  # fmt: skip
        started = time.monotonic()
        # Its own session: the browser's helper processes (zygote, renderer,
        # network service) are then all ended together by process group.
        proc = topo.popen(
            ns or topo.client_ns, argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A helper may hold the pipes after the browser itself exited.
            timed_out = proc.poll() is None
            _end_session(proc.pid)
            stdout, stderr = proc.communicate()
        finally:
            _end_session(proc.pid)
        elapsed = time.monotonic() - started
    if timed_out:
        return ClientResult("chromium", False, "timeout", elapsed, None, stdout, _tail(stderr))
    # An error page is a DOM too; only the lab server's JSON counts as an answer.
    ok = proc.returncode == 0 and '"ok": true' in stdout
    outcome = "ok" if ok else _outcome_from_text((stdout + stderr).replace("_", " "))
    return ClientResult("chromium", ok, outcome, elapsed, proc.returncode, stdout, _tail(stderr))


def splithello_client(
    topo: Topology,
    address: str,
    port: int,
    *,
    mode: str,
    sends: int = 1,
    servername: str = HOSTNAME,
    timeout: float = 5.0,
    ns: str | None = None,
) -> ClientResult:
    """Python's ClientHello split across two TCP segments or two TLS records (`lab.splithello`).

    ok means the server accepted the split hello: handshake done and GET / answered 200.
    """
    argv = [sys.executable, "-m", "lab.splithello", "--mode", mode, "--sends", str(sends)]
    argv += ["--servername", servername, "--timeout", str(timeout), address, str(port)]
    done, elapsed = _run(topo, ns, argv, timeout=4 * timeout + GRACE)
    if done is None:
        return ClientResult("splithello", False, "timeout", elapsed, None)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        report = {"ok": False, "outcome": "error"}
    return ClientResult(
        "splithello",
        bool(report["ok"]),
        report["outcome"],
        elapsed,
        done.returncode,
        report.get("body", ""),
        _tail(done.stderr or report.get("error", "")),
        report.get("local"),
    )
