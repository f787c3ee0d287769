"""Property tests: on any input the ClientHello parser, the fingerprints and the assembler
either succeed or refuse in their documented way, and never raise anything else.

About 11,000 generated cases in all: random bytes, real hellos from the fixture
captures with bytes flipped, cut or added, hellos built with random extension
bodies, and random sequences of captured segments.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.events import ClientHelloSegment, Flow
from sensor.fingerprint.ja3 import ja3, ja3_string
from sensor.fingerprint.ja4 import ja4, ja4_r
from sensor.fingerprint.reassembly import CompleteHello, HelloAssembler
from sensor.fingerprint.tls import ClientHello, ParseError, parse_client_hello
from tests.test_tls_parser import build_client_hello, fixture_hellos, tls_records

JA4_SHAPE = re.compile(r"[tqd][0-9a-z]{2}[di]\d{4}[0-9a-zA-Z]{2}_[0-9a-f]{12}_[0-9a-f]{12}")
JA3_SHAPE = re.compile(r"[0-9a-f]{32}")

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def real_hellos() -> tuple[bytes, ...]:
    hellos = tuple(fixture_hellos())
    assert len(hellos) >= 150, "expected the fixture captures' hellos"
    return hellos


def parse_or_refuse(data: bytes) -> ClientHello | None:
    """The parser's whole contract: a ClientHello whose fingerprints work, or ParseError."""
    try:
        hello = parse_client_hello(data)
    except ParseError:
        return None
    assert isinstance(hello, ClientHello)
    assert JA4_SHAPE.fullmatch(ja4(hello)), ja4(hello)
    assert ja4_r(hello).startswith(ja4(hello)[:10])
    assert JA3_SHAPE.fullmatch(ja3(hello))
    assert ja3_string(hello).startswith(f"{hello.legacy_version},")
    return hello


def with_handshake_header(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


@settings(FUZZ, max_examples=3000)
@given(st.one_of(st.binary(max_size=700), st.binary(max_size=700).map(with_handshake_header)))
def test_random_bytes(data: bytes) -> None:
    parse_or_refuse(data)


@settings(FUZZ, max_examples=4000)
@given(
    pick=st.integers(min_value=0),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    tail=st.binary(max_size=16),
    fix_length=st.booleans(),
)
def test_mutated_real_hellos(
    pick: int, flips: list[tuple[int, int]], cut: int | None, tail: bytes, fix_length: bool
) -> None:
    hellos = real_hellos()
    data = bytearray(hellos[pick % len(hellos)])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    data += tail
    if fix_length and len(data) >= 4:
        # Keep the outer length right so the parser reaches the damage inside.
        data[1:4] = (len(data) - 4).to_bytes(3, "big")
    parse_or_refuse(bytes(data))


def test_unmutated_real_hellos_all_parse() -> None:
    assert all(parse_or_refuse(h) is not None for h in real_hellos())


# Known extensions get random bodies so their inner decoders see garbage too.
extension = st.tuples(
    st.one_of(
        st.sampled_from([0x0000, 0x000A, 0x000B, 0x000D, 0x0010, 0x002B]), st.integers(0, 0xFFFF)
    ),
    st.binary(max_size=40),
)


@settings(FUZZ, max_examples=2000)
@given(
    version=st.integers(0, 0xFFFF),
    session_id=st.binary(max_size=40),
    suites=st.lists(st.integers(0, 0xFFFF), max_size=120),
    extensions=st.one_of(st.none(), st.lists(extension, max_size=20)),
)
def test_built_hellos_with_random_extension_bodies(
    version: int,
    session_id: bytes,
    suites: list[int],
    extensions: list[tuple[int, bytes]] | None,
) -> None:
    raw = build_client_hello(
        legacy_version=version, session_id=session_id, cipher_suites=suites, extensions=extensions
    )
    hello = parse_or_refuse(raw)
    if len(session_id) <= 32 and hello is not None:
        assert hello.cipher_suites == tuple(suites)
        assert hello.extensions == tuple(extensions or ())


# ---- the assembler ---------------------------------------------------------

FLOWS = [
    Flow(ipaddress.ip_address("10.0.0.1"), 40000, ipaddress.ip_address("10.0.0.2"), 443),
    Flow(ipaddress.ip_address("2001:db8::1"), 40001, ipaddress.ip_address("2001:db8::2"), 443),
]


@functools.cache
def real_streams() -> tuple[tuple[bytes, bytes], ...]:
    """(client byte stream, hello) for fixture hellos: in one record, in many, behind a CCS."""
    hellos = real_hellos()[::5]
    return (
        tuple((tls_records(h), h) for h in hellos)
        + tuple((tls_records(h, 100), h) for h in hellos)
        + tuple((b"\x14\x03\x03\x00\x01\x01" + tls_records(h, 700), h) for h in hellos)
    )


PERTURBATIONS = (
    "drop", "swap", "repeat", "retransmit", "shift_seq", "truncate", "garbage", "reindex", "reflow",
)  # fmt: skip
# These leave every segment's data where its sequence number says it belongs,
# so whatever completes must be the original hello.
FAITHFUL = frozenset(PERTURBATIONS) - {"garbage", "reindex"}

# (segments, the hello they carry, undisturbed, disturbed only faithfully)
Case = tuple[list[ClientHelloSegment], bytes, bool, bool]


@st.composite
def segment_sequences(draw: st.DrawFn) -> Case:
    """A hello cut into segments as the kernel would send them, then perhaps disturbed."""
    streams = real_streams()
    stream, hello = streams[draw(st.integers(0, len(streams) - 1))]
    cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=3)))
    bounds = [0, *cuts, len(stream)]
    sequence = [
        ClientHelloSegment(
            ts_ns=i,
            flow=FLOWS[0],
            seq=(2**32 - 300 + bounds[i]) % 2**32,  # wraps inside the stream
            hello_index=1,
            segment_index=i + 1,
            payload_len=bounds[i + 1] - bounds[i],
            data=stream[bounds[i] : bounds[i + 1]],
        )
        for i in range(len(bounds) - 1)
    ]
    actions = draw(st.lists(st.sampled_from(PERTURBATIONS), max_size=3))
    for action in actions:
        at = draw(st.integers(0, len(sequence) - 1)) if sequence else 0
        if not sequence:
            break
        seg = sequence[at]
        if action == "drop":
            del sequence[at]
        elif action == "swap":
            sequence[at], sequence[-1] = sequence[-1], seg
        elif action == "repeat":
            sequence.insert(at, seg)
        elif action == "retransmit" and at > 0:
            # The previous segment again, where the next one was expected.
            sequence[at] = replace(sequence[at - 1], segment_index=seg.segment_index)
        elif action == "shift_seq":
            sequence[at] = replace(seg, seq=(seg.seq + draw(st.integers(-5, 5))) % 2**32)
        elif action == "truncate":
            sequence[at] = replace(seg, data=seg.data[: draw(st.integers(0, len(seg.data)))])
        elif action == "garbage":
            sequence[at] = replace(seg, data=draw(st.binary(max_size=64)))
        elif action == "reindex":
            sequence[at] = replace(
                seg, segment_index=draw(st.integers(-1, 5)), hello_index=draw(st.integers(0, 3))
            )
        elif action == "reflow":
            sequence[at] = replace(seg, flow=FLOWS[1])
    return sequence, hello, not actions, set(actions) <= FAITHFUL


@settings(FUZZ, max_examples=2000)
@given(segment_sequences())
def test_assembler_on_random_segment_sequences(case: Case) -> None:
    sequence, hello, undisturbed, faithful = case
    assembler = HelloAssembler(max_pending=3, max_segments=4)
    completed = []
    for segment in sequence:
        done = assembler.feed(segment)
        assert done is None or isinstance(done, CompleteHello)
        if done is not None:
            assert done.handshake[0] == 1
            assert len(done.handshake) == 4 + int.from_bytes(done.handshake[1:4], "big")
            parse_or_refuse(done.handshake)
            completed.append(done.handshake)
        assert len(assembler) <= 3
    if undisturbed:
        assert completed == [hello]
    if faithful:
        assert all(c == hello for c in completed)
    assert set(assembler.stats) <= ASSEMBLER_OUTCOMES


ASSEMBLER_OUTCOMES = {
    "completed", "orphan_segment", "surplus_after_complete", "bad_segment_index",
    "incomplete_replaced",
    "incomplete_segment_skipped", "incomplete_out_of_order", "incomplete_truncated",
    "incomplete_segment_limit", "incomplete_evicted", "invalid_record_type",
    "invalid_record_version", "invalid_record_length", "not_client_hello", "hello_too_large",
}  # fmt: skip
