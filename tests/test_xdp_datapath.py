"""The XDP program, row by row: a packet (or a short sequence), the verdicts before it,
the action it gets, the exact counters it moves and the events it writes.

Every row runs the real program through BPF_PROG_TEST_RUN on a sensor loaded once for
the module and reset between rows. A row with several packets lists one action per
packet; its counters are the sum over the row and its events all it wrote, in order.
Sequences that must look at map state (per-source counters, the flow table) are the
plain tests at the end.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import rdpcap

from sensor.abi import HELLO_MAX_BYTES, HTTP_HEAD_MAX_BYTES, FlowEndReason, SynQuirk
from sensor.abi import Counter as C
from sensor.errors import MapError
from sensor.events import (
    ClientHelloSegment,
    Flow,
    FlowEnd,
    HttpRequestHead,
    SynEvent,
)
from sensor.libbpf import prog_test_run
from tests.kernel import KernelSensor, loaded_sensor

pytestmark = pytest.mark.kernel

TLS_FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"

# ---- the cast: one client and one server per family, and a neighbour of the client ----

MAC_CLIENT, MAC_SERVER = "02:00:00:00:00:01", "02:00:00:00:00:02"
CPORT, SEQ = 40000, 1000


@dataclass(frozen=True)
class Family:
    v: int
    client: str
    server: str
    neighbour: str  # outside `net`
    net: str  # the client's /24 or /64

    def flow(self, sport: int = CPORT, dport: int = 443, src: str | None = None) -> Flow:
        return Flow(
            ipaddress.ip_address(src or self.client),
            sport,
            ipaddress.ip_address(self.server),
            dport,
        )


V4 = Family(4, "192.0.2.10", "198.51.100.1", "192.0.3.10", "192.0.2.0/24")
V6 = Family(6, "2001:db8:c::10", "2001:db8:5::1", "2001:db8:c:1::10", "2001:db8:c::/64")
FAMILIES = (V4, V6)


def seg(
    fam: Family = V4,
    flags: str = "S",
    *,
    sport: int = CPORT,
    dport: int = 443,
    seq: int = SEQ,
    payload: bytes = b"",
    src: str | None = None,
    tags: Sequence[Packet] = (),
    ext: Sequence[Packet] = (),
    ip: Mapping[str, Any] | None = None,
    **tcp: Any,
) -> Packet:
    """Ethernet [VLAN tags] IPv4/IPv6 [extension headers] TCP [payload], client -> server."""
    frame: Packet = Ether(src=MAC_CLIENT, dst=MAC_SERVER)
    for tag in tags:
        frame = frame / tag
    src = src or fam.client
    net = (
        IP(src=src, dst=fam.server, **(ip or {}))
        if fam.v == 4
        else IPv6(src=src, dst=fam.server, **(ip or {}))
    )
    for header in ext:
        net = net / header
    packet = frame / net / TCP(sport=sport, dport=dport, flags=flags, seq=seq, **tcp)
    return packet / Raw(payload) if payload else packet


def data(fam: Family = V4, payload: bytes = b"x" * 100, **kw: Any) -> Packet:
    """A client data segment (PSH ACK) on an established flow."""
    return seg(fam, "PA", payload=payload, ack=1, **kw)


def l2(*layers: Packet, ethertype: int | None = None) -> Packet:
    """Ethernet and whatever follows; ethertype for a payload scapy cannot name."""
    frame: Packet = Ether(src=MAC_CLIENT, dst=MAC_SERVER)
    if ethertype is not None:
        frame.type = ethertype
    for layer in layers:
        frame = frame / layer
    return frame


# ---- verdicts written before a row's first packet ----

Given = Callable[[KernelSensor], None]
LIVE_TTL_S = 600
EXPIRED_TTL_S = 1  # written PAST_S back in kernel time: already expired


def _maps(k: KernelSensor, expired: bool) -> Any:
    return k.past if expired else k.verdicts


def _ttl(expired: bool) -> int:
    return EXPIRED_TTL_S if expired else LIVE_TTL_S


def block(target: str, *, expired: bool = False) -> Given:
    return lambda k: _maps(k, expired).block(target, _ttl(expired), "row")


def allow(target: str, *, expired: bool = False) -> Given:
    return lambda k: _maps(k, expired).allow(target, _ttl(expired), "row")


def block_flow(flow: Flow, *, expired: bool = False) -> Given:
    return lambda k: _maps(k, expired).block_flow(flow, _ttl(expired), "row")


def throttle(target: str, *, expired: bool = False, **rates: float) -> Given:
    return lambda k: _maps(k, expired).throttle(target, _ttl(expired), "row", **rates)


def tarpit(target: str, syns_to_drop: int, *, expired: bool = False) -> Given:
    return lambda k: _maps(k, expired).tarpit(
        target, _ttl(expired), "row", syns_to_drop=syns_to_drop
    )


# Rates so slow that no token comes back while a row runs: only the burst matters.
SLOW = 0.01  # per second: one token per 100 s


# ---- expected events: the type and the fields that matter ----


@dataclass(frozen=True)
class Expect:
    kind: type
    fields: Mapping[str, object]


def expect_syn(flow: Flow, **fields: object) -> Expect:
    return Expect(SynEvent, {"flow": flow, **fields})


def expect_hello(
    flow: Flow, hello_index: int, segment_index: int, data: bytes, **fields: object
) -> Expect:
    return Expect(
        ClientHelloSegment,
        {
            "flow": flow,
            "hello_index": hello_index,
            "segment_index": segment_index,
            "data": data,
            **fields,
        },
    )


def expect_http(flow: Flow, data: bytes, **fields: object) -> Expect:
    return Expect(HttpRequestHead, {"flow": flow, "data": data, **fields})


def expect_end(flow: Flow, reason: FlowEndReason, **fields: object) -> Expect:
    return Expect(FlowEnd, {"flow": flow, "reason": reason, **fields})


# ---- rows ----


@dataclass(frozen=True)
class Row:
    name: str
    packets: tuple[Packet | bytes, ...]
    actions: tuple[str, ...]  # one per packet
    counters: Mapping[C, int]  # exact deltas over the row; absent means 0
    events: tuple[Expect, ...] = ()
    given: tuple[Given, ...] = field(default=())


def row(
    name: str,
    packets: Packet | bytes | Sequence[Packet | bytes],
    actions: str | Sequence[str],
    counters: Mapping[C, int],
    events: Sequence[Expect] = (),
    given: Sequence[Given] = (),
) -> Row:
    """One action for every packet, or one action per packet."""
    packets = (packets,) if isinstance(packets, Packet | bytes) else tuple(packets)
    actions = (actions,) * len(packets) if isinstance(actions, str) else tuple(actions)
    assert len(actions) == len(packets), name
    return Row(name, packets, actions, counters, tuple(events), tuple(given))


PASS, DROP = "XDP_PASS", "XDP_DROP"
PASSED_SYN = {C.PASS: 1, C.EVENT_SYN: 1}
NOT_WATCHED = {C.PASS_NOT_WATCHED: 1}
MALFORMED = {C.PASS_MALFORMED: 1}
FRAGMENT = {C.PASS_FRAGMENT: 1}


def _verdict_rows(f: Family) -> Iterator[Row]:
    v = f"v{f.v}"
    flow, other_port = f.flow(), f.flow(sport=CPORT + 1)
    yield row(f"{v} no verdict: SYN passes", seg(f), PASS, PASSED_SYN, [expect_syn(flow)])
    yield row(
        f"{v} block address: SYN dropped", seg(f), DROP, {C.DROP_BLOCK: 1}, given=[block(f.client)]
    )
    yield row(
        f"{v} block address: data dropped",
        data(f),
        DROP,
        {C.DROP_BLOCK: 1},
        given=[block(f.client)],
    )
    yield row(
        f"{v} block of another address: passes",
        seg(f),
        PASS,
        PASSED_SYN,
        [expect_syn(flow)],
        given=[block(f.neighbour)],
    )
    yield row(
        f"{v} block CIDR: member dropped",
        seg(f),
        DROP,
        {C.DROP_BLOCK_CIDR: 1},
        given=[block(f.net)],
    )
    yield row(
        f"{v} block CIDR: neighbour outside passes",
        seg(f, src=f.neighbour),
        PASS,
        PASSED_SYN,
        [expect_syn(f.flow(src=f.neighbour))],
        given=[block(f.net)],
    )
    yield row(
        f"{v} block flow: that 5-tuple dropped, next source port passes",
        [seg(f), seg(f, sport=CPORT + 1)],
        [DROP, PASS],
        {C.DROP_BLOCK_FLOW: 1, **PASSED_SYN},
        [expect_syn(other_port)],
        given=[block_flow(flow)],
    )
    yield row(
        f"{v} block flow: same ports to another service passes",
        seg(f, dport=80),
        PASS,
        PASSED_SYN,
        [expect_syn(f.flow(dport=80))],
        given=[block_flow(flow)],
    )

    # Throttle on new connections: the first `burst` SYNs pass, then drop.
    syns = [seg(f, sport=CPORT + i) for i in range(5)]
    yield row(
        f"{v} throttle connections: within burst all pass",
        syns[:3],
        PASS,
        {C.HIT_THROTTLE: 3, C.PASS: 3, C.EVENT_SYN: 3},
        [expect_syn(f.flow(sport=CPORT + i)) for i in range(3)],
        given=[throttle(f.client, connections_per_s=SLOW, connection_burst=3)],
    )
    yield row(
        f"{v} throttle connections: above burst dropped",
        syns,
        [PASS] * 3 + [DROP] * 2,
        {C.HIT_THROTTLE: 5, C.PASS: 3, C.DROP_THROTTLE_CONN: 2, C.EVENT_SYN: 3},
        [expect_syn(f.flow(sport=CPORT + i)) for i in range(3)],
        given=[throttle(f.client, connections_per_s=SLOW, connection_burst=3)],
    )
    yield row(
        f"{v} throttle connections: data of an open flow is not a connection",
        [seg(f), seg(f, sport=CPORT + 1), data(f)],
        [PASS, DROP, PASS],
        {C.HIT_THROTTLE: 3, C.PASS: 2, C.DROP_THROTTLE_CONN: 1, C.EVENT_SYN: 1},
        [expect_syn(flow)],
        given=[throttle(f.client, connections_per_s=SLOW, connection_burst=1)],
    )
    yield row(
        f"{v} throttle packets: within burst all pass",
        [data(f)] * 3,
        PASS,
        {C.HIT_THROTTLE: 3, C.PASS: 3},
        given=[throttle(f.client, packets_per_s=SLOW, packet_burst=3)],
    )
    yield row(
        f"{v} throttle packets: above burst dropped",
        [data(f)] * 5,
        [PASS] * 3 + [DROP] * 2,
        {C.HIT_THROTTLE: 5, C.PASS: 3, C.DROP_THROTTLE_PKT: 2},
        given=[throttle(f.client, packets_per_s=SLOW, packet_burst=3)],
    )
    yield row(
        f"{v} throttle packets: a SYN is a packet",
        [seg(f), seg(f), seg(f)],
        [PASS, PASS, DROP],
        {C.HIT_THROTTLE: 3, C.PASS: 2, C.DROP_THROTTLE_PKT: 1, C.EVENT_SYN: 2},
        [expect_syn(flow), expect_syn(flow)],
        given=[throttle(f.client, packets_per_s=SLOW, packet_burst=2)],
    )
    yield row(
        f"{v} throttle both: a SYN over the connection rate takes no packet token",
        [seg(f), seg(f, sport=CPORT + 1), data(f), data(f)],
        [PASS, DROP, PASS, DROP],
        {
            C.HIT_THROTTLE: 4,
            C.PASS: 2,
            C.DROP_THROTTLE_CONN: 1,
            C.DROP_THROTTLE_PKT: 1,
            C.EVENT_SYN: 1,
        },
        [expect_syn(flow)],
        given=[
            throttle(
                f.client,
                connections_per_s=SLOW,
                connection_burst=1,
                packets_per_s=SLOW,
                packet_burst=2,
            )
        ],
    )
    yield row(
        f"{v} throttle of another address: no hit",
        [data(f)] * 3,
        PASS,
        {C.PASS: 3},
        given=[throttle(f.neighbour, packets_per_s=SLOW, packet_burst=1)],
    )

    # Tarpit: the first K SYNs of each connection (5-tuple) are dropped.
    yield row(
        f"{v} tarpit 2: third SYN of a connection passes",
        [seg(f)] * 3,
        [DROP, DROP, PASS],
        {C.HIT_TARPIT: 3, C.DROP_TARPIT: 2, **PASSED_SYN},
        [expect_syn(flow)],
        given=[tarpit(f.client, 2)],
    )
    yield row(
        f"{v} tarpit 1: a new source port starts over",
        [seg(f), seg(f), seg(f, sport=CPORT + 1), seg(f, sport=CPORT + 1)],
        [DROP, PASS, DROP, PASS],
        {C.HIT_TARPIT: 4, C.DROP_TARPIT: 2, C.PASS: 2, C.EVENT_SYN: 2},
        [expect_syn(flow), expect_syn(other_port)],
        given=[tarpit(f.client, 1)],
    )
    yield row(
        f"{v} tarpit: data and bare ACKs are not tarpitted",
        [data(f), seg(f, "A")],
        PASS,
        {C.PASS: 2},
        given=[tarpit(f.client, 6)],
    )

    # Allow wins over every block, and is skipped once expired.
    yield row(
        f"{v} allow address over block address",
        seg(f),
        PASS,
        {C.HIT_ALLOW: 1, C.PASS_ALLOWED: 1, C.EVENT_SYN: 1},
        [expect_syn(flow)],
        given=[block(f.client), allow(f.client)],
    )
    yield row(
        f"{v} allow CIDR over block address",
        seg(f),
        PASS,
        {C.HIT_ALLOW_CIDR: 1, C.PASS_ALLOWED: 1, C.EVENT_SYN: 1},
        [expect_syn(flow)],
        given=[block(f.client), allow(f.net)],
    )
    yield row(
        f"{v} allow address over block CIDR",
        seg(f),
        PASS,
        {C.HIT_ALLOW: 1, C.PASS_ALLOWED: 1, C.EVENT_SYN: 1},
        [expect_syn(flow)],
        given=[block(f.net), allow(f.client)],
    )
    yield row(
        f"{v} allow CIDR over throttle and tarpit",
        [seg(f)] * 2,
        PASS,
        {C.HIT_ALLOW_CIDR: 2, C.PASS_ALLOWED: 2, C.EVENT_SYN: 2},
        [expect_syn(flow)] * 2,
        given=[
            allow(f.net),
            tarpit(f.client, 6),
            throttle(f.client, connections_per_s=SLOW, connection_burst=1),
        ],
    )
    yield row(
        f"{v} allow of another address: block applies",
        seg(f),
        DROP,
        {C.DROP_BLOCK: 1},
        given=[block(f.client), allow(f.neighbour)],
    )

    # Expired verdicts are ignored, and counted each time they are found.
    yield row(
        f"{v} expired block address passes",
        seg(f),
        PASS,
        {C.VERDICT_EXPIRED: 1, **PASSED_SYN},
        [expect_syn(flow)],
        given=[block(f.client, expired=True)],
    )
    yield row(
        f"{v} expired block CIDR passes",
        seg(f),
        PASS,
        {C.VERDICT_EXPIRED: 1, **PASSED_SYN},
        [expect_syn(flow)],
        given=[block(f.net, expired=True)],
    )
    yield row(
        f"{v} expired block flow passes",
        seg(f),
        PASS,
        {C.VERDICT_EXPIRED: 1, **PASSED_SYN},
        [expect_syn(flow)],
        given=[block_flow(flow, expired=True)],
    )
    yield row(
        f"{v} expired throttle passes",
        [seg(f), seg(f, sport=CPORT + 1)],
        PASS,
        {C.VERDICT_EXPIRED: 2, C.PASS: 2, C.EVENT_SYN: 2},
        [expect_syn(flow), expect_syn(other_port)],
        given=[throttle(f.client, expired=True, connections_per_s=SLOW)],
    )
    yield row(
        f"{v} expired tarpit passes",
        seg(f),
        PASS,
        {C.VERDICT_EXPIRED: 1, **PASSED_SYN},
        [expect_syn(flow)],
        given=[tarpit(f.client, 6, expired=True)],
    )
    yield row(
        f"{v} expired allow: block applies",
        seg(f),
        DROP,
        {C.VERDICT_EXPIRED: 1, C.DROP_BLOCK: 1},
        given=[allow(f.client, expired=True), block(f.client)],
    )
    yield row(
        f"{v} expired block, live CIDR block behind it",
        seg(f),
        DROP,
        {C.VERDICT_EXPIRED: 1, C.DROP_BLOCK_CIDR: 1},
        given=[block(f.client, expired=True), block(f.net)],
    )


def _scope_rows() -> Iterator[Row]:
    """Verdicts apply to watched ports only, by design: SSH and the rest of the host
    must never be cut off by a bot verdict. Nothing else is observed either."""
    blocked = [block(V4.client), block(V6.client)]
    for f in FAMILIES:
        v = f"v{f.v}"
        yield row(
            f"{v} blocked source, unwatched port 22",
            seg(f, dport=22),
            PASS,
            NOT_WATCHED,
            given=blocked,
        )
        yield row(
            f"{v} from port 443 to a client port: the server's side, not watched",
            seg(f, "SA", sport=443, dport=CPORT, src=f.server),
            PASS,
            NOT_WATCHED,
            given=[block(f.server)],
        )
        net = IP(src=f.client, dst=f.server) if f.v == 4 else IPv6(src=f.client, dst=f.server)
        yield row(
            f"{v} UDP to 443 (QUIC) is not TCP",
            l2(net, UDP(sport=CPORT, dport=443)),
            PASS,
            NOT_WATCHED,
            given=blocked,
        )
    yield row(
        "v4 ICMP echo",
        l2(IP(src=V4.client, dst=V4.server), ICMP()),
        PASS,
        NOT_WATCHED,
        given=blocked,
    )
    yield row(
        "v6 ICMPv6 echo",
        l2(IPv6(src=V6.client, dst=V6.server), ICMPv6EchoRequest()),
        PASS,
        NOT_WATCHED,
        given=blocked,
    )
    yield row(
        "v6 UDP behind a hop-by-hop header",
        l2(IPv6(src=V6.client, dst=V6.server), IPv6ExtHdrHopByHop(), UDP(sport=CPORT, dport=443)),
        PASS,
        NOT_WATCHED,
        given=blocked,
    )
    yield row("ARP", l2(ARP(psrc=V4.client, pdst=V4.server)), PASS, NOT_WATCHED, given=blocked)
    yield row(
        "ARP in 802.1Q", l2(Dot1Q(vlan=10), ARP(psrc=V4.client)), PASS, NOT_WATCHED, given=blocked
    )
    # MAX_VLAN_DEPTH is 2: under a third tag the sensor sees EtherType 0x8100, not IP.
    yield row(
        "three VLAN tags: beyond the walked depth, not watched",
        seg(V4, tags=[Dot1AD(vlan=1), Dot1Q(vlan=2), Dot1Q(vlan=3)]),
        PASS,
        NOT_WATCHED,
        given=blocked,
    )


def _encapsulation_rows() -> Iterator[Row]:
    flow4, flow6 = V4.flow(), V6.flow()
    dot1q, qinq = [Dot1Q(vlan=10)], [Dot1AD(vlan=100), Dot1Q(vlan=10)]
    old_qinq = [Dot1Q(vlan=100), Dot1Q(vlan=10)]  # 0x8100 outside too, as older switches do
    for name, tags in (("802.1Q", dot1q), ("802.1ad QinQ", qinq), ("0x8100 QinQ", old_qinq)):
        for f in FAMILIES:
            yield row(
                f"v{f.v} {name}: SYN parsed",
                seg(f, tags=tags),
                PASS,
                PASSED_SYN,
                [expect_syn(f.flow(), ip_total_len=40 if f.v == 4 else 60)],
            )
            yield row(
                f"v{f.v} {name}: blocked source dropped",
                seg(f, tags=tags),
                DROP,
                {C.DROP_BLOCK: 1},
                given=[block(f.client)],
            )

    hbh, rh, dst = IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt()
    options = {"mss": 1460, "wscale": 7, "options": (2, 4, 8, 1, 3), "options_len": 20}
    yield row(
        "v6 QinQ and two extension headers: SYN options read at the right offset",
        seg(V6, tags=qinq, ext=[hbh, dst], options=STANDARD_OPTIONS),
        PASS,
        PASSED_SYN,
        [expect_syn(flow6, ip_total_len=40 + 16 + 40, **options)],
    )
    yield row(
        "v4 802.1Q and IP options: SYN options read at the right offset",
        seg(V4, tags=dot1q, ip={"options": [IPOption_Router_Alert()]}, options=STANDARD_OPTIONS),
        PASS,
        PASSED_SYN,
        [expect_syn(flow4, ip_total_len=24 + 40, **options)],
    )
    first_frag = IPv6ExtHdrFragment(offset=0, m=1, id=7)
    for name, ext in (
        ("hop-by-hop", [hbh]),
        ("routing", [rh]),
        ("destination options", [dst]),
        ("first fragment", [first_frag]),
        ("hop-by-hop, dest options, routing, fragment", [hbh, dst, rh, first_frag]),
        # Exactly MAX_IPV6_EXT_HEADERS: the parser used to refuse it as malformed.
        ("six extension headers (the walked maximum)", [dst] * 6),
    ):
        total = 40 + 8 * len(ext) + 20
        yield row(
            f"v6 {name}: SYN parsed",
            seg(V6, ext=ext),
            PASS,
            PASSED_SYN,
            [expect_syn(flow6, ip_total_len=total, payload_len=0)],
        )
        yield row(
            f"v6 {name}: blocked source dropped",
            seg(V6, ext=ext),
            DROP,
            {C.DROP_BLOCK: 1},
            given=[block(V6.client)],
        )
    yield row(
        "v6 non-first fragment: no TCP header, passes even if blocked",
        l2(
            IPv6(src=V6.client, dst=V6.server),
            IPv6ExtHdrFragment(offset=185, m=0, id=7, nh=6),
            Raw(bytes(40)),
        ),
        PASS,
        FRAGMENT,
        given=[block(V6.client)],
    )
    yield row(
        "v6 non-first fragment behind hop-by-hop",
        l2(
            IPv6(src=V6.client, dst=V6.server),
            IPv6ExtHdrHopByHop(),
            IPv6ExtHdrFragment(offset=1, m=1, id=7, nh=6),
            Raw(bytes(40)),
        ),
        PASS,
        FRAGMENT,
        given=[block(V6.client)],
    )

    router_alert = [IPOption_Router_Alert()]
    record_route = [IPOption_RR(routers=["0.0.0.0"] * 9)]  # 39 bytes + EOL: ihl 15
    yield row(
        "v4 options (router alert, ihl 6): SYN parsed",
        seg(V4, ip={"options": router_alert}),
        PASS,
        PASSED_SYN,
        [expect_syn(flow4, ip_total_len=44)],
    )
    yield row(
        "v4 options (record route, ihl 15): SYN parsed",
        seg(V4, ip={"options": record_route}),
        PASS,
        PASSED_SYN,
        [expect_syn(flow4, ip_total_len=80)],
    )
    yield row(
        "v4 options: blocked source dropped",
        seg(V4, ip={"options": record_route}),
        DROP,
        {C.DROP_BLOCK: 1},
        given=[block(V4.client)],
    )
    yield row(
        "v4 first fragment (MF, offset 0): SYN parsed",
        seg(V4, ip={"flags": "MF", "id": 99}),
        PASS,
        PASSED_SYN,
        [expect_syn(flow4, df=False, ip_id=99)],
    )
    yield row(
        "v4 non-first fragment: passes even if blocked",
        l2(IP(src=V4.client, dst=V4.server, frag=1, proto=6), Raw(bytes(40))),
        PASS,
        FRAGMENT,
        given=[block(V4.client)],
    )
    yield row(
        "v4 last fragment with DF set: still a fragment",
        l2(IP(src=V4.client, dst=V4.server, frag=100, flags="DF", proto=6), Raw(bytes(40))),
        PASS,
        FRAGMENT,
        given=[block(V4.client)],
    )


def _raw_ip(ip: Packet, keep: int) -> bytes:
    return bytes(ip)[:keep]


def _malformed_rows() -> Iterator[Row]:
    """Fail open: whatever cannot be parsed passes untouched, even from a blocked source."""
    blocked = [block(V4.client), block(V6.client)]
    ip4, ip6 = IP(src=V4.client, dst=V4.server), IPv6(src=V6.client, dst=V6.server)
    syn = TCP(sport=CPORT, dport=443, flags="S")
    cases: list[tuple[str, Packet]] = [
        # Ethernet: BPF_PROG_TEST_RUN refuses frames under 14 bytes (see
        # test_kernel_refuses_frames_shorter_than_ethernet); this is the shortest.
        (
            "Ethernet header and nothing after it",
            Ether(src=MAC_CLIENT, dst=MAC_SERVER, type=0x0800),
        ),
        ("802.1Q tag cut short", l2(Raw(b"\x00\x0a"), ethertype=0x8100)),
        ("802.1ad inner tag cut short", l2(Dot1AD(vlan=100, type=0x8100), Raw(b"\x00"))),
        ("IPv4 header cut short", l2(Raw(_raw_ip(ip4 / syn, 19)), ethertype=0x0800)),
        ("IPv4 ihl 4", l2(IP(src=V4.client, dst=V4.server, ihl=4), syn)),
        ("IPv4 ihl 15 beyond the packet", l2(IP(src=V4.client, dst=V4.server, ihl=15), syn)),
        ("IPv4 total length below the header", l2(IP(src=V4.client, dst=V4.server, len=19), syn)),
        (
            "IPv4 total length ends inside the options",
            l2(IP(src=V4.client, dst=V4.server, options=[IPOption_Router_Alert()], len=22), syn),
        ),
        (
            "IPv4 version 6 in an IPv4 EtherType",
            l2(IP(src=V4.client, dst=V4.server, version=6), syn),
        ),
        ("IPv6 header cut short", l2(Raw(_raw_ip(ip6 / syn, 39)), ethertype=0x86DD)),
        (
            "IPv6 version 4 in an IPv6 EtherType",
            l2(IPv6(src=V6.client, dst=V6.server, version=4), syn),
        ),
        (
            "IPv6 extension header cut before its length",
            l2(IPv6(src=V6.client, dst=V6.server, nh=0), Raw(b"\x06")),
        ),
        (
            "IPv6 extension header longer than the packet",
            l2(IPv6(src=V6.client, dst=V6.server, nh=0), Raw(b"\x06\x05" + bytes(6))),
        ),
        (
            "IPv6 fragment header cut short",
            l2(IPv6(src=V6.client, dst=V6.server, nh=44), Raw(b"\x06\x00\x00")),
        ),
        (
            "IPv6 seven extension headers (one more than walked)",
            l2(ip6, *[IPv6ExtHdrDestOpt()] * 7, syn),
        ),
        (
            "IPv6 payload length shorter than its extension headers",
            l2(IPv6(src=V6.client, dst=V6.server, plen=4), IPv6ExtHdrHopByHop(), syn),
        ),
        (
            "TCP header cut short (v4)",
            l2(IP(src=V4.client, dst=V4.server, proto=6), Raw(bytes(syn)[:19])),
        ),
        (
            "TCP header cut short (v6)",
            l2(IPv6(src=V6.client, dst=V6.server, nh=6), Raw(bytes(syn)[:12])),
        ),
        ("TCP data offset 4", l2(ip4, TCP(sport=CPORT, dport=443, flags="S", dataofs=4))),
        (
            "TCP data offset 15 beyond the packet (v4)",
            l2(ip4, TCP(sport=CPORT, dport=443, flags="S", dataofs=15)),
        ),
        (
            "TCP data offset 15 beyond the packet (v6)",
            l2(ip6, TCP(sport=CPORT, dport=443, flags="S", dataofs=15)),
        ),
        (
            "IPv4 total length ends inside the TCP options",
            l2(
                IP(src=V4.client, dst=V4.server, len=40),
                TCP(sport=CPORT, dport=443, flags="S", options=[("MSS", 1460), ("WScale", 7)]),
            ),
        ),
    ]
    for name, packet in cases:
        yield row(f"malformed: {name}", packet, PASS, MALFORMED, given=blocked)


STANDARD_OPTIONS = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (123, 0)),
    ("NOP", None),
    ("WScale", 7),
]
NO_OPTIONS = {"options": (), "options_len": 0, "mss": None, "wscale": None}


def _syn_field_rows(f: Family) -> Iterator[Row]:
    v, flow = f"v{f.v}", f.flow()
    hdr = 20 if f.v == 4 else 40
    ip_defaults = {"ttl": 64, "df": f.v == 6, "ip_id": 1 if f.v == 4 else 0}
    ip = {"ttl": 57, "id": 0x1234, "flags": "DF"} if f.v == 4 else {"hlim": 57}

    def syn_row(name: str, packet: Packet, **fields: object) -> Row:
        return row(
            f"{v} SYN fields: {name}", packet, PASS, PASSED_SYN, [expect_syn(flow, **fields)]
        )

    yield syn_row(
        "a Linux-like SYN",
        seg(f, ip=ip, seq=0x01020304, window=64240, options=STANDARD_OPTIONS),
        ttl=57,
        df=True,
        ip_id=0x1234 if f.v == 4 else 0,
        window=64240,
        seq=0x01020304,
        mss=1460,
        wscale=7,
        options=(2, 4, 8, 1, 3),
        options_len=20,
        tcp_flags=0x02,
        quirks=SynQuirk(0),
        ip_total_len=hdr + 40,
        payload_len=0,
    )
    yield syn_row(
        "no options",
        seg(f),
        **NO_OPTIONS,
        **ip_defaults,
        quirks=SynQuirk(0),
        window=8192,
        ip_total_len=hdr + 20,
    )
    yield syn_row(
        "end-of-list option",
        seg(f, options=[("MSS", 1360), ("EOL", None)]),
        options=(2, 0),
        options_len=8,
        mss=1360,
        wscale=None,
        quirks=SynQuirk(0),
    )
    yield syn_row(
        "40 bytes of options (data offset 15)",
        seg(f, options=[("WScale", 14)] + [("NOP", None)] * 37),
        options_len=40,
        wscale=14,
        mss=None,
        options=(3,) + (1,) * 15,
        ip_total_len=hdr + 60,
        quirks=SynQuirk(0),
    )
    yield syn_row(
        "option length past the options: OPTIONS_TRUNCATED",
        seg(f, dataofs=7) / Raw(b"\x02\x04\x05\xb4\x03\x09\x07\x00"),
        options=(2, 3),
        options_len=8,
        mss=1460,
        wscale=None,
        payload_len=0,
        quirks=SynQuirk.OPTIONS_TRUNCATED,
    )
    yield syn_row(
        "ECE and CWR: ECN_SETUP", seg(f, "SEC"), tcp_flags=0xC2, quirks=SynQuirk.ECN_SETUP
    )
    yield syn_row("ECE alone is not ECN setup", seg(f, "SE"), tcp_flags=0x42, quirks=SynQuirk(0))
    ect = {"tos": 0x02} if f.v == 4 else {"tc": 0x02}
    ce = {"tos": 0x03} if f.v == 4 else {"tc": 0x03}
    dscp_only = {"tos": 0xB8} if f.v == 4 else {"tc": 0xB8}
    yield syn_row("ECT(0) in the IP header: ECN_IP", seg(f, ip=ect), quirks=SynQuirk.ECN_IP)
    yield syn_row("CE in the IP header: ECN_IP", seg(f, ip=ce), quirks=SynQuirk.ECN_IP)
    yield syn_row("DSCP EF without ECN bits", seg(f, ip=dscp_only), quirks=SynQuirk(0))
    yield syn_row(
        "ack number without ACK: ACK_NONZERO", seg(f, ack=12345), quirks=SynQuirk.ACK_NONZERO
    )
    yield syn_row(
        "urgent pointer without URG: URG_NONZERO", seg(f, urgptr=7), quirks=SynQuirk.URG_NONZERO
    )
    yield syn_row(
        "payload in the SYN: DATA",
        seg(f, payload=b"early"),
        payload_len=5,
        ip_total_len=hdr + 25,
        quirks=SynQuirk.DATA,
    )
    yield syn_row(
        "Ethernet padding is not payload", _padded(seg(f), 6), payload_len=0, quirks=SynQuirk(0)
    )
    yield syn_row(
        "every quirk the kernel sees at once",
        seg(f, "SEC", ip=ect if f.v == 4 else {**ect, "fl": 1}, ack=1, urgptr=1, payload=b"d"),
        quirks=SynQuirk.ECN_SETUP
        | SynQuirk.ECN_IP
        | SynQuirk.ACK_NONZERO
        | SynQuirk.URG_NONZERO
        | SynQuirk.DATA
        | (SynQuirk.FLOW_LABEL if f.v == 6 else SynQuirk(0)),
    )
    if f.v == 4:
        yield syn_row(
            "IP ID 0 with DF: IP_ID_ZERO",
            seg(f, ip={"id": 0, "flags": "DF"}),
            ip_id=0,
            df=True,
            quirks=SynQuirk.IP_ID_ZERO,
        )
        yield syn_row(
            "IP ID 0 without DF: no quirk",
            seg(f, ip={"id": 0}),
            ip_id=0,
            df=False,
            quirks=SynQuirk(0),
        )
    else:
        for label in (0x12345, 0x10000, 0x00001):
            yield syn_row(
                f"flow label {label:#07x}: FLOW_LABEL",
                seg(f, ip={"fl": label}),
                quirks=SynQuirk.FLOW_LABEL,
                df=True,
                ip_id=0,
            )
        yield syn_row(
            "traffic class without flow label", seg(f, ip={"tc": 0xB8}), quirks=SynQuirk(0)
        )


def _padded(packet: Packet, pad: int) -> bytes:
    return bytes(packet) + bytes(pad)


@cache
def real_client_hello() -> bytes:
    """A real ClientHello (517 bytes, one TCP segment) from the shared fixtures."""
    capture = rdpcap(str(TLS_FIXTURES / "tls12.pcap"))
    payload = bytes(capture[0][TCP].payload)
    assert payload[:1] == b"\x16" and payload[5:6] == b"\x01" and len(payload) == 517
    return payload


def client_hello(body_len: int) -> bytes:
    """A TLS record holding a ClientHello with a body of body_len bytes (content zero):
    the kernel reads only the record and handshake headers."""
    record_len = 4 + body_len
    return (
        b"\x16\x03\x01"
        + record_len.to_bytes(2, "big")
        + b"\x01"
        + body_len.to_bytes(3, "big")
        + bytes(body_len)
    )


CCS = bytes.fromhex("140303000101")  # ChangeCipherSpec, middlebox-compatibility mode


def _hello_rows() -> Iterator[Row]:
    flow = V4.flow()
    ch = real_client_hello()
    head, tail = ch[:300], ch[300:]

    def seg_at(payload: bytes, seq: int, fam: Family = V4) -> Packet:
        return data(fam, payload, seq=seq)

    yield row(
        "hello in one segment",
        seg_at(ch, 5000),
        PASS,
        {C.PASS: 1, C.EVENT_HELLO: 1},
        [expect_hello(flow, 1, 1, ch, payload_len=517, seq=5000)],
    )
    yield row(
        "v6 hello in one segment",
        seg_at(ch, 5000, V6),
        PASS,
        {C.PASS: 1, C.EVENT_HELLO: 1},
        [expect_hello(V6.flow(), 1, 1, ch, payload_len=517, seq=5000)],
    )
    yield row(
        "hello after the handshake: SYN, ACK, hello",
        [seg(V4), seg(V4, "A", ack=1), seg_at(ch, SEQ + 1)],
        PASS,
        {C.PASS: 3, C.EVENT_SYN: 1, C.EVENT_HELLO: 1},
        [expect_syn(flow), expect_hello(flow, 1, 1, ch, seq=SEQ + 1)],
    )
    yield row(
        "hello over two segments: the second is captured as segment 2",
        [seg_at(head, 5000), seg_at(tail, 5300)],
        PASS,
        {C.PASS: 2, C.EVENT_HELLO: 2},
        [
            expect_hello(flow, 1, 1, head, payload_len=300, seq=5000),
            expect_hello(flow, 1, 2, tail, payload_len=217, seq=5300),
        ],
    )
    yield row(
        "hello over three segments: the third is not captured",
        [seg_at(ch[:200], 5000), seg_at(ch[200:400], 5200), seg_at(ch[400:], 5400)],
        PASS,
        {C.PASS: 3, C.EVENT_HELLO: 2},
        [expect_hello(flow, 1, 1, ch[:200]), expect_hello(flow, 1, 2, ch[200:400])],
    )
    yield row(
        "a complete hello does not capture the next segment",
        [seg_at(ch, 5000), seg_at(b"\x16\x03\x03\x00\x46\x10" + bytes(70), 5517)],
        PASS,
        {C.PASS: 2, C.EVENT_HELLO: 1},
        [expect_hello(flow, 1, 1, ch)],
    )
    yield row(
        "second hello after HelloRetryRequest, behind ChangeCipherSpec",
        [seg_at(ch, 5000), seg_at(CCS + ch, 5517)],
        PASS,
        {C.PASS: 2, C.EVENT_HELLO: 2},
        [
            expect_hello(flow, 1, 1, ch),
            expect_hello(flow, 2, 1, CCS + ch, payload_len=523, seq=5517),
        ],
    )
    yield row(
        "second hello after HelloRetryRequest, without ChangeCipherSpec",
        [seg_at(ch, 5000), seg_at(ch, 5517)],
        PASS,
        {C.PASS: 2, C.EVENT_HELLO: 2},
        [expect_hello(flow, 1, 1, ch), expect_hello(flow, 2, 1, ch, seq=5517)],
    )
    yield row(
        "a third hello is not captured",
        [seg_at(ch, 5000), seg_at(ch, 5517), seg_at(ch, 6034)],
        PASS,
        {C.PASS: 3, C.EVENT_HELLO: 2},
        [expect_hello(flow, 1, 1, ch), expect_hello(flow, 2, 1, ch)],
    )
    # A post-quantum-sized hello split 3000 + 3000: HELLO_MAX_BYTES caps the total.
    big = client_hello(6000 - 9)
    yield row(
        "hello over 4096 bytes: the second segment is cut at the cap",
        [seg_at(big[:3000], 5000), seg_at(big[3000:], 8000)],
        PASS,
        {C.PASS: 2, C.EVENT_HELLO: 2},
        [
            expect_hello(flow, 1, 1, big[:3000], payload_len=3000),
            expect_hello(flow, 1, 2, big[3000:HELLO_MAX_BYTES], payload_len=3000),
        ],
    )
    jumbo = client_hello(5000 - 9)
    yield row(
        "hello over 4096 bytes in one jumbo segment: cut at the cap",
        seg_at(jumbo, 5000),
        PASS,
        {C.PASS: 1, C.EVENT_HELLO: 1},
        [expect_hello(flow, 1, 1, jumbo[:HELLO_MAX_BYTES], payload_len=5000)],
    )
    yield row(
        "TLS application data is not a hello",
        seg_at(b"\x17\x03\x03\x00\x20" + bytes(32), 5000),
        PASS,
        {C.PASS: 1},
    )
    yield row(
        "a handshake record that is not a ClientHello",
        seg_at(b"\x16\x03\x03\x00\x46\x10" + bytes(70), 5000),
        PASS,
        {C.PASS: 1},
    )
    yield row(
        "a ChangeCipherSpec whose message is not 1 is no HRR prefix",
        seg_at(bytes.fromhex("140303000102") + ch, 5000),
        PASS,
        {C.PASS: 1},
    )
    yield row(
        "ChangeCipherSpec then application data (TLS 1.3 without HRR)",
        seg_at(CCS + b"\x17\x03\x03\x00\x20" + bytes(32), 5000),
        PASS,
        {C.PASS: 1},
    )
    yield row(
        "hello to the HTTP-only port 80 is not captured", data(V4, ch, dport=80), PASS, {C.PASS: 1}
    )


HTTP_GET = b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: api.example\r\nAccept: */*\r\n\r\n"


def _http_rows() -> Iterator[Row]:
    flow = V4.flow(dport=80)

    def to80(payload: bytes, fam: Family = V4, **kw: Any) -> Packet:
        return data(fam, payload, dport=80, **kw)

    yield row(
        "HTTP GET head captured",
        to80(HTTP_GET, seq=7000),
        PASS,
        {C.PASS: 1, C.EVENT_HTTP_REQUEST: 1},
        [expect_http(flow, HTTP_GET, payload_len=len(HTTP_GET), seq=7000)],
    )
    yield row(
        "v6 HTTP GET head captured",
        to80(HTTP_GET, V6),
        PASS,
        {C.PASS: 1, C.EVENT_HTTP_REQUEST: 1},
        [expect_http(V6.flow(dport=80), HTTP_GET)],
    )
    for method in ("POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"):
        request = method.encode() + b" /x HTTP/1.1\r\nHost: a\r\n\r\n"
        yield row(
            f"HTTP {method} head captured",
            to80(request),
            PASS,
            {C.PASS: 1, C.EVENT_HTTP_REQUEST: 1},
            [expect_http(flow, request)],
        )
    long_request = b"POST /upload HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 1900 + b"\r\n\r\n"
    yield row(
        "HTTP head longer than 1024 bytes is cut",
        to80(long_request),
        PASS,
        {C.PASS: 1, C.EVENT_HTTP_REQUEST: 1},
        [expect_http(flow, long_request[:HTTP_HEAD_MAX_BYTES], payload_len=len(long_request))],
    )
    yield row(
        "two requests on one keep-alive flow",
        [to80(HTTP_GET), to80(HTTP_GET)],
        PASS,
        {C.PASS: 2, C.EVENT_HTTP_REQUEST: 2},
        [expect_http(flow, HTTP_GET), expect_http(flow, HTTP_GET)],
    )
    yield row(
        "exactly 'GET ' is a request",
        to80(b"GET "),
        PASS,
        {C.PASS: 1, C.EVENT_HTTP_REQUEST: 1},
        [expect_http(flow, b"GET ")],
    )
    for name, payload in (
        ("three bytes 'GET'", b"GET"),
        ("lower-case method", b"get / HTTP/1.1\r\n\r\n"),
        ("not a method", b"HELLO / HTTP/1.1\r\n\r\n"),
        ("request body continuation", b'{"id": 7, "name": "x"}'),
        ("TLS on the HTTP port", real_client_hello()),
    ):
        yield row(f"HTTP: {name} is no request", to80(payload), PASS, {C.PASS: 1})
    yield row(
        "HTTP request to the TLS-only port 443 is not captured",
        data(V4, HTTP_GET),
        PASS,
        {C.PASS: 1},
    )


def _flow_end_rows(f: Family) -> Iterator[Row]:
    v, flow = f"v{f.v}", f.flow()
    app = b"\x17\x03\x03\x00\x40" + bytes(64)  # 69 bytes of TLS application data
    yield row(
        f"{v} flow end on FIN: retransmitted SYN, ACK, two data segments",
        [seg(f), seg(f), seg(f, "A", ack=1), data(f, app), data(f, app[:50]), seg(f, "FA", ack=1)],
        PASS,
        {C.PASS: 6, C.EVENT_SYN: 2, C.EVENT_FLOW_END: 1},
        [
            expect_syn(flow),
            expect_syn(flow),
            expect_end(
                flow,
                FlowEndReason.FIN,
                packets=6,
                bytes=119,
                data_segments=2,
                syn_count=2,
                gap_count=1,
                seen_syn=True,
                server_packets=0,
                server_bytes=0,
            ),
        ],
    )
    yield row(
        f"{v} flow end on RST",
        [seg(f), data(f, app), data(f, app), data(f, app), seg(f, "R")],
        PASS,
        {C.PASS: 5, C.EVENT_SYN: 1, C.EVENT_FLOW_END: 1},
        [
            expect_syn(flow),
            expect_end(
                flow,
                FlowEndReason.RST,
                packets=5,
                bytes=207,
                data_segments=3,
                syn_count=1,
                gap_count=2,
                seen_syn=True,
            ),
        ],
    )
    yield row(
        f"{v} FIN carrying data counts the data",
        [seg(f), seg(f, "FPA", payload=app)],
        PASS,
        {C.PASS: 2, C.EVENT_SYN: 1, C.EVENT_FLOW_END: 1},
        [
            expect_syn(flow),
            expect_end(
                flow,
                FlowEndReason.FIN,
                packets=2,
                bytes=69,
                data_segments=1,
                syn_count=1,
                gap_count=0,
            ),
        ],
    )
    yield row(
        f"{v} flow seen from mid-stream: no SYN",
        [data(f, app), seg(f, "FA")],
        PASS,
        {C.PASS: 2, C.EVENT_FLOW_END: 1},
        [
            expect_end(
                flow,
                FlowEndReason.FIN,
                packets=2,
                bytes=69,
                data_segments=1,
                syn_count=0,
                gap_count=0,
                seen_syn=False,
            )
        ],
    )
    yield row(
        f"{v} stray FIN and RST without a flow: nothing to end",
        [seg(f, "FA"), seg(f, "R")],
        PASS,
        {C.PASS: 2},
    )
    yield row(
        f"{v} a closed flow stays closed: ACK and FIN after the end",
        [seg(f), seg(f, "FA"), seg(f, "A"), seg(f, "FA")],
        PASS,
        {C.PASS: 4, C.EVENT_SYN: 1, C.EVENT_FLOW_END: 1},
        [expect_syn(flow), expect_end(flow, FlowEndReason.FIN, packets=2, syn_count=1)],
    )
    yield row(
        f"{v} RST ends one flow, not its neighbour on the next port",
        [seg(f), seg(f, sport=CPORT + 1), seg(f, "R")],
        PASS,
        {C.PASS: 3, C.EVENT_SYN: 2, C.EVENT_FLOW_END: 1},
        [
            expect_syn(flow),
            expect_syn(f.flow(sport=CPORT + 1)),
            expect_end(flow, FlowEndReason.RST, packets=2, syn_count=1),
        ],
    )


ROWS: list[Row] = [
    *(r for f in FAMILIES for r in _verdict_rows(f)),
    *_scope_rows(),
    *_encapsulation_rows(),
    *_malformed_rows(),
    *(r for f in FAMILIES for r in _syn_field_rows(f)),
    *_hello_rows(),
    *_http_rows(),
    *(r for f in FAMILIES for r in _flow_end_rows(f)),
]
assert len({r.name for r in ROWS}) == len(ROWS), "row names must be unique"


@pytest.fixture(scope="module")
def loaded() -> Iterator[KernelSensor]:
    with loaded_sensor() as kernel:
        yield kernel


@pytest.fixture
def kernel(loaded: KernelSensor) -> KernelSensor:
    loaded.reset()
    return loaded


@pytest.mark.parametrize("case", ROWS, ids=lambda r: r.name)
def test_datapath(kernel: KernelSensor, case: Row) -> None:
    for given in case.given:
        given(kernel)
    outcomes = kernel.run_all(case.packets)

    assert [o.action for o in outcomes] == list(case.actions)
    totals: dict[C, int] = {}
    for outcome in outcomes:
        for counter, delta in outcome.counter_deltas.items():
            totals[counter] = totals.get(counter, 0) + delta
    assert totals == dict(case.counters)
    events = [event for outcome in outcomes for event in outcome.events]
    assert [type(e).__name__ for e in events] == [x.kind.__name__ for x in case.events]
    for event, expected in zip(events, case.events, strict=True):
        assert {name: getattr(event, name) for name in expected.fields} == dict(expected.fields)


# ---- sequences judged by the maps they leave ----


def test_sources_count_syns_flows_and_packets(kernel: KernelSensor) -> None:
    """Per source: SYNs (retransmissions included), flows opened, packets on watched
    ports. Packets to unwatched ports and dropped packets leave no trace."""
    kernel.verdicts.block(V4.neighbour, LIVE_TTL_S, "dropped before observation")
    kernel.run_all(
        [
            seg(V4),
            seg(V4),  # a SYN and its retransmission: one flow
            seg(V4, sport=CPORT + 1),  # a second connection
            data(V4),
            seg(V4, dport=22),  # not watched
            seg(V4, src=V4.neighbour),  # dropped
        ]
    )

    state = kernel.source_state(ipaddress.ip_address(V4.client))
    assert state is not None
    # Packets are added to the source when its flow ends, not per packet.
    assert (state.syns, state.flows, state.packets) == (3, 2, 0)
    assert 0 < state.first_ns <= state.last_ns
    assert kernel.source_state(ipaddress.ip_address(V4.neighbour)) is None
    assert kernel.flow_count() == 2

    kernel.run(seg(V4, flags="FA"))  # the first connection ends: SYN, SYN, data, FIN
    state = kernel.source_state(ipaddress.ip_address(V4.client))
    assert state is not None and state.packets == 4
    assert kernel.flow_count() == 1


def test_sources_keep_families_apart(kernel: KernelSensor) -> None:
    kernel.run_all([seg(V4), seg(V6), data(V6), seg(V6, "RA")])

    v4 = kernel.source_state(ipaddress.ip_address(V4.client))
    v6 = kernel.source_state(ipaddress.ip_address(V6.client))
    assert v4 is not None and v6 is not None
    assert (v4.syns, v4.flows, v4.packets) == (1, 1, 0)  # its flow is still open
    assert (v6.syns, v6.flows, v6.packets) == (1, 1, 3)  # SYN, data, RST


def test_stray_ack_opens_no_flow(kernel: KernelSensor) -> None:
    """An ACK (or FIN) of a flow we never saw, or already ended, must not leave state
    behind to time out, in the flow table or the source table."""
    outcome = kernel.run(seg(V4, "A", ack=1))

    assert outcome.action == PASS and outcome.events == []
    assert kernel.flow_count() == 0
    assert kernel.source_state(ipaddress.ip_address(V4.client)) is None


def test_flow_state_while_a_hello_is_open(kernel: KernelSensor) -> None:
    """Between the two segments of a ClientHello the flow remembers it is mid-hello."""
    ch = real_client_hello()
    kernel.run_all([seg(V4), data(V4, ch[:300], seq=SEQ + 1)])

    state = kernel.flow_state(V4.flow())
    assert state is not None
    assert (state.hellos, state.hello_segments, state.hello_bytes) == (1, 1, 300)
    assert (state.packets, state.syn_count, state.data_segments, state.bytes) == (2, 1, 1, 300)
    assert state.flags == 0b11  # FLOW_SEEN_SYN | FLOW_HELLO_OPEN

    kernel.run(data(V4, ch[300:], seq=SEQ + 301))
    state = kernel.flow_state(V4.flow())
    assert state is not None
    assert (state.hellos, state.hello_segments, state.hello_bytes) == (1, 2, 517)
    assert state.flags == 0b01


def test_hello_over_two_records_keeps_the_next_segment(kernel: KernelSensor) -> None:
    """A hello split over two TLS records needs a second record header: a first
    segment as long as a one-record hello would be can still be short of it."""
    ch = real_client_hello()
    message = ch[5:]  # the handshake message, without its record header
    cut = len(message) // 2
    records = (
        bytes([0x16, 0x03, 0x01]) + cut.to_bytes(2, "big") + message[:cut]
        + bytes([0x16, 0x03, 0x01]) + (len(message) - cut).to_bytes(2, "big") + message[cut:]
    )  # fmt: skip
    first = records[: len(ch)]  # exactly the length a single-record hello needs
    outcome = kernel.run_all([seg(V4), data(V4, first, seq=SEQ + 1)])[-1]
    assert [type(e).__name__ for e in outcome.events] == ["ClientHelloSegment"]
    state = kernel.flow_state(V4.flow())
    assert state is not None and state.flags & 0b10  # still open: the rest follows

    second = kernel.run(data(V4, records[len(ch) :], seq=SEQ + 1 + len(ch)))
    assert [(e.hello_index, e.segment_index) for e in second.events] == [(1, 2)]
    assert second.events[0].data == records[len(ch) :]


def test_flow_timing_is_monotonic(kernel: KernelSensor) -> None:
    """first_ns <= last_ns and the gap sums agree with gap_count (gaps here are µs)."""
    outcomes = kernel.run_all([seg(V4), data(V4), data(V4), data(V4), seg(V4, "FA")])

    (end,) = [e for o in outcomes for e in o.events if isinstance(e, FlowEnd)]
    assert end.first_ns <= end.last_ns
    assert end.gap_count == 2
    assert end.gap_mean_us >= 0 and end.gap_var_us2 >= 0


def test_flow_times_follow_the_monotonic_clock(kernel: KernelSensor) -> None:
    """Flow-state times are CLOCK_MONOTONIC at tick resolution (the kernel keeps one
    reading of the coarse clock per tick and CPU): each lies between the precise clock
    a few ticks before the packet and the precise clock after it, and they advance as
    time passes, so a reading kept past its tick would fail here."""
    ticks_behind_ns = 25_000_000  # up to two ticks at HZ=100, and then some
    pause_ns = 60_000_000

    before = time.monotonic_ns()
    kernel.run(seg(V4))
    first = kernel.flow_state(V4.flow())
    assert first is not None
    assert before - ticks_behind_ns <= first.first_ns <= time.monotonic_ns()

    time.sleep(pause_ns / 1e9)
    before = time.monotonic_ns()
    kernel.run(data(V4))
    later = kernel.flow_state(V4.flow())
    assert later is not None
    assert before - ticks_behind_ns <= later.last_ns <= time.monotonic_ns()
    assert later.last_ns - first.first_ns >= pause_ns - ticks_behind_ns


def test_kernel_refuses_frames_shorter_than_ethernet(kernel: KernelSensor) -> None:
    """Why no row has a truncated Ethernet header: BPF_PROG_TEST_RUN refuses frames
    under ETH_HLEN, as drivers never deliver them. If a kernel starts accepting them,
    this fails and the row belongs in the table."""
    with pytest.raises(MapError, match="Invalid argument"):
        prog_test_run(kernel.sensor.xdp_fn.fd, bytes(13))
    assert kernel.run(bytes(14)).counter_deltas == NOT_WATCHED  # EtherType 0: not IP
