"""CampaignDetector: many polite addresses that together are one bot."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.models.campaign import CAMPAIGN_FEATURES, CampaignDetector, key_words
from tests.synthetic_traffic import (
    JA4_AUTOMATION,
    JA4_CHROME,
    JA4_ROTATOR,
    Traffic,
    client_features,
    cluster_features,
    trained,
)

STUFFING_KEY = ("ja4", JA4_AUTOMATION)


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return Traffic(41)


@pytest.fixture(scope="module")
def detector() -> CampaignDetector:
    return trained().campaign


def test_distributed_credential_stuffing_is_one_campaign(
    traffic: Traffic, detector: CampaignDetector
) -> None:
    clients = traffic.credential_stuffing(500)
    # Each address alone is polite: one or two logins a minute.
    assert max(client_features(c)["req_rate_60s"] for c in clients) <= 2
    features = cluster_features(clients, baseline_share=0.0)
    assert detector.score(features, STUFFING_KEY) >= 0.9
    top = detector.explain(features, STUFFING_KEY)[0]
    assert top.code == "credential_stuffing" and top.model == "campaign"
    assert top.text.startswith("500 addresses share JA4 t13d1516h2_8daa")
    assert "login attempts in 10 min" in top.text and "96% failures" in top.text
    assert "each address at ~1." in top.text


def test_rotating_residential_proxies_with_one_fingerprint(
    traffic: Traffic, detector: CampaignDetector
) -> None:
    clients = traffic.rotating_proxies(300)
    features = cluster_features(clients, baseline_share=0.0)
    key = ("ja4", JA4_ROTATOR)
    assert detector.score(features, key) >= 0.9
    assert "proxy_rotation" in [r.code for r in detector.explain(features, key)]


def test_popular_browser_shared_by_many_people_is_not_a_campaign(
    traffic: Traffic, detector: CampaignDetector
) -> None:
    people = [c for c in traffic.humans(1500) if c.ja4 == JA4_CHROME]
    assert len(people) > 800
    returning = frozenset(c.address for c in people[::2])
    features = cluster_features(people, baseline_share=0.7, known_addresses=returning)
    assert detector.score(features, ("ja4", JA4_CHROME)) == 0.0
    assert detector.explain(features, ("ja4", JA4_CHROME)) == []


def test_breadth_alone_or_behaviour_alone_is_not_enough(detector: CampaignDetector) -> None:
    stuffing_alone = {
        "distinct_addrs": 1,
        "login_attempts_600s": 400,
        "login_failure_share": 0.97,
        "requests_600s": 400,
    }
    assert detector.score(stuffing_alone) == 0.0  # one address: per-client models' job
    many = {
        "distinct_addrs": 5000,
        "requests_600s": 40000,
        "sensitive_share_600s": 0.3,
        "login_failure_share": 0.1,
        "login_attempts_600s": 900,
        "synchrony": 0.9,
    }
    assert detector.score(many) == 0.0
    assert 0.6 < detector.breadth(20) < detector.breadth(50) < 1.0


def test_thresholds_rise_above_this_hosts_own_clusters() -> None:
    # A host whose users fail 55% of logins (a confusing SSO): stuffing needs more.
    rows = np.zeros((20, len(CAMPAIGN_FEATURES)))
    names = list(CAMPAIGN_FEATURES)
    rows[:, names.index("distinct_addrs")] = 50
    rows[:, names.index("login_failure_share")] = np.linspace(0.4, 0.55, 20)
    fitted = CampaignDetector().fit(rows, feature_names=names)
    assert fitted.thresholds_["login_failure_share"] == pytest.approx(0.65, abs=0.01)
    cluster = {"distinct_addrs": 100, "login_attempts_600s": 300, "login_failure_share": 0.6}
    assert CampaignDetector().fit().score(cluster) > 0.7
    assert fitted.score(cluster) == 0.0
    with pytest.raises(ValueError, match="feature_names"):
        CampaignDetector().fit(rows)


def test_key_words() -> None:
    assert key_words(("ja4+http", "t13d1516h2_8daaf6152771_02713d6af862")) == (
        "JA4+HTTP fingerprint t13d1516h2_8daaf6…"
    )
    assert key_words(("prefix", "100.64.0.0/24")) == "network prefix 100.64.0.0/24"
