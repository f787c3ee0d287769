"""Real HTTPS and plain HTTP servers for the lab's server namespace, and their certificates.

`TlsServer` and `HttpServer` start this module as a separate process inside
the server namespace (`python -m lab.tls_server`). That process answers GET
and HEAD with 200 and a small JSON body saying what it saw (peer address, TLS
version), and appends the same as one JSON line per request to a log file, so
a test can check which source address a connection really came from.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from lab.netns import LabError, Topology

HOSTNAME = "api.botwall.test"
REPO_ROOT = Path(__file__).resolve().parent.parent
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
# POST /login answers 200 when the body holds this, 401 otherwise.
LOGIN_SECRET = b"correct-horse"


# -- certificates ------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A lab CA and a server certificate it signed (PEM files)."""

    ca_path: Path
    cert_path: Path
    key_path: Path
    hostname: str
    ips: tuple[str, ...]


def generate_certificate(
    directory: Path,
    hostname: str = HOSTNAME,
    ips: Sequence[str] = (),
    *,
    days: int = 2,
    use_openssl: bool | None = None,
) -> Certificate:
    """Write a fresh CA and a server certificate for `hostname` and `ips` into `directory`.

    A CA plus a leaf, rather than one self-signed leaf: every client stack
    (curl, OpenSSL, Python, Go, Node) accepts a CA file, while some refuse a
    leaf that is its own trust anchor. Uses the `cryptography` package when it
    is importable, else the `openssl req` command.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert = Certificate(
        ca_path=directory / "ca.pem",
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        hostname=hostname,
        ips=tuple(ips),
    )
    if use_openssl is None:
        try:
            import cryptography  # noqa: F401
        except ImportError:
            use_openssl = True
        else:
            use_openssl = False
    if use_openssl:
        _generate_with_openssl(cert, directory, days)
    else:
        _generate_with_cryptography(cert, days)
    return cert


def _generate_with_cryptography(cert: Certificate, days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little so a client whose clock lags a few seconds still accepts it.
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)

    def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "botwall lab CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(cert.hostname)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in cert.ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cert.hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    cert.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    cert.key_path.touch(mode=0o600)
    cert.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _generate_with_openssl(cert: Certificate, directory: Path, days: int) -> None:
    # A config of our own: the system openssl.cnf would add its v3_ca
    # extensions to the leaf too (CA:TRUE beside our CA:FALSE).
    config = directory / "openssl-req.cnf"
    config.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n")
    ca_key = directory / "ca.key"
    common = ["-config", str(config), "-nodes", "-days", str(days)]
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    san = ",".join([f"DNS:{cert.hostname}", *(f"IP:{ip}" for ip in cert.ips)])
    commands = [
        ["openssl", "req", "-x509", *common, *newkey,
         "-keyout", str(ca_key), "-out", str(cert.ca_path), "-subj", "/CN=botwall lab CA",
         "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash"],
        ["openssl", "req", *common, *newkey, "-CA", str(cert.ca_path), "-CAkey", str(ca_key),
         "-keyout", str(cert.key_path), "-out", str(cert.cert_path),
         "-subj", f"/CN={cert.hostname}",
         "-addext", f"subjectAltName={san}",
         "-addext", "basicConstraints=critical,CA:FALSE",
         "-addext", "keyUsage=critical,digitalSignature",
         "-addext", "extendedKeyUsage=serverAuth"],
    ]  # fmt: skip
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise LabError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-500:]}")
    # The CA signs once: its key has no further use, so it does not stay around.
    ca_key.unlink()
    config.unlink()


# -- controlling a server process from the test or lab side -------------------


class LabServer:
    """One server process in the server namespace; `TlsServer` and `HttpServer` pick the kind.

    Listens on [::]:port with IPV6_V6ONLY off, so one socket serves IPv4 and
    IPv6. `start()` returns once the port accepts connections; `stop()` ends
    the process; as a context manager it also removes its own work directory.
    """

    tls = False

    def __init__(
        self,
        topo: Topology,
        port: int,
        *,
        workdir: Path | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.topo = topo
        self.port = port
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="botwall-lab-"))
        kind = "https" if self.tls else "http"
        self.log_path = self.workdir / f"{kind}-{port}.jsonl"
        self.stderr_path = self.workdir / f"{kind}-{port}.stderr"
        self.cert: Certificate | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _server_args(self) -> list[str]:
        return []

    def start(self) -> Self:
        argv = [
            sys.executable,
            "-m",
            "lab.tls_server",
            "--port",
            str(self.port),
            "--log",
            str(self.log_path),
            *self._server_args(),
        ]
        with self.stderr_path.open("wb") as stderr:
            self.process = self.topo.popen(
                self.topo.server_ns,
                argv,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_listening(self) -> None:
        # The server logs "listening" right after listen(): from then on the
        # kernel accepts connections. Watching the log instead of probing the
        # port keeps stray connections out of what a sensor test observes.
        deadline = time.monotonic() + self.ready_timeout
        while not any(e["event"] == "listening" for e in self.events()):
            assert self.process is not None
            if self.process.poll() is not None:
                raise LabError(
                    f"server on port {self.port} exited with {self.process.returncode}: "
                    f"{self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"server on port {self.port} not listening after {self.ready_timeout}s"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        self.process = None

    def cleanup(self) -> None:
        """Stop, and remove the work directory if this server made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def events(self) -> list[dict[str, Any]]:
        """Everything the server logged: listening, request, handshake_failed."""
        if not self.log_path.exists():
            return []
        # The last line may be half written; only whole lines count.
        lines = self.log_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line]

    def requests(self) -> list[dict[str, Any]]:
        """The requests answered so far, oldest first."""
        return [e for e in self.events() if e["event"] == "request"]

    def peers(self) -> set[str]:
        """Source addresses of the requests answered so far."""
        return {r["peer"] for r in self.requests()}

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


class TlsServer(LabServer):
    """HTTPS (TLS 1.2 and 1.3) with a certificate for `hostname` and both server IPs."""

    tls = True

    def __init__(
        self,
        topo: Topology,
        port: int = 8443,
        *,
        hostname: str = HOSTNAME,
        cert: Certificate | None = None,
        workdir: Path | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__(topo, port, workdir=workdir, ready_timeout=ready_timeout)
        self.hostname = hostname
        self.cert = cert

    def start(self) -> Self:
        if self.cert is None:
            self.cert = generate_certificate(
                self.workdir / "pki", self.hostname, [self.topo.server_v4, self.topo.server_v6]
            )
        super().start()
        return self

    def _server_args(self) -> list[str]:
        assert self.cert is not None
        return ["--cert", str(self.cert.cert_path), "--key", str(self.cert.key_path)]


class HttpServer(LabServer):
    """Plaintext HTTP/1.1, for the sensor's plaintext-port path."""

    def __init__(
        self,
        topo: Topology,
        port: int = 8080,
        *,
        workdir: Path | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        super().__init__(topo, port, workdir=workdir, ready_timeout=ready_timeout)


# -- the server process itself ------------------------------------------------


def plain_address(address: str) -> str:
    """'::ffff:10.0.0.1' (an IPv4 peer on a dual-stack socket) -> '10.0.0.1'."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class _LabHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024  # the lab's floods should meet the server, not a short backlog

    def __init__(self, port: int, ssl_context: ssl.SSLContext | None, log_path: Path) -> None:
        self.ssl_context = ssl_context
        self._log = log_path.open("a", buffering=1)
        self._log_lock = threading.Lock()
        super().__init__(("::", port), _Handler)

    def server_bind(self) -> None:
        # One socket for both families.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would call getfqdn(), a reverse DNS lookup that
        # hangs for seconds in a namespace with no route to the host's resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOSTNAME
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the connection's own thread: done in
        # accept() it would let one slow client stall every other.
        if self.ssl_context is None:
            _Handler(request, client_address, self)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls_sock = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.record(
                {
                    "event": "handshake_failed",
                    "peer": plain_address(client_address[0]),
                    "peer_port": client_address[1],
                    "error": str(exc),
                }
            )
            return
        try:
            _Handler(tls_sock, client_address, self)
        finally:
            _close_tls(tls_sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets mid-request is normal in the lab: one line, no traceback.
        exc = sys.exc_info()[1]
        print(f"{client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def record(self, entry: dict[str, Any]) -> None:
        entry["time"] = time.time()
        with self._log_lock:
            self._log.write(json.dumps(entry) + "\n")

    def server_close(self) -> None:
        super().server_close()
        self._log.close()


def _close_tls(tls_sock: ssl.SSLSocket) -> None:
    """Send close_notify, then close, without waiting for the peer's own close_notify.

    OpenSSL 3 clients report a session that ends in a bare TCP FIN as an error
    ("unexpected eof while reading"), so a real server's goodbye is needed.
    Non-blocking, unwrap() sends ours and then fails to read the peer's at once.
    """
    try:
        tls_sock.setblocking(False)
        tls_sock.unwrap()
    except (ssl.SSLError, OSError, ValueError):
        pass
    finally:
        tls_sock.close()


def _requested_status(path: str) -> int:
    """/status/NNN answers NNN (tests need 401, 404, 429 on demand); all else 200."""
    parts = path.split("?")[0].strip("/").split("/")
    if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
        code = int(parts[1])
        if 200 <= code <= 599:
            return code
    return 200


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real API clients use it
    server_version = "botwall-lab"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: _LabHTTPServer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_POST(self) -> None:
        # Read the body so keep-alive stays in step; only /login looks at it.
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 65536)) if length > 0 else b""
        status = None
        if self.path.split("?")[0].rstrip("/").endswith("/login"):
            status = 200 if LOGIN_SECRET in body else 401
        self._answer(send_body=True, status=status)

    def _answer(self, send_body: bool, status: int | None = None) -> None:
        tls = self.connection.version() if isinstance(self.connection, ssl.SSLSocket) else None
        peer = plain_address(self.client_address[0])
        seen = {"peer": peer, "tls": tls, "method": self.command, "path": self.path}
        if status is None:
            status = _requested_status(self.path)
        body = (json.dumps({"ok": status < 400, **seen}) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        self.server.record(
            {
                "event": "request",
                **seen,
                "peer_port": self.client_address[1],
                "user_agent": self.headers.get("User-Agent"),
            }
        )

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests go to the JSON log instead


def serve(port: int, log_path: Path, certfile: Path | None, keyfile: Path | None) -> None:
    context = None
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        context.set_alpn_protocols(["http/1.1"])
    server = _LabHTTPServer(port, context, log_path)
    server.record({"event": "listening", "port": port, "tls": context is not None})

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines request log")
    parser.add_argument("--cert", type=Path, help="PEM certificate chain; TLS when given")
    parser.add_argument("--key", type=Path, help="PEM private key")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    serve(args.port, args.log, args.cert, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
