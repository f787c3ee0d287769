"""The lab test bed with real traffic: namespaces and veth, a TLS server, real client stacks."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from lab import clients
from lab.netns import (
    IFA_F_TENTATIVE,
    Topology,
    call_in,
    cleanup_stale,
    pids_in_namespace,
)
from lab.tls_server import REPO_ROOT, HttpServer, TlsServer, generate_certificate

pytestmark = pytest.mark.netns

ETH_P_ALL = 0x0003
TLS_PORT = 8443
HTTP_PORT = 8080

CLIENT_TOOLS: dict[str, Callable[..., clients.ClientResult]] = {
    "curl": clients.curl,
    "openssl": clients.openssl_s_client,
    "python": clients.python_client,
}


@pytest.fixture(scope="module")
def servers(module_topology: Topology) -> Iterator[tuple[TlsServer, HttpServer]]:
    with (
        TlsServer(module_topology, TLS_PORT) as tls,
        HttpServer(module_topology, HTTP_PORT) as http,
    ):
        yield tls, http


def addresses(topo: Topology, ns: str, ifname: str) -> dict[str, int]:
    """address -> IFA flags of the addresses on `ifname` in `ns`."""
    with topo.iproute(ns) as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        return {
            a.get_attr("IFA_ADDRESS"): a.get_attr("IFA_FLAGS") or a["flags"]
            for a in ipr.get_addr(index=index)
        }


def host_interfaces() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def namespaces() -> set[str]:
    """Named namespaces seen by `ip netns list` or by pyroute2 (parallel runs may
    add or remove some between the two looks, so a name in either counts)."""
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    )
    from_ip = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    return from_ip | set(netns.listnetns())


def unique_prefix(tag: str) -> str:
    """A namespace prefix of our own, so parallel sessions never clean up each other's."""
    return tag + secrets.token_hex(2)


def start_holder(prefix: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Run `python -m lab.netns up` in a child process; return it and the topology it built."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.netns", "--prefix", prefix, "up"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15.0)
    if not ready:
        proc.kill()
        proc.wait(timeout=5)
        pytest.fail("python -m lab.netns up printed nothing within 15 s")
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    return proc, json.loads(line)


def test_topology_has_both_families_ready(topology: Topology) -> None:
    server = addresses(topology, topology.server_ns, topology.server_if)
    client = addresses(topology, topology.client_ns, topology.client_if)
    assert {topology.server_v4, topology.server_v6} <= server.keys()
    assert {topology.client_v4, topology.client_v6} <= client.keys()
    # nodad and accept_dad=0: IPv6, link-local included, is usable at once.
    assert not [a for a, flags in {**server, **client}.items() if flags & IFA_F_TENTATIVE]
    with topology.server_iproute() as ipr:
        assert ipr.link_lookup(ifname=topology.server_if) == [topology.server_ifindex]
        (link,) = ipr.get_links(topology.server_ifindex)
        assert link.get_attr("IFLA_OPERSTATE") == "UP"
    # The veth exists only inside our namespaces.
    assert not {topology.server_if, topology.client_if} & host_interfaces()


def test_namespace_switching_is_per_thread(topology: Topology) -> None:
    with topology.in_server():
        assert topology.server_if in host_interfaces()
    assert topology.server_if not in host_interfaces()
    assert topology.call_in_client(host_interfaces) >= {"lo", topology.client_if}
    with pytest.raises(ZeroDivisionError):
        call_in(topology.server_ns, lambda: 1 / 0)
    # A sysctl written from a namespace thread lands in that namespace.
    rs = "/proc/sys/net/ipv6/conf/default/router_solicitations"
    assert call_in(topology.server_ns, Path(rs).read_text).strip() == "0"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("tool", sorted(CLIENT_TOOLS))
def test_clients_reach_tls_server(
    module_topology: Topology, servers: tuple[TlsServer, HttpServer], tool: str, family: int
) -> None:
    topo = module_topology
    tls, _ = servers
    assert tls.cert is not None
    server, client = (
        (topo.server_v4, topo.client_v4) if family == 4 else (topo.server_v6, topo.client_v6)
    )
    result = CLIENT_TOOLS[tool](topo, server, TLS_PORT, cafile=tls.cert.ca_path)
    assert result.ok, result
    assert result.json() == {
        "ok": True,
        "peer": client,
        "tls": "TLSv1.3",
        "method": "GET",
        "path": "/",
    }
    assert client in tls.peers()


def test_tls12_and_plain_http(
    module_topology: Topology, servers: tuple[TlsServer, HttpServer]
) -> None:
    topo = module_topology
    tls, http = servers
    assert tls.cert is not None
    ca = tls.cert.ca_path
    results = [
        clients.curl(topo, topo.server_v4, TLS_PORT, cafile=ca, tls_max="1.2"),
        clients.openssl_s_client(topo, topo.server_v6, TLS_PORT, cafile=ca, tls_version="1.2"),
        clients.python_client(topo, topo.server_v4, TLS_PORT, cafile=ca, tls_max="1.2"),
    ]
    for result in results:
        assert result.ok, result
        assert result.json()["tls"] == "TLSv1.2"
    for result in (
        clients.curl(topo, topo.server_v6, HTTP_PORT, https=False),
        clients.python_client(topo, topo.server_v4, HTTP_PORT, https=False),
    ):
        assert result.ok, result
        assert result.json()["tls"] is None
    assert {topo.client_v4, topo.client_v6} <= http.peers()


def test_certificate_is_really_verified(
    module_topology: Topology, servers: tuple[TlsServer, HttpServer], tmp_path: Path
) -> None:
    topo = module_topology
    tls, _ = servers
    assert tls.cert is not None
    wrong_name = clients.curl(
        topo, topo.server_v4, TLS_PORT, servername="other.botwall.test", cafile=tls.cert.ca_path
    )
    assert (wrong_name.ok, wrong_name.outcome) == (False, "tls"), wrong_name
    # A CA of the same name made with the other generator is still a stranger.
    stranger = generate_certificate(tmp_path, use_openssl=True)
    for result in (
        clients.curl(topo, topo.server_v4, TLS_PORT, cafile=stranger.ca_path),
        clients.openssl_s_client(topo, topo.server_v4, TLS_PORT, cafile=stranger.ca_path),
        clients.python_client(topo, topo.server_v6, TLS_PORT, cafile=stranger.ca_path),
    ):
        assert (result.ok, result.outcome) == (False, "tls"), result


def _open_capture(ifname: str) -> socket.socket:
    # An AF_PACKET socket sees each skb as the interface received it.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("wire_frames", [True, False])
def test_frames_on_the_server_veth_are_wire_sized(wire_frames: bool) -> None:
    with Topology(wire_frames=wire_frames) as topo, TlsServer(topo, TLS_PORT) as tls:
        assert tls.cert is not None
        capture = call_in(topo.server_ns, _open_capture, topo.server_if)
        with capture:
            big_header = ["--header", "X-Padding: " + "a" * 20000]
            result = clients.curl(
                topo, topo.server_v4, TLS_PORT, cafile=tls.cert.ca_path, extra_args=big_header
            )
            assert result.ok, result
            sizes = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    sizes.append(len(capture.recv(65536)))
    assert sum(sizes) > 20000
    if wire_frames:
        assert max(sizes) <= 1514  # Ethernet header + 1500 MTU
    else:
        assert max(sizes) > 1514  # what veth does by default: GSO super-packets


def test_refused_and_timeout_are_real(topology: Topology) -> None:
    refused = clients.tcp_connect(topology, topology.server_v4, 9, timeout=2.0)
    assert refused.outcome == "refused"
    assert refused.elapsed < 0.5

    topology.drop_inbound(9)
    for server in (topology.server_v4, topology.server_v6):
        dropped = clients.tcp_connect(topology, server, 9, timeout=1.0)
        assert dropped.outcome == "timeout", dropped
        assert 0.9 <= dropped.elapsed < 2.0
    curl = clients.curl(
        topology, topology.server_v4, 9, https=False, connect_timeout=1.0, max_time=2.0
    )
    assert (curl.outcome, curl.returncode) == ("timeout", clients.CURL_OPERATION_TIMEDOUT)

    # An address nobody owns goes to the server, which does not forward: silence.
    nobody = clients.tcp_connect(topology, "10.201.99.99", 80, timeout=0.5)
    assert nobody.outcome == "timeout"


def test_many_client_addresses_reach_the_server(topology: Topology) -> None:
    started = time.monotonic()
    v4, v6 = topology.add_client_addresses(1000, 50)
    assert time.monotonic() - started < 10.0
    assert (len(v4), len(v6)) == (1000, 50)
    assert (v4[0], v4[-1], v6[0]) == ("10.201.1.0", "10.201.4.231", "fd00:b0:0:1::1")
    on_client = addresses(topology, topology.client_ns, topology.client_if)
    assert set(v4) | set(v6) <= on_client.keys()
    assert not [a for a in v6 if on_client[a] & IFA_F_TENTATIVE]
    assert topology.add_client_addresses(1, 1) == (["10.201.4.232"], ["fd00:b0:0:1::33"])

    with TlsServer(topology, TLS_PORT) as tls:
        assert tls.cert is not None
        ca = tls.cert.ca_path
        results = {
            v4[999]: clients.curl(
                topology, topology.server_v4, TLS_PORT, cafile=ca, source=v4[999]
            ),
            v4[500]: clients.python_client(
                topology, topology.server_v4, TLS_PORT, cafile=ca, source=v4[500]
            ),
            v6[42]: clients.openssl_s_client(
                topology, topology.server_v6, TLS_PORT, cafile=ca, source=v6[42]
            ),
            v6[49]: clients.curl(topology, topology.server_v6, TLS_PORT, cafile=ca, source=v6[49]),
        }
        for source, result in results.items():
            assert result.ok, result
            assert result.json()["peer"] == source
        # The server's own log agrees on where the connections came from.
        assert tls.peers() == set(results)


def test_two_topologies_coexist() -> None:
    with Topology() as a, Topology() as b:
        assert len({a.server_ns, a.client_ns, b.server_ns, b.client_ns}) == 4
        assert a.server_if != b.server_if
        # Same addresses and port in both, no clash: each lives in its own namespaces.
        with HttpServer(a, HTTP_PORT) as http_a, HttpServer(b, HTTP_PORT) as http_b:
            for topo, server in ((a, http_a), (b, http_b)):
                result = clients.curl(topo, topo.server_v6, HTTP_PORT, https=False)
                assert result.ok, result
                assert server.peers() == {topo.client_v6}


def test_teardown_leaves_nothing_behind() -> None:
    with Topology() as topo:
        server = HttpServer(topo, HTTP_PORT).start()  # never stopped by us
        assert server.process is not None
        process = server.process
        built = {topo.server_ns, topo.client_ns}
        assert built <= namespaces()
        assert pids_in_namespace(topo.server_ns) == [process.pid]
    assert process.poll() is not None  # ended and reaped by the teardown
    assert not built & namespaces()
    assert not {topo.server_if, topo.client_if} & host_interfaces()
    server.cleanup()

    with pytest.raises(RuntimeError, match="boom"), Topology() as failing:
        built = {failing.server_ns, failing.client_ns}
        raise RuntimeError("boom")
    assert not built & namespaces()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_tears_down(sig: signal.Signals) -> None:
    prefix = unique_prefix("sig")
    proc, built = start_holder(prefix)
    try:
        assert {built["server_ns"], built["client_ns"]} <= namespaces()
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)
        cleanup_stale(prefix)  # finds something only if the holder failed to tear down
    assert not {built["server_ns"], built["client_ns"]} & namespaces()


def test_cleanup_stale_removes_only_dead_runs(topology: Topology) -> None:
    prefix = unique_prefix("stl")
    proc, stale = start_holder(prefix)
    proc.kill()  # SIGKILL: no teardown runs
    proc.communicate(timeout=5)
    stale_names = {stale["server_ns"], stale["client_ns"]}
    assert stale_names <= namespaces()
    # A process still inside keeps a namespace (and its veth) alive: cleanup ends it.
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale["server_ns"], "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while sleeper.pid not in pids_in_namespace(stale["server_ns"]):
            assert time.monotonic() < deadline, "sleep never entered the namespace"
            time.sleep(0.02)
        assert set(cleanup_stale(prefix)) == stale_names
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(timeout=5)
    assert not stale_names & namespaces()
    # Our own live topology has the default prefix and a live owner: kept.
    assert topology.server_ns not in cleanup_stale("bw")
    assert {topology.server_ns, topology.client_ns} <= namespaces()
    assert os.getpid() == int(topology.server_ns.split("-")[2])
