"""Sends a real Python ssl ClientHello split across two TCP segments or two TLS records.

    python -m lab.splithello --mode segments|records [--sends 1|2] ADDR PORT

The ClientHello is the one Python's ssl module (OpenSSL) builds for the lab's
Python client (`lab.pyclient.tls_context`): an SSLObject over memory BIOs
writes it, and this module puts it on a plain TCP socket with TCP_NODELAY,
reshaped one of two ways, both legal TLS that real networks produce:

segments  the one record cut in two, sent by two send() calls with a pause
          between, so it leaves as two TCP segments (a middlebox or a small
          MSS does this to large hellos);
records   the handshake message cut in two and framed as two handshake
          records (RFC 8446 5.1 allows fragmenting a handshake message over
          records), sent in one segment, or with --sends 2 one per segment.

Then the server's reply is fed back into the SSLObject, the handshake finishes
and one GET is made, so the split hello is shown to be one a server accepts.
Prints one JSON line; exits 0 when the whole hello was sent, 1 when it was not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

from lab.pyclient import classify, tls_context

# lab.tls_server.HOSTNAME, not imported from there: that module pulls in
# pyroute2, which would add 150 ms to every run.
HOSTNAME = "api.botwall.test"
RECORD_HEADER_LEN = 5
RECORD_HANDSHAKE = 0x16
# Long enough for the first send to leave on its own: with TCP_NODELAY the
# kernel transmits at once, and autocorking only holds data back while an
# earlier segment is still queued on the device.
SEND_GAP_S = 0.05


def client_hello(obj: ssl.SSLObject, outgoing: ssl.MemoryBIO) -> bytes:
    """The ClientHello record(s) the SSLObject writes on its first handshake step."""
    # It writes the hello, then stops for want of the ServerHello.
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    if len(hello) < RECORD_HEADER_LEN or hello[0] != RECORD_HANDSHAKE:
        raise ValueError(f"not a handshake record: {hello[:8].hex()}")
    if int.from_bytes(hello[3:5], "big") != len(hello) - RECORD_HEADER_LEN:
        # Splitting below assumes the library wrote exactly one record.
        raise ValueError("the ClientHello did not come as exactly one record")
    return hello


def split(hello: bytes, mode: str, sends: int) -> list[bytes]:
    """The bytes to send, one element per send() call."""
    if mode == "segments":
        cut = len(hello) // 2
        return [hello[:cut], hello[cut:]]
    # Two records with the original record header's version, each carrying
    # half of the handshake message (its 4-byte header stays in the first).
    handshake = hello[RECORD_HEADER_LEN:]
    cut = len(handshake) // 2
    records = [
        hello[:3] + len(part).to_bytes(2, "big") + part
        for part in (handshake[:cut], handshake[cut:])
    ]
    return records if sends == 2 else [b"".join(records)]


def _flush(sock: socket.socket, outgoing: ssl.MemoryBIO) -> None:
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)


def finish(
    sock: socket.socket,
    obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    servername: str,
) -> dict[str, Any]:
    """Complete the handshake over the socket, then GET / and read the answer."""
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            _flush(sock, outgoing)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection during the handshake")
        incoming.write(data)
    _flush(sock, outgoing)  # our Finished
    result: dict[str, Any] = {"handshake": True, "tls": obj.version()}

    # Connection: close, so the server's close_notify ends the response.
    obj.write(
        f"GET / HTTP/1.1\r\nHost: {servername}\r\nUser-Agent: botwall-lab-splithello\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    _flush(sock, outgoing)
    response = bytearray()
    while True:
        try:
            chunk = obj.read(65536)
        except ssl.SSLWantReadError:
            chunk = None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if chunk == b"":
            break  # the server's close_notify
        if chunk:
            response += chunk
            continue
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    result["status"] = int(status_line[1]) if len(status_line) >= 2 else 0
    result["body"] = body.decode(errors="replace")
    return result


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context(insecure=True).wrap_bio(incoming, outgoing, server_hostname=args.servername)
    hello = client_hello(obj, outgoing)
    chunks = split(hello, args.mode, args.sends)
    report: dict[str, Any] = {
        "ok": False,
        "outcome": "error",
        "hello_bytes": len(hello),
        "sent": [],
        "handshake": False,
    }
    try:
        sock = socket.create_connection((args.addr, args.port), args.timeout)
    except OSError as exc:
        return 1, {**report, "outcome": classify(exc), "error": repr(exc)}
    with sock:
        # No Nagle: each send() leaves at once as its own segment.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        report["local"] = sock.getsockname()[0]
        try:
            for i, chunk in enumerate(chunks):
                if i:
                    time.sleep(SEND_GAP_S)
                sock.sendall(chunk)
                report["sent"].append(len(chunk))
        except OSError as exc:
            return 1, {**report, "outcome": classify(exc), "error": repr(exc)}
        try:
            report.update(finish(sock, obj, incoming, outgoing, args.servername))
        except (OSError, ValueError) as exc:
            # The hello went out, which is what this tool is for; say what failed after.
            return 0, {**report, "outcome": classify(exc), "error": repr(exc)}
    report["ok"] = report.get("status") == 200
    report["outcome"] = "ok" if report["ok"] else "error"
    return 0, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("segments", "records"), required=True)
    parser.add_argument(
        "--sends", type=int, choices=(1, 2), default=1,
        help="records mode: both records in one send (default) or one send each",
    )  # fmt: skip
    parser.add_argument("--servername", default=HOSTNAME, help="SNI and Host header")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds, per socket op")
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    status, report = run(args)
    print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
