"""VerdictMaps: the only writer of the kernel's enforcement maps.

Every verdict has a TTL and a reason. Its expiry is written in kernel time
(CLOCK_MONOTONIC, what bpf_ktime_get_ns() reads) and checked by the kernel on
every packet, so an expired verdict stops applying even if nobody removes it;
expire() only reclaims the space.
"""

from __future__ import annotations

import ctypes
import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sensor import abi
from sensor.abi import VerdictKind
from sensor.events import Flow

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NS_PER_S = 1_000_000_000

# A map key: an address (a union), a CIDR or a 5-tuple (structures), a hello key.
_CKey = ctypes.Structure | ctypes.Union | ctypes.c_uint64


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def parse_address(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


def parse_network(value: str | IPNetwork) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {value!r}") from None


def _check_ttl(ttl: float) -> int:
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not math.isfinite(ttl):
        raise ValueError(f"TTL must be a number of seconds, got {ttl!r}")
    if ttl <= 0:
        raise ValueError(f"TTL must be > 0 seconds, got {ttl!r}")
    return int(ttl * NS_PER_S)


def _check_reason(reason: str) -> bytes:
    raw = reason.encode()
    if not raw:
        raise ValueError("a verdict needs a reason")
    # Cut on a character boundary so listing never shows half a character.
    return raw[: abi.REASON_LEN - 1].decode(errors="ignore").encode()


def _check_rate(name: str, rate: float, burst: int) -> None:
    if rate < 0 or not math.isfinite(rate):
        raise ValueError(f"{name} rate must be >= 0 per second (0: unlimited), got {rate!r}")
    if burst < 1:
        raise ValueError(f"{name} burst must be >= 1, got {burst!r}")


@dataclass(frozen=True)
class VerdictEntry:
    """One live or expired entry, as listed."""

    kind: VerdictKind
    target: str  # an address, a CIDR, a flow "src:port->dst:port" or "hello:<key>"
    reason: str
    expires_in_s: float  # negative once expired
    detail: dict[str, float]

    @property
    def expired(self) -> bool:
        return self.expires_in_s <= 0


class VerdictMaps:
    """Writes and lists verdicts in the (pinned) kernel maps of a Sensor."""

    def __init__(self, table: Callable[[str], Any], clock: Callable[[], int] = monotonic_ns):
        """table: name -> BCC table (Sensor.table); clock: kernel-time source."""
        self._table = table
        self._clock = clock

    # ---- writing ----

    def allow(self, target: str | IPAddress | IPNetwork, ttl: float, reason: str) -> None:
        """An address or CIDR that passes, skipping block, throttle and tarpit."""
        if _is_cidr(target):
            net = parse_network(target)  # type: ignore[arg-type]
            self._put(
                VerdictKind.ALLOW_CIDR, "allow_cidr", abi.lpm_key(net), self._verdict(ttl, reason)
            )
        else:
            addr = parse_address(target)  # type: ignore[arg-type]
            self._put(VerdictKind.ALLOW, "allow_addr", abi.addr16(addr), self._verdict(ttl, reason))

    def block(self, target: str | IPAddress | IPNetwork, ttl: float, reason: str) -> None:
        """Drop every packet from an address or CIDR to a watched port."""
        if _is_cidr(target):
            net = parse_network(target)  # type: ignore[arg-type]
            self._put(
                VerdictKind.BLOCK_CIDR, "block_cidr", abi.lpm_key(net), self._verdict(ttl, reason)
            )
        else:
            addr = parse_address(target)  # type: ignore[arg-type]
            self._put(VerdictKind.BLOCK, "block_addr", abi.addr16(addr), self._verdict(ttl, reason))

    def block_flow(self, flow: Flow, ttl: float, reason: str) -> None:
        """Drop one connection (client -> server 5-tuple)."""
        self._put(VerdictKind.BLOCK_FLOW, "block_flow", _flow_key(flow), self._verdict(ttl, reason))

    def block_hello(self, key: int, ttl: float, reason: str) -> None:
        """Drop every new ClientHello with this key (sensor.fingerprint.tls.hello_key)
        and block its connection, unless its source is exempt (exempt_hello)."""
        if not 0 < key < 1 << 64:
            raise ValueError(f"a hello key is a non-zero 64-bit number, got {key!r}")
        self._put(
            VerdictKind.BLOCK_HELLO, "block_hello", ctypes.c_uint64(key), self._verdict(ttl, reason)
        )

    def exempt_hello(self, target: str | IPAddress, ttl: float, reason: str) -> None:
        """Let this address's hellos pass a blocked key: a client the policy spares
        from fingerprint verdicts (a declared agent) on a blocked bot's TLS stack."""
        addr = parse_address(target)
        self._put(
            VerdictKind.HELLO_EXEMPT, "hello_exempt", abi.addr16(addr), self._verdict(ttl, reason)
        )

    def throttle(
        self,
        target: str | IPAddress,
        ttl: float,
        reason: str,
        *,
        connections_per_s: float = 0.0,
        connection_burst: int = 1,
        packets_per_s: float = 0.0,
        packet_burst: int = 1,
    ) -> None:
        """Token buckets per source on new connections and on packets; what exceeds
        is dropped. A rate of 0 leaves that dimension unlimited."""
        addr = parse_address(target)
        _check_rate("connection", connections_per_s, connection_burst)
        _check_rate("packet", packets_per_s, packet_burst)
        if connections_per_s == 0 and packets_per_s == 0:
            raise ValueError("a throttle needs connections_per_s or packets_per_s > 0")
        entry = abi.ThrottleEntry(v=self._verdict(ttl, reason))
        entry.conn_interval_ns, entry.conn_tolerance_ns = _gcra(connections_per_s, connection_burst)
        entry.pkt_interval_ns, entry.pkt_tolerance_ns = _gcra(packets_per_s, packet_burst)
        self._put(VerdictKind.THROTTLE, "throttle", abi.addr16(addr), entry)

    def tarpit(
        self, target: str | IPAddress, ttl: float, reason: str, *, syns_to_drop: int = 1
    ) -> None:
        """Drop the first syns_to_drop SYNs of every new connection from the
        source: each costs the client a retransmission timeout (1 s, 2 s, ...)."""
        addr = parse_address(target)
        if not 1 <= syns_to_drop <= 6:
            raise ValueError(
                f"syns_to_drop must be 1-6 (Linux gives up after 6), got {syns_to_drop!r}"
            )
        entry = abi.TarpitEntry(v=self._verdict(ttl, reason), syns_to_drop=syns_to_drop)
        self._put(VerdictKind.TARPIT, "tarpit", abi.addr16(addr), entry)

    def _verdict(self, ttl: float, reason: str) -> abi.Verdict:
        ttl_ns = _check_ttl(ttl)
        now = self._clock()
        return abi.Verdict(expires_ns=now + ttl_ns, created_ns=now, reason=_check_reason(reason))

    def _put(self, kind: VerdictKind, map_name: str, key: _CKey, value: ctypes.Structure) -> None:
        # The kind's bit goes up before the entry lands, so the kernel never
        # skips a map that holds a live entry.
        self._set_kinds(self._kinds() | kind)
        table = self._table(map_name)
        table[table.Key.from_buffer_copy(key)] = table.Leaf.from_buffer_copy(value)

    # ---- removing ----

    def unblock(self, target: str | IPAddress | IPNetwork) -> int:
        """Removes every block, throttle and tarpit on exactly this address or
        CIDR; returns how many entries went."""
        removed = 0
        if _is_cidr(target):
            net = parse_network(target)  # type: ignore[arg-type]
            removed += self._delete(VerdictKind.BLOCK_CIDR, "block_cidr", abi.lpm_key(net))
        else:
            key = abi.addr16(parse_address(target))  # type: ignore[arg-type]
            for kind, name in (
                (VerdictKind.BLOCK, "block_addr"),
                (VerdictKind.THROTTLE, "throttle"),
                (VerdictKind.TARPIT, "tarpit"),
            ):
                removed += self._delete(kind, name, key)
        return removed

    def unblock_flow(self, flow: Flow) -> int:
        return self._delete(VerdictKind.BLOCK_FLOW, "block_flow", _flow_key(flow))

    def unblock_hello(self, key: int) -> int:
        return self._delete(VerdictKind.BLOCK_HELLO, "block_hello", ctypes.c_uint64(key))

    def unexempt_hello(self, target: str | IPAddress) -> int:
        key = abi.addr16(parse_address(target))
        return self._delete(VerdictKind.HELLO_EXEMPT, "hello_exempt", key)

    def disallow(self, target: str | IPAddress | IPNetwork) -> int:
        """Removes an allow entry."""
        if _is_cidr(target):
            net = parse_network(target)  # type: ignore[arg-type]
            return self._delete(VerdictKind.ALLOW_CIDR, "allow_cidr", abi.lpm_key(net))
        key = abi.addr16(parse_address(target))  # type: ignore[arg-type]
        return self._delete(VerdictKind.ALLOW, "allow_addr", key)

    def _delete(self, kind: VerdictKind, map_name: str, key: _CKey) -> int:
        table = self._table(map_name)
        try:
            del table[table.Key.from_buffer_copy(key)]
        except KeyError:
            return 0
        self._clear_kind_if_empty(kind, table)
        return 1

    def expire(self) -> int:
        """Deletes expired entries (the kernel already ignores them)."""
        now = self._clock()
        removed = 0
        for kind, name in _MAPS:
            table = self._table(name)
            stale = [k for k, v in table.items() if _verdict_of(v).expires_ns <= now]
            for key in stale:
                try:
                    del table[key]
                    removed += 1
                except KeyError:
                    pass
            if stale:
                self._clear_kind_if_empty(kind, table)
        return removed

    def clear(self) -> None:
        """Removes every verdict of every kind."""
        for _, name in _MAPS:
            self._table(name).clear()
        self._set_kinds(VerdictKind(0))

    def _clear_kind_if_empty(self, kind: VerdictKind, table: Any) -> None:
        if next(iter(table.keys()), None) is None:
            self._set_kinds(self._kinds() & ~kind)
            if kind is VerdictKind.BLOCK_HELLO:  # it held BLOCK_FLOW up (_set_kinds)
                self._clear_kind_if_empty(VerdictKind.BLOCK_FLOW, self._table("block_flow"))

    # ---- reading ----

    def list(self) -> list[VerdictEntry]:
        now = self._clock()
        entries: list[VerdictEntry] = []
        for kind, name in _MAPS:
            for key, value in self._table(name).items():
                verdict = _verdict_of(value)
                entries.append(
                    VerdictEntry(
                        kind=kind,
                        target=_describe_key(kind, key),
                        reason=verdict.reason.decode(errors="replace"),
                        expires_in_s=(verdict.expires_ns - now) / NS_PER_S,
                        detail=_detail(kind, value),
                    )
                )
        return entries

    def active_kinds(self) -> VerdictKind:
        return self._kinds()

    def _kinds(self) -> VerdictKind:
        config = self._table("config")[ctypes.c_uint32(0)]
        return VerdictKind(config.verdict_kinds)

    def _set_kinds(self, kinds: VerdictKind) -> None:
        if kinds & VerdictKind.BLOCK_HELLO:
            # The kernel blocks the flow of each hello it drops: its entries
            # must be looked at, or the hello's retransmission would pass.
            kinds |= VerdictKind.BLOCK_FLOW
        table = self._table("config")
        config = table[ctypes.c_uint32(0)]
        config.verdict_kinds = int(kinds)
        table[ctypes.c_uint32(0)] = config


_MAPS = (
    (VerdictKind.ALLOW, "allow_addr"),
    (VerdictKind.ALLOW_CIDR, "allow_cidr"),
    (VerdictKind.BLOCK, "block_addr"),
    (VerdictKind.BLOCK_CIDR, "block_cidr"),
    (VerdictKind.BLOCK_FLOW, "block_flow"),
    (VerdictKind.THROTTLE, "throttle"),
    (VerdictKind.TARPIT, "tarpit"),
    (VerdictKind.BLOCK_HELLO, "block_hello"),
    (VerdictKind.HELLO_EXEMPT, "hello_exempt"),
)


def hello_target(key: int) -> str:
    """How a hello key is shown and named: "hello:<16 hex digits>"."""
    return f"hello:{key:016x}"


def _is_cidr(target: object) -> bool:
    if isinstance(target, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return True
    return isinstance(target, str) and "/" in target


def _gcra(rate: float, burst: int) -> tuple[int, int]:
    """Interval and tolerance for bpf/common.h's throttle buckets."""
    if rate == 0:
        return 0, 0
    interval = max(int(NS_PER_S / rate), 1)
    return interval, interval * (burst - 1)


def _flow_key(flow: Flow) -> abi.FlowTuple:
    key = abi.FlowTuple(sport=flow.sport, dport=flow.dport, ip_version=flow.src.version)
    key.saddr = abi.addr16(flow.src)
    key.daddr = abi.addr16(flow.dst)
    return key


def _verdict_of(value: Any) -> Any:
    return value.v if hasattr(value, "v") else value


def _describe_key(kind: VerdictKind, key: Any) -> str:
    if kind in (VerdictKind.ALLOW_CIDR, VerdictKind.BLOCK_CIDR):
        lpm = abi.LpmKey.from_buffer_copy(key)
        return str(abi.network_from_lpm_key(lpm))
    if kind is VerdictKind.BLOCK_FLOW:
        from sensor.events import flow_from_abi

        return str(flow_from_abi(abi.FlowTuple.from_buffer_copy(key)))
    if kind is VerdictKind.BLOCK_HELLO:
        return hello_target(key.value)
    raw = bytes(abi.Addr16.from_buffer_copy(key).b)
    version = 4 if raw[:12] == abi.IPV4_MAPPED_PREFIX else 6
    return str(abi.addr_from_bytes(raw, version))


def _detail(kind: VerdictKind, value: Any) -> dict[str, float]:
    if kind is VerdictKind.THROTTLE:
        return {
            "connections_per_s": NS_PER_S / value.conn_interval_ns
            if value.conn_interval_ns
            else 0.0,
            "packets_per_s": NS_PER_S / value.pkt_interval_ns if value.pkt_interval_ns else 0.0,
        }
    if kind is VerdictKind.TARPIT:
        return {"syns_to_drop": float(value.syns_to_drop)}
    return {}
