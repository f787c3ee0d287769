"""The engine on constructed sensor events: who gets a verdict, who does not, and why."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer
from controlplane.engine import (
    LOW_RISK,
    LOW_RISK_RESCORE_S,
    MIN_SCORE_TO_DECIDE,
    YOUNG_STEPS,
    Engine,
    _Learning,
    campaign_inputs,
    stats_dict,
)
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from lab.run import agent_learned
from lab.synthetic import LEARNING_S, PRELUDE_S, Client, mixed_traffic
from lab.traffic import CHROME_LINUX


def make_engine(learning_s: float = LEARNING_S) -> Engine:
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
    first = min(d.ts for d in hits) - (1000.0 + PRELUDE_S + 10.0)
    assert 0 <= first <= 3.0, f"first verdict {first:.1f} s in"
    assert {"catalog_enumeration"} & {r.code for r in engine.risks[("addr", "10.201.1.10")].reasons}


def test_a_flood_is_judged_as_its_requests_come_not_at_the_regular_tick() -> None:
    """A client counted clear at its first requests is due again after a few
    more; at 2,500 requests a second, waiting for the half-second tick would
    let about 1,250 through."""
    engine = make_engine(learning_s=0.0)
    # It names itself: a flood without a User-Agent is judged at its first
    # request (the next test), this one by its rate.
    flooder = Client("10.201.1.40", "python-requests/2.31", browser=False)
    ts, decided_at = 100.0, None
    for sent in range(1, 1001):
        for event in flooder.request(ts, "GET", "/products?page=1", 200):
            if engine.process(event) and decided_at is None:
                decided_at = sent
        ts += 1 / 2500
    assert decided_at is not None, "the flood got no verdict in 1,000 requests"
    assert decided_at <= 80, f"first verdict at request {decided_at}"
    risk = engine.risks[("addr", "10.201.1.40")]
    assert "request_rate" in {r.code for r in risk.reasons}


def test_a_client_without_a_user_agent_is_judged_at_its_first_request() -> None:
    """wrk, like most load tools, sends no User-Agent: its first request is
    enough, where its rate alone needs about fifty."""
    engine = make_engine(learning_s=0.0)
    anonymous = Client("10.201.1.41", None, browser=False)
    named = Client("10.201.1.42", "python-requests/2.31", browser=False)
    decisions: list[Decision] = []
    for client in (anonymous, named):
        for event in client.request(100.0, "GET", "/products", 200):
            decisions.extend(engine.process(event))
    decisions.extend(engine.tick(100.001))
    assert enforced(decisions) == {"10.201.1.41": {Action.TARPIT}}
    risk = engine.risks[("addr", "10.201.1.41")]
    assert risk.reasons[0].code == "no_user_agent"
    assert ("addr", "10.201.1.42") not in engine.risks


def test_a_client_is_scored_again_when_its_cadence_says() -> None:
    """A clear client past its session's first steps waits LOW_RISK_RESCORE_S
    (or 20 requests) for its next scoring; a risky one is scored at the next
    tick after anything it does, a closed connection included."""
    engine = make_engine(learning_s=0.0)
    human = Client("10.201.3.1", CHROME_LINUX, browser=True)
    ts = 100.0
    young = YOUNG_STEPS - 1  # the steps before the one that makes YOUNG_STEPS
    for _ in range(young):  # scored at each one
        for event in human.request(ts, "GET", "/products", 200):
            engine.process(event)
        ts += 1.0
        engine.tick(ts)
    assert engine.stats.clients_scored == young
    assert engine._profiles["10.201.3.1"].last_score < LOW_RISK

    for event in human.request(ts, "GET", "/search?q=tea", 200):
        engine.process(event)
    for quiet in (1.0, 10.0, LOW_RISK_RESCORE_S - 2.0):
        engine.tick(ts + quiet)
    assert engine.stats.clients_scored == young, "scored before its cadence said"
    engine.tick(ts + LOW_RISK_RESCORE_S)
    assert engine.stats.clients_scored == young + 1

    anonymous = Client("10.201.1.41", None, browser=False)
    for event in anonymous.request(ts, "GET", "/products", 200):
        engine.process(event)
    engine.tick(ts + 0.1)
    assert engine._profiles["10.201.1.41"].last_score >= MIN_SCORE_TO_DECIDE
    scored = engine.stats.clients_scored
    for event in anonymous.close(ts + 0.2):
        engine.process(event)
    engine.tick(ts + 0.3)
    assert engine.stats.clients_scored == scored + 1, "the risky client was not scored again"


def test_a_tarpit_and_its_cuts_are_handed_over_together() -> None:
    """One risk's decisions reach the store in one call (one transaction):
    one call each kept a flood's connection cuts 20 ms behind its tarpit."""
    batches: list[list[Decision]] = []
    engine = make_engine(learning_s=0.0)
    engine._on_decisions = lambda made, _risk: batches.append(list(made))
    client = Client("10.201.1.41", None, browser=False)
    for event in client.request(100.0, "GET", "/products", 200):
        engine.process(event)
    engine.tick(100.001)
    assert [[(d.action, d.target) for d in batch] for batch in batches] == [
        [
            (Action.TARPIT, "10.201.1.41"),
            (Action.BLOCK_FLOW, "10.201.1.41:40001->10.201.0.1:8080"),
        ]
    ]


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
    # What the lab waits for before its bots join (lab.run.agent_learned).
    assert agent_learned({"engine": stats})
    assert stats["models"]["journey"] and stats["models"]["consistency"]


def test_learning_state_waits_for_the_first_client_then_counts_down() -> None:
    engine = make_engine(learning_s=60.0)
    engine.tick(now=5.0)
    assert stats_dict(engine)["learning"]["state"] == "waiting"
    assert not agent_learned({"engine": stats_dict(engine)})
    first = next(iter(mixed_traffic()))
    engine.process(first)
    engine.tick(now=first.ts_ns / 1e9 + 1.0)
    state = stats_dict(engine)["learning"]
    assert state["state"] == "learning" and 0 < state["left_s"] <= 61.0


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
    assert inputs["fingerprint_rarity"] == pytest.approx(1 - math.exp(-3.0))
    assert inputs["distinct_addrs"] == 40.0


def test_the_learning_period_starts_with_the_first_client_not_with_the_agent() -> None:
    # An agent that ticks on a quiet host for longer than its learning period
    # (a slow start, a service brought up after it) still learns the traffic
    # that follows: a period spent on silence would leave the journey model unfit.
    engine = make_engine()
    first_event = next(iter(mixed_traffic()))
    engine.tick(now=first_event.ts_ns / 1e9 - 2 * LEARNING_S)
    for event in mixed_traffic():
        engine.process(event)
    engine.tick()
    assert engine.scorer.trained()["journey"]


def test_the_learning_sample_is_uniform_over_the_period_not_its_first_vectors() -> None:
    # A busy host offers far more vectors than are kept; keeping the first
    # ones taught the baseline what clients look like at their first request.
    learning = _Learning(until=None, duration_s=1300.0, max_vectors=1_000)
    for i in range(20_000):
        learning.offer(np.array([float(i)]), "browse")
    kept = np.array([v[0] for v in learning.vectors])
    assert len(kept) == 1_000 and learning.offered == 20_000
    # Uniform over 0..19,999: a mean near 10,000, and every quarter represented.
    assert 9_000 < kept.mean() < 11_000
    assert all(150 < np.sum((kept >= q * 5_000) & (kept < (q + 1) * 5_000)) < 350 for q in range(4))


def test_a_learning_period_too_short_for_the_baseline_fits_the_journeys_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="botwall.engine"):
        engine = make_engine(learning_s=600.0)
    assert "too short for the baseline" in caplog.text
    for event in mixed_traffic(prelude_s=700.0, attack_s=10.0):
        engine.process(event)
    engine.tick()
    trained = engine.scorer.trained()
    assert trained["journey"] and not trained["baseline"]


def test_a_busy_host_of_300_humans_gets_no_verdict_after_learning() -> None:
    # 300 shoppers, each with pauses of minutes now and then: the learning
    # sample must cover the whole period, and a checkout after a pause is
    # still part of the visit that filled the cart.
    engine = make_engine()
    decisions: list[Decision] = []
    for event in mixed_traffic(humans=300):
        decisions.extend(engine.process(event))
    decisions.extend(engine.tick())
    assert engine.scorer.trained()["baseline"]
    humans = {a for a in enforced(decisions) if a.startswith(("10.201.3.", "10.201.4."))}
    assert not humans, f"{len(humans)} of 300 humans got a verdict, e.g. {sorted(humans)[:3]}"
    assert len({a for a in enforced(decisions) if a.startswith("10.201.2.")}) >= 45
