"""The engine on constructed sensor events: who gets a verdict, who does not, and why."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator

import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer
from controlplane.engine import Engine, campaign_inputs, stats_dict
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from sensor.abi import FlowEndReason, SynQuirk
from sensor.events import Event, Flow, FlowEnd, HttpRequestHead, HttpResponseStatus, SynEvent

SERVER = ipaddress.ip_address("10.201.0.1")
PORT = 8080
LINUX_OPTIONS = (2, 4, 8, 1, 3)  # MSS, SACK-permitted, timestamps, NOP, window scale
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
CHROME_LINUX = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)


class Client:
    """One client address speaking HTTP/1.1 over keep-alive connections."""

    def __init__(self, addr: str, user_agent: str, browser: bool) -> None:
        self.addr = ipaddress.ip_address(addr)
        self.user_agent = user_agent
        self.browser = browser
        self.port = 40000
        self.flow: Flow | None = None

    def connect(self, ts: float) -> Iterator[Event]:
        self.port += 1
        self.flow = Flow(self.addr, self.port, SERVER, PORT)
        yield SynEvent(
            ts_ns=int(ts * 1e9), flow=self.flow, seq=1, ttl=64, df=True, ip_id=0,
            window=64240, mss=1460, wscale=7, options=LINUX_OPTIONS, options_len=20,
            quirks=SynQuirk(0), tcp_flags=0x02, ip_total_len=60, payload_len=0,
        )  # fmt: skip

    def request(self, ts: float, method: str, path: str, status: int) -> Iterator[Event]:
        if self.flow is None:
            yield from self.connect(ts)
        assert self.flow is not None
        headers = [f"{method} {path} HTTP/1.1", "Host: shop.test", f"User-Agent: {self.user_agent}"]
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
            yield FlowEnd(int(ts * 1e9), self.flow, FlowEndReason.FIN, 0, int(ts * 1e9), 10,
                          1000, 3, 1, 10, 5000, 2, 0.5, 0.1, True)  # fmt: skip
            self.flow = None


def mixed_traffic(seed: int = 7, prelude_s: float = 900.0, attack_s: float = 120.0) -> list[Event]:
    """Twelve humans alone for prelude_s (the engine learns them), then a loud
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
    scraper = Client("10.201.1.10", "python-requests/2.31.0", browser=False)
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

    for h in range(12):
        human = Client(f"10.201.3.{h + 1}", CHROME_LINUX, browser=True)
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


def make_engine(learning_s: float = 880.0) -> Engine:
    """Only the models that need no traffic, plus a learning period in which the
    humans alone are about (the attacks start after the prelude)."""
    scorer = RiskScorer(
        consistency=ConsistencyModel().fit(),
        campaign=CampaignDetector().fit(),
    )
    return Engine(
        scorer=scorer,
        policy=PolicyEngine(Policy.default()),
        enforcer=Enforcer(None),
        score_every_s=0.5,
        learning_s=learning_s,
    )


def enforced(decisions: list[Decision]) -> dict[str, set[Action]]:
    out: dict[str, set[Action]] = {}
    for d in decisions:
        if not d.shadow and d.action is not Action.MONITOR and d.target_kind is TargetKind.ADDRESS:
            out.setdefault(d.target, set()).add(d.action)
    return out


@pytest.fixture(scope="module")
def run() -> tuple[Engine, list[Decision]]:
    engine = make_engine()
    decisions: list[Decision] = []
    for event in mixed_traffic():
        decisions.extend(engine.process(event))
    decisions.extend(engine.tick())
    return engine, decisions


def test_polite_distributed_stuffer_is_stopped_on_most_addresses(
    run: tuple[Engine, list[Decision]],
) -> None:
    _, decisions = run
    hit = {a for a in enforced(decisions) if a.startswith("10.201.2.")}
    assert len(hit) >= 45, f"only {len(hit)} of 50 stuffer addresses got a verdict"


def test_loud_scraper_is_stopped_within_its_first_requests(
    run: tuple[Engine, list[Decision]],
) -> None:
    engine, decisions = run
    assert engine.scorer.trained()["journey"] and engine.scorer.trained()["baseline"]
    hits = [d for d in decisions if d.target == "10.201.1.10" and d.action is not Action.MONITOR]
    assert hits, "the scraper got no verdict"
    # It starts 10 s into the attack and sends 10 requests a second.
    first = min(d.ts for d in hits) - (1000.0 + 900.0 + 10.0)
    assert 0 <= first <= 3.0, f"first verdict {first:.1f} s in"
    assert {"catalog_enumeration"} & {r.code for r in engine.risks[("addr", "10.201.1.10")].reasons}


def test_humans_get_no_verdict(run: tuple[Engine, list[Decision]]) -> None:
    _, decisions = run
    assert not [a for a in enforced(decisions) if a.startswith("10.201.3.")]


def test_every_decision_carries_its_reason_and_rule(run: tuple[Engine, list[Decision]]) -> None:
    _, decisions = run
    assert decisions
    for d in decisions:
        assert d.reason and d.rule and d.ttl_s > 0 and 0 <= d.score <= 100


def test_stats_count_the_run(run: tuple[Engine, list[Decision]]) -> None:
    engine, decisions = run
    stats = stats_dict(engine)
    assert stats["events"] == len(mixed_traffic())
    assert stats["decisions"] == len(decisions)
    assert stats["ticks"] > 100
    assert stats["events_per_s"] > 0


def test_campaign_inputs_from_features() -> None:
    inputs = campaign_inputs(
        {
            "req_rate_600s": 1.0,
            "login_share": 0.5,
            "login_error_share": 0.9,
            "login_failure_share": 0.2,
            "distinct_addrs": 40.0,
            "addr_sync": 1.0,
            "ja4_rarity": 3.0,
            "sensitive_share": 0.5,
        },
        ("ja4", "t13d"),
    )
    assert inputs["requests_600s"] == 600.0
    assert inputs["login_attempts_600s"] == 300.0
    assert inputs["login_failure_share"] == 0.9
    assert inputs["synchrony"] == 0.5
    assert inputs["fingerprint_rarity"] == 3.0
    assert inputs["distinct_addrs"] == 40.0
