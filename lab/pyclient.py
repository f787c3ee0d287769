"""A Python ssl HTTP client for the lab: one GET, result printed as one JSON line.

Run inside a namespace as `python -m lab.pyclient --host 10.201.0.1 --port 8443
--servername api.botwall.test --cafile ca.pem`; `lab.clients.python_client`
does that. Exit status 0 means HTTP 200.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def classify(exc: BaseException) -> str:
    """The outcome names lab.clients uses: timeout, refused, unreachable, tls or error."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


def tls_context(
    cafile: str | None = None, insecure: bool = False, tls_max: str | None = None
) -> ssl.SSLContext:
    """The client context: Python's defaults plus ALPN http/1.1, as an HTTP/1.1 library sets.

    lab.splithello builds its ClientHello from this too, so a split hello and
    this client's unsplit one are the same bytes apart from random values.
    """
    context = ssl.create_default_context(cafile=cafile)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls_max:
        context.maximum_version = TLS_VERSIONS[tls_max]
    context.set_alpn_protocols(["http/1.1"])
    return context


def fetch(args: argparse.Namespace) -> dict[str, Any]:
    source = (args.source, 0) if args.source else None
    started = time.monotonic()
    sock = socket.create_connection((args.host, args.port), args.timeout, source_address=source)
    result: dict[str, Any] = {"local": sock.getsockname()[0], "tls": None}
    try:
        if not args.plain:
            context = tls_context(cafile=args.cafile, insecure=args.insecure, tls_max=args.tls_max)
            sock = context.wrap_socket(sock, server_hostname=args.servername or args.host)
            result["tls"] = sock.version()
        host = args.servername or args.host
        request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: botwall-lab-pyclient\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    finally:
        sock.close()
    result.update(
        status=response.status,
        body=body.decode(errors="replace"),
        elapsed=time.monotonic() - started,
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="server address to connect to")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--servername", help="SNI and Host header; default: --host")
    parser.add_argument("--cafile", help="CA bundle to verify the server with")
    parser.add_argument("--insecure", action="store_true", help="skip certificate checks")
    parser.add_argument("--plain", action="store_true", help="plain HTTP, no TLS")
    parser.add_argument("--tls-max", choices=sorted(TLS_VERSIONS))
    parser.add_argument("--source", help="local address to bind before connecting")
    parser.add_argument("--path", default="/")
    parser.add_argument("--timeout", type=float, required=True, help="seconds, per socket op")
    args = parser.parse_args(argv)
    try:
        result = fetch(args)
    except (OSError, http.client.HTTPException) as exc:
        print(json.dumps({"ok": False, "outcome": classify(exc), "error": repr(exc)}))
        return 1
    ok = result["status"] == 200
    print(json.dumps({"ok": ok, "outcome": "ok" if ok else "error", **result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
