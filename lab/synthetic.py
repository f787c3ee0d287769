"""Synthetic sensor events for tests and benchmarks: humans, a loud scraper and a
polite distributed credential stuffer, as the kernel would report them.

The lab's real clients (lab/traffic.py) send the same journeys over a real
network; these events let the engine be tested and measured without root.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

from lab.traffic import CHROME_LINUX, CHROME_WINDOWS, PYTHON_REQUESTS
from sensor.abi import FlowEndReason, SynQuirk
from sensor.events import Event, Flow, FlowEnd, HttpRequestHead, HttpResponseStatus, SynEvent

SERVER = ipaddress.ip_address("10.201.0.1")
PORT = 8080
LINUX_OPTIONS = (2, 4, 8, 1, 3)  # MSS, SACK-permitted, timestamps, NOP, window scale


class Client:
    """One client address speaking HTTP/1.1 over keep-alive connections."""

    def __init__(self, addr: str, user_agent: str | None, browser: bool) -> None:
        self.addr = ipaddress.ip_address(addr)
        self.user_agent = user_agent
        self.browser = browser
        self.port = 40000
        self.flow: Flow | None = None
        self.opened_ns = 0

    def connect(self, ts: float) -> Iterator[Event]:
        self.port += 1
        self.flow = Flow(self.addr, self.port, SERVER, PORT)
        self.opened_ns = int(ts * 1e9)
        yield SynEvent(
            ts_ns=int(ts * 1e9), flow=self.flow, seq=1, ttl=64, df=True, ip_id=0,
            window=64240, mss=1460, wscale=7, options=LINUX_OPTIONS, options_len=20,
            quirks=SynQuirk(0), tcp_flags=0x02, ip_total_len=60, payload_len=0,
        )  # fmt: skip

    def request(self, ts: float, method: str, path: str, status: int) -> Iterator[Event]:
        if self.flow is None:
            yield from self.connect(ts)
        assert self.flow is not None
        headers = [f"{method} {path} HTTP/1.1", "Host: shop.test"]
        if self.user_agent is not None:  # None: a tool that sends none (wrk)
            headers.append(f"User-Agent: {self.user_agent}")
        if self.browser:
            headers += ["Accept: application/json", "Accept-Language: en-GB", "Cookie: s=1",
                        "Referer: https://shop.test/"]  # fmt: skip
        else:
            headers += ["Accept: */*"]
        head = ("\r\n".join(headers) + "\r\n\r\n").encode()
        yield HttpRequestHead(int(ts * 1e9), self.flow, 1, len(head), head)
        yield HttpResponseStatus(int((ts + 0.004) * 1e9), self.flow, status, 4_000_000, 200)

    def close(self, ts: float) -> Iterator[Event]:
        if self.flow is not None:
            yield FlowEnd(
                ts_ns=int(ts * 1e9),
                flow=self.flow,
                reason=FlowEndReason.FIN,
                first_ns=self.opened_ns,
                last_ns=int(ts * 1e9),
                packets=10,
                bytes=1000,
                data_segments=3,
                syn_count=1,
                server_packets=10,
                server_bytes=5000,
                gap_count=2,
                gap_mean_us=0.5,
                gap_var_us2=0.1,
                seen_syn=True,
            )
            self.flow = None


# The humans-only prelude: long enough for a learning period the baseline
# model accepts (controlplane.engine.BASELINE_MIN_LEARNING_S, 1,200 s).
PRELUDE_S = 1300.0
LEARNING_S = PRELUDE_S - 20.0  # ends before the bots start


def mixed_traffic(
    seed: int = 7, prelude_s: float = PRELUDE_S, attack_s: float = 120.0, humans: int = 12
) -> list[Event]:
    """`humans` humans alone for prelude_s (the engine learns them), then a loud
    scraper and a polite stuffer on 50 addresses join them for attack_s."""
    rng = random.Random(seed)
    timeline: list[tuple[float, int, Event]] = []
    order = 0

    def add(events: Iterator[Event]) -> None:
        nonlocal order
        for event in events:
            timeline.append((event.ts_ns / 1e9, order, event))
            order += 1

    t0 = 1000.0
    attack = t0 + prelude_s
    end = attack + attack_s
    scraper = Client("10.201.1.10", PYTHON_REQUESTS, browser=False)
    t = attack + 10
    for product in range(1, 301):  # 10 requests a second, in id order
        add(scraper.request(t, "GET", f"/products/{product}", 200))
        t += 0.1

    stuffers = [Client(f"10.201.2.{i}", CHROME_WINDOWS, browser=False) for i in range(1, 51)]
    for n, stuffer in enumerate(stuffers):
        t = attack + n * 1.2
        while t < end:  # one login a minute from each address
            add(stuffer.request(t, "POST", "/login", 401))
            add(stuffer.close(t + 0.01))
            t += 60 * rng.uniform(0.9, 1.1)

    for h in range(humans):
        human = Client(f"10.201.{3 + h // 250}.{h % 250 + 1}", CHROME_LINUX, browser=True)
        t = t0 + rng.uniform(0, 5)
        while t < end:
            for method, path in [("GET", "/"), ("GET", f"/search?q={rng.randrange(9)}"),
                                 ("GET", f"/products/{rng.randrange(1, 500)}"),
                                 ("GET", f"/products/{rng.randrange(1, 500)}"),
                                 ("POST", "/cart"), ("POST", "/checkout")]:  # fmt: skip
                add(human.request(t, method, path, 200))
                t += rng.lognormvariate(0.7, 0.8)
            add(human.close(t))
            t += rng.lognormvariate(2.0, 0.5)

    timeline.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timeline]
