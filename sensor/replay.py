"""ReplaySource: a pcap or pcapng capture replayed as the events the kernel sensor would emit.

Two halves. The reader turns each frame (Ethernet, Linux cooked SLL/SLL2, raw
IP, BSD loopback; 802.1Q/802.1ad tags; IPv4 options; IPv6 extension headers)
into a parsed TCP segment, skipping and counting what it cannot parse. The
observer applies to those segments the rules bpf/xdp_sensor.c applies at
ingress and its tc program at egress, with the limits of bpf/common.h:

0. A capture holds both directions, where XDP sees only the client's: the
   sender of a SYN (without ACK) is the client; with no SYN seen, the watched
   port is the server's, or the lower port when both or neither are watched.
1. A client SYN gives a SynEvent and opens a flow (SEEN_SYN), or counts into it.
2. Only a SYN or a data segment opens a flow; every client packet of a flow
   counts, data segments also into bytes and the gaps between them.
3. ClientHello capture on TLS ports: a segment starting with a ClientHello
   record (possibly behind a ChangeCipherSpec record) starts a hello, at most
   two per flow; if the hello is longer than the segment, the next data
   segment is captured as its continuation; 4 KiB per hello at most.
4. A data segment starting with an HTTP method on HTTP ports: a request head.
5. A client FIN or RST ends the flow, after the packet's other events.
6. Flows idle longer than the timeout end when capture time passes them, the
   rest at the end of the capture, oldest first.
7. Server packets count into the client's flow; an HTTP status line on an HTTP
   port gives an HttpResponseStatus; a server RST ends the flow.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sensor import abi
from sensor.abi import FlowEndReason, FlowFlag, SynQuirk
from sensor.errors import SensorError
from sensor.events import (
    ClientHelloSegment,
    Event,
    Flow,
    HttpRequestHead,
    HttpResponseStatus,
    SynEvent,
    decode_tcp_options,
    flow_end_from_state,
)


class ReplayError(SensorError, ValueError):
    """The capture cannot be replayed; the message names the file."""


# ---- link layers (pcap LINKTYPE_* values) ----
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in the writer's byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_VALUES = frozenset({101, 12, 14})  # LINKTYPE_RAW, and DLT_RAW as some OSes number it
LINKTYPE_LOOP = 108  # OpenBSD loopback: address family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLANS = frozenset({0x8100, 0x88A8})  # 802.1Q, 802.1ad
# BSD loopback address families: AF_INET is 2 everywhere, AF_INET6 is not.
_AF_INET = 2
_AF_INET6 = frozenset({10, 24, 28, 30})

# The kernel parser walks at most this many of each (bpf/common.h).
MAX_VLAN_DEPTH = 2
MAX_IPV6_EXT_HEADERS = 6

IPPROTO_TCP = 6
_IPV6_EXT_GENERIC = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_EXT_FRAGMENT = 44

# TCP flags byte
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))

HTTP_METHOD_PREFIXES = frozenset(
    {b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC"}
)

_CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"  # ChangeCipherSpec, as TLS 1.3 compat mode sends it


class _Skip(Exception):
    """This frame is not observed; the message is the stats key."""


@dataclass
class ReplayStats:
    """What the replay read, skipped as bad, ignored as not observed, and emitted."""

    packets: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # malformed or truncated
    ignored: Counter[str] = field(default_factory=Counter)  # well-formed, not observed
    events: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)  # read with a header fixed up


@dataclass(slots=True)
class TcpSegment:
    """One TCP segment with the IP fields a SYN signature needs."""

    ts_ns: int
    ip_version: int
    src: bytes  # packed address
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int
    options: bytes
    payload: bytes
    ttl: int
    df: bool
    ip_id: int
    ecn: int
    flow_label: int
    ip_total_len: int
    length_from_frame: bool = False  # IPv4 length was 0 (offloaded segment): frame length used


# ---------------------------------------------------------------- frames


def parse_frame(linktype: int, frame: bytes, ts_ns: int) -> TcpSegment:
    """The TCP segment in a frame; raises _Skip with the reason when there is none."""
    ethertype, offset = _network_start(linktype, frame)
    if ethertype == ETHERTYPE_IPV4:
        return _parse_ipv4(frame, offset, ts_ns)
    if ethertype == ETHERTYPE_IPV6:
        return _parse_ipv6(frame, offset, ts_ns)
    raise _Skip("not_ip")


def _u16(buf: bytes, at: int) -> int:
    return (buf[at] << 8) | buf[at + 1]


def _need(frame: bytes, end: int, reason: str) -> None:
    if len(frame) < end:
        raise _Skip(reason)


def _network_start(linktype: int, frame: bytes) -> tuple[int, int]:
    """(ethertype, offset of the network header) after the link header and VLAN tags."""
    if linktype == LINKTYPE_ETHERNET:
        _need(frame, 14, "truncated_link")
        ethertype, offset = _u16(frame, 12), 14
    elif linktype == LINKTYPE_LINUX_SLL:
        _need(frame, 16, "truncated_link")
        ethertype, offset = _u16(frame, 14), 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        _need(frame, 20, "truncated_link")
        ethertype, offset = _u16(frame, 0), 20
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        _need(frame, 4, "truncated_link")
        # The family is in the byte order of the machine that wrote the file.
        family = struct.unpack_from("<I", frame)[0]
        if family > 0xFFFF:
            family = struct.unpack_from(">I", frame)[0]
        if family == _AF_INET:
            ethertype = ETHERTYPE_IPV4
        elif family in _AF_INET6:
            ethertype = ETHERTYPE_IPV6
        else:
            raise _Skip("not_ip")
        offset = 4
    elif linktype in LINKTYPE_RAW_VALUES or linktype in (LINKTYPE_IPV4, LINKTYPE_IPV6):
        _need(frame, 1, "truncated_ip")
        version = frame[0] >> 4
        ethertype = {4: ETHERTYPE_IPV4, 6: ETHERTYPE_IPV6}.get(version, 0)
        offset = 0
    else:
        raise _Skip(f"link_type_{linktype}")
    for _ in range(MAX_VLAN_DEPTH):
        if ethertype not in ETHERTYPE_VLANS:
            break
        _need(frame, offset + 4, "truncated_link")
        ethertype = _u16(frame, offset + 2)
        offset += 4
    if ethertype in ETHERTYPE_VLANS:
        raise _Skip("vlan_too_deep")
    return ethertype, offset


def _parse_ipv4(frame: bytes, off: int, ts_ns: int) -> TcpSegment:
    _need(frame, off + 20, "truncated_ip")
    if frame[off] >> 4 != 4:
        raise _Skip("malformed_ip")
    header_len = (frame[off] & 0x0F) * 4
    total_len = _u16(frame, off + 2)
    if total_len == 0 and len(frame) - off > header_len:
        # A large segment captured on the sending host before TCP segmentation
        # offload split it: the NIC fills in the length. Take it from the frame.
        total_len = min(len(frame) - off, 0xFFFF)
        repaired = True
    else:
        repaired = False
    if header_len < 20 or total_len < header_len:
        raise _Skip("malformed_ip")
    # Lengths come from the IP header: frames may carry Ethernet padding past
    # the datagram, and a capture cut by its snap length misses the payload.
    _need(frame, off + total_len, "truncated_ip")
    frag = _u16(frame, off + 6)
    if frag & 0x1FFF:
        raise _Skip("fragment")  # no TCP header in a non-first fragment
    if frame[off + 9] != IPPROTO_TCP:
        raise _Skip("not_tcp")
    segment = _parse_tcp(
        frame,
        off + header_len,
        off + total_len,
        ts_ns=ts_ns,
        ip_version=4,
        src=frame[off + 12 : off + 16],
        dst=frame[off + 16 : off + 20],
        ttl=frame[off + 8],
        df=bool(frag & 0x4000),
        ip_id=_u16(frame, off + 4),
        ecn=frame[off + 1] & 0x03,
        flow_label=0,
        ip_total_len=total_len,
    )
    segment.length_from_frame = repaired
    return segment


def _parse_ipv6(frame: bytes, off: int, ts_ns: int) -> TcpSegment:
    _need(frame, off + 40, "truncated_ip")
    first_word = struct.unpack_from(">I", frame, off)[0]
    if first_word >> 28 != 6:
        raise _Skip("malformed_ip")
    payload_len = _u16(frame, off + 4)
    end = off + 40 + payload_len
    _need(frame, end, "truncated_ip")
    next_header = frame[off + 6]
    pos = off + 40
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if next_header in _IPV6_EXT_GENERIC:
            if pos + 2 > end:
                raise _Skip("malformed_ip")
            header_len = (frame[pos + 1] + 1) * 8
        elif next_header == _IPV6_EXT_FRAGMENT:
            if pos + 8 > end:
                raise _Skip("malformed_ip")
            if _u16(frame, pos + 2) >> 3:
                raise _Skip("fragment")
            header_len = 8
        else:
            break
        next_header = frame[pos]
        pos += header_len
    if pos > end:
        raise _Skip("malformed_ip")
    if next_header in _IPV6_EXT_GENERIC or next_header == _IPV6_EXT_FRAGMENT:
        raise _Skip("ipv6_ext_too_deep")
    if next_header != IPPROTO_TCP:
        raise _Skip("not_tcp")
    return _parse_tcp(
        frame,
        pos,
        end,
        ts_ns=ts_ns,
        ip_version=6,
        src=frame[off + 8 : off + 24],
        dst=frame[off + 24 : off + 40],
        ttl=frame[off + 7],
        df=True,  # IPv6 routers never fragment
        ip_id=0,
        ecn=(first_word >> 20) & 0x03,
        flow_label=first_word & 0xFFFFF,
        ip_total_len=payload_len + 40,
    )


def _parse_tcp(frame: bytes, start: int, end: int, **ip: Any) -> TcpSegment:
    if end - start < 20:
        raise _Skip("malformed_tcp")
    sport, dport, seq, ack, offset_byte, flags, window, _checksum, urgent = struct.unpack_from(
        ">HHIIBBHHH", frame, start
    )
    header_len = (offset_byte >> 4) * 4
    if header_len < 20 or start + header_len > end:
        raise _Skip("malformed_tcp")
    return TcpSegment(
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        urgent=urgent,
        options=frame[start + 20 : start + header_len],
        payload=frame[start + header_len : end],
        **ip,
    )


# ---------------------------------------------------------------- observation rules


@dataclass(frozen=True, slots=True)
class ObservationLimits:
    """The kernel's capture limits; the defaults are bpf/common.h's."""

    hello_max_segments: int = abi.HELLO_MAX_SEGMENTS
    hello_max_bytes: int = abi.HELLO_MAX_BYTES
    hellos_per_flow: int = abi.HELLOS_PER_FLOW
    http_head_max_bytes: int = abi.HTTP_HEAD_MAX_BYTES


# (client address, client port, server address, server port), addresses packed
_FlowKey = tuple[bytes, int, bytes, int]


@dataclass(slots=True)
class _TrackedFlow:
    flow: Flow
    state: abi.FlowState
    # Bytes of the current ClientHello not yet seen on the wire. The kernel
    # needs no such field with two segments (it closes the hello after one
    # continuation); it lets a larger hello_max_segments stop at the hello's end.
    hello_remaining: int = 0


def _watch_set(ports: Iterable[int] | None) -> frozenset[int] | None:
    return None if ports is None else frozenset(int(p) for p in ports)


class FlowObserver:
    """The kernel's observation rules over parsed TCP segments, in capture order.

    observe() returns the events one segment causes; finish() ends the capture.
    Timestamps are assumed non-decreasing, as in a capture from one interface;
    the idle sweep of a capture merged out of order may end flows late.
    """

    def __init__(
        self,
        tls_ports: Iterable[int] | None = None,
        http_ports: Iterable[int] | None = None,
        idle_timeout_s: float = 30.0,
        limits: ObservationLimits | None = None,
        stats: ReplayStats | None = None,
    ) -> None:
        self.tls_ports = _watch_set(tls_ports)
        self.http_ports = _watch_set(http_ports)
        self.idle_timeout_ns = int(idle_timeout_s * 1e9)
        self.limits = limits or ObservationLimits()
        self.stats = stats if stats is not None else ReplayStats()
        # Insertion order is activity order: a flow moves to the end on every
        # packet, so the idle sweep reads from the front and stops early.
        self._flows: dict[_FlowKey, _TrackedFlow] = {}
        self._clock_ns: int | None = None

    # -- ports

    def _tls_watched(self, port: int) -> bool:
        return self.tls_ports is None or port in self.tls_ports

    def _http_watched(self, port: int) -> bool:
        return self.http_ports is None or port in self.http_ports

    def _watched(self, port: int) -> bool:
        return self._tls_watched(port) or self._http_watched(port)

    def _server_is_dst(self, sport: int, dport: int) -> bool:
        """With no SYN to go by: the watched port is the server's, else the lower one."""
        dst_watched, src_watched = self._watched(dport), self._watched(sport)
        if dst_watched != src_watched:
            return dst_watched
        return dport <= sport

    # -- entry points

    def observe(self, seg: TcpSegment) -> list[Event]:
        events = self._sweep_idle(seg.ts_ns)
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        reverse = (seg.dst, seg.dport, seg.src, seg.sport)
        is_syn = bool(seg.flags & SYN) and not seg.flags & ACK
        if is_syn or key in self._flows:
            self._ingress(seg, key, is_syn, events)
        elif reverse in self._flows:
            self._egress(seg, reverse, events)
        elif seg.flags & SYN:
            self.stats.ignored["egress_no_flow"] += 1  # a SYN-ACK comes from the server
        elif self._server_is_dst(seg.sport, seg.dport):
            self._ingress(seg, key, False, events)
        else:
            self.stats.ignored["egress_no_flow"] += 1
        for event in events:
            self.stats.events[type(event).__name__] += 1
        return events

    def finish(self) -> list[Event]:
        """End of capture: every flow still open ends as idle, oldest first."""
        end_ns = self._clock_ns or 0
        remaining = sorted(self._flows.values(), key=lambda t: t.state.first_ns)
        self._flows.clear()
        events: list[Event] = [
            flow_end_from_state(end_ns, t.flow, FlowEndReason.IDLE, t.state) for t in remaining
        ]
        for event in events:
            self.stats.events[type(event).__name__] += 1
        return events

    # -- rules

    def _sweep_idle(self, ts_ns: int) -> list[Event]:
        if self._clock_ns is not None and ts_ns <= self._clock_ns:
            return []
        self._clock_ns = ts_ns
        expired_keys = []
        for key, tracked in self._flows.items():
            if ts_ns - tracked.state.last_ns <= self.idle_timeout_ns:
                break
            expired_keys.append(key)
        expired = [self._flows.pop(key) for key in expired_keys]
        expired.sort(key=lambda t: t.state.first_ns)
        return [flow_end_from_state(ts_ns, t.flow, FlowEndReason.IDLE, t.state) for t in expired]

    def _touch(self, key: _FlowKey) -> _TrackedFlow:
        tracked = self._flows.pop(key)
        self._flows[key] = tracked
        return tracked

    def _ingress(self, seg: TcpSegment, key: _FlowKey, is_syn: bool, out: list[Event]) -> None:
        if not self._watched(seg.dport):
            self.stats.ignored["port_not_watched"] += 1
            return
        payload_len = len(seg.payload)
        tracked = self._flows.get(key)
        if is_syn:
            if tracked is None:
                tracked = self._new_flow(seg, key, FlowFlag.SEEN_SYN)
            tracked.state.syn_count += 1
            out.append(_syn_event(seg, tracked.flow))
        elif tracked is None:
            if payload_len == 0:
                # A pure ACK, FIN or RST of a flow we never saw start says too
                # little to be worth a table entry an attacker could fill.
                self.stats.ignored["no_flow"] += 1
                return
            tracked = self._new_flow(seg, key, FlowFlag(0))
        tracked = self._touch(key)
        st = tracked.state
        st.packets += 1
        if not (is_syn or payload_len or seg.flags & (FIN | RST)):
            return  # a pure ACK only counts, as in the kernel: no clock, no time
        st.last_ns = seg.ts_ns
        if payload_len:
            st.bytes += payload_len
            st.data_segments += 1
            if st.last_data_ns:
                # A capture clock can step back (merged files); a gap is never negative.
                gap_us = min(max(seg.ts_ns - st.last_data_ns, 0) // 1000, abi.GAP_CAP_US)
                st.gap_count += 1
                st.gap_sum_us += gap_us
                st.gap_sumsq_us2 += gap_us * gap_us
            st.last_data_ns = seg.ts_ns
            if self._tls_watched(seg.dport):
                hello = self._hello_segment(seg, tracked)
                if hello is not None:
                    out.append(hello)
            if self._http_watched(seg.dport) and seg.payload[:4] in HTTP_METHOD_PREFIXES:
                out.append(
                    HttpRequestHead(
                        ts_ns=seg.ts_ns,
                        flow=tracked.flow,
                        seq=seg.seq,
                        payload_len=payload_len,
                        data=seg.payload[: self.limits.http_head_max_bytes],
                    )
                )
        if seg.flags & (FIN | RST):
            reason = FlowEndReason.RST if seg.flags & RST else FlowEndReason.FIN
            out.append(flow_end_from_state(seg.ts_ns, tracked.flow, reason, st))
            del self._flows[key]

    def _new_flow(self, seg: TcpSegment, key: _FlowKey, flags: FlowFlag) -> _TrackedFlow:
        flow = Flow(
            src=ipaddress.ip_address(seg.src),
            sport=seg.sport,
            dst=ipaddress.ip_address(seg.dst),
            dport=seg.dport,
        )
        state = abi.FlowState()
        state.first_ns = seg.ts_ns
        state.flags = int(flags)
        tracked = _TrackedFlow(flow=flow, state=state)
        self._flows[key] = tracked
        return tracked

    def _hello_segment(self, seg: TcpSegment, tracked: _TrackedFlow) -> ClientHelloSegment | None:
        st = tracked.state
        limits = self.limits
        payload = seg.payload
        payload_len = len(payload)
        if (
            st.flags & FlowFlag.HELLO_OPEN
            and st.hello_segments < limits.hello_max_segments
            and st.hello_bytes < limits.hello_max_bytes
        ):
            captured = payload[: limits.hello_max_bytes - st.hello_bytes]
            st.hello_segments += 1
            st.hello_bytes += len(captured)
            tracked.hello_remaining -= payload_len
            if st.hello_segments >= limits.hello_max_segments or tracked.hello_remaining <= 0:
                st.flags &= ~FlowFlag.HELLO_OPEN
            return ClientHelloSegment(
                ts_ns=seg.ts_ns,
                flow=tracked.flow,
                seq=seg.seq,
                hello_index=st.hellos,
                segment_index=st.hello_segments,
                payload_len=payload_len,
                data=captured,
            )
        if st.hellos >= limits.hellos_per_flow:
            return None
        record_at = _client_hello_offset(payload)
        if record_at is None:
            return None
        captured = payload[: limits.hello_max_bytes]
        st.hellos += 1
        st.hello_segments = 1
        st.hello_bytes = len(captured)
        # Only the first record's headers are read, as in the kernel: the hello
        # is open while the segment is shorter than the handshake header says,
        # or whatever its length when the first record cannot hold the hello.
        hs_len = int.from_bytes(payload[record_at + 6 : record_at + 9], "big")
        record_len = int.from_bytes(payload[record_at + 3 : record_at + 5], "big")
        if record_len < 4 + hs_len:
            tracked.hello_remaining = _SPANS_RECORDS
        else:
            tracked.hello_remaining = record_at + 9 + hs_len - payload_len
        if tracked.hello_remaining > 0:
            st.flags |= FlowFlag.HELLO_OPEN
        else:
            st.flags &= ~FlowFlag.HELLO_OPEN
        return ClientHelloSegment(
            ts_ns=seg.ts_ns,
            flow=tracked.flow,
            seq=seg.seq,
            hello_index=st.hellos,
            segment_index=1,
            payload_len=payload_len,
            data=captured,
        )

    def _egress(self, seg: TcpSegment, key: _FlowKey, out: list[Event]) -> None:
        tracked = self._touch(key)
        st = tracked.state
        payload = seg.payload
        st.server_packets += 1
        st.server_bytes += len(payload)
        st.last_ns = seg.ts_ns  # the kernel's tc program does the same
        if self._http_watched(seg.sport):
            status = _http_status(payload)
            if status is not None:
                think_ns = max(seg.ts_ns - st.last_data_ns, 0) if st.last_data_ns else 0
                out.append(
                    HttpResponseStatus(
                        ts_ns=seg.ts_ns,
                        flow=tracked.flow,
                        status=status,
                        think_ns=think_ns,
                        payload_len=len(payload),
                    )
                )
        if seg.flags & RST:
            out.append(flow_end_from_state(seg.ts_ns, tracked.flow, FlowEndReason.SERVER_RST, st))
            del self._flows[key]


# The hello continues in another record: take the next segment, whatever its length.
_SPANS_RECORDS = 1 << 32


def _client_hello_offset(payload: bytes) -> int | None:
    """Where the ClientHello record starts: 0, 6 after a ChangeCipherSpec record, or None.

    The check reads the record type, its major version and the handshake type,
    and the start rule then reads the 24-bit handshake length: a segment too
    short for all of that is not a hello start.
    """
    if len(payload) >= 9 and payload[0] == 0x16 and payload[1] == 0x03 and payload[5] == 0x01:
        return 0
    if (
        len(payload) >= 15
        and payload[:6] == _CCS_RECORD
        and payload[6] == 0x16
        and payload[7] == 0x03
        and payload[11] == 0x01
    ):
        return 6
    return None


def _http_status(payload: bytes) -> int | None:
    if len(payload) < 12 or not payload.startswith(b"HTTP/1.") or payload[8] != 0x20:
        return None
    digits = payload[9:12]
    if not digits.isdigit():
        return None
    return int(digits)


def _syn_event(seg: TcpSegment, flow: Flow) -> SynEvent:
    quirks = SynQuirk(0)
    if seg.flags & ECE and seg.flags & CWR:
        quirks |= SynQuirk.ECN_SETUP
    if seg.ecn:
        quirks |= SynQuirk.ECN_IP
    if seg.ack and not seg.flags & ACK:
        quirks |= SynQuirk.ACK_NONZERO
    if seg.urgent and not seg.flags & URG:
        quirks |= SynQuirk.URG_NONZERO
    if seg.payload:
        quirks |= SynQuirk.DATA
    if seg.ip_version == 4 and seg.ip_id == 0 and seg.df:
        quirks |= SynQuirk.IP_ID_ZERO
    if seg.flow_label:
        quirks |= SynQuirk.FLOW_LABEL
    # The kernel sends the option bytes raw; the same decoder reads them here.
    options = decode_tcp_options(seg.options)
    if options.truncated:
        quirks |= SynQuirk.OPTIONS_TRUNCATED
    return SynEvent(
        ts_ns=seg.ts_ns,
        flow=flow,
        seq=seg.seq,
        ttl=seg.ttl,
        df=seg.df,
        ip_id=seg.ip_id,
        window=seg.window,
        mss=options.mss,
        wscale=options.wscale,
        options=options.kinds,
        options_len=len(seg.options),
        quirks=quirks,
        tcp_flags=seg.flags,
        ip_total_len=seg.ip_total_len,
        payload_len=len(seg.payload),
    )


# ---------------------------------------------------------------- the source


class ReplaySource:
    """An EventSource over a capture file: the events the kernel would have sent.

    tls_ports / http_ports: server ports watched for each kind; None watches
    every port. Each call to events() replays the file from the start with fresh
    flow state and fresh stats.
    """

    def __init__(
        self,
        path: str | Path,
        tls_ports: Iterable[int] | None = None,
        http_ports: Iterable[int] | None = None,
        idle_timeout_s: float = 30.0,
        limits: ObservationLimits | None = None,
    ) -> None:
        self.path = Path(path)
        self.tls_ports = _watch_set(tls_ports)
        self.http_ports = _watch_set(http_ports)
        self.idle_timeout_s = idle_timeout_s
        self.limits = limits or ObservationLimits()
        self.stats = ReplayStats()
        self._capture: _CaptureFile | None = None
        self._closed = False
        _CaptureFile(self.path).close()  # fail now, naming the path, not on first iteration

    def events(self) -> Iterator[Event]:
        self.stats = ReplayStats()
        if self._closed:
            return
        observer = FlowObserver(
            self.tls_ports, self.http_ports, self.idle_timeout_s, self.limits, self.stats
        )
        capture = self._capture = _CaptureFile(self.path)
        try:
            for frame, linktype, ts_ns in capture.frames(self.stats):
                if self._closed:
                    return
                self.stats.packets += 1
                try:
                    segment = parse_frame(linktype, frame, ts_ns)
                except _Skip as skip:
                    reason = str(skip)
                    bucket = self.stats.ignored if reason in _NOT_BAD else self.stats.skipped
                    bucket[reason] += 1
                    continue
                if segment.length_from_frame:
                    self.stats.repaired["ipv4_length_from_frame"] += 1
                yield from observer.observe(segment)
            if not self._closed:
                yield from observer.finish()
        finally:
            capture.close()
            self._capture = None

    def close(self) -> None:
        """Stop a replay in progress: events() ends before the next packet, without a summary."""
        self._closed = True

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CaptureFile:
    """An open pcap or pcapng file and scapy's raw reader over it; closing closes both.

    The file is opened here rather than by scapy, which leaves its own file
    open when it refuses one.
    """

    def __init__(self, path: Path) -> None:
        # scapy is imported here so that importing sensor.replay stays cheap.
        from scapy.error import Scapy_Exception
        from scapy.utils import RawPcapReader

        self.path = path
        try:
            self._file = path.open("rb")
        except FileNotFoundError as exc:
            raise ReplayError(f"{path}: no such capture file") from exc
        except OSError as exc:
            raise ReplayError(f"{path}: cannot read capture ({exc.strerror})") from exc
        try:
            # scapy's stubs say str, but it takes a binary file as well.
            self._reader: Any = RawPcapReader(cast(Any, self._file))
        except (Scapy_Exception, OSError, EOFError, ValueError, struct.error) as exc:
            self._file.close()
            raise ReplayError(f"{path}: not a pcap or pcapng capture ({exc})") from exc

    def close(self) -> None:
        self._reader.close()  # a gzip reader does not close the file beneath it
        self._file.close()

    def frames(self, stats: ReplayStats) -> Iterator[tuple[bytes, int, int]]:
        """(frame, link type, timestamp in ns) for each packet record, until the file ends."""
        from scapy.error import Scapy_Exception

        reader = self._reader
        meta: Any  # RawPcapReader.PacketMetadata or RawPcapNgReader.PacketMetadata
        last_ts = 0
        while True:
            try:
                frame, meta = next(reader)
            except StopIteration:
                return
            except (Scapy_Exception, OSError, EOFError, ValueError, struct.error):
                # A damaged tail: what was read so far stands, the rest is lost.
                stats.skipped["unreadable_record"] += 1
                return
            if hasattr(meta, "tsresol"):  # pcapng: per-interface link type and resolution
                linktype = meta.linktype
                if meta.tshigh is None:  # a Simple Packet Block has no timestamp
                    ts_ns = last_ts
                else:
                    ticks = (meta.tshigh << 32) | meta.tslow
                    ts_ns = ticks * 1_000_000_000 // int(meta.tsresol)
            else:
                linktype = reader.linktype
                fraction_ns = meta.usec if reader.nano else meta.usec * 1000
                ts_ns = meta.sec * 1_000_000_000 + fraction_ns
            last_ts = ts_ns
            yield frame, linktype, ts_ns


# Frames that are fine but carry nothing the sensor observes.
_NOT_BAD = frozenset({"not_ip", "not_tcp", "fragment", "vlan_too_deep"})
