"""The whole loop on a real network: kernel events, the engine, kernel verdicts.

Twelve human-like clients, a loud catalog scraper, and a polite credential
stuffer spread over 50 addresses send real HTTP requests from their own
addresses in the client namespace to a real server; the sensor is attached in
native XDP to the server's veth and the engine writes verdicts to its maps.
The engine first learns the humans alone (journey model), then the bots join.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controlplane.decisions import Action, Decision
from controlplane.enforce import Enforcer
from controlplane.engine import Engine
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from lab.netns import Topology
from lab.tls_server import HttpServer
from sensor.loader import Sensor, SensorSettings, remove_pins
from sensor.sources import BccSensor
from sensor.verdicts import VerdictMaps
from tests.test_sensor_live import _pin_dir

pytestmark = [pytest.mark.kernel, pytest.mark.netns, pytest.mark.slow]

HTTP_PORT = 8080
LEARNING_S = 15.0


@dataclass
class Outcome:
    decisions: list[Decision]
    traffic: dict[str, list[dict[str, object]]]  # scenario -> request records
    kernel_verdicts: set[str]
    humans: list[str]
    scraper: str
    stuffers: list[str]
    attack_start: float


def _traffic(topo: Topology, scenario: str, sources: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lab.traffic", scenario,
        "--server", topo.server_v4, "--port", str(HTTP_PORT),
        "--sources", ",".join(sources), "--timeout", "1.5", "--max-seconds", "60", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def outcome() -> Iterator[Outcome]:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they load eBPF programs and build namespaces")
    pin_dir = _pin_dir()
    with Topology() as topo, HttpServer(topo, HTTP_PORT):
        v4, _ = topo.add_client_addresses(63)
        humans, scraper, stuffers = v4[:12], v4[12], v4[13:63]
        sensor = Sensor(SensorSettings(tls_ports=(), http_ports=(HTTP_PORT,), pin_dir=pin_dir))
        try:
            sensor.attach(topo.server_if, mode="native", netns=topo.server_ns)
            decisions: list[Decision] = []
            engine = Engine(
                scorer=RiskScorer(
                    consistency=ConsistencyModel().fit(), campaign=CampaignDetector().fit()
                ),
                policy=PolicyEngine(Policy.default()),
                enforcer=Enforcer(VerdictMaps(sensor.table)),
                learning_s=LEARNING_S,
                learn=("journey",),
                on_decisions=lambda made, _risk: decisions.extend(made),
            )
            stop = threading.Event()
            loop = threading.Thread(
                target=engine.run_live, args=(BccSensor(sensor), stop.is_set), daemon=True
            )
            loop.start()

            human = topo.popen(
                topo.client_ns,
                _traffic(topo, "human", humans, "--count", "8", "--think-scale", "0.4"),
                stdout=-1, text=True,
            )  # fmt: skip
            time.sleep(LEARNING_S + 2.0)
            attack_start = time.time()
            bots = [
                topo.popen(topo.client_ns,
                           _traffic(topo, "scrape", [scraper], "--count", "150", "--rate", "10"),
                           stdout=-1, text=True),
                topo.popen(topo.client_ns,
                           _traffic(topo, "stuff", stuffers, "--count", "4", "--interval", "6"),
                           stdout=-1, text=True),
            ]  # fmt: skip
            outputs = {}
            for name, proc in (("scrape", bots[0]), ("stuff", bots[1]), ("human", human)):
                out, _ = proc.communicate(timeout=90)
                outputs[name] = [json.loads(line) for line in out.splitlines() if line.strip()]
            stop.set()
            loop.join(timeout=10)
            kernel = {e.target for e in VerdictMaps(sensor.table).list() if not e.expired}
            yield Outcome(decisions, outputs, kernel, humans, scraper, stuffers, attack_start)
        finally:
            sensor.close()
            remove_pins(pin_dir)


def _enforced_on(outcome: Outcome, addr: str) -> list[Decision]:
    return [
        d for d in outcome.decisions if d.target == addr and not d.shadow
        and d.action is not Action.MONITOR
    ]  # fmt: skip


def test_loud_scraper_gets_a_kernel_verdict_and_is_cut_off(outcome: Outcome) -> None:
    assert _enforced_on(outcome, outcome.scraper), "no verdict on the scraper"
    assert outcome.scraper in outcome.kernel_verdicts
    records = outcome.traffic["scrape"]
    answered = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["error"]]
    # 150 requests at 10/s: a verdict within seconds leaves most unanswered.
    assert len(answered) < 60, f"{len(answered)} of {len(records)} scraper requests answered"
    assert failed


def test_polite_stuffer_gets_kernel_verdicts_on_most_addresses(outcome: Outcome) -> None:
    hit = [a for a in outcome.stuffers if _enforced_on(outcome, a)]
    assert len(hit) >= 45, f"only {len(hit)} of 50 stuffer addresses got a verdict"
    assert len(set(outcome.stuffers) & outcome.kernel_verdicts) >= 45


def test_humans_get_no_verdict_and_every_request_answered(outcome: Outcome) -> None:
    assert not [a for a in outcome.humans if _enforced_on(outcome, a)]
    assert not set(outcome.humans) & outcome.kernel_verdicts
    records = outcome.traffic["human"]
    assert records, "the humans sent nothing"
    assert all(r["error"] is None for r in records), [r for r in records if r["error"]][:3]
