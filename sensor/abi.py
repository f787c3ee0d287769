"""ctypes mirrors of every struct and enum in bpf/common.h.

tests/test_abi.py compares each class here, field by field, with the class BCC
builds from the C, so a change on one side that is not made on the other fails
the build. Nothing above sensor/ imports this module.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

REASON_LEN = 48
TCP_OPTIONS_MAX_BYTES = 40
HELLO_MAX_SEGMENTS = 2
HELLO_MAX_BYTES = 4096
HELLOS_PER_FLOW = 2
HTTP_HEAD_MAX_BYTES = 1024
PAYLOAD_MAX_BYTES = HELLO_MAX_BYTES
GAP_CAP_US = 60_000_000
# ClientHello keys (bpf/common.h; computed by sensor.fingerprint.tls.hello_key)
HELLO_KEY_MAX_CIPHERS = 128
HELLO_KEY_MAX_EXTENSIONS = 32
HELLO_KEY_EXT_BUDGET = 1024
HELLO_KEY_EXT_MIX = 0x9E3779B97F4A7C15
HELLO_KEY_FNV_OFFSET = 0xCBF29CE484222325
HELLO_KEY_FNV_PRIME = 0x100000001B3
HELLO_FLOW_BLOCK_NS = 120_000_000_000

IPV4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class Addr16(ctypes.Union):
    _fields_ = [("b", c_uint8 * 16), ("w", c_uint32 * 4)]


class FlowTuple(ctypes.Structure):
    _fields_ = [
        ("saddr", Addr16),
        ("daddr", Addr16),
        ("sport", c_uint16),
        ("dport", c_uint16),
        ("ip_version", c_uint8),
        ("pad", c_uint8 * 3),
    ]


class LpmKey(ctypes.Structure):
    _fields_ = [("prefixlen", c_uint32), ("addr", Addr16)]


class VerdictKind(enum.IntFlag):
    ALLOW = 1 << 0
    ALLOW_CIDR = 1 << 1
    BLOCK = 1 << 2
    BLOCK_CIDR = 1 << 3
    BLOCK_FLOW = 1 << 4
    THROTTLE = 1 << 5
    TARPIT = 1 << 6
    BLOCK_HELLO = 1 << 7
    HELLO_EXEMPT = 1 << 8


class Verdict(ctypes.Structure):
    _fields_ = [
        ("expires_ns", c_uint64),
        ("created_ns", c_uint64),
        ("reason", c_char * REASON_LEN),
    ]


class ThrottleEntry(ctypes.Structure):
    _fields_ = [
        ("v", Verdict),
        ("conn_interval_ns", c_uint64),
        ("conn_tolerance_ns", c_uint64),
        ("conn_tat_ns", c_uint64),
        ("pkt_interval_ns", c_uint64),
        ("pkt_tolerance_ns", c_uint64),
        ("pkt_tat_ns", c_uint64),
    ]


class TarpitEntry(ctypes.Structure):
    _fields_ = [("v", Verdict), ("syns_to_drop", c_uint32), ("pad", c_uint32)]


class Config(ctypes.Structure):
    _fields_ = [("verdict_kinds", c_uint32), ("pad", c_uint32)]


class WatchFlag(enum.IntFlag):
    TLS = 1 << 0
    HTTP = 1 << 1


class FlowFlag(enum.IntFlag):
    SEEN_SYN = 1 << 0
    HELLO_OPEN = 1 << 1


class FlowState(ctypes.Structure):
    _fields_ = [
        ("first_ns", c_uint64),
        ("last_ns", c_uint64),
        ("last_data_ns", c_uint64),
        ("bytes", c_uint64),
        ("server_bytes", c_uint64),
        ("gap_sum_us", c_uint64),
        ("gap_sumsq_us2", c_uint64),
        ("packets", c_uint32),
        ("server_packets", c_uint32),
        ("data_segments", c_uint32),
        ("gap_count", c_uint32),
        ("syn_count", c_uint16),
        ("hello_bytes", c_uint16),
        ("hellos", c_uint8),
        ("hello_segments", c_uint8),
        ("flags", c_uint8),
        ("pad", c_uint8),
    ]


class SourceState(ctypes.Structure):
    _fields_ = [
        ("first_ns", c_uint64),
        ("last_ns", c_uint64),
        ("packets", c_uint64),
        ("syns", c_uint32),
        ("flows", c_uint32),
    ]


class Counter(enum.IntEnum):
    PASS_NOT_WATCHED = 0
    PASS_MALFORMED = enum.auto()
    PASS_FRAGMENT = enum.auto()
    PASS = enum.auto()
    PASS_ALLOWED = enum.auto()
    DROP_BLOCK = enum.auto()
    DROP_BLOCK_CIDR = enum.auto()
    DROP_BLOCK_FLOW = enum.auto()
    DROP_THROTTLE_CONN = enum.auto()
    DROP_THROTTLE_PKT = enum.auto()
    DROP_TARPIT = enum.auto()
    DROP_BLOCK_HELLO = enum.auto()
    HIT_ALLOW = enum.auto()
    HIT_ALLOW_CIDR = enum.auto()
    HIT_THROTTLE = enum.auto()
    HIT_TARPIT = enum.auto()
    HIT_HELLO_EXEMPT = enum.auto()
    VERDICT_EXPIRED = enum.auto()
    EVENT_SYN = enum.auto()
    EVENT_HELLO = enum.auto()
    EVENT_HTTP_REQUEST = enum.auto()
    EVENT_FLOW_END = enum.auto()
    EVENT_HTTP_RESPONSE = enum.auto()
    EVENT_LOST = enum.auto()
    PAYLOAD_READ_ERROR = enum.auto()
    FLOW_TABLE_FULL = enum.auto()
    EGRESS_PACKETS = enum.auto()
    EGRESS_NO_FLOW = enum.auto()
    DROP_BLOCK_UNPARSED = enum.auto()
    MAX = enum.auto()


class EventType(enum.IntEnum):
    SYN = 1
    HELLO = 2
    HTTP_REQUEST = 3
    FLOW_END = 4
    HTTP_RESPONSE = 5


class EventHeader(ctypes.Structure):
    _fields_ = [
        ("type", c_uint16),
        ("version", c_uint16),
        ("length", c_uint32),
        ("ts_ns", c_uint64),
    ]


class SynQuirk(enum.IntFlag):
    ECN_SETUP = 1 << 0
    ECN_IP = 1 << 1
    ACK_NONZERO = 1 << 2
    URG_NONZERO = 1 << 3
    DATA = 1 << 4
    OPTIONS_TRUNCATED = 1 << 5
    IP_ID_ZERO = 1 << 6
    FLOW_LABEL = 1 << 7


SYN_EVENT_VERSION = 1


class SynEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("flow", FlowTuple),
        ("seq", c_uint32),
        ("ip_id", c_uint16),
        ("window", c_uint16),
        ("quirks", c_uint16),
        ("ip_total_len", c_uint16),
        ("payload_len", c_uint16),
        ("ttl", c_uint8),
        ("df", c_uint8),
        ("tcp_flags", c_uint8),
        ("options_len", c_uint8),
        ("options", c_uint8 * TCP_OPTIONS_MAX_BYTES),
        ("pad", c_uint8 * 6),
    ]


PAYLOAD_EVENT_VERSION = 1


class PayloadEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("flow", FlowTuple),
        ("seq", c_uint32),
        ("payload_len", c_uint16),
        ("captured_len", c_uint16),
        ("hello_index", c_uint8),
        ("segment_index", c_uint8),
        ("pad", c_uint8 * 2),
        ("data", c_uint8 * PAYLOAD_MAX_BYTES),
    ]


PAYLOAD_EVENT_FIXED_SIZE = PayloadEvent.data.offset


class FlowEndReason(enum.IntEnum):
    FIN = 1
    RST = 2
    SERVER_RST = 3
    IDLE = 4


FLOW_END_EVENT_VERSION = 1


class FlowEndEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("flow", FlowTuple),
        ("state", FlowState),
        ("reason", c_uint8),
        ("pad", c_uint8 * 7),
    ]


HTTP_RESPONSE_EVENT_VERSION = 1


class HttpResponseEvent(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("flow", FlowTuple),
        ("think_ns", c_uint64),
        ("status", c_uint16),
        ("payload_len", c_uint16),
        ("pad", c_uint8 * 4),
    ]


# Every shared struct, by the name it has in bpf/common.h: the ABI test walks this.
STRUCTS: dict[str, type[ctypes.Structure] | type[ctypes.Union]] = {
    "addr16": Addr16,
    "flow_tuple": FlowTuple,
    "lpm_key": LpmKey,
    "verdict": Verdict,
    "throttle_entry": ThrottleEntry,
    "tarpit_entry": TarpitEntry,
    "config": Config,
    "flow_state": FlowState,
    "source_state": SourceState,
    "event_header": EventHeader,
    "syn_event": SynEvent,
    "payload_event": PayloadEvent,
    "flow_end_event": FlowEndEvent,
    "http_response_event": HttpResponseEvent,
}

# Record versions this build of the sensor decodes, by event type.
EVENT_VERSIONS: dict[EventType, int] = {
    EventType.SYN: SYN_EVENT_VERSION,
    EventType.HELLO: PAYLOAD_EVENT_VERSION,
    EventType.HTTP_REQUEST: PAYLOAD_EVENT_VERSION,
    EventType.FLOW_END: FLOW_END_EVENT_VERSION,
    EventType.HTTP_RESPONSE: HTTP_RESPONSE_EVENT_VERSION,
}


# ---- address conversion: the 16-byte form used by every key ----

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def addr_to_bytes(addr: IPAddress) -> bytes:
    """16-byte key form: IPv6 as is, IPv4 mapped into ::ffff:0:0/96."""
    if addr.version == 4:
        return IPV4_MAPPED_PREFIX + addr.packed
    return addr.packed


def addr_from_bytes(raw: bytes, ip_version: int) -> IPAddress:
    if ip_version == 4:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(raw)


def addr16(addr: IPAddress) -> Addr16:
    key = Addr16()
    ctypes.memmove(key.b, addr_to_bytes(addr), 16)
    return key


def lpm_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> LpmKey:
    """An LPM key for a CIDR; IPv4 prefixes sit under the 96-bit mapped prefix."""
    key = LpmKey()
    key.prefixlen = network.prefixlen + (96 if network.version == 4 else 0)
    ctypes.memmove(key.addr.b, addr_to_bytes(network.network_address), 16)
    return key


def network_from_lpm_key(key: LpmKey) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    raw = bytes(key.addr.b)
    if raw[:12] == IPV4_MAPPED_PREFIX and key.prefixlen >= 96:
        return ipaddress.IPv4Network((raw[12:16], key.prefixlen - 96))
    return ipaddress.IPv6Network((raw, key.prefixlen))
