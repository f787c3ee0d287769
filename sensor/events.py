"""Typed, frozen events decoded from ring-buffer records by (type, version).

These are what everything above sensor/ sees, whether they come from the
kernel (BccSensor) or from a capture (ReplaySource). Unknown, short or
mis-versioned records are counted in DecodeStats, never raised.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import math
from collections import Counter as TallyCounter
from dataclasses import dataclass, field

from sensor import abi
from sensor.abi import EventType, FlowEndReason, SynQuirk

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Flow:
    """A TCP connection, always oriented client -> server."""

    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Flows key the observer's tables, several lookups per event, so the
        # hash is computed once. The addresses' own hash formats each one as
        # hex first; their integers hash equal flows alike at a fraction of
        # the cost.
        object.__setattr__(
            self, "_hash", hash((int(self.src), self.sport, int(self.dst), self.dport))
        )

    def __str__(self) -> str:
        return f"{_hostport(self.src, self.sport)}->{_hostport(self.dst, self.dport)}"

    def __hash__(self) -> int:
        return self._hash

    @property
    def ip_version(self) -> int:
        return self.src.version


def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True, slots=True)
class SynEvent:
    """A client's SYN on a watched port, with everything a TCP signature needs."""

    ts_ns: int
    flow: Flow
    seq: int
    ttl: int  # IPv4 TTL or IPv6 hop limit as received
    df: bool
    ip_id: int  # IPv4 only; 0 for IPv6
    window: int
    mss: int | None
    wscale: int | None
    options: tuple[int, ...]  # TCP option kinds in wire order
    options_len: int  # bytes of TCP options
    quirks: SynQuirk
    tcp_flags: int
    ip_total_len: int
    payload_len: int


@dataclass(frozen=True, slots=True)
class ClientHelloSegment:
    """One client segment carrying (part of) a TLS ClientHello, as captured.

    A ClientHello spans up to HELLO_MAX_SEGMENTS segments; hello_index is 1 for
    the first ClientHello of the flow and 2 for one sent after a
    HelloRetryRequest. data may be shorter than payload_len (capture cap).
    """

    ts_ns: int
    flow: Flow
    seq: int
    hello_index: int
    segment_index: int
    payload_len: int
    data: bytes

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.payload_len


@dataclass(frozen=True, slots=True)
class HttpRequestHead:
    """The first HTTP_HEAD_MAX_BYTES of a client segment that begins with a method."""

    ts_ns: int
    flow: Flow
    seq: int
    payload_len: int
    data: bytes

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.payload_len


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """A flow's summary, on the client's FIN or RST, the server's RST, or idle."""

    ts_ns: int
    flow: Flow
    reason: FlowEndReason
    first_ns: int
    last_ns: int
    packets: int
    bytes: int
    data_segments: int
    syn_count: int
    server_packets: int
    server_bytes: int
    gap_count: int
    gap_mean_us: float  # between client data segments; nan with no gap
    gap_var_us2: float
    seen_syn: bool  # False when the flow began before the sensor attached

    @property
    def duration_ns(self) -> int:
        return self.last_ns - self.first_ns

    @property
    def syn_retransmissions(self) -> int:
        return max(self.syn_count - 1, 0)


@dataclass(frozen=True, slots=True)
class HttpResponseStatus:
    """The status line of a plaintext HTTP response on a watched port."""

    ts_ns: int
    flow: Flow  # client -> server, like every other event
    status: int
    think_ns: int  # from the client's last data segment to this response
    payload_len: int


Event = SynEvent | ClientHelloSegment | HttpRequestHead | FlowEnd | HttpResponseStatus


@dataclass
class DecodeStats:
    """Records decoded and records refused, by reason; never an exception."""

    decoded: TallyCounter[str] = field(default_factory=TallyCounter)
    refused: TallyCounter[str] = field(default_factory=TallyCounter)


def flow_from_abi(t: abi.FlowTuple) -> Flow:
    return Flow(
        src=abi.addr_from_bytes(bytes(t.saddr.b), t.ip_version),
        sport=t.sport,
        dst=abi.addr_from_bytes(bytes(t.daddr.b), t.ip_version),
        dport=t.dport,
    )


def gap_stats(count: int, sum_us: int, sumsq_us2: int) -> tuple[float, float]:
    """Mean and population variance from the kernel's running sums."""
    if count == 0:
        return math.nan, math.nan
    mean = sum_us / count
    return mean, max(sumsq_us2 / count - mean * mean, 0.0)


def flow_end_from_state(
    ts_ns: int, flow: Flow, reason: FlowEndReason, st: abi.FlowState
) -> FlowEnd:
    mean, var = gap_stats(st.gap_count, st.gap_sum_us, st.gap_sumsq_us2)
    return FlowEnd(
        ts_ns=ts_ns,
        flow=flow,
        reason=reason,
        first_ns=st.first_ns,
        last_ns=st.last_ns,
        packets=st.packets,
        bytes=st.bytes,
        data_segments=st.data_segments,
        syn_count=st.syn_count,
        server_packets=st.server_packets,
        server_bytes=st.server_bytes,
        gap_count=st.gap_count,
        gap_mean_us=mean,
        gap_var_us2=var,
        seen_syn=bool(st.flags & abi.FlowFlag.SEEN_SYN),
    )


_FIXED_SIZES: dict[EventType, int] = {
    EventType.SYN: ctypes.sizeof(abi.SynEvent),
    EventType.HELLO: abi.PAYLOAD_EVENT_FIXED_SIZE,
    EventType.HTTP_REQUEST: abi.PAYLOAD_EVENT_FIXED_SIZE,
    EventType.FLOW_END: ctypes.sizeof(abi.FlowEndEvent),
    EventType.HTTP_RESPONSE: ctypes.sizeof(abi.HttpResponseEvent),
}


def decode(record: bytes, stats: DecodeStats | None = None) -> Event | None:
    """One ring-buffer record to its typed event, or None (counted in stats)."""
    stats = stats if stats is not None else DecodeStats()
    header_size = ctypes.sizeof(abi.EventHeader)
    if len(record) < header_size:
        stats.refused["short_header"] += 1
        return None
    hdr = abi.EventHeader.from_buffer_copy(record[:header_size])
    try:
        kind = EventType(hdr.type)
    except ValueError:
        stats.refused[f"unknown_type_{hdr.type}"] += 1
        return None
    if hdr.version != abi.EVENT_VERSIONS[kind]:
        stats.refused[f"{kind.name.lower()}_version_{hdr.version}"] += 1
        return None
    fixed = _FIXED_SIZES[kind]
    if len(record) < fixed or hdr.length < fixed or hdr.length > len(record):
        stats.refused[f"{kind.name.lower()}_short"] += 1
        return None
    event = _DECODERS[kind](record, hdr)
    if event is None:
        stats.refused[f"{kind.name.lower()}_inconsistent"] += 1
    else:
        stats.decoded[kind.name.lower()] += 1
    return event


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """A SYN's TCP options decoded from their raw bytes."""

    kinds: tuple[int, ...]  # in wire order, NOP (1) and a final EOL (0) included
    mss: int | None
    wscale: int | None
    truncated: bool  # an option's length ran past the option bytes


MAX_OPTION_KINDS = 16  # kinds recorded per SYN; real stacks send at most ~10


def decode_tcp_options(raw: bytes) -> TcpOptions:
    """Walk TCP option bytes as a receiver would; never raises.

    Kinds are recorded up to the end-of-list option, the first malformed
    length, or MAX_OPTION_KINDS options, whichever comes first."""
    kinds: list[int] = []
    mss: int | None = None
    wscale: int | None = None
    at = 0
    while at < len(raw) and len(kinds) < MAX_OPTION_KINDS:
        kind = raw[at]
        kinds.append(kind)
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation: one byte
            at += 1
            continue
        if at + 1 >= len(raw) or raw[at + 1] < 2 or at + raw[at + 1] > len(raw):
            return TcpOptions(tuple(kinds), mss, wscale, truncated=True)
        length = raw[at + 1]
        if kind == 2 and length == 4:
            mss = int.from_bytes(raw[at + 2 : at + 4], "big")
        elif kind == 3 and length == 3:
            wscale = raw[at + 2]
        at += length
    return TcpOptions(tuple(kinds), mss, wscale, truncated=False)


def _decode_syn(record: bytes, hdr: abi.EventHeader) -> SynEvent | None:
    raw = abi.SynEvent.from_buffer_copy(record[: ctypes.sizeof(abi.SynEvent)])
    options_len = min(raw.options_len, abi.TCP_OPTIONS_MAX_BYTES)
    options = decode_tcp_options(bytes(raw.options[:options_len]))
    quirks = SynQuirk(raw.quirks)
    if options.truncated:
        quirks |= SynQuirk.OPTIONS_TRUNCATED
    return SynEvent(
        ts_ns=hdr.ts_ns,
        flow=flow_from_abi(raw.flow),
        seq=raw.seq,
        ttl=raw.ttl,
        df=bool(raw.df),
        ip_id=raw.ip_id,
        window=raw.window,
        mss=options.mss,
        wscale=options.wscale,
        options=options.kinds,
        options_len=options_len,
        quirks=quirks,
        tcp_flags=raw.tcp_flags,
        ip_total_len=raw.ip_total_len,
        payload_len=raw.payload_len,
    )


def _payload_parts(record: bytes, hdr: abi.EventHeader) -> tuple[abi.PayloadEvent, bytes] | None:
    fixed = abi.PAYLOAD_EVENT_FIXED_SIZE
    head = record[:fixed] + bytes(ctypes.sizeof(abi.PayloadEvent) - fixed)
    raw = abi.PayloadEvent.from_buffer_copy(head)
    if fixed + raw.captured_len > hdr.length:
        return None
    return raw, record[fixed : fixed + raw.captured_len]


def _decode_hello(record: bytes, hdr: abi.EventHeader) -> ClientHelloSegment | None:
    parts = _payload_parts(record, hdr)
    if parts is None:
        return None
    raw, data = parts
    return ClientHelloSegment(
        ts_ns=hdr.ts_ns,
        flow=flow_from_abi(raw.flow),
        seq=raw.seq,
        hello_index=raw.hello_index,
        segment_index=raw.segment_index,
        payload_len=raw.payload_len,
        data=data,
    )


def _decode_http_request(record: bytes, hdr: abi.EventHeader) -> HttpRequestHead | None:
    parts = _payload_parts(record, hdr)
    if parts is None:
        return None
    raw, data = parts
    return HttpRequestHead(
        ts_ns=hdr.ts_ns,
        flow=flow_from_abi(raw.flow),
        seq=raw.seq,
        payload_len=raw.payload_len,
        data=data,
    )


def _decode_flow_end(record: bytes, hdr: abi.EventHeader) -> FlowEnd | None:
    raw = abi.FlowEndEvent.from_buffer_copy(record[: ctypes.sizeof(abi.FlowEndEvent)])
    try:
        reason = FlowEndReason(raw.reason)
    except ValueError:
        return None
    return flow_end_from_state(hdr.ts_ns, flow_from_abi(raw.flow), reason, raw.state)


def _decode_http_response(record: bytes, hdr: abi.EventHeader) -> HttpResponseStatus | None:
    raw = abi.HttpResponseEvent.from_buffer_copy(record[: ctypes.sizeof(abi.HttpResponseEvent)])
    return HttpResponseStatus(
        ts_ns=hdr.ts_ns,
        flow=flow_from_abi(raw.flow),
        status=raw.status,
        think_ns=raw.think_ns,
        payload_len=raw.payload_len,
    )


_DECODERS = {
    EventType.SYN: _decode_syn,
    EventType.HELLO: _decode_hello,
    EventType.HTTP_REQUEST: _decode_http_request,
    EventType.FLOW_END: _decode_flow_end,
    EventType.HTTP_RESPONSE: _decode_http_response,
}


def event_to_dict(event: Event) -> dict[str, object]:
    """A JSON-ready view of an event: addresses as text, payload bytes as hex."""
    out: dict[str, object] = {"type": type(event).__name__}
    for name in event.__dataclass_fields__:
        value = getattr(event, name)
        if isinstance(value, Flow):
            value = str(value)
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, float) and math.isnan(value):
            value = None
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, enum.Enum):
            value = value.name if value.name else value.value
        out[name] = value
    return out
