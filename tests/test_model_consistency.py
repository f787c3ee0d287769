"""ConsistencyModel: lying clients and crawlers claimed from the wrong addresses."""

from __future__ import annotations

import pytest

from controlplane.models.consistency import ConsistencyModel, parse_tcp_signature
from sensor.fingerprint.tcp import os_guess
from tests.synthetic_traffic import (
    GOOGLEBOT_RANGES,
    JA4_CHROME,
    JA4_GO,
    JA4_REQUESTS,
    TCP_LINUX,
    TCP_MACOS,
    TCP_WINDOWS,
    UA_CHROME_WINDOWS,
    UA_GOOGLEBOT,
)

BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"


@pytest.fixture(scope="module")
def model() -> ConsistencyModel:
    return ConsistencyModel(crawler_ranges=GOOGLEBOT_RANGES).fit()


def test_browser_user_agent_over_python_tls_on_linux(model: ConsistencyModel) -> None:
    found = model.assess(
        user_agent=UA_CHROME_WINDOWS, ja4=JA4_REQUESTS, tcp=TCP_LINUX, client="198.51.100.7"
    )
    codes = [f.reason.code for f in found.findings]
    assert codes == ["ua_tls_mismatch", "ua_os_mismatch"]
    top = found.findings[0].reason
    assert top.points >= 90 and top.model == "consistency"
    assert "claims Chrome" in top.text and "python-requests" in top.text
    assert found.findings[0].evidence == {"http", "tls"}
    assert found.findings[1].evidence == {"http", "syn"}
    assert model.score(user_agent=UA_CHROME_WINDOWS, ja4=JA4_REQUESTS, tcp=TCP_LINUX) > 0.9


def test_honest_browser_is_consistent(model: ConsistencyModel) -> None:
    found = model.assess(user_agent=UA_CHROME_WINDOWS, ja4=JA4_CHROME, tcp=TCP_WINDOWS)
    assert found.findings == ()
    assert found.probability == 0.0
    assert model.explain(user_agent=UA_CHROME_WINDOWS, ja4=JA4_CHROME, tcp=TCP_WINDOWS) == []


def test_missing_layers_are_not_evidence(model: ConsistencyModel) -> None:
    assert model.score(user_agent=UA_CHROME_WINDOWS) == 0.0
    assert model.score(ja4=JA4_REQUESTS, tcp=TCP_LINUX) == 0.0
    assert model.score(user_agent=UA_CHROME_WINDOWS, ja4=JA4_REQUESTS, tcp="garbage") > 0.8


def test_requests_without_a_user_agent_are_flagged_once_requests_were_seen(
    model: ConsistencyModel,
) -> None:
    found = model.assess(ja4=JA4_GO, tcp=TCP_LINUX, anonymous=True)
    assert [f.reason.code for f in found.findings] == ["no_user_agent"]
    assert found.findings[0].reason.points == 85.0
    assert found.findings[0].evidence == {"http"}
    assert model.score(user_agent="", anonymous=True) == 0.85  # an empty header says nothing
    # No request seen yet (a TLS-only flow): no evidence either way.
    assert model.score(ja4=JA4_GO, tcp=TCP_LINUX) == 0.0
    # A named client is judged on its name, not on this rule.
    assert model.score(user_agent="python-requests/2.31", anonymous=True) == 0.0
    assert ConsistencyModel(no_user_agent_points=50.0).fit().score(anonymous=True) == 0.5


def test_googlebot_impostor_is_flagged(model: ConsistencyModel) -> None:
    found = model.assess(user_agent=UA_GOOGLEBOT, ja4=JA4_GO, tcp=TCP_LINUX, client="203.0.113.77")
    assert found.claimed_crawler == "googlebot"
    assert found.verified_crawler is None
    reason = found.findings[0].reason
    assert reason.code == "crawler_impostor"
    assert reason.points >= 90
    assert "203.0.113.77" in reason.text and "googlebot" in reason.text


@pytest.mark.parametrize("address", ["66.249.66.1", "2001:4860:4801:10::1", "::ffff:66.249.70.3"])
def test_real_googlebot_from_its_ranges_is_verified(model: ConsistencyModel, address: str) -> None:
    found = model.assess(user_agent=UA_GOOGLEBOT, ja4=JA4_GO, tcp=TCP_LINUX, client=address)
    assert found.verified_crawler == "googlebot"
    assert found.findings == ()


def test_crawler_without_configured_ranges_is_not_judged(model: ConsistencyModel) -> None:
    found = model.assess(user_agent=BINGBOT, ja4=JA4_GO, client="203.0.113.77")
    assert found.claimed_crawler == "bingbot"
    assert found.verified_crawler is None
    assert found.findings == ()
    assert any("no configured ranges" in note for note in found.checked)


def test_patterns_and_ranges_are_configurable() -> None:
    model = ConsistencyModel(
        crawler_patterns={"examplebot": r"ExampleBot/\d"},
        crawler_ranges={"examplebot": ["192.0.2.0/24"]},
    ).fit()
    assert model.score(user_agent="ExampleBot/1.0", client="192.0.2.9") == 0.0
    assert model.score(user_agent="ExampleBot/1.0", client="198.51.100.1") > 0.9
    assert model.score(user_agent=UA_GOOGLEBOT, client="198.51.100.1") == 0.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"crawler_ranges": {"googlebot": ["not a cidr"]}}, "googlebot"),
        ({"crawler_ranges": {"nobot": ["192.0.2.0/24"]}}, "no pattern"),
        ({"crawler_patterns": {"x": "("}}, "bad User-Agent pattern"),
    ],
)
def test_bad_configuration_fails_at_fit(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConsistencyModel(**params).fit()


@pytest.mark.parametrize("text", [TCP_LINUX, TCP_WINDOWS, TCP_MACOS])
def test_compact_tcp_signature_round_trips(text: str) -> None:
    signature = parse_tcp_signature(text)
    assert signature is not None
    assert str(signature) == text
    assert os_guess(signature).confidence >= 0.9


@pytest.mark.parametrize("text", ["", "4:64", "4:63:1460:mss*44:7:M:df", "x:64:-:1:-:-:-"])
def test_malformed_tcp_signature_is_a_missing_layer(text: str) -> None:
    assert parse_tcp_signature(text) is None
