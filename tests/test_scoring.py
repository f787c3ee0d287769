"""RiskScorer: every model combined into one explainable 0-100 risk per client and cluster."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import numpy as np
import pytest

from controlplane.decisions import ClusterKey, Reason, Risk
from controlplane.models import Finding
from controlplane.models.baseline import BaselineAnomaly
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.models.journey import JourneyModel
from controlplane.models.supervised import SupervisedClassifier
from controlplane.scoring import DEFAULT_WEIGHTS, ClientView, RiskScorer
from tests.synthetic_traffic import (
    GOOGLEBOT_RANGES,
    JA4_AUTOMATION,
    JA4_CHROME,
    JA4_ROTATOR,
    Client,
    Traffic,
    cluster_features,
    trained,
    view,
)

VERSION = re.compile(r"^[a-z]+-\d{8}T\d{4}-[0-9a-f]{4}$")

# Each bot, and the reason that must explain it.
BOTS: dict[str, tuple[Callable[[Traffic], Client], str]] = {
    "distributed credential stuffing": (
        lambda t: t.credential_stuffing(1)[0],
        "credential_stuffing",
    ),
    "stealthy scraper": (lambda t: t.stealthy_scraper(), "catalog_enumeration"),
    "inventory hoarding": (lambda t: t.inventory_hoarder(), "cart_hoarding"),
    "SMS pumping": (lambda t: t.sms_pumper(), "otp_without_preamble"),
    "browser User-Agent over Python TLS": (lambda t: t.browser_ua_python_tls(), "ua_tls_mismatch"),
    "Googlebot impostor": (lambda t: t.crawler("203.0.113.77"), "crawler_impostor"),
}


def before_labels() -> RiskScorer:
    """The learning period is over; nobody has labelled anything yet."""
    m = trained()
    return RiskScorer(
        consistency=m.consistency, baseline=m.baseline, journey=m.journey, campaign=m.campaign
    )


def all_models() -> RiskScorer:
    m = trained()
    return RiskScorer(
        consistency=m.consistency,
        baseline=m.baseline,
        journey=m.journey,
        supervised=m.supervised,
        campaign=m.campaign,
    )


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return Traffic(81)


@pytest.fixture(scope="module")
def stuffing(traffic: Traffic) -> list[Client]:
    return traffic.credential_stuffing(500)


def campaigns(
    scorer: RiskScorer, traffic: Traffic, stuffing: list[Client]
) -> dict[ClusterKey, Risk]:
    """The cluster risks the engine would have computed this window."""
    people = traffic.humans(600)
    chrome = [c for c in people if c.ja4 == JA4_CHROME]
    clusters = {
        ("ja4", JA4_AUTOMATION): cluster_features(stuffing, baseline_share=0.0),
        ("http", stuffing[0].http_fingerprint): cluster_features(stuffing, baseline_share=0.0),
        ("ja4", JA4_CHROME): cluster_features(chrome, baseline_share=0.7),
    }
    return {key: scorer.score_cluster(key, features) for key, features in clusters.items()}


def check_risk(risk: Risk) -> None:
    """What every Risk promises: sorted reasons whose points add up to the score."""
    scored = [r for r in risk.reasons if r.points > 0]
    assert [r.points for r in scored] == sorted((r.points for r in scored), reverse=True)
    assert sum(r.points for r in scored) == pytest.approx(risk.score, abs=0.5)
    assert 0.0 <= risk.score <= 100.0
    assert risk.evidence <= {"syn", "tls", "http", "flow", "app"}
    for version in risk.model_versions.values():
        assert VERSION.match(version), version


@pytest.mark.parametrize("kind", list(BOTS))
def test_each_bot_scores_high_with_its_reason(
    kind: str, traffic: Traffic, stuffing: list[Client]
) -> None:
    make, code = BOTS[kind]
    client = stuffing[7] if kind == "distributed credential stuffing" else make(traffic)
    for scorer, top_n in ((before_labels(), 1), (all_models(), 3)):
        risk = scorer.score_client(
            view(client, with_clusters=True), campaigns(scorer, traffic, stuffing)
        )
        check_risk(risk)
        assert risk.score >= 70, (kind, risk)
        assert code in [r.code for r in risk.top(top_n)], (kind, risk.reasons)
        assert "http" in risk.evidence


def test_people_score_low(traffic: Traffic, stuffing: list[Client]) -> None:
    people = Traffic(82).humans(400)
    for scorer in (before_labels(), all_models()):
        cluster_risks = campaigns(scorer, traffic, stuffing)
        risks = scorer.score_clients([view(c, with_clusters=True) for c in people], cluster_risks)
        scores = np.array([r.score for r in risks])
        assert scores.max() < 30, max(risks, key=lambda r: r.score)
        assert np.median(scores) < 5
        for risk in risks:
            check_risk(risk)


def test_verified_crawler_is_capped_and_not_called_a_liar(traffic: Traffic) -> None:
    googlebot = traffic.crawler("66.249.66.1")
    risk = all_models().score_client(view(googlebot))
    assert risk.score <= 20
    assert "consistency" in risk.model_versions
    assert not [r for r in risk.reasons if r.model == "consistency" and r.points > 0]
    assert risk.reasons[-1].code == "verified_crawler"
    assert "66.249.66.1" in risk.reasons[-1].text


def test_cluster_risks(traffic: Traffic, stuffing: list[Client]) -> None:
    scorer = before_labels()
    risks = campaigns(scorer, traffic, stuffing)
    stuffed = risks[("ja4", JA4_AUTOMATION)]
    check_risk(stuffed)
    assert stuffed.score >= 90
    assert stuffed.top(1)[0].code == "credential_stuffing"
    assert stuffed.evidence == {"http", "tls"}
    assert risks[("http", stuffing[0].http_fingerprint)].evidence == {"http"}
    assert risks[("ja4", JA4_CHROME)].score < 30
    rotation = scorer.score_cluster(
        ("ja4", JA4_ROTATOR), cluster_features(traffic.rotating_proxies(300), baseline_share=0.0)
    )
    assert rotation.score >= 70
    assert "proxy_rotation" in [r.code for r in rotation.reasons]
    assert set(stuffed.model_versions) == {"campaign"}


def test_stuffing_address_alone_needs_its_campaign(
    traffic: Traffic, stuffing: list[Client]
) -> None:
    scorer = before_labels()
    alone = scorer.score_client(view(stuffing[3]))
    member = scorer.score_client(
        view(stuffing[3], with_clusters=True), campaigns(scorer, traffic, stuffing)
    )
    assert member.score > alone.score
    assert member.top(1)[0].text.startswith("member of a campaign on JA4 t13d1516h2_8daa")
    assert "tls" in member.evidence and "tls" not in alone.evidence


def test_untrained_models_are_absent_not_votes(traffic: Traffic, stuffing: list[Client]) -> None:
    # Before the learning period ends: rules and campaigns only.
    early = RiskScorer(
        consistency=ConsistencyModel(crawler_ranges=GOOGLEBOT_RANGES).fit(),
        baseline=BaselineAnomaly(),
        journey=JourneyModel(),
        supervised=SupervisedClassifier(),
        campaign=CampaignDetector().fit(),
    )
    assert early.trained() == {
        "consistency": True,
        "baseline": False,
        "journey": False,
        "supervised": False,
        "campaign": True,
    }
    liar = early.score_client(view(traffic.browser_ua_python_tls()))
    assert liar.score >= 70 and liar.top(1)[0].code == "ua_tls_mismatch"
    assert set(liar.model_versions) == {"consistency"}
    impostor = early.score_client(view(traffic.crawler("203.0.113.77")))
    assert impostor.score >= 70 and impostor.top(1)[0].code == "crawler_impostor"
    member = early.score_client(
        view(stuffing[0], with_clusters=True), campaigns(early, traffic, stuffing)
    )
    assert member.score >= 70 and member.top(1)[0].code == "credential_stuffing"
    assert set(member.model_versions) == {"consistency", "campaign"}
    person = early.score_client(view(Traffic(83).humans(1)[0]))
    assert person.score == 0.0 and person.reasons == ()
    assert RiskScorer().score_client(ClientView(key=("addr", "192.0.2.1"))).score == 0.0


def test_the_documented_combination() -> None:
    scorer = RiskScorer()

    def finding(code: str, points: float, kinds: set[str]) -> Finding:
        return Finding(Reason(code, code, points, "x"), evidence=frozenset(kinds))

    findings = {
        "consistency": [finding("a", 90.0, {"tls"}), finding("b", 45.0, {"syn"})],
        "baseline": [finding("c", 50.0, set())],
    }
    risk = scorer.combine(("addr", "192.0.2.1"), findings, {"consistency": "v"})
    s_consistency = 1 - (1 - 0.9) * (1 - 0.45)
    expected = 1 - (1 - DEFAULT_WEIGHTS["consistency"] * s_consistency) * (
        1 - DEFAULT_WEIGHTS["baseline"] * 0.5
    )
    assert risk.score == pytest.approx(100 * expected, abs=0.05)
    assert [r.code for r in risk.reasons] == ["a", "b", "c"]
    # Within the consistency model, points split by -ln(1 - p).
    a, b, _c = risk.reasons
    assert a.points / b.points == pytest.approx(math.log(0.1) / math.log(0.55), rel=0.02)
    assert risk.evidence == {"tls", "syn"}
    assert risk.model_versions == {"consistency": "v"}
    assert scorer.combine(("addr", "x"), {}, {}).score == 0.0


def test_feature_evidence_mapping() -> None:
    scorer = RiskScorer(feature_evidence={"login_failure_share": "app"})
    finding = Finding(
        Reason("x", "x", 50.0, "baseline"),
        features=("login_failure_share", "flow_gap_cv", "req_rate_60s"),
    )
    risk = scorer.combine(("addr", "x"), {"baseline": [finding]}, {})
    assert risk.evidence == {"app", "flow", "http"}


def test_scoring_time_per_client(traffic: Traffic, stuffing: list[Client]) -> None:
    scorer = all_models()
    cluster_risks = campaigns(scorer, traffic, stuffing)
    people = [view(c, with_clusters=True) for c in Traffic(84).humans(200)]
    bots = [view(make(traffic), with_clusters=True) for make, _ in BOTS.values()]
    scorer.score_clients(people[:5], cluster_risks)  # warm the caches
    start = time.perf_counter()
    for v in people + bots:
        scorer.score_client(v, cluster_risks)
    one_by_one = (time.perf_counter() - start) / (len(people) + len(bots))
    start = time.perf_counter()
    scorer.score_clients(people + bots, cluster_risks)
    batched = (time.perf_counter() - start) / (len(people) + len(bots))
    print(f"\nscoring: {1e3 * one_by_one:.2f} ms/client alone, {1e3 * batched:.2f} ms batched")
    # Generous bounds: this runs on shared CI machines.
    assert one_by_one < 0.05 and batched < 0.02
