"""Real ClientHellos from this machine's client stacks, captured by the kernel sensor, to JA4.

Each client (curl, openssl s_client, Python, Node, gnutls-cli, Go, headless
Chromium) makes one HTTPS request from the client namespace to the lab's TLS
server; the sensor, attached in native XDP mode to the server's veth, emits
the ClientHello segments, which are reassembled, parsed and fingerprinted as
the agent does it. Each JA4 must be the one client_stacks.toml records for
that client. Python's hello is also sent split across two TCP segments and
across two TLS records (lab.splithello): the fingerprint must not change.
Every client is required: a missing one fails its test, it is never skipped.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from lab import clients
from lab.clients import ClientResult
from lab.netns import Topology
from lab.tls_server import HOSTNAME, TlsServer
from sensor.events import ClientHelloSegment, Event
from sensor.fingerprint.consistency import client_stacks
from sensor.fingerprint.ja3 import ja3
from sensor.fingerprint.ja4 import ja4
from sensor.fingerprint.reassembly import CompleteHello, HelloAssembler
from sensor.fingerprint.tls import ClientHello, hello_key, parse_client_hello
from sensor.loader import Sensor, SensorSettings, remove_pins
from tests.test_sensor_live import Live

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

TLS_PORT = 8443
# veth MTU 1500 - 20 (IPv4) - 20 (TCP) - 12 (timestamps option): a segment's payload.
SEGMENT_PAYLOAD = 1448
# Debian package of each external program, for the message when one is missing.
PACKAGES = {
    "curl": "curl",
    "openssl": "openssl",
    "node": "nodejs",
    "gnutls-cli": "gnutls-bin",
    "go": "golang-go",
    "chromium": "chromium",
}


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they load eBPF programs and build namespaces")
    pin_dir = f"/sys/fs/bpf/botwall-test-{uuid.uuid4().hex[:8]}"
    with Topology() as topo, TlsServer(topo, TLS_PORT):
        sensor = Sensor(SensorSettings(tls_ports=(TLS_PORT,), http_ports=(), pin_dir=pin_dir))
        try:
            attached = sensor.attach(topo.server_if, mode="native", netns=topo.server_ns)
            assert attached.xdp_mode == "native"
            yield Live(topo, sensor)
        finally:
            sensor.close()
            remove_pins(pin_dir)


@dataclass(frozen=True)
class Seen:
    """What the sensor captured of one client run: every ClientHello it sent."""

    segments: list[ClientHelloSegment]  # in capture order, every connection
    complete: list[CompleteHello]  # each reassembled, in order of completion
    hellos: list[ClientHello]  # each parsed, in the same order

    @property
    def ja4s(self) -> set[str]:
        return {ja4(h) for h in self.hellos}

    @property
    def keys(self) -> set[int]:
        """The kernel's hello keys (bpf/common.h) of these hellos."""
        pairs = zip(self.hellos, self.complete, strict=True)
        return {hello_key(hello, len(done.handshake)) for hello, done in pairs}

    def segments_of(self, index: int) -> list[ClientHelloSegment]:
        """The captured segments that made up complete hello number `index`."""
        key = (self.complete[index].flow, self.complete[index].hello_index)
        return [s for s in self.segments if (s.flow, s.hello_index) == key]


def _hello_segments(events: list[Event], client: str) -> list[ClientHelloSegment]:
    source = ipaddress.ip_address(client)
    return [
        e
        for e in events
        if isinstance(e, ClientHelloSegment) and e.flow.src == source and e.flow.dport == TLS_PORT
    ]


def observe(live: Live, run: Callable[[Topology], ClientResult]) -> Seen:
    """Run one client and return the hellos the sensor saw from it, reassembled and parsed."""
    live.drain()
    result = run(live.topo)
    assert result.ok, f"{result.tool}: {result.outcome} ({result.returncode}): {result.stderr_tail}"
    client = live.topo.client_v4

    def assembled(events: list[Event]) -> bool:
        # Done when at least one hello is whole and none waits for a continuation.
        assembler = HelloAssembler()
        done = [assembler.feed(s) for s in _hello_segments(events, client)]
        return any(done) and len(assembler) == 0

    segments = _hello_segments(live.wait_for(assembled), client)
    assembler = HelloAssembler()
    complete = list(assembler.process(segments))
    # A segment after a complete hello is surplus, not loss: the kernel takes one
    # more when a hello's first record cannot hold it (it cannot see the rest).
    lost = set(assembler.stats) - {"completed", "surplus_after_complete"}
    assert not lost, f"lost hellos: {assembler.stats}"
    return Seen(segments, complete, [parse_client_hello(h.handshake) for h in complete])


def _require(program: str | None) -> None:
    if program is not None and shutil.which(program) is None:
        pytest.fail(
            f"{program} is not installed: apt-get install {PACKAGES[program]} "
            "(every client stack is required; these tests are never skipped)",
            pytrace=False,
        )


@dataclass(frozen=True)
class Stack:
    program: str | None  # the external program it needs, if any
    family: str  # the client_stacks.toml family its JA4 must map to
    run: Callable[[Topology], ClientResult]


# Each client's default ALPN, as captured for client_stacks.toml (JA4 records
# the first ALPN value and counts the extension), except the lab's Python
# client, which offers http/1.1 as urllib3 and httpx do: with it, Python's
# ssl is t13d3112h1_..., without it t13d311100_...
STACKS = {
    "curl": Stack("curl", "curl", lambda t: clients.curl(t, t.server_v4, TLS_PORT, insecure=True)),
    "openssl": Stack(
        "openssl", "openssl",
        lambda t: clients.openssl_s_client(t, t.server_v4, TLS_PORT, alpn=None),
    ),
    "python": Stack(
        None, "python", lambda t: clients.python_client(t, t.server_v4, TLS_PORT, insecure=True)
    ),
    "node": Stack("node", "node", lambda t: clients.node_client(t, t.server_v4, TLS_PORT)),
    "gnutls": Stack(
        "gnutls-cli", "gnutls", lambda t: clients.gnutls_client(t, t.server_v4, TLS_PORT)
    ),
    "go": Stack("go", "go", lambda t: clients.go_client(t, t.server_v4, TLS_PORT)),
    "chromium": Stack(
        "chromium", "chrome", lambda t: clients.chromium_client(t, t.server_v4, TLS_PORT)
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(STACKS))
def test_client_stack_hello_maps_to_its_family(live: Live, name: str) -> None:
    stack = STACKS[name]
    _require(stack.program)
    seen = observe(live, stack.run)

    assert seen.hellos, f"{name}: no complete ClientHello"
    assert {h.sni for h in seen.hellos} == {HOSTNAME}
    # Chromium shuffles its extensions on every connection; JA4 sorts them,
    # so all of its connections still share one fingerprint.
    assert len(seen.ja4s) == 1, f"{name}: differing JA4s {seen.ja4s}"
    (fingerprint,) = seen.ja4s
    match = client_stacks().lookup(fingerprint)
    assert match is not None, f"{name}: JA4 {fingerprint} is not in client_stacks.toml"
    assert match.exact, f"{name}: only the cipher-suite hash of {fingerprint} is known"
    assert match.families == {stack.family}, f"{name}: JA4 {fingerprint}"
    # The kernel's hello key (bpf/common.h) is as stable as the JA4.
    assert len(seen.keys) == 1, f"{name}: differing hello keys {seen.keys}"

    # The kernel takes a continuation segment exactly when a hello needs one.
    for index, done in enumerate(seen.complete):
        record_len = 5 + len(done.handshake)
        segments = seen.segments_of(index)
        expected = [1, 2] if record_len > SEGMENT_PAYLOAD else [1]
        assert [s.segment_index for s in segments] == expected
        assert sum(s.payload_len for s in segments) == record_len


def test_openssl_tools_share_a_cipher_list_but_not_a_hello_key(live: Live) -> None:
    """curl, openssl s_client and Python all send OpenSSL's default cipher list;
    the kernel's key tells them apart by their extensions, so a JA4 verdict on
    one of them never drops the others' hellos."""
    seen = {}
    for name in ("curl", "openssl", "python"):
        _require(STACKS[name].program)
        seen[name] = observe(live, STACKS[name].run)
    cipher_lists = {tuple(h.cipher_suites) for s in seen.values() for h in s.hellos}
    assert len(cipher_lists) == 1
    keys = {name: s.keys for name, s in seen.items()}
    assert all(len(k) == 1 for k in keys.values()), keys
    assert len(set().union(*keys.values())) == 3, keys


def test_chromium_post_quantum_hello_spans_two_segments(live: Live) -> None:
    _require("chromium")
    seen = observe(live, STACKS["chromium"].run)
    for index, (done, hello) in enumerate(zip(seen.complete, seen.hellos, strict=True)):
        # X25519MLKEM768 (0x11ec) among the groups: Chromium sends its key share,
        # 1216 bytes of ML-KEM, and the hello no longer fits one segment of a
        # 1500-MTU link, the case the kernel's two-segment capture exists for.
        assert 0x11EC in hello.supported_groups
        record_len = 5 + len(done.handshake)
        assert record_len > SEGMENT_PAYLOAD
        first, second = seen.segments_of(index)
        assert (first.segment_index, second.segment_index) == (1, 2)
        assert first.payload_len == SEGMENT_PAYLOAD
        assert second.payload_len == record_len - SEGMENT_PAYLOAD
        assert second.seq == (first.seq + first.payload_len) % (1 << 32)
        assert not first.truncated and not second.truncated


@pytest.fixture(scope="module")
def python_unsplit(live: Live) -> Seen:
    """The lab's Python client, whole: what each split hello must fingerprint to."""
    return observe(live, STACKS["python"].run)


# name: (lab.splithello --mode, its --sends, the TCP segments the hello then arrives in).
# --sends matters only for records: segments mode always sends twice.
SPLITS = {
    "two-segments": ("segments", 1, 2),
    "two-records-one-segment": ("records", 1, 1),
    "two-records-two-segments": ("records", 2, 2),
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_split_python_hello_keeps_its_fingerprint(
    live: Live, python_unsplit: Seen, split: str
) -> None:
    mode, sends, segment_count = SPLITS[split]
    seen = observe(
        live, lambda t: clients.splithello_client(t, t.server_v4, TLS_PORT, mode=mode, sends=sends)
    )
    assert len(seen.hellos) == 1
    segments = seen.segments_of(0)
    expected = list(range(1, segment_count + 1))
    if mode == "records" and segment_count == 1:
        # The first record cannot hold the hello and the kernel cannot see that
        # the second record is in the same segment: it takes the next one too,
        # and the assembler counts that one as surplus.
        expected = [1, 2]
    assert [s.segment_index for s in segments] == expected
    segments = segments[:segment_count]

    # The same library with the same settings: the same size, SNI, extension
    # order (JA3 keeps wire order) and JA4 as the hello sent whole.
    hello_len = len(seen.complete[0].handshake)
    assert hello_len == len(python_unsplit.complete[0].handshake)
    assert seen.hellos[0].sni == HOSTNAME
    assert seen.ja4s == python_unsplit.ja4s
    assert ja3(seen.hellos[0]) == ja3(python_unsplit.hellos[0])

    data = b"".join(s.data for s in segments)
    if mode == "segments":
        # One record, cut in the middle of the handshake message.
        assert data[0] == 0x16 and int.from_bytes(data[3:5], "big") == hello_len
        assert segments[0].payload_len == (5 + hello_len) // 2
        return
    # Two handshake records, the first with the first half of the message.
    first_len = int.from_bytes(data[3:5], "big")
    assert data[0] == 0x16 and first_len == hello_len // 2
    second = data[5 + first_len :]
    assert second[0] == 0x16 and int.from_bytes(second[3:5], "big") == hello_len - first_len
    assert len(data) == 10 + hello_len
    if segment_count == 2:
        # The first segment ends where the first record does: the kernel asked
        # for a continuation because the handshake length said there was more.
        assert segments[0].payload_len == 5 + first_len
