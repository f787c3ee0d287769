"""Every row of client_stacks.toml is backed by a real capture that replays to its JA4."""

from __future__ import annotations

from pathlib import Path

import pytest

from sensor.events import SynEvent
from sensor.fingerprint.consistency import KnownStack, client_stacks
from sensor.fingerprint.ja4 import ja4
from sensor.fingerprint.reassembly import HelloAssembler
from sensor.fingerprint.tcp import os_guess, syn_signature
from sensor.fingerprint.tls import parse_client_hello
from sensor.replay import ReplaySource

CLIENTS = Path(__file__).resolve().parent / "fixtures/clients"
CAPTURE_PORT = 8443  # scripts/capture-client-stacks.sh's default

CASES = [(stack, pcap) for stack in client_stacks().stacks for pcap in stack.pcaps]


def replay(pcap: Path) -> tuple[list[str], list[SynEvent]]:
    events = list(ReplaySource(pcap, tls_ports=[CAPTURE_PORT], http_ports=[]).events())
    hellos = HelloAssembler().process(events)
    ja4s = [ja4(parse_client_hello(h.handshake)) for h in hellos]
    return ja4s, [e for e in events if isinstance(e, SynEvent)]


@pytest.mark.parametrize(("stack", "pcap"), CASES, ids=[p for _, p in CASES])
def test_capture_replays_to_its_row(stack: KnownStack, pcap: str) -> None:
    ja4s, syns = replay(CLIENTS / pcap)
    assert ja4s, f"{pcap}: no complete ClientHello"
    # Browsers open more than one connection; each sends the same hello.
    assert set(ja4s) == {stack.ja4}
    match = client_stacks().lookup(ja4s[0])
    assert match is not None and match.exact
    assert match.families == {stack.family}
    # Captured on a Linux machine over loopback: the SYN must say so.
    assert syns and {os_guess(syn_signature(s)).family for s in syns} == {"Linux"}


def test_every_capture_is_in_the_table() -> None:
    on_disk = {p.name for p in CLIENTS.glob("*.pcap")}
    in_table = {pcap for _, pcap in CASES}
    assert on_disk == in_table
    assert len(on_disk) >= 10


def test_expected_families_are_captured() -> None:
    families = {s.family for s in client_stacks().stacks}
    expected = {"chrome", "firefox", "curl", "python", "go", "node", "openssl", "gnutls", "wget"}
    assert families == expected
