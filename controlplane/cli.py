"""The `botwall` command line: one function per command, each importing what it needs.

Commands import their dependencies inside the function, so `botwall --help`
and every command stay fast and a command's heavy imports (scapy, BCC,
scikit-learn) cost nothing to the others. Errors a user can cause (a missing
file, a bad option) print one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sensor.events import Event

EXIT_USAGE = 2

app = typer.Typer(
    name="botwall",
    help="API bot defence at the kernel: see every client's TCP, TLS and HTTP stack.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in a traceback can hold tokens and addresses: never print them.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """botwall: API bot defence at the kernel."""
    # A callback makes typer keep command names even while there is one command.


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a one-line error on stderr; raise the returned Exit."""
    typer.echo(f"botwall: {message}", err=True)
    return typer.Exit(code)


Ports = Annotated[list[int] | None, typer.Option(min=1, max=65535, show_default=False)]


@app.command()
def fingerprint(
    pcap: Annotated[Path, typer.Argument(help="pcap or pcapng capture", show_default=False)],
    tls_port: Ports = None,
    http_port: Ports = None,
) -> None:
    """Print one JSON line per TCP SYN and per complete TLS ClientHello in a capture.

    SYN lines: flow, tcp_signature, os_guess, ttl, window, mss, wscale, options.
    ClientHello lines: flow, sni, ja4, ja4_r, ja3, ja3_string. Lines follow
    capture order. Without --tls-port/--http-port every port is watched.
    """
    from sensor.replay import ReplayError, ReplaySource

    try:
        source = ReplaySource(pcap, tls_ports=tls_port, http_ports=http_port)
        for row in fingerprint_rows(source.events()):
            sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    except ReplayError as exc:
        raise fail(str(exc)) from None
    except BrokenPipeError:
        # The reader (head, a pager) went away: stop quietly, as cat does.
        # stdout still holds unflushed bytes; point it at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def fingerprint_rows(events: Iterable[Event]) -> Iterator[dict[str, Any]]:
    """The `fingerprint` command's rows, from any iterable of sensor events."""
    from sensor.events import ClientHelloSegment, FlowEnd, SynEvent
    from sensor.fingerprint.ja3 import ja3, ja3_string
    from sensor.fingerprint.ja4 import ja4, ja4_r
    from sensor.fingerprint.reassembly import HelloAssembler
    from sensor.fingerprint.tcp import os_guess, syn_signature
    from sensor.fingerprint.tls import ParseError, parse_client_hello

    assembler = HelloAssembler()
    for event in events:
        if isinstance(event, SynEvent):
            sig = syn_signature(event)
            guess = os_guess(sig)
            yield {
                "flow": str(event.flow),
                "tcp_signature": str(sig),
                "os_guess": {
                    "family": guess.family,
                    "confidence": guess.confidence,
                    "reason": guess.reason,
                },
                "ttl": event.ttl,
                "window": event.window,
                "mss": event.mss,
                "wscale": event.wscale,
                "options": sig.options,
            }
        elif isinstance(event, ClientHelloSegment):
            done = assembler.feed(event)
            if done is None:
                continue
            try:
                hello = parse_client_hello(done.handshake)
            except ParseError:
                continue  # reassembled but malformed: nothing to fingerprint
            yield {
                "flow": str(done.flow),
                "sni": hello.sni,
                "ja4": ja4(hello),
                "ja4_r": ja4_r(hello),
                "ja3": ja3(hello),
                "ja3_string": ja3_string(hello),
            }
        elif isinstance(event, FlowEnd):
            assembler.forget(event.flow)


if __name__ == "__main__":
    app(prog_name="botwall")
