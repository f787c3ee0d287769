"""HelloAssembler: ClientHellos over several TCP segments and TLS records, and how they fail."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from sensor.abi import FlowEndReason
from sensor.events import ClientHelloSegment, Flow, FlowEnd
from sensor.fingerprint.ja4 import ja4
from sensor.fingerprint.reassembly import CompleteHello, HelloAssembler, extract_client_hello
from sensor.fingerprint.tls import parse_client_hello
from sensor.replay import ReplaySource
from tests.test_tls_parser import chrome_like_hello, tls_records

FLOW = Flow(ipaddress.ip_address("10.0.0.1"), 40000, ipaddress.ip_address("10.0.0.2"), 443)
OTHER_FLOW = Flow(ipaddress.ip_address("10.0.0.3"), 40001, ipaddress.ip_address("10.0.0.2"), 443)
SEQ = 1000
# A hello larger than one MTU, like Chrome's with a post-quantum key share.
BIG_HELLO = chrome_like_hello(extensions=[(0x11EC, bytes(2000)), (0x0017, b"")])


def segment(
    data: bytes,
    segment_index: int = 1,
    seq: int = SEQ,
    payload_len: int | None = None,
    hello_index: int = 1,
    flow: Flow = FLOW,
    ts_ns: int = 5_000,
) -> ClientHelloSegment:
    return ClientHelloSegment(
        ts_ns=ts_ns,
        flow=flow,
        seq=seq,
        hello_index=hello_index,
        segment_index=segment_index,
        payload_len=len(data) if payload_len is None else payload_len,
        data=data,
    )


def split(stream: bytes, at: int) -> tuple[ClientHelloSegment, ClientHelloSegment]:
    return segment(stream[:at]), segment(stream[at:], 2, seq=SEQ + at, ts_ns=6_000)


def test_one_segment_one_record() -> None:
    assembler = HelloAssembler()

    done = assembler.feed(segment(tls_records(BIG_HELLO)))

    assert done == CompleteHello(flow=FLOW, hello_index=1, ts_ns=5_000, handshake=BIG_HELLO)
    assert assembler.stats == {"completed": 1}
    assert len(assembler) == 0


@pytest.mark.parametrize("at", [1, 3, 5, 7, 9, 700, 1400, len(BIG_HELLO)])
def test_two_segments_split_anywhere(at: int) -> None:
    assembler = HelloAssembler()
    first, second = split(tls_records(BIG_HELLO), at)

    assert assembler.feed(first) is None
    assert len(assembler) == 1
    done = assembler.feed(second)

    assert done is not None
    assert done.handshake == BIG_HELLO
    assert done.ts_ns == 5_000  # when the client began sending it
    assert len(assembler) == 0


@pytest.mark.parametrize("record_size", [1, 4, 100, 1000])
def test_several_records_in_one_segment(record_size: int) -> None:
    done = HelloAssembler().feed(segment(tls_records(BIG_HELLO, record_size)))

    assert done is not None and done.handshake == BIG_HELLO


def test_several_records_over_two_segments() -> None:
    stream = tls_records(BIG_HELLO, record_size=500)
    assembler = HelloAssembler()
    first, second = split(stream, 1003)  # inside the third record's header

    assert assembler.feed(first) is None
    done = assembler.feed(second)

    assert done is not None and done.handshake == BIG_HELLO


def test_leading_change_cipher_spec_record_is_skipped() -> None:
    stream = b"\x14\x03\x03\x00\x01\x01" + tls_records(BIG_HELLO, record_version=0x0303)

    done = HelloAssembler().feed(segment(stream, hello_index=2))

    assert done is not None
    assert done.hello_index == 2
    assert done.handshake == BIG_HELLO


def test_bytes_after_the_hello_are_left_out() -> None:
    stream = tls_records(BIG_HELLO) + b"\x17\x03\x03\x00\x05hello"

    assert HelloAssembler().feed(segment(stream)).handshake == BIG_HELLO  # type: ignore[union-attr]


def test_continuation_without_a_first_segment_is_an_orphan() -> None:
    assembler = HelloAssembler()
    _, second = split(tls_records(BIG_HELLO), 700)

    assert assembler.feed(second) is None
    assert assembler.stats == {"orphan_segment": 1}


def test_out_of_order_continuation_makes_the_hello_incomplete() -> None:
    assembler = HelloAssembler()
    stream = tls_records(BIG_HELLO)
    assembler.feed(segment(stream[:700]))

    # A retransmission of the first segment: same sequence number, not contiguous.
    assert assembler.feed(segment(stream[:700], 2, seq=SEQ)) is None
    assert assembler.stats == {"incomplete_out_of_order": 1}
    assert len(assembler) == 0


def test_sequence_numbers_wrap() -> None:
    stream = tls_records(BIG_HELLO)
    start = 2**32 - 100
    assembler = HelloAssembler()
    assembler.feed(segment(stream[:700], seq=start))

    done = assembler.feed(segment(stream[700:], 2, seq=(start + 700) % 2**32))

    assert done is not None and done.handshake == BIG_HELLO


def test_truncated_capture_makes_the_hello_incomplete() -> None:
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler()

    # The kernel kept 700 of the segment's 1400 bytes: the rest is gone.
    assert assembler.feed(segment(stream[:700], payload_len=1400)) is None
    assert assembler.stats == {"incomplete_truncated": 1}
    assert len(assembler) == 0


def test_still_incomplete_after_the_last_segment_allowed() -> None:
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler()
    assembler.feed(segment(stream[:500]))

    assert assembler.feed(segment(stream[500:1000], 2, seq=SEQ + 500)) is None
    assert assembler.stats == {"incomplete_segment_limit": 1}
    assert len(assembler) == 0


def test_more_segments_when_the_limit_allows() -> None:
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler(max_segments=3)
    assembler.feed(segment(stream[:500]))
    assembler.feed(segment(stream[500:1000], 2, seq=SEQ + 500))

    done = assembler.feed(segment(stream[1000:], 3, seq=SEQ + 1000))

    assert done is not None and done.handshake == BIG_HELLO


def test_segment_index_out_of_range() -> None:
    assembler = HelloAssembler()

    assert assembler.feed(segment(tls_records(BIG_HELLO), segment_index=0)) is None
    assert assembler.feed(segment(tls_records(BIG_HELLO), segment_index=3)) is None
    assert assembler.stats == {"bad_segment_index": 2}


def test_a_new_first_segment_replaces_a_waiting_one() -> None:
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler()
    assembler.feed(segment(stream[:500]))

    assert assembler.feed(segment(stream[:600])) is None
    done = assembler.feed(segment(stream[600:], 2, seq=SEQ + 600))

    assert done is not None and done.handshake == BIG_HELLO
    assert assembler.stats == {"incomplete_replaced": 1, "completed": 1}


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"\x17\x03\x03\x00\x10" + bytes(16), "invalid_record_type"),
        (b"\x16\x02\x00\x00\x10" + bytes(16), "invalid_record_version"),
        (b"\x16\x03\x01\x00\x00", "invalid_record_length"),
        (b"\x16\x03\x01\x40\x01" + bytes(20), "invalid_record_length"),
        (tls_records(b"\x02\x00\x00\x04" + bytes(4)), "not_client_hello"),
        (tls_records(b"\x01\xff\xff\xff" + bytes(100)), "hello_too_large"),
    ],
)
def test_streams_that_can_never_be_a_hello(stream: bytes, reason: str) -> None:
    assembler = HelloAssembler()

    assert assembler.feed(segment(stream)) is None
    assert assembler.stats == {reason: 1}
    assert len(assembler) == 0


def test_extract_client_hello_directly() -> None:
    assert extract_client_hello(tls_records(BIG_HELLO, 64)) == BIG_HELLO


def test_pending_hellos_are_bounded() -> None:
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler(max_pending=2)
    for port in range(3):
        flow = Flow(FLOW.src, 50000 + port, FLOW.dst, 443)
        assembler.feed(segment(stream[:500], flow=flow))

    assert len(assembler) == 2
    assert assembler.stats == {"incomplete_evicted": 1}
    # The oldest went: its continuation is now an orphan.
    oldest = Flow(FLOW.src, 50000, FLOW.dst, 443)
    assert assembler.feed(segment(stream[500:], 2, seq=SEQ + 500, flow=oldest)) is None
    assert assembler.stats["orphan_segment"] == 1


def test_process_forgets_a_flow_when_it_ends() -> None:
    stream = tls_records(BIG_HELLO)
    end = FlowEnd(
        ts_ns=7_000, flow=FLOW, reason=FlowEndReason.FIN, first_ns=0, last_ns=7_000, packets=3,
        bytes=500,
        data_segments=1, syn_count=1, server_packets=0, server_bytes=0, gap_count=0,
        gap_mean_us=float("nan"), gap_var_us2=float("nan"), seen_syn=True,
    )  # fmt: skip
    other_first, other_second = (
        segment(stream[:500], flow=OTHER_FLOW),
        segment(stream[500:], 2, seq=SEQ + 500, flow=OTHER_FLOW),
    )
    assembler = HelloAssembler()

    done = list(assembler.process([segment(stream[:500]), other_first, end, other_second]))

    assert [d.flow for d in done] == [OTHER_FLOW]
    assert assembler.stats == {"incomplete_flow_ended": 1, "completed": 1}
    assert len(assembler) == 0


# ---- end to end from a capture ---------------------------------------------


def _client(payload: bytes, seq: int, ts: float) -> Ether:
    pkt = (
        Ether()
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=40000, dport=443, flags="PA", seq=seq, ack=1)
        / Raw(payload)
    )
    pkt.time = ts
    return pkt


def test_two_segment_hello_from_a_capture(tmp_path: Path) -> None:
    stream = tls_records(BIG_HELLO)
    capture = tmp_path / "two.pcap"
    wrpcap(str(capture), [_client(stream[:1448], 1, 1.0), _client(stream[1448:], 1449, 1.001)])

    events = list(ReplaySource(capture).events())
    hellos = list(HelloAssembler().process(events))

    assert [
        (e.segment_index, len(e.data)) for e in events if isinstance(e, ClientHelloSegment)
    ] == [
        (1, 1448),
        (2, len(stream) - 1448),
    ]
    assert len(hellos) == 1
    hello = parse_client_hello(hellos[0].handshake)
    assert hello.sni is None
    assert ja4(hello).startswith("t12i0502")


def test_second_hello_after_hello_retry_request_from_a_capture(tmp_path: Path) -> None:
    first = tls_records(BIG_HELLO)
    second_hello = chrome_like_hello(extensions=[(0x0017, b"")])
    second = b"\x14\x03\x03\x00\x01\x01" + tls_records(second_hello, record_version=0x0303)
    capture = tmp_path / "hrr.pcap"
    wrpcap(
        str(capture),
        [
            _client(first[:1448], 1, 1.0),
            _client(first[1448:], 1449, 1.001),
            _client(second, 1 + len(first), 1.1),
        ],
    )

    hellos = list(HelloAssembler().process(ReplaySource(capture).events()))

    assert [(h.hello_index, h.handshake) for h in hellos] == [(1, BIG_HELLO), (2, second_hello)]


def test_a_segment_after_a_completed_hello_is_surplus_not_lost() -> None:
    """The kernel takes the next segment when a hello's first record cannot hold
    it; if the other records were in the same segment, that one is surplus."""
    stream = tls_records(BIG_HELLO)
    assembler = HelloAssembler()
    assert assembler.feed(segment(stream)) is not None
    assert assembler.feed(segment(b"\x17\x03\x03\x00\x01\x00", 2, seq=SEQ + len(stream))) is None
    assert assembler.stats == {"completed": 1, "surplus_after_complete": 1}
    assert len(assembler) == 0
