"""ReplaySource against captures built packet by packet: each kernel observation rule
(numbered as in sensor/replay.py's docstring), each link layer, and the malformed frames
it must skip without raising.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import TypeVar

import pytest
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Padding, Raw
from scapy.utils import EDecimal, wrpcap, wrpcapng

from sensor.abi import FlowEndReason, SynQuirk
from sensor.errors import SensorError
from sensor.events import (
    ClientHelloSegment,
    Event,
    FlowEnd,
    HttpRequestHead,
    HttpResponseStatus,
    SynEvent,
)
from sensor.replay import ObservationLimits, ReplayError, ReplaySource
from sensor.sources import EventSource
from tests.test_tls_parser import chrome_like_hello, tls_records

T0 = 1_700_000_000 * 10**9  # ns; a realistic clock, so last_data_ns is never 0
CLIENT, SERVER = "192.0.2.10", "198.51.100.20"
CLIENT6, SERVER6 = "2001:db8::10", "2001:db8:1::20"
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}

HELLO = tls_records(chrome_like_hello())  # fits one segment
BIG_HELLO = tls_records(chrome_like_hello(extensions=[(0x11EC, bytes(2000))]))  # needs two
CCS = b"\x14\x03\x03\x00\x01\x01"

E = TypeVar("E", bound=Event)


def ms(n: float) -> int:
    return T0 + int(n * 1_000_000)


def c2s(
    payload: bytes = b"",
    flags: str = "PA",
    sport: int = 40000,
    dport: int = 443,
    seq: int = 1,
    ack: int = 1,
    src: str = CLIENT,
    dst: str = SERVER,
    **tcp: object,
) -> Packet:
    """A client -> server frame."""
    pkt = (
        Ether(**MACS)
        / IP(src=src, dst=dst)
        / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, **tcp)
    )
    return pkt / Raw(payload) if payload else pkt


def s2c(payload: bytes = b"", flags: str = "PA", sport: int = 443, dport: int = 40000) -> Packet:
    """A server -> client frame."""
    return c2s(payload, flags, sport=sport, dport=dport, src=SERVER, dst=CLIENT)


def syn(flags: str = "S", **kwargs: object) -> Packet:
    return c2s(flags=flags, ack=0, **kwargs)  # type: ignore[arg-type]


def write_pcap(path: Path, frames: list[tuple[int, bytes | Packet]], linktype: int = 1) -> Path:
    """A nanosecond-resolution pcap written byte by byte, so bad frames stay as bad as built."""
    out = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, linktype)
    for ts_ns, frame in frames:
        raw = bytes(frame)
        sec, nsec = divmod(ts_ns, 10**9)
        out += struct.pack("<IIII", sec, nsec, len(raw), len(raw)) + raw
    path.write_bytes(out)
    return path


def replay(
    tmp_path: Path, frames: list[tuple[int, bytes | Packet]], linktype: int = 1, **kwargs: object
) -> tuple[list[Event], ReplaySource]:
    source = ReplaySource(write_pcap(tmp_path / "c.pcap", frames, linktype), **kwargs)  # type: ignore[arg-type]
    return list(source.events()), source


def of(events: list[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# ---- the source itself -----------------------------------------------------


def test_is_an_event_source(tmp_path: Path) -> None:
    source = ReplaySource(write_pcap(tmp_path / "empty.pcap", []))

    assert isinstance(source, EventSource)
    assert list(source.events()) == []
    assert source.stats.packets == 0


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pcap"
    with pytest.raises(ReplayError, match=r"nope\.pcap: no such capture file"):
        ReplaySource(missing)
    assert issubclass(ReplayError, ValueError) and issubclass(ReplayError, SensorError)


@pytest.mark.parametrize("content", [b"", b"GET / HTTP/1.1\r\n\r\n", b"\xd4\xc3\xb2\xa1\x02"])
def test_not_a_capture_names_the_path(tmp_path: Path, content: bytes) -> None:
    bogus = tmp_path / "bogus.pcap"
    bogus.write_bytes(content)
    with pytest.raises(ReplayError, match=r"bogus\.pcap: not a pcap or pcapng capture"):
        ReplaySource(bogus)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=str(tmp_path)):
        ReplaySource(tmp_path)


def test_replays_again_from_the_start(tmp_path: Path) -> None:
    source = ReplaySource(write_pcap(tmp_path / "c.pcap", [(ms(0), syn())]))

    first, second = list(source.events()), list(source.events())

    assert first == second
    assert kinds(first) == ["SynEvent", "FlowEnd"]


def test_close_stops_the_replay(tmp_path: Path) -> None:
    frames: list[tuple[int, bytes | Packet]] = [(ms(i), syn(sport=41000 + i)) for i in range(5)]
    source = ReplaySource(write_pcap(tmp_path / "c.pcap", frames))
    events = source.events()

    assert isinstance(next(events), SynEvent)
    source.close()

    assert list(events) == []
    assert list(source.events()) == []


def test_microsecond_pcap_timestamps(tmp_path: Path) -> None:
    pkt = syn()
    pkt.time = EDecimal("1700000000.250001")
    wrpcap(str(tmp_path / "us.pcap"), [pkt])

    (event, _end) = ReplaySource(tmp_path / "us.pcap").events()

    assert event.ts_ns == 1_700_000_000_250_001_000


def test_pcapng(tmp_path: Path) -> None:
    first, second = syn(), c2s(b"GET / HTTP/1.1\r\n\r\n", dport=80)
    first.time, second.time = EDecimal("1700000000.123456"), EDecimal("1700000000.5")
    wrpcapng(str(tmp_path / "c.pcapng"), [first, second])

    events = list(ReplaySource(tmp_path / "c.pcapng").events())

    assert kinds(events) == ["SynEvent", "HttpRequestHead", "FlowEnd", "FlowEnd"]
    assert events[0].ts_ns == 1_700_000_000_123_456_000
    assert events[1].ts_ns == 1_700_000_000_500_000_000


def test_damaged_tail_keeps_what_came_before(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "c.pcap", [(ms(0), syn()), (ms(1), c2s(HELLO))])
    path.write_bytes(path.read_bytes()[:-40])  # the second record loses its last 40 bytes

    source = ReplaySource(path)
    events = list(source.events())

    assert kinds(events) == ["SynEvent", "FlowEnd"]
    assert source.stats.skipped == {"truncated_ip": 1}


def write_pcapng_ns(path: Path, frames: list[tuple[int, bytes | Packet]]) -> Path:
    """A pcapng whose interface has nanosecond timestamps (if_tsresol 9), written by hand."""

    def block(block_type: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        length = 12 + len(body)
        return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    tsresol_option = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)
    out += block(1, struct.pack("<HHI", 1, 0, 0) + tsresol_option)
    for ts_ns, frame in frames:
        raw = bytes(frame)
        out += block(
            6, struct.pack("<IIIII", 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(raw), len(raw)) + raw
        )
    path.write_bytes(out)
    return path


def test_pcapng_with_nanosecond_resolution(tmp_path: Path) -> None:
    path = write_pcapng_ns(tmp_path / "ns.pcapng", [(ms(0) + 7, syn())])

    (event, _end) = ReplaySource(path).events()

    assert event.ts_ns == ms(0) + 7


def test_damaged_pcapng_tail_keeps_what_came_before(tmp_path: Path) -> None:
    wrpcapng(str(tmp_path / "c.pcapng"), [syn(seq=1), syn(seq=1), syn(seq=1)])
    path = tmp_path / "c.pcapng"
    path.write_bytes(path.read_bytes()[:-30])  # the last block loses its end

    source = ReplaySource(path)
    events = list(source.events())

    assert kinds(events) == ["SynEvent", "SynEvent", "FlowEnd"]
    assert source.stats.packets == 2


# ---- rule 0: who is the client ---------------------------------------------


def test_the_syn_sender_is_the_client_whatever_the_ports(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [(ms(0), syn(sport=443, dport=50000)), (ms(1), s2c(b"x", sport=50000, dport=443))],
    )

    (event,) = of(events, SynEvent)
    assert str(event.flow) == f"{CLIENT}:443->{SERVER}:50000"
    (end,) = of(events, FlowEnd)
    assert (end.server_packets, end.server_bytes) == (1, 1)


def test_without_a_syn_the_lower_port_is_the_server(tmp_path: Path) -> None:
    events, source = replay(
        tmp_path,
        [
            (ms(0), s2c(b"from the server first")),  # 443 -> 40000: egress, no flow
            (ms(1), c2s(b"abc")),  # 40000 -> 443: opens the flow
        ],
    )

    (end,) = of(events, FlowEnd)
    assert str(end.flow) == f"{CLIENT}:40000->{SERVER}:443"
    assert (end.packets, end.bytes, end.server_packets, end.seen_syn) == (1, 3, 0, False)
    assert source.stats.ignored == {"egress_no_flow": 1}


def test_without_a_syn_the_watched_port_is_the_server(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"abc", sport=8443, dport=1000)),  # from the watched port: egress
            (ms(1), c2s(b"def", sport=1000, dport=8443)),
        ],
        tls_ports=[8443],
        http_ports=[],
    )

    (end,) = of(events, FlowEnd)
    assert (end.flow.sport, end.flow.dport, end.bytes) == (1000, 8443, 3)


def test_unwatched_ports_are_not_observed(tmp_path: Path) -> None:
    events, source = replay(
        tmp_path,
        [(ms(0), syn(dport=22)), (ms(1), c2s(b"SSH-2.0-x", dport=22))],
        tls_ports=[443],
        http_ports=[80],
    )

    assert events == []
    assert source.stats.ignored == {"port_not_watched": 2}


# ---- rule 1: SYN signatures -----------------------------------------------

SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]


def test_syn_event_fields(tmp_path: Path) -> None:
    pkt = (
        Ether(**MACS)
        / IP(src=CLIENT, dst=SERVER, ttl=64, id=0x1234, flags="DF")
        / TCP(sport=40000, dport=443, flags="S", seq=123456, window=64240, options=SYN_OPTIONS)
    )
    events, _ = replay(tmp_path, [(ms(0), pkt)])

    (event,) = of(events, SynEvent)
    assert event.ts_ns == ms(0)
    assert str(event.flow) == f"{CLIENT}:40000->{SERVER}:443"
    assert (event.seq, event.ttl, event.df, event.ip_id, event.window) == (
        123456, 64, True, 0x1234, 64240,
    )  # fmt: skip
    assert (event.mss, event.wscale) == (1460, 7)
    assert event.options == (2, 4, 8, 1, 3)
    assert event.options_len == 20
    assert event.quirks == SynQuirk(0)
    assert event.tcp_flags == 0x02
    assert (event.ip_total_len, event.payload_len) == (60, 0)


def test_ipv6_syn_event_fields(tmp_path: Path) -> None:
    pkt = (
        Ether(**MACS)
        / IPv6(src=CLIENT6, dst=SERVER6, hlim=57, fl=0x12345)
        / TCP(sport=40000, dport=443, flags="S", window=65535, options=[("MSS", 1440)])
    )
    events, _ = replay(tmp_path, [(ms(0), pkt)])

    (event,) = of(events, SynEvent)
    assert str(event.flow) == f"[{CLIENT6}]:40000->[{SERVER6}]:443"
    assert (event.ttl, event.df, event.ip_id, event.mss, event.wscale) == (57, True, 0, 1440, None)
    assert event.quirks == SynQuirk.FLOW_LABEL
    assert (event.ip_total_len, event.options_len) == (40 + 24, 4)


@pytest.mark.parametrize(
    ("ip", "tcp", "payload", "quirks"),
    [
        ({}, {}, b"", SynQuirk(0)),
        ({}, {"flags": "SEC"}, b"", SynQuirk.ECN_SETUP),
        ({}, {"flags": "SE"}, b"", SynQuirk(0)),  # ECE alone is not an ECN setup
        ({"tos": 0x02}, {}, b"", SynQuirk.ECN_IP),
        ({"tos": 0xFC}, {}, b"", SynQuirk(0)),  # DSCP bits are not ECN
        ({}, {"ack": 5}, b"", SynQuirk.ACK_NONZERO),
        ({}, {"urgptr": 7}, b"", SynQuirk.URG_NONZERO),
        ({}, {"urgptr": 7, "flags": "SU"}, b"", SynQuirk(0)),
        ({}, {}, b"data", SynQuirk.DATA),
        ({"id": 0, "flags": "DF"}, {}, b"", SynQuirk.IP_ID_ZERO),
        ({"id": 0}, {}, b"", SynQuirk(0)),  # id 0 without DF is not the quirk
    ],
)
def test_syn_quirks(
    tmp_path: Path, ip: dict[str, object], tcp: dict[str, object], payload: bytes, quirks: SynQuirk
) -> None:
    tcp_args: dict[str, object] = {"sport": 40000, "dport": 443, "flags": "S", "ack": 0}
    tcp_args.update(tcp)
    ip_args: dict[str, object] = {"src": CLIENT, "dst": SERVER, "id": 1}
    ip_args.update(ip)
    pkt = Ether(**MACS) / IP(**ip_args) / TCP(**tcp_args)
    events, _ = replay(tmp_path, [(ms(0), pkt / Raw(payload) if payload else pkt)])

    (event,) = of(events, SynEvent)
    assert event.quirks == quirks


def raw_syn(options: bytes, flags: int = 0x02, payload: bytes = b"") -> bytes:
    """An Ethernet/IPv4 SYN whose TCP header, options included, is exactly as given."""
    header_len = 20 + len(options)
    tcp = struct.pack(">HHIIBBHHH", 40000, 443, 1, 0, (header_len // 4) << 4, flags, 1024, 0, 0)
    return bytes(
        Ether(**MACS) / IP(src=CLIENT, dst=SERVER, id=1, proto=6) / Raw(tcp + options + payload)
    )


@pytest.mark.parametrize(
    ("options", "kinds_seen", "mss", "wscale", "truncated"),
    [
        (b"\x02\x04\x05\xb4\x00\x03\x03\x07", (2, 0), 1460, None, False),  # stops at EOL
        (b"\x01\x01\x02\x08", (1, 1, 2), None, None, True),  # MSS length runs past the header
        (b"\x01\x01\x01\x03", (1, 1, 1, 3), None, None, True),  # no room for the length byte
        (b"\x03\x01\x00\x00", (3,), None, None, True),  # a length below 2 is no length
        (b"\x02\x03\x05\x01", (2, 1), None, None, False),  # MSS of the wrong size is ignored
        (b"\x01" * 20, (1,) * 16, None, None, False),  # at most 16 kinds recorded
        (b"\x03\x03\x0e\x01", (3, 1), None, 14, False),
    ],
)
def test_syn_options_walk(
    tmp_path: Path,
    options: bytes,
    kinds_seen: tuple[int, ...],
    mss: int | None,
    wscale: int | None,
    truncated: bool,
) -> None:
    events, _ = replay(tmp_path, [(ms(0), raw_syn(options))])

    (event,) = of(events, SynEvent)
    assert event.options == kinds_seen
    assert (event.mss, event.wscale) == (mss, wscale)
    assert bool(event.quirks & SynQuirk.OPTIONS_TRUNCATED) is truncated
    assert event.options_len == len(options)


def test_syn_retransmissions_count_into_one_flow(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path, [(ms(0), syn()), (ms(1000), syn()), (ms(3000), c2s(flags="R", ack=0))]
    )

    assert kinds(events) == ["SynEvent", "SynEvent", "FlowEnd"]
    end = events[-1]
    assert (end.reason, end.syn_count, end.syn_retransmissions, end.packets) == (
        FlowEndReason.RST, 2, 1, 3,
    )  # fmt: skip
    assert end.seen_syn is True


# ---- rule 2: flow state ----------------------------------------------------


def test_pure_ack_fin_rst_of_an_unknown_flow_leave_nothing(tmp_path: Path) -> None:
    events, source = replay(
        tmp_path, [(ms(0), c2s(flags="A")), (ms(1), c2s(flags="FA")), (ms(2), c2s(flags="R"))]
    )

    assert events == []
    assert source.stats.ignored == {"no_flow": 3}


def test_counters_and_gaps_between_data_segments(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), syn()),
            (ms(1), c2s(flags="A")),
            (ms(2), c2s(b"a" * 100)),
            (ms(4), c2s(b"b" * 50)),
            (ms(8), c2s(b"c" * 10)),
            (ms(9), c2s(flags="FA")),
        ],
    )

    (end,) = of(events, FlowEnd)
    assert (end.reason, end.first_ns, end.last_ns, end.ts_ns) == (
        FlowEndReason.FIN, ms(0), ms(9), ms(9),
    )  # fmt: skip
    assert (end.packets, end.bytes, end.data_segments, end.syn_count) == (6, 160, 3, 1)
    assert end.gap_count == 2  # 2 ms and 4 ms
    assert end.gap_mean_us == 3000.0
    assert end.gap_var_us2 == 1_000_000.0


def test_no_gap_with_one_data_segment(tmp_path: Path) -> None:
    events, _ = replay(tmp_path, [(ms(0), syn()), (ms(5), c2s(b"x", flags="FPA"))])

    (end,) = of(events, FlowEnd)
    assert end.gap_count == 0
    assert math.isnan(end.gap_mean_us) and math.isnan(end.gap_var_us2)


def test_gaps_are_capped_at_60_seconds(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path, [(ms(0), c2s(b"x")), (ms(100_000), c2s(b"y"))], idle_timeout_s=1000
    )

    (end,) = of(events, FlowEnd)
    assert (end.gap_count, end.gap_mean_us) == (1, 60_000_000.0)


def test_payload_length_comes_from_ip_not_the_padded_frame(tmp_path: Path) -> None:
    padded = c2s(b"G") / Padding(b"\x00" * 20)
    events, _ = replay(tmp_path, [(ms(0), padded)])

    (end,) = of(events, FlowEnd)
    assert end.bytes == 1


# ---- rule 3: ClientHello capture --------------------------------------------


def hello_events(events: list[Event]) -> list[tuple[int, int, int, int]]:
    """(hello_index, segment_index, payload_len, captured) of each hello segment."""
    return [
        (e.hello_index, e.segment_index, e.payload_len, len(e.data))
        for e in of(events, ClientHelloSegment)
    ]


def test_hello_in_one_segment_and_nothing_after_it(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path, [(ms(0), syn()), (ms(1), c2s(HELLO, seq=1)), (ms(2), c2s(b"\x17" * 40))]
    )

    (segment,) = of(events, ClientHelloSegment)
    assert (segment.hello_index, segment.segment_index, segment.seq) == (1, 1, 1)
    assert segment.data == HELLO and segment.payload_len == len(HELLO)
    assert segment.ts_ns == ms(1)


def test_hello_over_two_segments_then_nothing(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(1), c2s(BIG_HELLO[:1448], seq=1)),
            (ms(2), c2s(BIG_HELLO[1448:], seq=1449)),
            (ms(3), c2s(b"\x17\x03\x03" + bytes(60))),
        ],
    )

    first, second = of(events, ClientHelloSegment)
    assert first.data + second.data == BIG_HELLO
    assert (second.hello_index, second.segment_index, second.seq) == (1, 2, 1449)


def test_a_hello_beyond_4096_bytes_is_cut_at_the_byte_limit(tmp_path: Path) -> None:
    huge = tls_records(chrome_like_hello(extensions=[(0x11EC, bytes(8000))]))
    events, _ = replay(
        tmp_path,
        [
            (ms(1), c2s(huge[:3000])),
            (ms(2), c2s(huge[3000:6000])),
            (ms(3), c2s(huge[6000:])),
        ],
    )

    assert hello_events(events) == [(1, 1, 3000, 3000), (1, 2, 3000, 1096)]
    second = of(events, ClientHelloSegment)[1]
    assert second.data == huge[3000:4096] and second.truncated


def test_one_segment_over_4096_bytes_leaves_no_room_for_a_continuation(tmp_path: Path) -> None:
    huge = tls_records(chrome_like_hello(extensions=[(0x11EC, bytes(8000))]))
    events, _ = replay(tmp_path, [(ms(1), c2s(huge[:5000])), (ms(2), c2s(huge[5000:]))])

    assert hello_events(events) == [(1, 1, 5000, 4096)]


def test_more_segments_when_the_limits_allow(tmp_path: Path) -> None:
    limits = ObservationLimits(hello_max_segments=3)
    events, _ = replay(
        tmp_path,
        [
            (ms(1), c2s(BIG_HELLO[:1000])),
            (ms(2), c2s(BIG_HELLO[1000:2000])),
            (ms(3), c2s(BIG_HELLO[2000:])),
            (ms(4), c2s(b"\x17\x03\x03" + bytes(60))),  # the hello is over: not captured
        ],
        limits=limits,
    )

    assert [s for _, s, _, _ in hello_events(events)] == [1, 2, 3]


def test_second_hello_behind_change_cipher_spec_and_no_third(tmp_path: Path) -> None:
    second = CCS + HELLO
    events, _ = replay(
        tmp_path,
        [(ms(1), c2s(HELLO)), (ms(2), c2s(second)), (ms(3), c2s(HELLO))],
    )

    assert hello_events(events) == [
        (1, 1, len(HELLO), len(HELLO)),
        (2, 1, len(second), len(second)),
    ]


def test_hello_after_a_socks_handshake(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), syn(dport=1080)),
            (ms(1), c2s(b"\x05\x01\x00", dport=1080)),
            (ms(2), s2c(b"\x05\x00", sport=1080)),
            (ms(3), c2s(HELLO, dport=1080)),
        ],
    )

    assert hello_events(events) == [(1, 1, len(HELLO), len(HELLO))]


@pytest.mark.parametrize(
    "payload",
    [
        HELLO[:8],  # too short to hold the handshake length
        b"\x16\x03\x01\x00\x10\x02" + bytes(16),  # a ServerHello
        b"\x16\x02\x01\x00\x10\x01" + bytes(16),  # not TLS major version 3
        b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x01\x01\x00\x00\x00",  # CCS then app data
        b"\x14\x03\x01\x00\x01\x01" + HELLO,  # CCS not in the TLS 1.3 compat form
    ],
)
def test_segments_that_do_not_start_a_hello(tmp_path: Path, payload: bytes) -> None:
    events, _ = replay(tmp_path, [(ms(1), c2s(payload))])

    assert of(events, ClientHelloSegment) == []


def test_hellos_only_on_tls_watched_ports(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path, [(ms(1), c2s(HELLO, dport=80)), (ms(2), c2s(HELLO, dport=443, sport=40001))],
        tls_ports=[443], http_ports=[80],
    )  # fmt: skip

    (segment,) = of(events, ClientHelloSegment)
    assert segment.flow.dport == 443


# ---- rule 4: HTTP request heads ---------------------------------------------

METHOD_HEADS = [
    b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"PUT /x HTTP/1.1\r\n",
    b"HEAD / HTTP/1.1\r\n", b"DELETE /x HTTP/1.1\r\n", b"PATCH /x HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n", b"CONNECT a:443 HTTP/1.1\r\n", b"TRACE / HTTP/1.1\r\n",
]  # fmt: skip


@pytest.mark.parametrize("head", METHOD_HEADS)
def test_http_request_head_for_each_method(tmp_path: Path, head: bytes) -> None:
    payload = head + b"Host: api.test\r\n\r\n"
    events, _ = replay(tmp_path, [(ms(1), c2s(payload, dport=80, seq=77))])

    (event,) = of(events, HttpRequestHead)
    assert (event.data, event.payload_len, event.seq, event.ts_ns) == (
        payload, len(payload), 77, ms(1),
    )  # fmt: skip
    assert not event.truncated


@pytest.mark.parametrize("payload", [b"get / HTTP/1.1\r\n", b"GE", b"HELLO world", b"\x16\x03\x01"])
def test_not_a_request_head(tmp_path: Path, payload: bytes) -> None:
    events, _ = replay(tmp_path, [(ms(1), c2s(payload, dport=80))])

    assert of(events, HttpRequestHead) == []


def test_http_head_is_cut_at_1024_bytes(tmp_path: Path) -> None:
    payload = b"POST /upload HTTP/1.1\r\n" + b"X: " + b"y" * 2000
    events, _ = replay(tmp_path, [(ms(1), c2s(payload, dport=80))])

    (event,) = of(events, HttpRequestHead)
    assert event.data == payload[:1024] and event.payload_len == len(payload)
    assert event.truncated


def test_http_heads_only_on_http_watched_ports(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [(ms(1), c2s(b"GET / HTTP/1.1\r\n\r\n", dport=443))],
        tls_ports=[443],
        http_ports=[80],
    )

    assert kinds(events) == ["FlowEnd"]


# ---- rule 5: client FIN and RST --------------------------------------------


def test_fin_ends_the_flow_after_the_packets_own_events(tmp_path: Path) -> None:
    request = b"GET /bye HTTP/1.1\r\n\r\n"
    events, source = replay(
        tmp_path,
        [
            (ms(0), syn(dport=80)),
            (ms(1), c2s(request, flags="FPA", dport=80)),
            (ms(2), c2s(flags="A", dport=80)),  # the last ACK: the flow is gone
        ],
    )

    assert kinds(events) == ["SynEvent", "HttpRequestHead", "FlowEnd"]
    end = events[-1]
    assert (end.reason, end.ts_ns, end.packets, end.bytes) == (
        FlowEndReason.FIN, ms(1), 2, len(request),
    )  # fmt: skip
    assert source.stats.ignored == {"no_flow": 1}


def test_rst_ends_the_flow(tmp_path: Path) -> None:
    events, _ = replay(tmp_path, [(ms(0), c2s(b"x")), (ms(1), c2s(flags="RA"))])

    (end,) = of(events, FlowEnd)
    assert (end.reason, end.packets) == (FlowEndReason.RST, 2)


def test_within_one_packet_syn_then_head_then_end(tmp_path: Path) -> None:
    # A TCP Fast Open SYN that carries a request and a FIN.
    events, _ = replay(
        tmp_path, [(ms(0), syn(dport=80, flags="SF") / Raw(b"GET / HTTP/1.1\r\n\r\n"))]
    )

    assert kinds(events) == ["SynEvent", "HttpRequestHead", "FlowEnd"]
    assert events[0].quirks == SynQuirk.DATA


def test_a_tfo_syn_can_carry_the_hello(tmp_path: Path) -> None:
    events, _ = replay(tmp_path, [(ms(0), syn() / Raw(HELLO))])

    assert kinds(events) == ["SynEvent", "ClientHelloSegment", "FlowEnd"]


# ---- rule 6: idle ----------------------------------------------------------


def test_idle_flow_ends_when_capture_time_passes_it(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"a", sport=40001)),
            (ms(31_000), c2s(b"GET / HTTP/1.1\r\n\r\n", sport=40002, dport=80)),
        ],
    )

    assert kinds(events) == ["FlowEnd", "HttpRequestHead", "FlowEnd"]
    idle = events[0]
    assert (idle.flow.sport, idle.reason, idle.ts_ns, idle.last_ns) == (
        40001, FlowEndReason.IDLE, ms(31_000), ms(0),
    )  # fmt: skip


def test_exactly_the_timeout_is_not_yet_idle(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"a", sport=40001)),
            (ms(30_000), c2s(b"GET / HTTP/1.1\r\n\r\n", sport=40002, dport=80)),
        ],
    )

    # Both flows end only with the capture, after the second flow's request.
    assert kinds(events) == ["HttpRequestHead", "FlowEnd", "FlowEnd"]


def test_server_packets_keep_a_flow_alive(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"a")),
            (ms(20_000), s2c(b"b")),
            (ms(40_000), c2s(b"GET / HTTP/1.1\r\n\r\n", sport=40002, dport=80)),
        ],
    )

    # 40 s after its last client packet, the first flow is still open: the server spoke at 20 s.
    assert kinds(events) == ["HttpRequestHead", "FlowEnd", "FlowEnd"]
    assert [(e.flow.sport, e.ts_ns) for e in of(events, FlowEnd)] == [
        (40000, ms(40_000)),
        (40002, ms(40_000)),
    ]


def test_end_of_capture_ends_flows_in_order_of_first_packet(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"a", sport=40001)),
            (ms(1), c2s(b"b", sport=40002)),
            (ms(2), c2s(b"c", sport=40001)),  # 40001 is the most recent, yet the oldest flow
        ],
        idle_timeout_s=5,
    )

    assert [(e.flow.sport, e.reason, e.ts_ns) for e in events] == [
        (40001, FlowEndReason.IDLE, ms(2)),
        (40002, FlowEndReason.IDLE, ms(2)),
    ]


def test_flows_idle_at_the_same_moment_end_oldest_first(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [
            (ms(0), c2s(b"a", sport=40001)),
            (ms(1), c2s(b"b", sport=40002)),
            (ms(2), c2s(b"c", sport=40001)),  # 40001 is the most recent, yet the oldest flow
            (ms(60_000), c2s(b"d", sport=40003)),
        ],
    )

    assert [(e.flow.sport, e.ts_ns) for e in events] == [
        (40001, ms(60_000)),
        (40002, ms(60_000)),
        (40003, ms(60_000)),
    ]


def test_a_flow_ended_idle_starts_afresh(tmp_path: Path) -> None:
    events, _ = replay(tmp_path, [(ms(0), c2s(b"a")), (ms(2_000), c2s(b"b"))], idle_timeout_s=1)

    assert [(e.first_ns, e.bytes) for e in of(events, FlowEnd)] == [(ms(0), 1), (ms(2_000), 1)]


# ---- rule 7: egress --------------------------------------------------------


def test_response_status_and_server_counters(tmp_path: Path) -> None:
    response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    events, _ = replay(
        tmp_path,
        [
            (ms(0), syn(dport=80)),
            (ms(1), s2c(flags="SA", sport=80)),
            (ms(2), c2s(flags="A", dport=80)),
            (ms(10), c2s(b"GET /missing HTTP/1.1\r\n\r\n", dport=80)),
            (ms(25), s2c(response, sport=80)),
        ],
    )

    (status,) = of(events, HttpResponseStatus)
    assert (status.status, status.think_ns, status.payload_len, status.ts_ns) == (
        404, 15_000_000, len(response), ms(25),
    )  # fmt: skip
    assert str(status.flow) == f"{CLIENT}:40000->{SERVER}:80"
    (end,) = of(events, FlowEnd)
    assert (end.server_packets, end.server_bytes, end.packets) == (2, len(response), 3)


def test_status_before_any_client_data_has_no_think_time(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path, [(ms(0), syn(dport=80)), (ms(5), s2c(b"HTTP/1.0 200 OK\r\n\r\n", sport=80))]
    )

    (status,) = of(events, HttpResponseStatus)
    assert (status.status, status.think_ns) == (200, 0)


@pytest.mark.parametrize(
    "payload",
    [b"HTTP/1.1 2x0 OK\r\n", b"HTTP/2 200 OK\r\n\r\n", b"HTTP/1.1200 OK\r\n", b"HTTP/1.1 20"],
)
def test_not_a_status_line(tmp_path: Path, payload: bytes) -> None:
    events, _ = replay(tmp_path, [(ms(0), syn(dport=80)), (ms(1), s2c(payload, sport=80))])

    assert of(events, HttpResponseStatus) == []


def test_no_status_from_a_port_not_watched_for_http(tmp_path: Path) -> None:
    events, _ = replay(
        tmp_path,
        [(ms(0), syn()), (ms(1), s2c(b"HTTP/1.1 200 OK\r\n\r\n"))],
        tls_ports=[443],
        http_ports=[80],
    )

    assert of(events, HttpResponseStatus) == []
    assert of(events, FlowEnd)[0].server_bytes == 19


def test_server_rst_ends_the_flow_server_fin_does_not(tmp_path: Path) -> None:
    events, source = replay(
        tmp_path,
        [
            (ms(0), syn()),
            (ms(1), s2c(flags="FA")),
            (ms(2), s2c(flags="R")),
            (ms(3), c2s(flags="A")),
            (ms(4), s2c(b"late")),
        ],
    )

    assert kinds(events) == ["SynEvent", "FlowEnd"]
    end = events[-1]
    assert (end.reason, end.ts_ns, end.server_packets) == (FlowEndReason.SERVER_RST, ms(2), 2)
    assert source.stats.ignored == {"no_flow": 1, "egress_no_flow": 1}


# ---- link layers -------------------------------------------------------------

IP_SYN = IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=443, flags="S")
IP6_SYN = IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=40000, dport=443, flags="S")


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (1, Ether(**MACS) / IP_SYN),
        (1, Ether(**MACS) / Dot1Q(vlan=20) / IP_SYN),
        (1, Ether(**MACS) / Dot1AD(vlan=10) / Dot1Q(vlan=20) / IP_SYN),
        (1, Ether(**MACS) / IP6_SYN),
        (113, CookedLinux(proto=0x0800) / IP_SYN),
        (113, CookedLinux(proto=0x86DD) / IP6_SYN),
        (276, CookedLinuxV2(proto=0x0800) / IP_SYN),
        (101, IP_SYN),
        (101, IP6_SYN),
        (228, IP_SYN),
        (229, IP6_SYN),
        (0, struct.pack("<I", 2) + bytes(IP_SYN)),  # BSD loopback, little-endian writer
        (0, struct.pack(">I", 30) + bytes(IP6_SYN)),  # macOS AF_INET6, big-endian writer
        (0, struct.pack("<I", 24) + bytes(IP6_SYN)),  # NetBSD/OpenBSD AF_INET6
        (108, struct.pack(">I", 2) + bytes(IP_SYN)),  # OpenBSD loop
    ],
)
def test_link_layers(tmp_path: Path, linktype: int, frame: bytes | Packet) -> None:
    events, source = replay(tmp_path, [(ms(0), frame)], linktype=linktype)

    (event,) = of(events, SynEvent)
    assert (event.flow.sport, event.flow.dport) == (40000, 443)
    assert source.stats.skipped == {}


def test_ipv4_options_are_skipped_over(tmp_path: Path) -> None:
    pkt = (
        Ether(**MACS)
        / IP(src=CLIENT, dst=SERVER, options=[IPOption_Router_Alert()])
        / TCP(sport=40000, dport=443, flags="S", options=[("MSS", 1400)])
    )
    events, _ = replay(tmp_path, [(ms(0), pkt)])

    (event,) = of(events, SynEvent)
    assert (event.mss, event.ip_total_len) == (1400, 24 + 24)


def test_ipv6_extension_headers_are_walked(tmp_path: Path) -> None:
    pkt = (
        Ether(**MACS)
        / IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(offset=0, m=0)  # an atomic fragment still has its TCP header
        / TCP(sport=40000, dport=443, flags="PA")
        / Raw(HELLO)
    )
    events, _ = replay(tmp_path, [(ms(0), pkt)])

    (segment,) = of(events, ClientHelloSegment)
    assert segment.data == HELLO and segment.payload_len == len(HELLO)


def test_a_first_fragment_still_has_its_tcp_header(tmp_path: Path) -> None:
    pkt = (
        Ether(**MACS)
        / IP(src=CLIENT, dst=SERVER, flags="MF")
        / TCP(sport=40000, dport=443, flags="S")
    )
    events, _ = replay(tmp_path, [(ms(0), pkt)])

    (event,) = of(events, SynEvent)
    assert event.df is False


def test_non_first_fragments_are_not_observed(tmp_path: Path) -> None:
    frag4 = Ether(**MACS) / IP(src=CLIENT, dst=SERVER, frag=100, proto=6) / Raw(bytes(40))
    frag6 = (
        Ether(**MACS)
        / IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrFragment(offset=100, nh=6)
        / Raw(bytes(40))
    )
    events, source = replay(tmp_path, [(ms(0), frag4), (ms(1), frag6)])

    assert events == []
    assert source.stats.ignored == {"fragment": 2}


def test_non_tcp_and_non_ip_are_ignored_not_bad(tmp_path: Path) -> None:
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import ARP

    events, source = replay(
        tmp_path,
        [
            (ms(0), Ether(**MACS) / IP(src=CLIENT, dst=SERVER) / UDP(sport=1, dport=443)),
            (ms(1), Ether(**MACS) / ARP()),
            (ms(2), Ether(**MACS) / Dot1AD() / Dot1Q() / Dot1Q() / IP_SYN),  # deeper than parsed
        ],
    )

    assert events == []
    assert source.stats.ignored == {"not_tcp": 1, "not_ip": 1, "vlan_too_deep": 1}
    assert source.stats.skipped == {}


# ---- malformed frames ----------------------------------------------------------


def _patched(frame: bytes, at: int, value: bytes) -> bytes:
    return frame[:at] + value + frame[at + len(value) :]


GOOD = bytes(
    Ether(**MACS) / IP(src=CLIENT, dst=SERVER) / TCP(sport=40000, dport=443) / Raw(b"x" * 20)
)
IP6_GOOD = bytes(Ether(**MACS) / IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=40000, dport=443))


@pytest.mark.parametrize(
    ("frame", "linktype", "reason"),
    [
        (GOOD[:3], 1, "truncated_link"),
        (GOOD[:24], 1, "truncated_ip"),  # IPv4 header cut
        (GOOD[:-5], 1, "truncated_ip"),  # datagram longer than the frame (snap length)
        (_patched(GOOD, 14, b"\x44"), 1, "malformed_ip"),  # IHL 4
        (_patched(GOOD, 14, b"\x65"), 1, "malformed_ip"),  # version 6 behind the IPv4 EtherType
        (_patched(GOOD, 16, b"\x00\x10"), 1, "malformed_ip"),  # total length below the header
        (_patched(GOOD, 16, b"\x00\x20"), 1, "malformed_tcp"),  # room for 12 bytes of TCP
        (_patched(GOOD, 46, b"\x40"), 1, "malformed_tcp"),  # data offset 4
        (_patched(GOOD, 46, b"\xf0"), 1, "malformed_tcp"),  # data offset past the datagram
        (IP6_GOOD[:40], 1, "truncated_ip"),
        (_patched(IP6_GOOD, 18, b"\x01\x00"), 1, "truncated_ip"),  # payload length past the frame
        (_patched(IP6_GOOD, 14, b"\x40"), 1, "malformed_ip"),
        (
            bytes(
                Ether(**MACS) / IPv6(src=CLIENT6, dst=SERVER6)
                / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrDestOpt() / TCP()
            ),
            1,
            "ipv6_ext_too_deep",
        ),
        (GOOD, 147, "link_type_147"),
        (b"\x08\x00", 113, "truncated_link"),
    ],
)  # fmt: skip
def test_malformed_frames_are_skipped_and_counted(
    tmp_path: Path, frame: bytes, linktype: int, reason: str
) -> None:
    events, source = replay(tmp_path, [(ms(0), frame)], linktype=linktype)

    assert events == []
    assert source.stats.skipped == {reason: 1}
    assert source.stats.packets == 1


def test_bad_frames_between_good_ones_change_nothing(tmp_path: Path) -> None:
    events, source = replay(
        tmp_path,
        [
            (ms(0), syn()),
            (ms(1), GOOD[:30]),
            (ms(2), _patched(GOOD, 46, b"\x40")),
            (ms(3), c2s(b"abc", flags="FPA")),
        ],
    )

    assert kinds(events) == ["SynEvent", "FlowEnd"]
    assert (events[-1].packets, events[-1].bytes) == (2, 3)
    assert source.stats.skipped == {"truncated_ip": 1, "malformed_tcp": 1}


def test_offloaded_segment_with_ip_length_zero_uses_the_frame(tmp_path: Path) -> None:
    # Captured on the sending host before segmentation offload: IPv4 length 0.
    tso = _patched(GOOD, 16, b"\x00\x00")
    events, source = replay(tmp_path, [(ms(0), tso)])

    (end,) = of(events, FlowEnd)
    assert end.bytes == 20
    assert source.stats.repaired == {"ipv4_length_from_frame": 1}
