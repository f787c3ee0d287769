"""The policy: thresholds, sensitive classes, TTLs and escalation, good bots, AI
agents, shadow mode, cluster verdicts, and the guarantees it must keep."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from controlplane.decisions import Action, Decision, Reason, Risk, TargetKind
from controlplane.goodbots import NetworkSet, TokenMatcher, parse_ranges
from controlplane.observations import SENSITIVE_CLASSES, EndpointClass
from controlplane.policy import (
    DecisionContext,
    Escalation,
    EscalationConfig,
    Policy,
    PolicyEngine,
    ja4_target,
    parse_ja4_target,
)
from sensor.errors import PolicyError

FIXTURES = Path(__file__).parent / "fixtures" / "goodbots"

CLIENT = "203.0.113.7"
JA4 = "t13d1516h2_8daaf6152771_02713d6af862"
FULL = frozenset({"syn", "tls", "http"})  # a completed handshake: the address is real
GOOGLEBOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
CHROME_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)

# No [[rules]] or [classes]: the thresholds are the schema defaults.
POLICY = """
version = 1

[allow]
cidrs = ["10.0.0.0/8", "2001:db8:a11::/48"]
ttl_s = 1800

[[crawlers]]
name = "googlebot"
user_agents = ["Googlebot"]
ranges_files = ["googlebot.json"]
connections_per_s = 20.0
packets_per_s = 5000.0
ttl_s = 600

[[crawlers]]
name = "bingbot"
user_agents = ["bingbot"]
ranges_files = ["bingbot.json"]
connections_per_s = 10.0
packets_per_s = 2000.0
ttl_s = 300

[[agents]]
name = "chatgpt-user"
user_agents = ["ChatGPT-User"]
action = "limit"
connections_per_s = 5.0
packets_per_s = 1000.0
ttl_s = 600

[[agents]]
name = "gptbot"
user_agents = ["GPTBot"]
action = "block"
ttl_s = 3600

[[agents]]
name = "shopagent"
user_agents = ["ShopAgent/1.0"]
action = "allow"
ttl_s = 600
score_override = 90

[[agents]]
name = "verified-shop"
user_agents = ["VerifiedShop"]
action = "limit"
connections_per_s = 50.0
ranges_files = ["shopagent.json"]
"""


def make_policy(extra: str = "") -> Policy:
    return Policy.from_toml(POLICY + extra, base_dir=FIXTURES)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return make_policy()


@pytest.fixture
def engine(policy: Policy) -> PolicyEngine:
    return PolicyEngine(policy)  # a fresh escalation memory per test


def risk(
    score: float,
    key: tuple[str, str] = ("addr", CLIENT),
    evidence: frozenset[str] = FULL,
    ts: float = 0.0,
    reasons: tuple[Reason, ...] = (
        Reason("ua_tls_mismatch", "User-Agent says Chrome, ClientHello says python", 60, "c"),
    ),
) -> Risk:
    return Risk(
        key=key,
        score=score,
        reasons=reasons,
        model_versions={"consistency": "1.2", "baseline": "7"},
        evidence=evidence,
        ts=ts,
    )


def one(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def summary(decisions: list[Decision]) -> list[tuple[str, str, str, str, float]]:
    return [(d.action.value, d.target_kind.value, d.target, d.rule, d.ttl_s) for d in decisions]


# ---- thresholds and endpoint classes ----


@pytest.mark.parametrize(
    ("cls", "score", "expected"),
    [
        (EndpointClass.OTHER, 39.9, None),
        (EndpointClass.OTHER, 40, ("monitor", "monitor", 300)),
        (EndpointClass.OTHER, 59.9, ("monitor", "monitor", 300)),
        (EndpointClass.OTHER, 60, ("throttle", "throttle", 600)),
        (EndpointClass.OTHER, 75, ("tarpit", "tarpit", 600)),
        (EndpointClass.OTHER, 89.9, ("tarpit", "tarpit", 600)),
        (EndpointClass.OTHER, 90, ("block", "block", 3600)),
        (EndpointClass.CATALOG, 90, ("block", "block", 3600)),
        (EndpointClass.LOGIN, 24.9, None),
        (EndpointClass.LOGIN, 25, ("monitor", "monitor@login", 300)),
        (EndpointClass.LOGIN, 45, ("throttle", "throttle@login", 600)),
        (EndpointClass.LOGIN, 60, ("tarpit", "tarpit@login", 600)),
        (EndpointClass.LOGIN, 75, ("block", "block@login", 3600)),
        (EndpointClass.OTP, 70, ("block", "block@otp", 3600)),
        (EndpointClass.OTP, 69.9, ("tarpit", "tarpit@otp", 600)),
        (EndpointClass.CHECKOUT, 75, ("block", "block@checkout", 3600)),
        (EndpointClass.CART, 80, ("block", "block@cart", 3600)),
        (EndpointClass.CART, 79.9, ("tarpit", "tarpit@cart", 600)),
        (EndpointClass.SEARCH, 50, ("throttle", "throttle@search", 600)),
    ],
)
def test_thresholds_per_class(
    engine: PolicyEngine,
    cls: EndpointClass,
    score: float,
    expected: tuple[str, str, float] | None,
) -> None:
    decisions = engine.decide(risk(score), DecisionContext(endpoint_class=cls))
    if expected is None:
        assert decisions == []
        return
    d = one(decisions)
    assert (d.action.value, d.rule, d.ttl_s) == expected
    assert (d.target_kind, d.target, d.shadow) == (TargetKind.ADDRESS, CLIENT, False)


def test_action_parameters(engine: PolicyEngine) -> None:
    throttle = one(engine.decide(risk(65), DecisionContext()))
    assert (throttle.throttle_connections_per_s, throttle.throttle_packets_per_s) == (2.0, 200.0)
    assert throttle.tarpit_syns == 0
    tarpit = one(engine.decide(risk(80, key=("addr", "203.0.113.8")), DecisionContext()))
    assert tarpit.tarpit_syns == 3
    assert (tarpit.throttle_connections_per_s, tarpit.throttle_packets_per_s) == (0.0, 0.0)


def test_every_sensitive_class_is_stricter(policy: Policy) -> None:
    base = policy.tables[EndpointClass.OTHER]
    for cls in SENSITIVE_CLASSES:
        table = policy.tables[cls]
        assert [r.action for r in table] == [r.action for r in base]
        assert all(s.min_score < b.min_score for s, b in zip(table, base, strict=True)), cls
    for cls in set(EndpointClass) - SENSITIVE_CLASSES:
        assert policy.tables[cls] == base


def test_decision_carries_reason_rule_score_versions(engine: PolicyEngine) -> None:
    d = one(engine.decide(risk(91), DecisionContext()))
    assert d.reason == "User-Agent says Chrome, ClientHello says python"
    assert (d.rule, d.score) == ("block", 91)
    assert d.model_versions == {"consistency": "1.2", "baseline": "7"}
    bare = one(engine.decide(risk(91, key=("addr", "203.0.113.9"), reasons=()), DecisionContext()))
    assert bare.reason == "risk score 91"


def test_class_with_its_own_table() -> None:
    policy = make_policy("""
[classes.checkout]
offset = 5
[[classes.checkout.rules]]
name = "hard"
min_score = 50
action = "block"
ttl_s = 7200
[[classes.checkout.rules]]
name = "watch"
min_score = 10
action = "monitor"
ttl_s = 60
[classes.login]
offset = 0
""")
    engine = PolicyEngine(policy)
    ctx = DecisionContext(endpoint_class=EndpointClass.CHECKOUT)
    assert summary(engine.decide(risk(45), ctx)) == [
        ("block", "addr", CLIENT, "hard@checkout", 7200.0)
    ]
    assert summary(engine.decide(risk(5, key=("addr", "203.0.113.8")), ctx)) == [
        ("monitor", "addr", "203.0.113.8", "watch@checkout", 60.0)
    ]
    # login's offset written as 0: the base table; otp keeps its built-in offset.
    assert policy.tables[EndpointClass.LOGIN] == policy.tables[EndpointClass.OTHER]
    assert policy.tables[EndpointClass.OTP][0].min_score == 70


# ---- TTLs and escalation ----


def test_escalation_doubles_per_repeat_and_caps(engine: PolicyEngine) -> None:
    def block_ttl(now: float) -> float:
        return one(engine.decide(risk(95, ts=now), DecisionContext())).ttl_s

    assert block_ttl(0) == 3600  # first offence: expires at 3600
    assert block_ttl(100) == 3600  # still live: the same offence, not a repeat
    assert block_ttl(4000) == 7200  # came back after expiry (3700): x2, expires 11200
    assert block_ttl(11300) == 14400  # x4, expires 25700
    assert block_ttl(25800) == 28800  # x8 = max_multiplier, expires 54600
    assert block_ttl(54700) == 28800  # capped, expires 83500
    # Clean for longer than window_s (86400) after the last expiry: forgotten.
    assert block_ttl(83500 + 86400 + 1) == 3600


def test_escalation_is_per_target_and_spans_actions(engine: PolicyEngine) -> None:
    assert one(engine.decide(risk(80, ts=0), DecisionContext())).ttl_s == 600  # tarpit
    # Another address is a separate offender.
    other = risk(95, key=("addr", "203.0.113.99"), ts=700)
    assert one(engine.decide(other, DecisionContext())).ttl_s == 3600
    # The tarpitted client comes back at block level: its second offence.
    assert one(engine.decide(risk(95, ts=700), DecisionContext())).ttl_s == 7200


def test_monitor_does_not_escalate(engine: PolicyEngine) -> None:
    for now in (0, 1000, 2000):
        assert one(engine.decide(risk(45, ts=now), DecisionContext())).ttl_s == 300
    assert len(engine.escalation) == 0


def test_escalation_ttl_cap_and_memory_bound() -> None:
    esc = Escalation(
        EscalationConfig(factor=10, max_multiplier=100, max_ttl_s=20_000, max_targets=2)
    )
    assert esc.ttl(("addr", "a"), 3600, now=0) == 3600
    assert esc.ttl(("addr", "a"), 3600, now=3601) == 20_000  # 36000 capped by max_ttl_s
    # A rule TTL above the cap is never shortened by escalation.
    assert esc.ttl(("addr", "b"), 50_000, now=0) == 50_000
    esc.ttl(("addr", "c"), 10, now=0)  # a third target evicts the least recent ("a")
    assert len(esc) == 2
    assert esc.level(("addr", "a")) == 0
    assert esc.ttl(("addr", "a"), 3600, now=30_000) == 3600


def test_reload_keeps_offenders(engine: PolicyEngine) -> None:
    assert one(engine.decide(risk(95, ts=0), DecisionContext())).ttl_s == 3600
    engine.reload(make_policy("[escalation]\nfactor = 3.0\n"))
    assert one(engine.decide(risk(95, ts=4000), DecisionContext())).ttl_s == 10800


# ---- verified crawlers ----


@pytest.mark.parametrize("addr", ["66.249.64.5", "2001:4860:4801:10::1f", "::ffff:66.249.66.30"])
def test_verified_crawler_passes_with_its_rate_limit(engine: PolicyEngine, addr: str) -> None:
    d = one(engine.decide(risk(99, key=("addr", addr)), DecisionContext(user_agent=GOOGLEBOT_UA)))
    assert d.action is Action.THROTTLE
    assert (d.rule, d.ttl_s, d.shadow) == ("crawler:googlebot", 600, False)
    assert (d.throttle_connections_per_s, d.throttle_packets_per_s) == (20.0, 5000.0)
    assert d.target == addr.removeprefix("::ffff:")  # v4-mapped is the v4 client
    assert d.reason == "verified crawler googlebot: User-Agent and address match"


def test_verified_crawler_whatever_its_score(engine: PolicyEngine) -> None:
    ctx = DecisionContext(
        user_agent="Mozilla/5.0 (compatible; bingbot/2.0)", endpoint_class=EndpointClass.LOGIN
    )
    for score in (0, 50, 100):
        d = one(engine.decide(risk(score, key=("addr", "157.55.39.1")), ctx))
        assert (d.action, d.rule, d.ttl_s) == (Action.THROTTLE, "crawler:bingbot", 300)
        assert (d.throttle_connections_per_s, d.throttle_packets_per_s) == (10.0, 2000.0)


def test_impostor_crawler_is_not_exempt(engine: PolicyEngine) -> None:
    # Googlebot's User-Agent from outside Google's ranges: the scores rule.
    ctx = DecisionContext(user_agent=GOOGLEBOT_UA)
    assert summary(engine.decide(risk(95), ctx)) == [("block", "addr", CLIENT, "block", 3600)]
    assert engine.decide(risk(10, key=("addr", "203.0.113.8")), ctx) == []
    # Google's address with Bing's User-Agent is not Bing.
    bing_claim = DecisionContext(user_agent="bingbot/2.0")
    d = one(engine.decide(risk(95, key=("addr", "66.249.64.5")), bing_claim))
    assert (d.action, d.rule) == (Action.BLOCK, "block")


def test_caller_verified_crawler(engine: PolicyEngine) -> None:
    # The engine verified by reverse DNS: the policy trusts the name it is given.
    d = one(engine.decide(risk(95), DecisionContext(verified_crawler="bingbot")))
    assert (d.action, d.rule) == (Action.THROTTLE, "crawler:bingbot")
    # A name the policy does not configure exempts nobody.
    d = one(engine.decide(risk(95), DecisionContext(verified_crawler="yandexbot")))
    assert (d.action, d.rule) == (Action.BLOCK, "block")


# ---- declared AI agents ----


def test_agent_limit(engine: PolicyEngine) -> None:
    ua = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ChatGPT-User/1.0)"
    d = one(engine.decide(risk(70), DecisionContext(user_agent=ua)))
    assert (d.action, d.rule, d.ttl_s) == (Action.THROTTLE, "agent:chatgpt-user", 600)
    assert (d.throttle_connections_per_s, d.throttle_packets_per_s) == (5.0, 1000.0)
    assert d.reason == "declared AI agent chatgpt-user: rate-limited by policy"


def test_agent_block_whatever_its_score(engine: PolicyEngine) -> None:
    ctx = DecisionContext(
        user_agent="Mozilla/5.0 (compatible; GPTBot/1.2; +https://openai.com/gptbot)"
    )
    d = one(engine.decide(risk(0), ctx))
    assert (d.action, d.rule, d.ttl_s, d.target) == (Action.BLOCK, "agent:gptbot", 3600, CLIENT)


def test_agent_allow_records_and_never_writes_the_allow_list(engine: PolicyEngine) -> None:
    ctx = DecisionContext(
        user_agent="ShopAgent/1.0 (+https://lab.example/agent)",
        endpoint_class=EndpointClass.CHECKOUT,
    )
    d = one(engine.decide(risk(85), ctx))  # checkout would block from 75
    assert (d.action, d.rule, d.ttl_s) == (Action.MONITOR, "agent:shopagent", 600)
    # score_override = 90: once the models are that sure, the thresholds rule.
    d = one(engine.decide(risk(90), ctx))
    assert (d.action, d.rule) == (Action.BLOCK, "block@checkout")


def test_agent_by_declared_name_and_token_boundaries(engine: PolicyEngine) -> None:
    d = one(engine.decide(risk(95), DecisionContext(declared_agent="chatgpt-user")))
    assert d.rule == "agent:chatgpt-user"
    for ua in ("ShopAgent/1.05", "NotGPTBot/1.0", "GPTBot-Extended", "ChatGPT-Users"):
        d = one(
            engine.decide(risk(95, key=("addr", "203.0.113.50")), DecisionContext(user_agent=ua))
        )
        assert d.rule == "block", ua
    assert engine.decide(risk(0), DecisionContext(user_agent="ShopAgent/1.0.3")) == []


def test_agent_with_ranges_counts_only_from_inside(engine: PolicyEngine) -> None:
    ctx = DecisionContext(user_agent="VerifiedShop/2")
    inside = one(engine.decide(risk(95, key=("addr", "192.0.2.10")), ctx))
    assert (inside.action, inside.rule) == (Action.THROTTLE, "agent:verified-shop")
    outside = one(engine.decide(risk(95, key=("addr", "192.0.2.200")), ctx))
    assert (outside.action, outside.rule) == (Action.BLOCK, "block")


# ---- shadow mode ----


def test_global_shadow_records_everything_enforces_nothing() -> None:
    engine = PolicyEngine(Policy.from_toml("shadow = true\n" + POLICY, base_dir=FIXTURES))
    cases = [
        (risk(95), DecisionContext(), Action.BLOCK),
        (risk(65, key=("addr", "203.0.113.8")), DecisionContext(), Action.THROTTLE),
        (
            risk(10, key=("addr", "66.249.64.5")),
            DecisionContext(user_agent=GOOGLEBOT_UA),
            Action.THROTTLE,
        ),
        (risk(10, key=("addr", "203.0.113.9")), DecisionContext(user_agent="GPTBot"), Action.BLOCK),
    ]
    for r, ctx, action in cases:
        d = one(engine.decide(r, ctx))
        assert (d.action, d.shadow) == (action, True)
    # An allow is never shadowed: it can only let traffic through.
    d = one(engine.decide(risk(95, key=("addr", "10.1.2.3")), DecisionContext()))
    assert (d.action, d.shadow) == (Action.ALLOW, False)


def test_shadow_per_rule() -> None:
    policy = make_policy("""
[[rules]]
name = "block"
min_score = 90
action = "block"
ttl_s = 3600
[[rules]]
name = "tarpit-trial"
min_score = 75
action = "tarpit"
ttl_s = 600
tarpit_syns = 2
shadow = true
""")
    engine = PolicyEngine(policy)
    tarpit = one(engine.decide(risk(80), DecisionContext()))
    assert (tarpit.action, tarpit.rule, tarpit.shadow, tarpit.tarpit_syns) == (
        Action.TARPIT,
        "tarpit-trial",
        True,
        2,
    )
    block = one(engine.decide(risk(95, key=("addr", "203.0.113.8")), DecisionContext()))
    assert (block.action, block.shadow) == (Action.BLOCK, False)
    assert engine.decide(risk(70, key=("addr", "203.0.113.9")), DecisionContext()) == []


def test_shadow_per_crawler_and_agent() -> None:
    policy = make_policy("""
[[agents]]
name = "trial-agent"
user_agents = ["TrialAgent"]
action = "block"
shadow = true
""")
    d = one(PolicyEngine(policy).decide(risk(0), DecisionContext(user_agent="TrialAgent/1")))
    assert (d.action, d.rule, d.shadow) == (Action.BLOCK, "agent:trial-agent", True)


# ---- cluster verdicts ----

MEMBERS = ("198.51.100.1", "198.51.100.2", "2001:db8:1::9")


def test_ja4_cluster_block_expands_to_members_and_ja4(engine: PolicyEngine) -> None:
    decisions = engine.decide(risk(95, key=("ja4", JA4)), DecisionContext(members=MEMBERS))
    assert summary(decisions) == [
        ("block_flow", "ja4", JA4, "block", 3600),
        ("block", "addr", "198.51.100.1", "block", 3600),
        ("block", "addr", "198.51.100.2", "block", 3600),
        ("block", "addr", "2001:db8:1::9", "block", 3600),
    ]
    assert {d.reason for d in decisions} == {"User-Agent says Chrome, ClientHello says python"}


def test_cluster_members_allow_list_crawlers_duplicates(engine: PolicyEngine) -> None:
    members = ("198.51.100.1", "10.9.9.9", "66.249.64.7", "::ffff:198.51.100.1")
    decisions = engine.decide(risk(95, key=("ja4", JA4)), DecisionContext(members=members))
    assert summary(decisions) == [
        ("block_flow", "ja4", JA4, "block", 3600),
        ("block", "addr", "198.51.100.1", "block", 3600),
        ("allow", "addr", "10.9.9.9", "allow_list", 1800),
        # 66.249.64.7 is in Googlebot's ranges: never swept up in a campaign verdict.
    ]


def test_cluster_below_block_records_the_ja4(engine: PolicyEngine) -> None:
    decisions = engine.decide(risk(80, key=("ja4", JA4)), DecisionContext(members=MEMBERS[:2]))
    assert summary(decisions) == [
        ("monitor", "ja4", JA4, "tarpit", 600),
        ("tarpit", "addr", "198.51.100.1", "tarpit", 600),
        ("tarpit", "addr", "198.51.100.2", "tarpit", 600),
    ]
    assert engine.decide(risk(20, key=("ja4", JA4)), DecisionContext(members=MEMBERS)) == []


def test_cluster_with_triggering_client(engine: PolicyEngine) -> None:
    # The request that triggered it is a member too; its identity checks apply.
    ctx = DecisionContext(client="66.249.64.5", user_agent=GOOGLEBOT_UA, members=MEMBERS[:1])
    assert summary(engine.decide(risk(95, key=("ja4", JA4)), ctx)) == [
        ("block_flow", "ja4", JA4, "block", 3600),
        ("throttle", "addr", "66.249.64.5", "crawler:googlebot", 600),
        ("block", "addr", "198.51.100.1", "block", 3600),
    ]


def test_non_ja4_cluster_keys(engine: PolicyEngine) -> None:
    tcp = engine.decide(
        risk(95, key=("tcp", "4:64+0:1460:65535:M,S,T,N,W:df")),
        DecisionContext(members=MEMBERS[:2]),
    )
    assert summary(tcp) == [
        ("block", "addr", "198.51.100.1", "block", 3600),
        ("block", "addr", "198.51.100.2", "block", 3600),
    ]
    scoped = engine.decide(
        risk(95, key=("ja4+prefix", f"{JA4}|198.51.100.0/24")), DecisionContext(members=MEMBERS[:1])
    )
    assert summary(scoped)[0] == ("block_flow", "ja4", f"{JA4}@198.51.100.0/24", "block", 3600)
    # A JA4 combined with an HTTP fingerprint is far narrower than the JA4 alone.
    combo = engine.decide(
        risk(95, key=("ja4+http", f"{JA4}|h2c0a1b2")), DecisionContext(members=MEMBERS[:1])
    )
    assert [d.target_kind for d in combo] == [TargetKind.ADDRESS]
    with pytest.raises(ValueError, match="2 kinds but 1 values"):
        engine.decide(risk(95, key=("ja4+prefix", JA4)), DecisionContext())


def test_ja4_target_format() -> None:
    assert ja4_target(JA4) == JA4
    assert ja4_target(JA4, "203.0.113.7") == f"{JA4}@203.0.113.7"
    assert parse_ja4_target(f"{JA4}@203.0.113.0/24") == (JA4, "203.0.113.0/24")
    assert parse_ja4_target(JA4) == (JA4, None)


# ---- Guarantee 3: a SYN alone never enforces on an address ----


@pytest.mark.parametrize("evidence", [frozenset({"syn"}), frozenset()])
def test_syn_only_never_blocks_an_address(engine: PolicyEngine, evidence: frozenset[str]) -> None:
    for score, rule in ((99, "block"), (80, "tarpit"), (65, "throttle")):
        d = one(engine.decide(risk(score, evidence=evidence), DecisionContext()))
        assert (d.action, d.target_kind, d.rule) == (
            Action.MONITOR,
            TargetKind.ADDRESS,
            f"{rule}/syn_only",
        )
        assert d.reason.endswith("[SYN-only evidence: the address is not enforced]")
    d = one(engine.decide(risk(0, evidence=evidence), DecisionContext(user_agent="GPTBot")))
    assert (d.action, d.rule) == (Action.MONITOR, "agent:gptbot/syn_only")


def test_syn_only_sweep(engine: PolicyEngine) -> None:
    """No score, class or key kind turns SYN-only evidence into an address verdict."""
    syn = frozenset({"syn"})
    for cls in EndpointClass:
        for score in range(0, 101, 5):
            for key in (
                ("addr", CLIENT),
                ("tcp", "sig"),
                ("prefix", "198.51.100.0/24"),
                ("ja4", JA4),
            ):
                ctx = DecisionContext(endpoint_class=cls, members=MEMBERS)
                for d in engine.decide(risk(score, key=key, evidence=syn), ctx):
                    if d.target_kind in (TargetKind.ADDRESS, TargetKind.CIDR):
                        assert d.action is Action.MONITOR, (cls, score, key, d)


def test_handshake_evidence_does_enforce(engine: PolicyEngine) -> None:
    d = one(engine.decide(risk(99, evidence=frozenset({"syn", "tls"})), DecisionContext()))
    assert d.action is Action.BLOCK


# ---- shared addresses: CGNAT, corporate proxies ----

FLOWS = ("203.0.113.7:50000->192.0.2.1:443", "203.0.113.7:50002->192.0.2.1:443")


def test_shared_address_blocks_the_fingerprint_not_the_address(engine: PolicyEngine) -> None:
    ctx = DecisionContext(fingerprints_at_address=12, ja4=JA4, flows=FLOWS)
    assert summary(engine.decide(risk(95), ctx)) == [
        ("block_flow", "ja4", f"{JA4}@{CLIENT}", "block/shared_address", 3600),
        ("block_flow", "flow", FLOWS[0], "block/shared_address", 3600),
        ("block_flow", "flow", FLOWS[1], "block/shared_address", 3600),
    ]
    # Below the threshold of distinct fingerprints, the address itself.
    few = DecisionContext(fingerprints_at_address=3, ja4=JA4, flows=FLOWS)
    d = one(engine.decide(risk(95, key=("addr", "203.0.113.8")), few))
    assert (d.action, d.target_kind) == (Action.BLOCK, TargetKind.ADDRESS)


def test_shared_address_tarpit_throttle_and_nothing_to_scope(engine: PolicyEngine) -> None:
    tarpit = engine.decide(risk(80), DecisionContext(fingerprints_at_address=4, ja4=JA4))
    assert summary(tarpit) == [
        ("block_flow", "ja4", f"{JA4}@{CLIENT}", "tarpit/shared_address", 600)
    ]
    throttle = one(
        engine.decide(
            risk(65, key=("addr", "203.0.113.8")),
            DecisionContext(fingerprints_at_address=4, ja4=JA4),
        )
    )
    assert (throttle.action, throttle.rule) == (Action.MONITOR, "throttle/shared_address")
    bare = one(
        engine.decide(
            risk(95, key=("addr", "203.0.113.9")), DecisionContext(fingerprints_at_address=4)
        )
    )
    assert (bare.action, bare.rule) == (Action.MONITOR, "block/shared_address/no_flow")


def test_shared_member_of_a_ja4_cluster(engine: PolicyEngine) -> None:
    ctx = DecisionContext(members=MEMBERS[:2], member_fingerprints={"198.51.100.2": 30})
    decisions = engine.decide(risk(95, key=("ja4", JA4)), ctx)
    assert summary(decisions) == [
        ("block_flow", "ja4", JA4, "block", 3600),
        ("block", "addr", "198.51.100.1", "block", 3600),
        ("monitor", "addr", "198.51.100.2", "block/shared_address", 3600),
    ]
    assert decisions[2].reason.endswith("[its new flows fall under the cluster's JA4 block]")
    # A tarpit-level JA4 cluster: the shared member's JA4 is blocked at its address only.
    decisions = engine.decide(risk(80, key=("ja4", JA4), ts=1), ctx)
    assert summary(decisions)[2] == (
        "block_flow",
        "ja4",
        f"{JA4}@198.51.100.2",
        "tarpit/shared_address",
        600,
    )


# ---- Guarantee 2: the allow list always wins ----


@pytest.mark.parametrize("addr", ["10.200.0.1", "2001:db8:a11::5", "::ffff:10.0.0.1"])
def test_allow_list_wins(engine: PolicyEngine, addr: str) -> None:
    ctx = DecisionContext(
        user_agent="GPTBot",
        endpoint_class=EndpointClass.OTP,
        fingerprints_at_address=50,
        ja4=JA4,
        flows=FLOWS,
    )
    d = one(engine.decide(risk(100, key=("addr", addr)), ctx))
    assert (d.action, d.target_kind, d.rule, d.ttl_s, d.shadow) == (
        Action.ALLOW,
        TargetKind.ADDRESS,
        "allow_list",
        1800,
        False,
    )
    assert d.reason in ("allow list: 10.0.0.0/8", "allow list: 2001:db8:a11::/48")


def test_allow_decisions_for_the_kernel(policy: Policy) -> None:
    assert [(d.action, d.target_kind, d.target, d.ttl_s) for d in policy.allow_decisions()] == [
        (Action.ALLOW, TargetKind.CIDR, "10.0.0.0/8", 1800),
        (Action.ALLOW, TargetKind.CIDR, "2001:db8:a11::/48", 1800),
    ]


def test_client_must_match_an_address_key(engine: PolicyEngine) -> None:
    with pytest.raises(ValueError, match="is not the risk's address"):
        engine.decide(risk(95), DecisionContext(client="203.0.113.8"))


# ---- loading and validation ----


def test_default_policy_loads() -> None:
    policy = Policy.default()
    assert policy.config.version == 1 and policy.shadow is False
    other = policy.tables[EndpointClass.OTHER]
    assert [(r.label, r.min_score, r.action.value, r.ttl_s) for r in other] == [
        ("block", 90, "block", 3600),
        ("tarpit", 75, "tarpit", 600),
        ("throttle", 60, "throttle", 600),
        ("monitor", 40, "monitor", 300),
    ]
    assert [r.min_score for r in policy.tables[EndpointClass.LOGIN]] == [75, 60, 45, 25]
    assert set(policy.crawlers) == {"googlebot", "bingbot"}
    assert {n: a.action for n, a in policy.agents.items()} == {
        "chatgpt-user": "limit",
        "claude-user": "limit",
        "perplexitybot": "limit",
        "gptbot": "block",
        "claudebot": "block",
        "shopagent": "allow",
    }
    # No ranges shipped: a crawler claim alone exempts nobody.
    engine = PolicyEngine(policy)
    d = one(
        engine.decide(
            risk(95, key=("addr", "66.249.64.5")), DecisionContext(user_agent=GOOGLEBOT_UA)
        )
    )
    assert (d.action, d.rule) == (Action.BLOCK, "block")
    assert one(engine.decide(risk(10), DecisionContext(user_agent="ClaudeBot/1.0"))).rule == (
        "agent:claudebot"
    )


def test_the_empty_policy_is_the_schema_defaults() -> None:
    empty = Policy.from_toml("")
    assert empty.tables == Policy.default().tables
    assert [str(n) for n in empty.allow.networks] == ["127.0.0.0/8", "::1/128"]


def test_load_reads_ranges_relative_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "ranges").mkdir()
    (tmp_path / "ranges" / "g.json").write_text((FIXTURES / "googlebot.json").read_text())
    (tmp_path / "policy.toml").write_text(
        '[[crawlers]]\nname = "g"\nuser_agents = ["Googlebot"]\nranges_files = ["ranges/g.json"]\n'
    )
    policy = Policy.load(tmp_path / "policy.toml")
    assert [str(n) for n in policy.crawlers["g"].ranges.networks] == [
        "2001:4860:4801:10::/64",
        "2001:4860:4801:12::/64",
        "66.249.64.0/27",
        "66.249.66.0/27",
        "66.249.68.0/27",
    ]


RULE = '[[rules]]\nname = "r"\nmin_score = 50\naction = "block"\nttl_s = 60\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 2", "version: Input should be 1 (got 2)"),
        ("shadow = 'yes'", "shadow: Input should be a valid boolean (got 'yes')"),
        ("sahdow = true", "sahdow: Extra inputs are not permitted (got True)"),
        (
            "[allow]\ncidrs = ['10.1.2.3/8']",
            "allow.cidrs[0]: not a CIDR or address (10.1.2.3/8 has host bits set) "
            "(got '10.1.2.3/8')",
        ),
        ("[allow]\ncidrs = ['not-a-net']", "allow.cidrs[0]: not a CIDR or address"),
        ("[allow]\nttl_s = 0", "allow.ttl_s: Input should be greater than 0 (got 0)"),
        (
            "[allow]\nttl_s = 999999999",
            "allow.ttl_s: Input should be less than or equal to 604800 (got 999999999)",
        ),
        (
            RULE.replace('"block"', '"blok"'),
            "rules[0].action: Input should be 'monitor', 'throttle', 'tarpit', 'block' or "
            "'block_flow' (got 'blok')",
        ),
        (RULE.replace('"block"', '"allow"'), "rules[0].action: Input should be"),
        (
            RULE.replace("50", "150"),
            "rules[0].min_score: Input should be less than or equal to 100 (got 150)",
        ),
        (
            RULE.replace("50", "'50'"),
            "rules[0].min_score: Input should be a valid number (got '50')",
        ),
        (
            RULE + "actoin = 'block'\n",
            "rules[0].actoin: Extra inputs are not permitted (got 'block')",
        ),
        (
            RULE + "connections_per_s = 3.0\n",
            "rules[0]: connections_per_s=3.0: only a throttle has rates (action is 'block')",
        ),
        (
            RULE.replace('"block"', '"throttle"'),
            "rules[0]: connections_per_s=0 and packets_per_s=0: a throttle needs at least one rate",
        ),
        (RULE.replace('"block"', '"tarpit"'), "rules[0]: tarpit_syns=0: a tarpit drops 1-6 SYNs"),
        (
            RULE.replace('"block"', '"tarpit"') + "tarpit_syns = 7\n",
            "rules[0].tarpit_syns: Input should be less than or equal to 6 (got 7)",
        ),
        (RULE + RULE, "rules: name='r' appears twice in one table"),
        (RULE + RULE.replace('"r"', '"s"'), "rules: min_score=50 appears twice in one table"),
        (
            RULE.replace('name = "r"', 'name = "has space"'),
            "rules[0].name: String should match pattern",
        ),
        ("[classes.logn]\noffset = 5", "classes: unknown endpoint class 'logn'"),
        (
            "[classes.login]\noffset = 500",
            "classes.login.offset: Input should be less than or equal to 100 (got 500)",
        ),
        (
            "[escalation]\nfactor = 0.5",
            "escalation.factor: Input should be greater than or equal to 1 (got 0.5)",
        ),
        (
            "[shared_address]\nmin_fingerprints = 1",
            "shared_address.min_fingerprints: Input should be greater than or equal to 2 (got 1)",
        ),
        (
            "[[crawlers]]\nname = 'g'\nuser_agents = []",
            "crawlers[0].user_agents: List should have at least 1 item after validation, not 0 "
            "(got [])",
        ),
        (
            "[[crawlers]]\nname = 'g'\nuser_agents = ['Google bot']",
            "crawlers[0].user_agents[0]: a User-Agent token is one product token, without spaces "
            "(got 'Google bot')",
        ),
        (
            "[[crawlers]]\nname = 'g'\nuser_agents = ['G']\nranges = ['1.2.3.0/33']",
            "crawlers[0].ranges[0]: not a CIDR or address",
        ),
        (
            "[[agents]]\nname = 'a'\nuser_agents = ['A']\naction = 'permit'",
            "agents[0].action: Input should be 'allow', 'limit' or 'block' (got 'permit')",
        ),
        (
            "[[agents]]\nname = 'a'\nuser_agents = ['A']\naction = 'limit'",
            "agents[0]: connections_per_s=0 and packets_per_s=0: a throttle needs",
        ),
        (
            "[[agents]]\nname = 'a'\nuser_agents = ['A']\naction = 'block'\npackets_per_s = 9.0",
            "agents[0]: packets_per_s=9.0: only a throttle has rates",
        ),
        (
            "[[agents]]\nname = 'a'\nuser_agents = ['A']\naction = 'block'\n"
            "[[agents]]\nname = 'b'\nuser_agents = ['a']\naction = 'block'",
            "agents: user_agents token 'a' names both 'a' and 'b'",
        ),
        ("[[agents]]\nname = 'a'\naction = 'block'", "agents[0].user_agents: Field required"),
    ],
)
def test_bad_policy_names_the_key_and_value(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("invalid policy: ")


def test_bad_toml() -> None:
    with pytest.raises(PolicyError, match=r"^policy is not valid TOML: .*line 1"):
        Policy.validate_text("shadow = = true")


def test_bad_ranges_files(tmp_path: Path) -> None:
    def crawler(files: str) -> str:
        return f"[[crawlers]]\nname = 'g'\nuser_agents = ['G']\nranges_files = [{files}]\n"

    with pytest.raises(
        PolicyError,
        match=r"crawlers\[0\]\.ranges_files\[0\]: cannot read "
        r"ranges file '.*missing\.json'",
    ):
        Policy.from_toml(crawler("'missing.json'"), base_dir=tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"prefixes": [{"ipv4Prefix": "66.249.64.0/27"}, {"ipv4Prefix": "2001:db8::/32"}]}'
    )
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(crawler("'ok.json', 'bad.json'").replace("'ok.json', ", ""), tmp_path)
    assert str(caught.value) == (
        f"invalid policy: crawlers[0].ranges_files[0]: {bad}: prefixes.1.ipv4Prefix: "
        "not an IPv4 prefix: '2001:db8::/32'"
    )


def test_load_missing_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read policy '.*nope\.toml'"):
        Policy.load(tmp_path / "nope.toml")


# ---- goodbots building blocks ----


def test_parse_ranges_published_format() -> None:
    nets = parse_ranges(
        '{"creationTime": "x", "syncToken": "1", "prefixes": ['
        '{"ipv4Prefix": "66.249.64.0/27", "service": "crawl"},'
        '{"ipv6Prefix": "2001:4860:4801:10::/64"}]}'
    )
    assert [str(n) for n in nets] == ["66.249.64.0/27", "2001:4860:4801:10::/64"]
    for text, message in [
        ("[", "not valid JSON"),
        ('{"creationTime": "x"}', "prefixes: Field required"),
        ('{"prefixes": [{}]}', "prefixes.0: needs exactly one of ipv4Prefix or ipv6Prefix"),
        ('{"prefixes": [{"ipv6Prefix": "66.249.64.0/27"}]}', "not an IPv6 prefix"),
        ('{"prefixes": [{"ipv4Prefix": "66.249.64.0/99"}]}', "not a CIDR: '66.249.64.0/99'"),
    ]:
        with pytest.raises(PolicyError, match=message):
            parse_ranges(text, "f.json")


def test_network_set() -> None:
    nets = NetworkSet(
        ipaddress.ip_network(n)
        for n in ("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "2001:db8::/32")
    )
    inside = ("10.0.0.0", "10.0.1.255", "2001:db8:ffff::1")
    outside = ("9.255.255.255", "10.0.2.0", "2001:db9::", "::a00:1")
    assert all(ipaddress.ip_address(a) in nets for a in inside)
    assert not any(ipaddress.ip_address(a) in nets for a in outside)
    assert ipaddress.ip_address("1.2.3.4") not in NetworkSet()
    assert str(nets.covering(ipaddress.ip_address("10.0.0.200"))) == "10.0.0.0/24"


def test_token_matcher() -> None:
    m = TokenMatcher({"Googlebot": "google", "Googlebot-Image": "google-image", "bingbot": "bing"})
    assert m.match(GOOGLEBOT_UA) == "google"
    assert m.match("Googlebot-Image/1.0") == "google-image"
    assert m.match("Mozilla/5.0 (compatible; BINGBOT/2.0)") == "bing"
    assert m.match(CHROME_UA) is None
    assert m.match("xGooglebot") is None
    assert m.match(None) is None
    assert TokenMatcher({}).match(GOOGLEBOT_UA) is None


def test_block_flow_rule_is_flow_scoped_everywhere() -> None:
    policy = make_policy(
        '[[rules]]\nname = "cut"\nmin_score = 50\naction = "block_flow"\nttl_s = 120\n'
    )
    engine = PolicyEngine(policy)
    ctx = DecisionContext(ja4=JA4, flows=FLOWS[:1])
    assert summary(engine.decide(risk(60), ctx)) == [
        ("block_flow", "ja4", f"{JA4}@{CLIENT}", "cut", 120),
        ("block_flow", "flow", FLOWS[0], "cut", 120),
    ]
    shared = DecisionContext(ja4=JA4, fingerprints_at_address=9)
    assert summary(engine.decide(risk(60, key=("addr", "203.0.113.8")), shared)) == [
        ("block_flow", "ja4", f"{JA4}@203.0.113.8", "cut", 120),
    ]
    bare = one(engine.decide(risk(60, key=("addr", "203.0.113.9")), DecisionContext()))
    assert (bare.action, bare.rule) == (Action.MONITOR, "cut/no_flow")
