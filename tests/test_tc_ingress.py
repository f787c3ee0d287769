"""tc ingress: packets XDP cannot read a port from are dropped when their source
is blocked, so a blocked client cannot slip through in fragments or behind a
long IPv6 header chain; everything else passes.

Each packet goes where the kernel sends it: through botwall_xdp first (it
passes these, fail open, and counts them), then through botwall_tc_ingress,
both by BPF_PROG_TEST_RUN on the real programs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.packet import Packet, Raw

from sensor.abi import Counter as C
from sensor.libbpf import prog_test_run
from tests.kernel import KernelSensor, loaded_sensor
from tests.test_xdp_datapath import CPORT, V4, V6, l2, seg

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT = 0, 2
SYN = TCP(sport=CPORT, dport=443, flags="S")


@pytest.fixture(scope="module")
def loaded() -> Iterator[KernelSensor]:
    with loaded_sensor() as kernel:
        yield kernel


@pytest.fixture
def kernel(loaded: KernelSensor) -> KernelSensor:
    loaded.reset()
    return loaded


def ingress(kernel: KernelSensor, packet: Packet) -> tuple[str, int, dict[C, int]]:
    """XDP's action, then tc ingress's verdict, and the counters both moved."""
    before = kernel.sensor.counters()
    xdp = kernel.run(packet).action
    tc = prog_test_run(kernel.sensor.tc_ingress_fn.fd, bytes(packet)).retval
    after = kernel.sensor.counters()
    return xdp, tc, {c: after[c] - before[c] for c in after if after[c] != before[c]}


def seven_ext_headers(src: str) -> Packet:
    """A SYN behind one more IPv6 extension header than XDP walks."""
    return l2(IPv6(src=src, dst=V6.server), *[IPv6ExtHdrDestOpt()] * 7, SYN)


UNPARSED = {
    "IPv6 SYN behind seven extension headers": (seven_ext_headers(V6.client), C.PASS_MALFORMED),
    "IPv6 fragment after the first": (
        l2(
            IPv6(src=V6.client, dst=V6.server),
            IPv6ExtHdrFragment(offset=185, m=0, id=7, nh=6),
            Raw(bytes(40)),
        ),
        C.PASS_FRAGMENT,
    ),
    "IPv4 fragment after the first": (
        l2(IP(src=V4.client, dst=V4.server, frag=1, proto=6), Raw(bytes(40))),
        C.PASS_FRAGMENT,
    ),
    # The TCP header split over two fragments: the first holds 8 of its 20 bytes.
    "IPv4 first fragment with the TCP header cut": (
        l2(IP(src=V4.client, dst=V4.server, flags="MF", id=5, proto=6), Raw(bytes(SYN)[:8])),
        C.PASS_MALFORMED,
    ),
}


@pytest.mark.parametrize("name", list(UNPARSED))
def test_unparsed_packet_from_a_blocked_source_is_dropped(kernel: KernelSensor, name: str) -> None:
    packet, xdp_counter = UNPARSED[name]
    kernel.verdicts.block(V4.client, 60, "bot")
    kernel.verdicts.block(V6.net, 60, "bot network")  # the v6 client by CIDR
    xdp, tc, counted = ingress(kernel, packet)
    assert xdp == "XDP_PASS"  # XDP fails open on what it cannot parse ...
    assert tc == TC_ACT_SHOT  # ... and tc ingress drops it, the source being blocked
    assert counted == {xdp_counter: 1, C.DROP_BLOCK_UNPARSED: 1}


@pytest.mark.parametrize("name", list(UNPARSED))
def test_unparsed_packet_from_anyone_else_passes(kernel: KernelSensor, name: str) -> None:
    packet, xdp_counter = UNPARSED[name]
    kernel.verdicts.block(V4.neighbour, 60, "another bot")
    kernel.verdicts.block(V6.neighbour, 60, "another bot")
    assert ingress(kernel, packet) == ("XDP_PASS", TC_ACT_OK, {xdp_counter: 1})


def test_allow_list_wins_and_no_block_means_no_work(kernel: KernelSensor) -> None:
    packet = seven_ext_headers(V6.client)
    assert ingress(kernel, packet)[1] == TC_ACT_OK  # no verdict at all
    kernel.verdicts.block(V6.client, 60, "bot")
    kernel.verdicts.allow(V6.client, 60, "operator")
    assert ingress(kernel, packet)[1] == TC_ACT_OK
    kernel.verdicts.disallow(V6.client)
    assert ingress(kernel, packet)[1] == TC_ACT_SHOT
    kernel.past.block(V6.client, 1, "expired")  # replaces the live block
    assert ingress(kernel, packet)[1] == TC_ACT_OK


def test_what_xdp_parsed_is_left_to_xdp(kernel: KernelSensor) -> None:
    """A readable TCP packet from a blocked source is XDP's to drop (to a
    watched port) or pass (to any other); a blocked source's UDP passes too."""
    kernel.verdicts.block(V4.client, 60, "bot")
    assert ingress(kernel, seg(V4))[:2] == ("XDP_DROP", TC_ACT_OK)
    assert ingress(kernel, seg(V4, dport=22))[:2] == ("XDP_PASS", TC_ACT_OK)
    udp = l2(IP(src=V4.client, dst=V4.server), UDP(sport=CPORT, dport=443))
    assert ingress(kernel, udp)[:2] == ("XDP_PASS", TC_ACT_OK)
    # An IP header that does not hold together names no source to look up.
    bogus = l2(IP(src=V4.client, dst=V4.server, len=19), SYN)
    assert ingress(kernel, bogus)[:2] == ("XDP_PASS", TC_ACT_OK)


# Sends one SYN to [server]:443 behind N destination-options headers from the
# client namespace and says whether a SYN-ACK came back.
SYN_BEHIND_HEADERS = r"""
import sys, time
from scapy.all import IPv6, IPv6ExtHdrDestOpt, TCP, AsyncSniffer, conf, send
conf.verb = 0
server, headers, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
packet = IPv6(dst=server)
for _ in range(headers):
    packet = packet / IPv6ExtHdrDestOpt()
sniffer = AsyncSniffer(filter=f"tcp and dst port {sport}", store=True)
sniffer.start()
time.sleep(0.5)
send(packet / TCP(sport=sport, dport=443, flags="S", seq=1))
time.sleep(1.5)
got = sniffer.stop()
print("syn-ack" if any(p.haslayer(TCP) and p[TCP].flags & 0x12 == 0x12 for p in got) else "none")
"""


@pytest.mark.netns
def test_a_blocked_client_cannot_hide_its_syn_behind_extension_headers(
    loaded: KernelSensor,
) -> None:
    """On a real veth, with a real listener: Linux answers a SYN behind seven
    extension headers, one more than XDP walks. Blocked, the client gets no
    answer, with the header chain or without; take the tc ingress program away
    and the chain gets through the block."""
    import itertools
    import sys

    from pyroute2 import NetNS

    from lab.netns import Topology
    from sensor.loader import TC_FILTER_PRIO, TC_INGRESS_PARENT

    ports = itertools.count(45000)

    def syn(topo: Topology, headers: int) -> str:
        argv = [sys.executable, "-c", SYN_BEHIND_HEADERS, topo.server_v6, str(headers)]
        done = topo.run(topo.client_ns, [*argv, str(next(ports))], timeout=30)
        assert done.returncode == 0, done.stderr[-1500:]
        return str(done.stdout.strip())

    listener = "import socket, time\n" + (
        "s = socket.socket(socket.AF_INET6); s.bind(('::', 443)); s.listen(64); time.sleep(120)"
    )
    with Topology() as topo:
        topo.popen(topo.server_ns, [sys.executable, "-c", listener])
        sensor = loaded.sensor
        sensor.attach(topo.server_if, mode="native", netns=topo.server_ns)
        try:
            assert syn(topo, 7) == "syn-ack"  # no verdict: Linux takes the chain
            loaded.verdicts.block(topo.client_v6, 120, "bot")
            assert (syn(topo, 0), syn(topo, 7)) == ("none", "none")

            with NetNS(topo.server_ns) as ns:
                (index,) = ns.link_lookup(ifname=topo.server_if)
                ns.tc("del-filter", "bpf", index, parent=TC_INGRESS_PARENT, prio=TC_FILTER_PRIO)
            assert (syn(topo, 0), syn(topo, 7)) == ("none", "syn-ack")
        finally:
            sensor.detach_all()
            loaded.reset()
