"""The kernel sensor on a real veth between two namespaces, with real clients.

A TLS server and a plaintext HTTP server run in the server namespace; curl,
openssl s_client, Python's ssl module and bare TCP connects run in the client
namespace. The sensor is attached in native XDP mode to the server's veth.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import clients
from lab.netns import Topology
from lab.tls_server import HttpServer, TlsServer
from sensor.events import (
    ClientHelloSegment,
    Event,
    FlowEnd,
    HttpRequestHead,
    HttpResponseStatus,
    SynEvent,
)
from sensor.loader import Sensor, SensorSettings, remove_pins
from sensor.sources import BccSensor
from sensor.verdicts import VerdictMaps

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

TLS_PORT = 8443
HTTP_PORT = 8080
REPO = Path(__file__).resolve().parents[1]


class Live:
    """One topology, its servers, and the sensor attached to the server's veth."""

    def __init__(self, topo: Topology, sensor: Sensor) -> None:
        self.topo = topo
        self.sensor = sensor
        self.source = BccSensor(sensor, idle_timeout_s=5.0)
        self.verdicts = VerdictMaps(sensor.table)

    def drain(self) -> None:
        self.source.poll(0)

    def wait_for(
        self, predicate: Callable[[list[Event]], bool], timeout: float = 5.0
    ) -> list[Event]:
        """Collects events until predicate(all collected) holds; fails on timeout."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.extend(self.source.poll(100))
            if predicate(seen):
                return seen
        raise AssertionError(f"events never satisfied the condition; saw {len(seen)}: {seen[:10]}")


def _pin_dir() -> str:
    return f"/sys/fs/bpf/botwall-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they load eBPF programs and build namespaces")
    pin_dir = _pin_dir()
    with Topology() as topo, TlsServer(topo, TLS_PORT), HttpServer(topo, HTTP_PORT):
        sensor = Sensor(
            SensorSettings(tls_ports=(TLS_PORT,), http_ports=(HTTP_PORT,), pin_dir=pin_dir)
        )
        try:
            attached = sensor.attach(topo.server_if, mode="native", netns=topo.server_ns)
            assert attached.xdp_mode == "native"
            yield Live(topo, sensor)
        finally:
            sensor.close()
            remove_pins(pin_dir)


@pytest.fixture
def fresh(live: Live) -> Iterator[Live]:
    """No verdicts and no pending events before or after a test."""
    live.verdicts.clear()
    live.drain()
    yield live
    live.verdicts.clear()


def _from(addr: str) -> Callable[[Event], bool]:
    wanted = ipaddress.ip_address(addr)
    return lambda e: e.flow.src == wanted


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_curl_emits_syn_hello_and_flow_end(fresh: Live, family: str) -> None:
    topo = fresh.topo
    server, client = (
        (topo.server_v4, topo.client_v4) if family == "v4" else (topo.server_v6, topo.client_v6)
    )
    result = clients.curl(topo, server, TLS_PORT, insecure=True)
    assert result.ok, result.stderr_tail

    mine = _from(client)

    def complete(events: list[Event]) -> bool:
        kinds = {type(e) for e in events if mine(e)}
        return {SynEvent, ClientHelloSegment, FlowEnd} <= kinds

    events = [e for e in fresh.wait_for(complete) if mine(e)]
    syn = next(e for e in events if isinstance(e, SynEvent))
    assert syn.flow.dport == TLS_PORT
    assert str(syn.flow.dst) == server
    assert syn.ttl == 64  # Linux, no router in between
    assert syn.df is True
    # veth MTU 1500: MSS is 1460 over IPv4 and 1440 over IPv6.
    assert syn.mss == (1460 if family == "v4" else 1440)
    assert syn.wscale is not None
    assert syn.options[:2] == (2, 4)  # Linux: MSS, SACK-permitted first
    assert 8 in syn.options  # timestamps

    hello = next(e for e in events if isinstance(e, ClientHelloSegment))
    assert hello.flow == syn.flow
    assert (hello.hello_index, hello.segment_index) == (1, 1)
    assert hello.data[0] == 0x16 and hello.data[5] == 0x01  # handshake record, ClientHello
    assert b"api.botwall.test" in hello.data  # the SNI

    end = next(e for e in events if isinstance(e, FlowEnd))
    assert end.flow == syn.flow
    assert end.seen_syn is True
    assert end.syn_count == 1
    assert end.data_segments >= 2  # hello, finished, request
    assert end.bytes >= len(hello.data)
    # tc egress counted the server's answer (certificate, response).
    assert end.server_packets > 0 and end.server_bytes > 1000


@pytest.mark.parametrize("client", ["openssl", "python"])
def test_other_client_stacks_emit_hellos(fresh: Live, client: str) -> None:
    topo = fresh.topo
    if client == "openssl":
        result = clients.openssl_s_client(topo, topo.server_v4, TLS_PORT)
    else:
        result = clients.python_client(topo, topo.server_v4, TLS_PORT, insecure=True)
    assert result.ok, result.stderr_tail
    events = fresh.wait_for(
        lambda evs: (
            any(isinstance(e, ClientHelloSegment) for e in evs)
            and any(isinstance(e, SynEvent) for e in evs)
        )
    )
    hello = next(e for e in events if isinstance(e, ClientHelloSegment))
    assert hello.flow.dport == TLS_PORT
    assert b"api.botwall.test" in hello.data


def test_plaintext_http_request_and_response_status(fresh: Live) -> None:
    topo = fresh.topo
    ok = clients.curl(topo, topo.server_v4, HTTP_PORT, https=False, path="/products/7")
    assert ok.ok, ok.stderr_tail
    clients.curl(topo, topo.server_v4, HTTP_PORT, https=False, path="/status/404")
    events = fresh.wait_for(
        lambda evs: sum(isinstance(e, HttpResponseStatus) for e in evs) >= 2, timeout=5
    )
    heads = [e for e in events if isinstance(e, HttpRequestHead)]
    assert heads[0].data.startswith(b"GET /products/7 HTTP/1.1\r\n")
    assert b"User-Agent: curl/" in heads[0].data
    statuses = [e.status for e in events if isinstance(e, HttpResponseStatus)]
    assert statuses[:2] == [200, 404]
    response = next(e for e in events if isinstance(e, HttpResponseStatus))
    assert response.flow == heads[0].flow  # oriented client -> server
    # The kernel's think time has clock-tick resolution; the two events' own
    # timestamps are precise and ordered.
    assert response.think_ns >= 0
    assert response.ts_ns > heads[0].ts_ns


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_block_times_out_and_unblock_restores(fresh: Live, family: str) -> None:
    topo = fresh.topo
    server, client = (
        (topo.server_v4, topo.client_v4) if family == "v4" else (topo.server_v6, topo.client_v6)
    )
    fresh.verdicts.block(client, ttl=60, reason="test: block")
    blocked = clients.tcp_connect(topo, server, TLS_PORT, timeout=2.0)
    assert blocked.outcome == "timeout"

    assert fresh.verdicts.unblock(client) == 1
    after = clients.curl(topo, server, TLS_PORT, insecure=True)
    assert after.ok, after.stderr_tail


def test_block_cidr_times_out(fresh: Live) -> None:
    topo = fresh.topo
    fresh.verdicts.block("10.201.0.0/24", ttl=60, reason="test: cidr")
    assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).outcome == "timeout"
    # IPv6 from the same client is a different address: it passes.
    assert clients.tcp_connect(topo, topo.server_v6, TLS_PORT, timeout=2.0).ok


def test_block_applies_only_to_watched_ports(fresh: Live) -> None:
    topo = fresh.topo
    fresh.verdicts.block(topo.client_v4, ttl=60, reason="test: watched only")
    # The HTTP port is watched too; an unwatched port on the server is not.
    assert clients.tcp_connect(topo, topo.server_v4, HTTP_PORT, timeout=2.0).outcome == "timeout"
    unwatched = clients.tcp_connect(topo, topo.server_v4, 9, timeout=2.0)
    assert unwatched.outcome == "refused"  # reached the server's stack: nothing listens


def test_tarpit_delays_each_connect_by_a_retransmission(fresh: Live) -> None:
    topo = fresh.topo
    fresh.verdicts.tarpit(topo.client_v4, ttl=60, reason="test: tarpit", syns_to_drop=1)
    for _ in range(2):  # every new connection pays, not only the first
        result = clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=6.0)
        assert result.ok
        assert result.elapsed >= 0.9  # Linux's initial SYN RTO is 1 s
    untarpitted = clients.tcp_connect(topo, topo.server_v6, TLS_PORT, timeout=6.0)
    assert untarpitted.ok and untarpitted.elapsed < 0.5


def test_throttle_fails_connections_over_the_rate(fresh: Live) -> None:
    topo = fresh.topo
    # One new connection per 10 s with a burst of 2: the first two pass at once.
    fresh.verdicts.throttle(
        topo.client_v4, ttl=60, reason="test: throttle", connections_per_s=0.1, connection_burst=2
    )
    outcomes = [
        clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=0.7).outcome for _ in range(5)
    ]
    assert outcomes == ["ok", "ok", "timeout", "timeout", "timeout"]


def test_expired_block_lets_traffic_pass(fresh: Live) -> None:
    topo = fresh.topo
    fresh.verdicts.block(topo.client_v4, ttl=2.0, reason="test: expiry")
    assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.0).outcome == "timeout"
    time.sleep(2.2)
    # Nobody removed the entry: the kernel ignores it past its expiry.
    assert any(not e.expired or e.target == topo.client_v4 for e in fresh.verdicts.list())
    assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok


# ---- the agent as a process: killed, restarted, stopped ----


def _start_agent(topo: Topology, pin_dir: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "sensor",
        "--iface", topo.server_if, "--netns", topo.server_ns,
        "--mode", "native", "--tls-port", str(TLS_PORT), "--pin-dir", pin_dir, "--quiet",
    ]  # fmt: skip
    agent = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert agent.stdout is not None
    line = agent.stdout.readline()  # blocks until attached or dead
    if not line:
        raise AssertionError(f"agent did not start: {agent.stderr.read() if agent.stderr else ''}")
    assert json.loads(line) == {"type": "attached", "iface": topo.server_if, "mode": "native"}
    return agent


def _xdp_attached(topo: Topology) -> bool:
    with topo.server_iproute() as ipr:
        link = ipr.get_links(topo.server_ifindex)[0]
        xdp = link.get_attr("IFLA_XDP")
        return bool(xdp and xdp.get_attr("IFLA_XDP_PROG_ID"))


def test_agent_killed_and_restarted_keeps_enforcing() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root")
    pin_dir = _pin_dir()
    agents: list[subprocess.Popen[str]] = []
    try:
        with Topology() as topo, TlsServer(topo, TLS_PORT):
            agents.append(_start_agent(topo, pin_dir))
            # The test reaches the same pinned maps through its own (unattached) load.
            maps = Sensor(SensorSettings(tls_ports=(TLS_PORT,), pin_dir=pin_dir))
            verdicts = VerdictMaps(maps.table)
            verdicts.block(topo.client_v4, ttl=120, reason="test: survives restart")
            assert (
                clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome
                == "timeout"
            )

            agents[0].send_signal(signal.SIGKILL)
            agents[0].wait(timeout=5)
            assert _xdp_attached(topo)  # netlink attachments outlive the process
            assert (
                clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome
                == "timeout"
            )

            agents.append(_start_agent(topo, pin_dir))  # replaces its own program
            assert (
                clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome
                == "timeout"
            )
            assert clients.curl(topo, topo.server_v6, TLS_PORT, insecure=True).ok

            verdicts.unblock(topo.client_v4)
            assert clients.curl(topo, topo.server_v4, TLS_PORT, insecure=True).ok

            # SIGTERM: a clean stop detaches; the pinned maps stay for the next start.
            verdicts.block(topo.client_v4, ttl=120, reason="test: pinned across stop")
            agents[1].send_signal(signal.SIGTERM)
            assert agents[1].wait(timeout=10) == 0
            assert not _xdp_attached(topo)
            assert clients.curl(topo, topo.server_v4, TLS_PORT, insecure=True).ok  # fails open
            assert any(e.target == topo.client_v4 for e in verdicts.list())
            maps.close()
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.communicate(timeout=5)  # reaps it and closes its pipes
        remove_pins(pin_dir)
