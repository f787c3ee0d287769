"""Blocked ClientHello keys: the kernel drops a new hello whose cipher list a JA4
verdict named, and the key it computes is the one user space computes.

The kernel half runs the real programs (botwall_xdp tail-calling botwall_hello)
through BPF_PROG_TEST_RUN; the hellos are every first hello segment of the real
captures in shared/fixtures/tls, replayed the way a live one arrives.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sensor import abi
from sensor.abi import Counter as C
from sensor.abi import VerdictKind
from sensor.events import ClientHelloSegment
from sensor.fingerprint.reassembly import HelloAssembler
from sensor.fingerprint.tls import GREASE_VALUES, hello_key, parse_client_hello
from sensor.replay import ReplaySource
from sensor.verdicts import hello_target
from tests.kernel import KernelSensor, loaded_sensor
from tests.test_tls_parser import build_client_hello
from tests.test_xdp_datapath import SEQ, V4, V6, data, real_client_hello, seg

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"
DROP, PASS = "XDP_DROP", "XDP_PASS"


@dataclass(frozen=True)
class FixtureHello:
    name: str
    first_segment: bytes  # as the kernel sees it: the hello's first TCP payload
    key: int  # hello_key() of the whole hello, reassembled and parsed in user space


@functools.cache
def fixture_hellos() -> tuple[FixtureHello, ...]:
    """The first hello of every flow in the captures that starts a TLS record."""
    found: list[FixtureHello] = []
    for pcap in sorted(FIXTURES.glob("*.pcap*")):
        assembler = HelloAssembler()
        first: dict[tuple[object, int], bytes] = {}
        for event in ReplaySource(pcap).events():
            if not isinstance(event, ClientHelloSegment):
                continue
            if event.segment_index == 1:
                first[(event.flow, event.hello_index)] = event.data
            done = assembler.feed(event)
            if done is None or done.hello_index != 1:
                continue
            segment = first[(done.flow, 1)]
            if segment[:1] != b"\x16":
                continue
            key = key_of(done.handshake)
            found.append(FixtureHello(f"{pcap.name}:{done.flow}", segment, key))
    return tuple(found)


def key_of(handshake: bytes) -> int:
    return hello_key(parse_client_hello(handshake), len(handshake))


@pytest.fixture(scope="module")
def loaded() -> Iterator[KernelSensor]:
    with loaded_sensor() as kernel:
        yield kernel


@pytest.fixture
def kernel(loaded: KernelSensor) -> KernelSensor:
    loaded.reset()
    return loaded


def _handshake_start(kernel: KernelSensor, payload: bytes, fam=V4, sport: int = 40000) -> str:
    """SYN, then the hello's first segment; the action the hello got."""
    kernel.run(seg(fam, sport=sport))
    return kernel.run(data(fam, payload, sport=sport, seq=SEQ + 1)).action


# ---- the key itself ----


def test_fixtures_hold_many_client_stacks() -> None:
    """The agreement test below means something only over many different hellos."""
    hellos = fixture_hellos()
    assert len(hellos) >= 100
    assert len({h.key for h in hellos}) >= 8  # 10 keys in today's captures


def _hello(ciphers: tuple[int, ...], extensions: tuple[int, ...], pad: int = 0) -> bytes:
    """A hello with these cipher suites and empty extensions of these types,
    plus a padding extension (21) of `pad` bytes when pad > 0."""
    exts = [(t, b"") for t in extensions] + ([(21, bytes(pad))] if pad else [])
    return build_client_hello(cipher_suites=ciphers, extensions=exts)


# Extension types the parser does not decode, so they may be empty.
CIPHERS, EXTENSIONS = (0x1301, 0x1302, 0xC02B), (23, 35, 22, 45, 27)


def test_key_leaves_out_grease_and_keeps_cipher_order() -> None:
    key = key_of(_hello(CIPHERS, EXTENSIONS))
    for grease in sorted(GREASE_VALUES)[:3]:
        assert key_of(_hello((grease, *CIPHERS), EXTENSIONS)) == key
        assert key_of(_hello(CIPHERS, (grease, *EXTENSIONS))) == key
    assert key_of(_hello((0x1302, 0x1301, 0xC02B), EXTENSIONS)) != key
    assert 0 < key < 1 << 64


def test_key_holds_the_extension_set_not_its_order() -> None:
    """Chrome shuffles its extensions on every connection; OpenSSL's tools share
    one cipher list and differ in their extensions."""
    key = key_of(_hello(CIPHERS, EXTENSIONS))
    assert key_of(_hello(CIPHERS, tuple(reversed(EXTENSIONS)))) == key
    assert key_of(_hello(CIPHERS, EXTENSIONS[:-1])) != key
    assert key_of(_hello(CIPHERS, (*EXTENSIONS, 49))) != key


def test_key_of_a_large_hello_is_its_cipher_list() -> None:
    """Past HELLO_KEY_EXT_BUDGET the hello may span segments: the extensions
    no longer count, so any two large hellos with one cipher list share a key."""
    large = key_of(_hello(CIPHERS, EXTENSIONS, pad=abi.HELLO_KEY_EXT_BUDGET))
    assert key_of(_hello(CIPHERS, EXTENSIONS[:2], pad=abi.HELLO_KEY_EXT_BUDGET)) == large
    assert key_of(_hello(CIPHERS, EXTENSIONS)) != large
    # Exactly at the budget (record header included) the extensions still count.
    small = _hello(CIPHERS, EXTENSIONS)
    fits = _hello(CIPHERS, EXTENSIONS, pad=abi.HELLO_KEY_EXT_BUDGET - 5 - len(small) - 4)
    assert 5 + len(fits) == abi.HELLO_KEY_EXT_BUDGET
    one_over = _hello(CIPHERS, EXTENSIONS, pad=abi.HELLO_KEY_EXT_BUDGET - 5 - len(small) - 3)
    assert key_of(fits) != large and key_of(one_over) == large


def test_key_counts_only_the_first_ciphers() -> None:
    many = tuple(range(0x0100, 0x0100 + abi.HELLO_KEY_MAX_CIPHERS))
    assert key_of(_hello((*many, 0xC02F), ())) == key_of(_hello(many, ()))


# ---- the kernel ----


@pytest.mark.parametrize("index", range(len(fixture_hellos())))
def test_kernel_drops_exactly_the_blocked_key(kernel: KernelSensor, index: int) -> None:
    """The kernel's key for a real hello's first segment is user space's key for
    the whole hello: blocking it drops the hello; blocking any other key does not."""
    hello = fixture_hellos()[index]
    kernel.verdicts.block_hello(hello.key ^ 1, 60, "another stack")
    assert _handshake_start(kernel, hello.first_segment, sport=40001) == PASS, hello.name

    kernel.verdicts.block_hello(hello.key, 60, "JA4 blocked")
    assert _handshake_start(kernel, hello.first_segment, sport=40002) == DROP, hello.name


def test_dropped_hello_blocks_its_connection(kernel: KernelSensor) -> None:
    ch = real_client_hello()
    key = key_of(ch[5:])
    kernel.verdicts.block_hello(key, 3600, "JA4 t13d_x blocked")

    kernel.run(seg(V4))
    hello = kernel.run(data(V4, ch, seq=SEQ + 1))
    assert hello.action == DROP
    assert hello.counter_deltas == {C.DROP_BLOCK_HELLO: 1, C.EVENT_HELLO: 1}
    # User space still sees the hello it was dropped for.
    assert [type(e).__name__ for e in hello.events] == ["ClientHelloSegment"]

    retransmitted = kernel.run(data(V4, ch, seq=SEQ + 1))
    assert retransmitted.action == DROP
    assert retransmitted.counter_deltas == {C.DROP_BLOCK_FLOW: 1}
    (entry,) = [e for e in kernel.verdicts.list() if e.kind is VerdictKind.BLOCK_FLOW]
    assert entry.target == str(V4.flow())
    assert entry.reason == "JA4 t13d_x blocked"
    # A connection needs minutes at most, not the key's hour.
    assert 0 < entry.expires_in_s <= abi.HELLO_FLOW_BLOCK_NS / 1e9

    # Another connection of the same stack goes the same way; IPv6 too.
    assert _handshake_start(kernel, ch, sport=40100) == DROP
    assert _handshake_start(kernel, ch, fam=V6) == DROP


def test_exempt_and_allowed_sources_pass(kernel: KernelSensor) -> None:
    ch = real_client_hello()
    key = key_of(ch[5:])
    kernel.verdicts.block_hello(key, 60, "JA4 blocked")
    kernel.verdicts.exempt_hello(V4.client, 60, "declared agent")
    kernel.run(seg(V4))
    exempt = kernel.run(data(V4, ch, seq=SEQ + 1))
    assert exempt.action == PASS
    assert exempt.counter_deltas == {C.PASS: 1, C.EVENT_HELLO: 1, C.HIT_HELLO_EXEMPT: 1}

    kernel.verdicts.allow(V6.client, 60, "operator")
    assert _handshake_start(kernel, ch, fam=V6) == PASS


def test_expired_key_and_non_hello_data_pass(kernel: KernelSensor) -> None:
    ch = real_client_hello()
    key = key_of(ch[5:])
    kernel.past.block_hello(key, 1, "expired long ago")
    kernel.run(seg(V4))
    expired = kernel.run(data(V4, ch, seq=SEQ + 1))
    assert expired.action == PASS
    assert expired.counter_deltas == {C.PASS: 1, C.EVENT_HELLO: 1, C.VERDICT_EXPIRED: 1}

    kernel.verdicts.block_hello(key, 60, "live")
    # The same bytes not at a segment's start, and a truncated hello, are no hello.
    assert _handshake_start(kernel, b"GET / HTTP/1.1\r\n\r\n" + ch, sport=40200) == PASS
    assert _handshake_start(kernel, ch[:60], sport=40201) == PASS


def test_key_verdicts_are_listed_and_removed(kernel: KernelSensor) -> None:
    kernel.verdicts.block_hello(0x1234, 60, "JA4 blocked")
    kernel.verdicts.exempt_hello(V4.client, 60, "declared agent")
    listed = {(e.kind, e.target) for e in kernel.verdicts.list()}
    assert listed == {
        (VerdictKind.BLOCK_HELLO, hello_target(0x1234)),
        (VerdictKind.HELLO_EXEMPT, V4.client),
    }
    # Blocking hellos turns on flow blocks too: the kernel writes them.
    assert kernel.verdicts.active_kinds() & VerdictKind.BLOCK_FLOW
    assert kernel.verdicts.unblock_hello(0x1234) == 1
    assert kernel.verdicts.unexempt_hello(V4.client) == 1
    assert kernel.verdicts.list() == []
    assert kernel.verdicts.active_kinds() == VerdictKind(0)
    with pytest.raises(ValueError, match="non-zero 64-bit"):
        kernel.verdicts.block_hello(0, 60, "no key")
