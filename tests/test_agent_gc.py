"""The agent keeps the engine's long-lived state out of the cyclic collector
(controlplane.agent.freeze_long_lived): safe only because a client the engine
forgets leaves no reference cycle behind."""

from __future__ import annotations

import gc
import ipaddress
import weakref
from collections.abc import Iterator

import pytest

from controlplane.agent import freeze_long_lived
from controlplane.enforce import Enforcer
from controlplane.engine import PRUNE_AFTER_S, Engine
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from lab.synthetic import Client
from lab.traffic import CHROME_LINUX, PYTHON_REQUESTS


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """gc.garbage with DEBUG_SAVEALL on: what a collection found unreachable."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_a_forgotten_client_leaves_no_reference_cycle(saved_garbage: list[object]) -> None:
    engine = Engine(
        scorer=RiskScorer(consistency=ConsistencyModel().fit(), campaign=CampaignDetector().fit()),
        policy=PolicyEngine(Policy.default()),
        enforcer=Enforcer(None),
        max_profiles=50,  # most profiles are dropped as new clients come
    )
    base = int(ipaddress.ip_address("100.64.0.0"))
    t = 1000.0
    for i in range(400):
        agent = CHROME_LINUX if i % 2 else PYTHON_REQUESTS
        client = Client(str(ipaddress.ip_address(base + i)), agent, browser=bool(i % 2))
        for path in (f"/products/{i}", "/cart", "/login"):
            for event in client.request(t, "POST" if path == "/login" else "GET", path, 200):
                engine.process(event)
            t += 0.05
        for event in client.close(t):
            engine.process(event)
    engine.tick(t)
    engine.tick(t + PRUNE_AFTER_S + 120.0)  # every feature key idle: forgotten
    assert len(engine.clients()) == 50
    assert len(engine.features) == 0

    del engine
    found = gc.collect()
    ours = [o for o in saved_garbage if type(o).__module__.startswith(("controlplane", "sensor"))]
    assert ours == [], f"{len(ours)} engine objects were only freed as cycles"
    assert found < 100, f"{found} objects were only freed as cycles"


def test_freezing_collects_young_garbage_first_and_keeps_the_rest_out() -> None:
    class Node:
        other: Node

    before = gc.get_freeze_count()
    try:
        kept = [[i] for i in range(10_000)]
        a, b = Node(), Node()
        a.other, b.other = b, a  # garbage once dropped, but only as a cycle
        gone = weakref.ref(a)
        del a, b
        freeze_long_lived()
        assert gone() is None, "young cyclic garbage was frozen, not collected"
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()
