"""The engine on a capture: ReplaySource -> Engine, unprivileged, deterministic.

The pcap holds real TCP conversations (handshakes, HTTP/1.1 requests and
responses, FINs) written with scapy: humans browsing with a browser's headers
over Linux's TCP stack, and a credential stuffer on 30 addresses claiming
Chrome on Windows over the same Linux stack, every login failing.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, Raw, wrpcap

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer
from controlplane.engine import Engine
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from lab.traffic import CHROME_LINUX, CHROME_WINDOWS
from sensor.replay import ReplaySource

SERVER = "10.201.0.1"
PORT = 8080
LINUX_SYN_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                     ("WScale", 7)]  # fmt: skip


class Conversation:
    """One TCP connection's packets, both directions, with real sequence numbers."""

    def __init__(self, client: str, sport: int, start: float) -> None:
        self.client, self.sport, self.t = client, sport, start
        self.cseq, self.sseq = 1000, 5000
        self.packets: list[Ether] = []
        self._send("S", client_side=True, options=LINUX_SYN_OPTIONS)
        self._send("SA", client_side=False)
        self._send("A", client_side=True)

    def _send(self, flags: str, client_side: bool, payload: bytes = b"", **tcp: object) -> None:
        src, dst = (self.client, SERVER) if client_side else (SERVER, self.client)
        sport, dport = (self.sport, PORT) if client_side else (PORT, self.sport)
        seq = self.cseq if client_side else self.sseq
        ack = self.sseq if client_side else self.cseq
        if "S" in flags:
            ack = 0 if client_side else self.cseq + 1
        segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240, **tcp)
        packet = (
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src=src, dst=dst, ttl=64, flags="DF")
            / segment
        )
        if payload:
            packet = packet / Raw(payload)
        packet.time = self.t
        self.packets.append(packet)
        advance = len(payload) + (1 if ("S" in flags or "F" in flags) else 0)
        if client_side:
            self.cseq += advance
        else:
            self.sseq += advance
        self.t += 0.001

    def request(
        self, method: str, path: str, ua: str, browser: bool, status: int, at: float
    ) -> None:
        self.t = max(self.t, at)
        lines = [f"{method} {path} HTTP/1.1", "Host: shop.test", f"User-Agent: {ua}"]
        if browser:
            lines += ["Accept: application/json", "Accept-Language: en-GB"]
        body = b"user=a&password=b" if method == "POST" else b""
        if body:
            lines += [
                "Content-Type: application/x-www-form-urlencoded",
                f"Content-Length: {len(body)}",
            ]
        self._send("PA", True, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reply = f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        self._send("PA", False, reply)
        self._send("A", True)

    def close(self) -> None:
        self._send("FA", True)
        self._send("FA", False)
        self._send("A", True)


def write_capture(path: Path, seed: int = 3) -> None:
    rng = random.Random(seed)
    conversations: list[Conversation] = []
    for h in range(6):  # humans: a few sessions each, think times of seconds
        t = 100.0 + h
        for s in range(4):
            c = Conversation(f"10.201.3.{h + 1}", 41000 + s, t)
            journey = [
                ("GET", "/"),
                ("GET", "/search?q=1"),
                ("GET", f"/products/{rng.randrange(99)}"),
                ("POST", "/cart"),
                ("POST", "/checkout"),
            ]
            for method, target in journey:
                t += rng.uniform(1.0, 6.0)
                c.request(method, target, CHROME_LINUX, True, 200, t)
            c.close()
            conversations.append(c)
            t += rng.uniform(5, 20)
    for i in range(30):  # the stuffer: 30 addresses, one failed login every 20 s each
        t = 110.0 + i * 0.7
        for n in range(4):
            c = Conversation(f"10.201.2.{i + 1}", 42000 + n, t)
            c.request("POST", "/login", CHROME_WINDOWS, False, 401, t)
            c.close()
            conversations.append(c)
            t += 20 * rng.uniform(0.9, 1.1)
    packets = sorted((p for c in conversations for p in c.packets), key=lambda p: float(p.time))
    wrpcap(str(path), packets)


def replay(path: Path) -> list[Decision]:
    engine = Engine(
        scorer=RiskScorer(consistency=ConsistencyModel().fit(), campaign=CampaignDetector().fit()),
        policy=PolicyEngine(Policy.default()),
        enforcer=Enforcer(None),
    )
    decisions: list[Decision] = []
    with ReplaySource(path, tls_ports=(), http_ports=(PORT,)) as source:
        for event in source.events():
            decisions.extend(engine.process(event))
    decisions.extend(engine.tick())
    return decisions


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "shop.pcap"
    write_capture(path)
    return path


def _enforced(decisions: list[Decision]) -> set[str]:
    return {
        d.target for d in decisions
        if not d.shadow and d.action is not Action.MONITOR and d.target_kind is TargetKind.ADDRESS
    }  # fmt: skip


def test_replay_stops_the_stuffer_and_spares_the_humans(capture: Path) -> None:
    hit = _enforced(replay(capture))
    stuffers = {f"10.201.2.{i + 1}" for i in range(30)}
    humans = {f"10.201.3.{h + 1}" for h in range(6)}
    assert len(hit & stuffers) >= 27, f"{len(hit & stuffers)} of 30 stuffer addresses"
    assert not hit & humans


def test_the_same_capture_decides_the_same_twice(capture: Path) -> None:
    first, second = replay(capture), replay(capture)
    key = [(d.action, d.target, d.rule, d.ts, round(d.score, 6)) for d in first]
    assert key == [(d.action, d.target, d.rule, d.ts, round(d.score, 6)) for d in second]
    assert key  # and it decided something
