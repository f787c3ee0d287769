"""FeatureStore on constructed event streams: exact values where the stream makes
them exact, and the decayed windows against exact window counts."""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import math
import random
import tracemalloc

import numpy as np
import pytest

from controlplane.features import (
    FEATURE_DEFAULTS,
    FEATURE_DESCRIPTIONS,
    FEATURE_EVIDENCE,
    FEATURE_NAMES,
    MEMBER_FEATURES,
    FeatureStore,
    network_prefix,
)
from controlplane.observations import (
    ClientFingerprint,
    Connection,
    ConnectionStage,
    FlowShape,
    IPAddress,
    Request,
    endpoint_class,
    route_template,
)

JA4_CHROME = "t13d1517h2_8daaf6152771_cb7bf5808d99"
JA4_REQUESTS = "t13d3112h1_e8f1e7e78f70_b26ce05bbdd6"
TCP_WINDOWS = "4:128:1460:65535:mss,nop,ws,nop,nop,sok:8"
TCP_LINUX = "4:64:1460:64240:mss,sok,ts,nop,ws:7"
HTTP_FP = "h2c4e1f0a9b3d"
UA_CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/124.0.0.0 Safari/537.36"
T0 = 1_700_000_000.0  # a realistic clock: the epoch trick must cope with large times


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def fingerprint(ja4: str | None = JA4_CHROME, tcp: str | None = TCP_WINDOWS) -> ClientFingerprint:
    return ClientFingerprint(ja4=ja4, tcp_signature=tcp, os_family="windows")


def request(
    ts: float,
    client: str | IPAddress = "198.51.100.7",
    path: str = "/",
    *,
    status: int | None = 200,
    ja4: str | None = JA4_CHROME,
    tcp: str | None = TCP_WINDOWS,
    http: str | None = HTTP_FP,
    ua: str | None = UA_CHROME,
    cookie: bool = True,
    referer: bool = False,
    method: str = "GET",
) -> Request:
    route = route_template(path)
    return Request(
        ts=ts,
        client=ip(client) if isinstance(client, str) else client,
        client_port=40000,
        method=method,
        path=path,
        route=route,
        endpoint_class=endpoint_class(route),
        status=status,
        user_agent=ua,
        http_fingerprint=http,
        fingerprint=fingerprint(ja4, tcp),
        has_cookie=cookie,
        has_referer=referer,
    )


def connection(
    ts: float,
    client: str = "198.51.100.7",
    stage: ConnectionStage = ConnectionStage.SYN,
    *,
    ja4: str | None = None,
    tcp: str | None = TCP_WINDOWS,
) -> Connection:
    return Connection(
        ts=ts,
        client=ip(client),
        client_port=40000,
        server_port=443,
        stage=stage,
        fingerprint=fingerprint(ja4, tcp),
    )


def flow(
    ts: float,
    client: str = "198.51.100.7",
    *,
    up: int,
    down: int,
    duration: float = 1.0,
    segments: int = 4,
    gap_cv: float | None = None,
    ja4: str | None = JA4_CHROME,
) -> FlowShape:
    return FlowShape(
        ts=ts,
        client=ip(client),
        client_port=40000,
        server_port=443,
        duration_s=duration,
        bytes_up=up,
        bytes_down=down,
        data_segments=segments,
        gap_mean_s=None if gap_cv is None else 0.1,
        gap_cv=gap_cv,
        syn_retransmissions=0,
        fingerprint=fingerprint(ja4),
    )


def addr(text: str = "198.51.100.7") -> tuple[str, str]:
    return ("addr", text)


def feed(store: FeatureStore, observations: list[Request] | list[Connection]) -> None:
    for obs in observations:
        store.observe(obs)


# ---- the vector ----


def test_feature_tables_cover_the_names_in_one_order() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    for table in (FEATURE_DESCRIPTIONS, FEATURE_DEFAULTS, FEATURE_EVIDENCE):
        assert list(table) == list(FEATURE_NAMES)
    assert all(FEATURE_DESCRIPTIONS[name] for name in FEATURE_NAMES)
    assert set(FEATURE_EVIDENCE.values()) <= {"syn", "tls", "http", "flow", "app"}


def test_vector_is_features_in_name_order_and_never_nan() -> None:
    store = FeatureStore()
    store.observe(connection(T0))
    store.observe(connection(T0 + 0.01, stage=ConnectionStage.HELLO, ja4=JA4_CHROME))
    for i in range(5):
        store.observe(request(T0 + i, path=f"/products/{i}", status=200 + 100 * (i % 3)))
    store.observe(flow(T0 + 6, up=100, down=1000, gap_cv=0.5))
    store.observe_app_event(ip("198.51.100.7"), 40000, "login_failure", T0 + 6)
    now = T0 + 7
    keys = list(store.keys())
    assert len(keys) == len(store) == 7
    matrix = store.matrix(keys, now)
    assert matrix.shape == (7, len(FEATURE_NAMES))
    assert matrix.dtype == np.float64
    assert np.isfinite(matrix).all()
    for row, key in zip(matrix, keys, strict=True):
        values = store.features(key, now)
        assert list(values) == list(FEATURE_NAMES)
        assert row.tolist() == [values[name] for name in FEATURE_NAMES]
    # a key never seen reads the defaults, not NaN and not an error
    unknown = store.vector(("ja4", "t13d0000h2_000000000000_000000000000"), now)
    assert unknown.tolist() == [FEATURE_DEFAULTS[name] for name in FEATURE_NAMES]
    assert store.matrix([], now).shape == (0, len(FEATURE_NAMES))


def test_keys_for_names_each_fingerprint_and_skips_missing_ones() -> None:
    store = FeatureStore()
    prefix = "198.51.100.0/24"
    assert store.keys_for(request(T0)) == [
        ("addr", "198.51.100.7"),
        ("prefix", prefix),
        ("ja4", JA4_CHROME),
        ("ja4+prefix", f"{JA4_CHROME}|{prefix}"),
        ("ja4+tcp", f"{JA4_CHROME}|{TCP_WINDOWS}"),
        ("tcp", TCP_WINDOWS),
        ("http", HTTP_FP),
    ]
    assert store.keys_for(connection(T0)) == [
        ("addr", "198.51.100.7"),
        ("prefix", prefix),
        ("tcp", TCP_WINDOWS),
    ]
    six = request(T0, "2001:db8:1:2:3:4:5:6", ja4=None, tcp=None, http=None)
    assert store.keys_for(six) == [
        ("addr", "2001:db8:1:2:3:4:5:6"),
        ("prefix", "2001:db8:1:2::/64"),
    ]
    store.observe(six)
    assert set(store.keys()) == set(store.keys_for(six))
    assert network_prefix(ip("::ffff:192.0.2.9")) == "192.0.2.0/24"


def test_observe_returns_the_keys_it_updated() -> None:
    store = FeatureStore()
    first = request(T0)
    # The prefix has one address so far: the address's state stands for it.
    assert store.observe(first) == [k for k in store.keys_for(first) if k[0] != "prefix"]
    second = request(T0 + 1.0, "198.51.100.8")
    assert store.observe(second) == store.keys_for(second)
    # A repeat of the address's keys takes the kept list: the same keys.
    assert store.observe(request(T0 + 2.0, "198.51.100.8")) == store.keys_for(second)
    assert store.observe(connection(T0 + 3.0)) == [
        ("addr", "198.51.100.7"),
        ("prefix", "198.51.100.0/24"),
        ("tcp", TCP_WINDOWS),
    ]


# ---- timing ----


def test_a_bot_every_two_seconds_has_regular_gaps() -> None:
    store = FeatureStore()
    feed(store, [request(T0 + 2.0 * i, path="/login", method="POST") for i in range(301)])
    f = store.features(addr(), T0 + 600.0)
    assert f["gap_mean_s"] == pytest.approx(2.0, rel=1e-9)
    assert f["gap_cv"] < 1e-6
    assert f["gap_min_s"] == 2.0
    assert f["gap_entropy"] == 0.0
    assert f["route_entropy"] == 0.0
    assert f["distinct_routes"] == 1.0
    assert f["login_share"] == pytest.approx(1.0)
    assert f["sensitive_share"] == pytest.approx(1.0)
    assert f["catalog_share"] == 0.0
    assert store.request_count(addr()) == 301
    assert store.first_seen(addr()) == T0
    assert store.last_seen(addr()) == T0 + 600.0


def test_a_person_with_heavy_tailed_think_times_is_irregular() -> None:
    rng = random.Random(7)
    store = FeatureStore()
    t = T0
    pages = ["/", "/search", "/products/12", "/products/40", "/cart", "/account"]
    for _ in range(60):
        # a page: the document, then its assets' API calls within 300 ms
        for _ in range(rng.randint(1, 4)):
            store.observe(request(t, path=rng.choice(pages)))
            t += rng.uniform(0.005, 0.1)
        t += rng.lognormvariate(math.log(6.0), 1.2)  # reading
    f = store.features(addr(), t)
    assert f["gap_cv"] > 1.0
    assert f["gap_entropy"] > 2.0
    assert f["gap_min_s"] < 0.1
    assert f["route_entropy"] > 2.0


# ---- enumeration ----


def test_a_sequential_walk_is_enumeration_and_a_shuffled_one_is_not() -> None:
    walker = FeatureStore()
    for i in range(1, 101):
        walker.observe(request(T0 + i, path=f"/products/{i}"))
        if i % 10 == 0:  # identifier-less requests between do not break the walk
            walker.observe(request(T0 + i + 0.5, path="/cart"))
    assert walker.features(addr(), T0 + 200)["sequential_id_share"] == 1.0

    ids = list(range(1, 101))
    random.Random(3).shuffle(ids)
    shuffled = FeatureStore()
    for i, ident in enumerate(ids):
        shuffled.observe(request(T0 + i, path=f"/products/{ident}/reviews"))
    last = ids[-33:]  # the 32 pairs the share is over
    steps = sum(1 for a, b in itertools.pairwise(last) if abs(a - b) == 1)
    share = shuffled.features(addr(), T0 + 200)["sequential_id_share"]
    assert share == steps / 32
    assert share < 0.15


def test_a_walk_shared_round_robin_between_addresses_is_enumeration_of_the_cluster() -> None:
    store = FeatureStore()
    for i in range(1, 201):
        store.observe(request(T0 + i, f"198.18.0.{i % 20}", f"/products/{i}"))
    assert store.features(("ja4", JA4_CHROME), T0 + 201)["sequential_id_share"] == 1.0
    assert store.features(addr("198.18.0.1"), T0 + 201)["sequential_id_share"] == 0.0


# ---- statuses, classes, headers ----


def test_status_and_header_shares_are_exact() -> None:
    store = FeatureStore()
    statuses = [200] * 5 + [401] * 3 + [403] + [404] * 2 + [429] * 4 + [400] + [None] * 2
    for i, status in enumerate(statuses):
        store.observe(request(T0, path="/search", status=status, cookie=i % 2 == 0,
                              referer=i < 3))  # fmt: skip
    store.observe(request(T0, path="/login", status=401, method="POST"))
    store.observe(request(T0, path="/login", status=200, method="POST"))
    store.observe(request(T0, path="/login", status=None, method="POST"))
    f = store.features(addr(), T0)
    answered = 16 + 2
    assert f["status_401_share"] == pytest.approx(4 / answered, rel=1e-12)
    assert f["status_403_share"] == pytest.approx(1 / answered, rel=1e-12)
    assert f["status_404_share"] == pytest.approx(2 / answered, rel=1e-12)
    assert f["status_429_share"] == pytest.approx(4 / answered, rel=1e-12)
    assert f["status_4xx_share"] == pytest.approx(12 / answered, rel=1e-12)
    assert f["login_error_share"] == pytest.approx(1 / 2, rel=1e-12)
    assert f["search_share"] == pytest.approx(18 / 21, rel=1e-12)
    assert f["login_share"] == pytest.approx(3 / 21, rel=1e-12)
    assert f["sensitive_share"] == pytest.approx(1.0, rel=1e-12)
    assert f["cookie_share"] == pytest.approx(12 / 21, rel=1e-12)  # 9 of 18, and the logins
    assert f["referer_share"] == pytest.approx(3 / 21, rel=1e-12)
    assert f["distinct_routes"] == 2.0
    expected_entropy = -(18 / 21 * math.log2(18 / 21) + 3 / 21 * math.log2(3 / 21))
    assert f["route_entropy"] == pytest.approx(expected_entropy, rel=1e-9)


def test_recent_routes_are_the_latest_in_order_and_bounded() -> None:
    store = FeatureStore(recent_routes=4)
    for i, path in enumerate(["/", "/search", "/products/1", "/cart", "/checkout", "/login"]):
        store.observe(request(T0 + i, path=path))
    assert store.recent_routes(addr(), 10) == ["/products/{id}", "/cart", "/checkout", "/login"]
    assert store.recent_routes(addr(), 2) == ["/checkout", "/login"]
    assert store.recent_routes(("ja4", JA4_CHROME), 2) == []  # only addresses keep routes
    assert store.recent_routes(addr("192.0.2.1"), 2) == []


# ---- application events ----


def test_application_events_count_per_address_and_reach_its_clusters() -> None:
    store = FeatureStore()
    client = ip("198.51.100.7")
    store.observe(request(T0, path="/login"))  # the cluster keys of its fingerprints
    for _ in range(9):
        store.observe_app_event(client, 40000, "login_failure", T0 + 1)
    store.observe_app_event(client, 40000, "login_success", T0 + 1)
    for _ in range(7):
        store.observe_app_event(client, 40000, "otp_sent", T0 + 1)
    for _ in range(30):
        store.observe_app_event(client, 40000, "add_to_cart", T0 + 1)
    f = store.features(addr(), T0 + 1)
    assert f["login_failure_share"] == pytest.approx(0.9, rel=1e-12)
    assert f["login_failures_600s"] == pytest.approx(9.0, rel=1e-12)
    assert f["otp_sends_600s"] == pytest.approx(7.0, rel=1e-12)
    assert f["cart_adds_600s"] == pytest.approx(30.0, rel=1e-12)
    assert f["cart_per_checkout"] == pytest.approx(30.0, rel=1e-12)  # hoarding: never buys
    assert store.features(("ja4", JA4_CHROME), T0 + 1)["login_failures_600s"] == pytest.approx(9)
    # ten minutes later they have decayed by e
    later = store.features(addr(), T0 + 601)
    assert later["otp_sends_600s"] == pytest.approx(7.0 / math.e, rel=1e-9)

    shopper = ip("203.0.113.5")
    for _ in range(3):
        store.observe_app_event(shopper, 1, "add_to_cart", T0)
    store.observe_app_event(shopper, 1, "checkout", T0)
    f = store.features(addr("203.0.113.5"), T0)
    assert f["cart_per_checkout"] == pytest.approx(1.5, rel=1e-12)
    assert f["login_failure_share"] == 0.0

    with pytest.raises(ValueError, match="login_failure"):
        store.observe_app_event(client, 40000, "login_fail", T0)


def test_member_features_are_those_of_features_exactly() -> None:
    """A campaign's members are judged on member_features: the same numbers
    features() gives, for keys with and without requests, logins, answers
    and application events."""
    store = FeatureStore()
    client = ip("198.51.100.7")
    for i in range(6):
        store.observe(request(T0 + i, path="/login" if i % 3 else "/products/1", status=401))
    store.observe(request(T0 + 7, path="/otp/send", status=200))
    store.observe_app_event(client, 40000, "login_failure", T0 + 8)
    store.observe_app_event(client, 40000, "login_success", T0 + 8)
    store.observe(connection(T0 + 9, client="203.0.113.9"))  # a key without requests
    keys = [*store.keys(), ("ja4", "t13d0000h2_000000000000_000000000000")]  # and one unseen
    for key in keys:
        full = store.features(key, T0 + 10)
        assert store.member_features(key, T0 + 10) == {n: full[n] for n in MEMBER_FEATURES}
    shares = store.member_features(addr(), T0 + 10)
    # shares of decayed sums: requests a few seconds apart weigh nearly alike
    assert shares["login_share"] == pytest.approx(4 / 7, rel=1e-3)
    assert shares["login_failure_share"] == 0.5
    assert shares["login_error_share"] == 1.0


# ---- connections and flows ----


def test_a_syn_counts_a_connection_and_a_hello_counts_it_only_for_ja4_keys() -> None:
    store = FeatureStore()
    for c in range(2):  # everything of a connection at one instant: equal weights
        t = T0 + 10 * c
        store.observe(connection(t))
        store.observe(connection(t, stage=ConnectionStage.HELLO, ja4=JA4_CHROME))
        for _ in range(5):
            store.observe(request(t))
    for key in (addr(), ("prefix", "198.51.100.0/24"), ("tcp", TCP_WINDOWS),
                ("ja4", JA4_CHROME), ("ja4+tcp", f"{JA4_CHROME}|{TCP_WINDOWS}")):  # fmt: skip
        assert store.features(key, T0 + 20)["requests_per_conn"] == pytest.approx(5.0), key
    assert store.features(("http", HTTP_FP), T0 + 20)["requests_per_conn"] == 0.0  # no connection
    rate = store.features(addr(), T0 + 10)["conn_rate_600s"]
    assert rate == pytest.approx((math.exp(-10 / 600) + 1.0) / 600, rel=1e-12)


def test_flow_shapes_average_exactly() -> None:
    store = FeatureStore()
    store.observe(flow(T0, up=100, down=1000, duration=1.0, segments=2, gap_cv=0.2))
    store.observe(flow(T0, up=200, down=1000, duration=2.0, segments=4, gap_cv=0.4))
    store.observe(flow(T0, up=300, down=1000, duration=6.0, segments=6, gap_cv=None))
    f = store.features(addr(), T0)
    assert f["flow_bytes_up_mean"] == pytest.approx(200.0)
    assert f["flow_bytes_up_cv"] == pytest.approx(math.sqrt(2 / 3) * 100 / 200)
    assert f["flow_bytes_down_mean"] == pytest.approx(1000.0)
    assert f["flow_bytes_down_cv"] == pytest.approx(0.0, abs=1e-6)
    assert f["flow_duration_mean_s"] == pytest.approx(3.0)
    assert f["flow_segments_mean"] == pytest.approx(4.0)
    assert f["flow_gap_cv"] == pytest.approx(0.3)
    assert f["req_rate_600s"] == 0.0


# ---- fingerprints ----


def test_a_ja4_seen_once_is_rare_against_one_seen_a_thousand_times() -> None:
    store = FeatureStore()
    for i in range(1000):
        store.observe(request(T0, f"10.0.{i // 250}.{i % 250}"))
    store.observe(request(T0, "192.0.2.66", ja4=JA4_REQUESTS, tcp=TCP_LINUX, http="h999"))
    rare = store.features(("ja4", JA4_REQUESTS), T0)
    common = store.features(("ja4", JA4_CHROME), T0)
    assert rare["ja4_rarity"] == pytest.approx(math.log(1002 / 2), rel=1e-9)
    assert common["ja4_rarity"] == pytest.approx(math.log(1002 / 1001), rel=1e-9)
    assert rare["tcp_rarity"] == pytest.approx(math.log(1002 / 2), rel=1e-9)
    assert rare["http_rarity"] == pytest.approx(math.log(1002 / 2), rel=1e-9)
    # the address carries the rarity of what it was seen with
    assert store.features(addr("192.0.2.66"), T0)["ja4_rarity"] == rare["ja4_rarity"]
    assert store.rarity("ja4", "never-seen", T0) == pytest.approx(math.log(1002))


def test_distinct_fingerprints_behind_one_address() -> None:
    store = FeatureStore()
    ja4s = [JA4_CHROME, JA4_REQUESTS, "t13d1617h2_86a278354501_3cbfd9057e0d"]
    for i in range(12):
        store.observe(request(T0 + i, ja4=ja4s[i % 3], ua=f"agent {i % 4}"))
    f = store.features(addr(), T0 + 12)
    assert f["distinct_ja4"] == 3.0
    assert f["distinct_tcp"] == 1.0
    assert f["distinct_user_agents"] == 4.0
    # requests 0, 3, 6 and 9 carried the Chrome JA4, with agents 0, 3, 2 and 1
    assert store.features(("ja4", JA4_CHROME), T0 + 12)["distinct_user_agents"] == 4.0


# ---- clusters ----


def test_fifty_addresses_sharing_a_ja4_are_counted_exactly() -> None:
    store = FeatureStore()
    addresses = [f"203.0.113.{i}" for i in range(1, 51)]
    for a in addresses[:10]:  # ten of them were here half an hour ago
        store.observe(request(T0 - 1800, a, ja4=JA4_REQUESTS))
    for round_ in range(3):
        for i, a in enumerate(addresses):
            store.observe(request(T0 + 20 * round_ + 0.3 * i, a, "/login", method="POST"))
    now = T0 + 60
    ja4 = store.features(("ja4", JA4_CHROME), now)
    assert ja4["distinct_addrs"] == 50.0
    assert ja4["new_addr_share"] == 40 / 50
    assert store.members(("ja4", JA4_CHROME)) == set(addresses)
    assert store.features(("prefix", "203.0.113.0/24"), now)["distinct_addrs"] == 50.0
    assert store.features(addr("203.0.113.1"), now)["distinct_addrs"] == 1.0
    assert store.members(addr("203.0.113.1")) == {"203.0.113.1"}
    # 25 minutes on, none of them is in the current or the previous 10-minute epoch
    assert store.features(("ja4", JA4_CHROME), now + 1500)["distinct_addrs"] == 0.0


def test_only_addresses_of_the_last_ten_to_twenty_minutes_count() -> None:
    store = FeatureStore()
    store.observe(request(T0, "192.0.2.1", ja4=JA4_REQUESTS))
    store.observe(request(T0 + 1500, "192.0.2.2", ja4=JA4_REQUESTS))
    store.observe(request(T0 + 1501, "192.0.2.3", ja4=JA4_REQUESTS))
    key = ("ja4", JA4_REQUESTS)
    assert store.features(key, T0 + 1501)["distinct_addrs"] == 2.0
    assert store.members(key) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}  # the sample keeps it


def test_thousands_of_addresses_are_estimated_and_the_sample_stays_bounded() -> None:
    store = FeatureStore(max_members=64)
    n = 4000
    for i in range(n):
        store.observe(request(T0 + i * 0.05, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"))
    estimate = store.features(("ja4", JA4_CHROME), T0 + n * 0.05)["distinct_addrs"]
    assert abs(estimate - n) / n < 0.10  # HyperLogLog, 1,024 registers: 3.25 % standard error
    members = store.members(("ja4", JA4_CHROME))
    assert members == {f"10.0.{i // 256 % 256}.{i % 256}" for i in range(n - 64, n)}


def test_addresses_firing_in_the_same_second_are_synchronised() -> None:
    lockstep, independent, pages = FeatureStore(), FeatureStore(), FeatureStore()
    rng = random.Random(11)
    addresses = [f"198.18.{i}.1" for i in range(50)]
    for minute in range(10):
        for i, a in enumerate(addresses):
            # a scheduler: every address within the same second of each minute
            lockstep.observe(request(T0 + 60 * minute + 0.01 * i, a, "/login"))
    events = []
    for a in addresses:  # the same addresses, each at its own times
        t = T0 + rng.uniform(0, 60)
        while t < T0 + 600:
            events.append((t, a))
            t += rng.expovariate(1 / 60)
    for t, a in sorted(events):
        independent.observe(request(t, a))
        for k in range(8):  # a page load: a burst of one address's requests
            pages.observe(request(t + 0.02 * k, a))
    now = T0 + 600
    assert lockstep.features(("ja4", JA4_CHROME), now)["addr_sync"] > 40.0
    assert independent.features(("ja4", JA4_CHROME), now)["addr_sync"] < 0.5
    assert pages.features(("ja4", JA4_CHROME), now)["addr_sync"] < 0.5
    assert lockstep.features(addr(addresses[0]), now)["addr_sync"] == 0.0
    # the cluster's timing is its members': each polls every 60 s exactly
    pooled = lockstep.features(("ja4", JA4_CHROME), now)
    assert pooled["gap_mean_s"] == pytest.approx(60.0)
    assert pooled["gap_cv"] < 1e-6


def test_a_prefix_of_one_address_is_that_address_until_a_second_arrives() -> None:
    store = FeatureStore()
    prefix = ("prefix", "192.0.2.0/24")
    for i in range(5):
        store.observe(request(T0 + 3 * i, "192.0.2.1", f"/products/{i}", status=404))
    first = store.features(addr("192.0.2.1"), T0 + 20)
    assert prefix in store
    assert store.features(prefix, T0 + 20) == first
    assert store.request_count(prefix) == 5
    assert store.members(prefix) == {"192.0.2.1"}
    assert list(store.keys("prefix")) == [prefix]

    for i in range(3):
        store.observe(request(T0 + 30 + i, "192.0.2.2", "/login", status=401))
    store.observe(request(T0 + 40, "192.0.2.1", "/products/5"))  # its cached keys grew
    f = store.features(prefix, T0 + 40)
    assert store.request_count(prefix) == 9
    assert store.first_seen(prefix) == T0
    assert store.members(prefix) == {"192.0.2.1", "192.0.2.2"}
    assert f["distinct_addrs"] == 2.0
    assert f["sequential_id_share"] == 1.0  # the first address's walk came along
    weight = {t: math.exp(-(40 - t) / 600) for t in (0, 3, 6, 9, 12, 30, 31, 32, 40)}
    logins = weight[30] + weight[31] + weight[32]
    assert f["login_share"] == pytest.approx(logins / sum(weight.values()), rel=1e-9)
    # two addresses, the prefix, and the JA4, JA4+prefix, JA4+TCP, TCP and HTTP keys
    assert store.evict_idle(T0 + 1000, idle_s=60) == 8
    assert len(store) == 0


# ---- windows ----


@pytest.mark.parametrize(
    ("window", "rate", "duration"),
    [(10.0, 100.0, 60.0), (60.0, 20.0, 300.0), (600.0, 3.0, 2400.0)],
)
def test_decayed_rates_match_exact_windows_in_steady_state(
    window: float, rate: float, duration: float
) -> None:
    """Periodic and Poisson streams, checked from 3 windows in (the steady
    state) against the exact count of the last window: each window holds
    1,000 requests or more, so the Poisson noise of either is a few percent."""
    name = {10.0: "req_rate_10s", 60.0: "req_rate_60s", 600.0: "req_rate_600s"}[window]
    n = int(rate * duration)
    periodic = [T0 + i / rate for i in range(n)]
    rng = random.Random(5)
    poisson = list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))
    poisson = [T0 + t for t in poisson]
    for times in (periodic, poisson):
        store = FeatureStore()
        checks = [T0 + 3 * window + k * duration / 40 for k in range(40)]
        checks = [t for t in checks if t < times[-1]]
        pending = iter(checks)
        check: float | None = next(pending)
        for ts in times:
            while check is not None and ts > check:
                exact = (bisect.bisect_right(times, check)
                         - bisect.bisect_right(times, check - window)) / window  # fmt: skip
                estimate = store.features(addr(), check)[name]
                assert estimate == pytest.approx(exact, rel=0.15), (check - T0, exact)
                check = next(pending, None)
            store.observe(request(ts))
        assert check is None  # every checkpoint was reached


def test_old_activity_decays_and_epochs_roll_over_without_overflow() -> None:
    store = FeatureStore()
    for i in range(3 * 3600):  # one request a second for three hours: many epochs
        store.observe(request(T0 + i, path="/search"))
    f = store.features(addr(), T0 + 3 * 3600)
    for name in ("req_rate_10s", "req_rate_60s", "req_rate_600s"):
        assert f[name] == pytest.approx(1.0, rel=0.06)
    assert f["gap_mean_s"] == pytest.approx(1.0)
    assert f["search_share"] == pytest.approx(1.0)
    quiet = store.features(addr(), T0 + 6 * 3600)
    assert quiet["req_rate_600s"] < 1e-6
    assert np.isfinite(store.vector(addr(), T0 + 30 * 86400)).all()


# ---- memory ----


def test_idle_keys_are_evicted_and_come_back_clean() -> None:
    store = FeatureStore()
    store.observe(request(T0, "192.0.2.1"))
    store.observe(request(T0 + 500, "203.0.113.2", ja4=JA4_REQUESTS, tcp=TCP_LINUX, http="h2"))
    assert len(store) == 14
    evicted = store.evict_idle(T0 + 600, idle_s=300)
    assert evicted == 7
    assert len(store) == 7
    assert store.first_seen(addr("192.0.2.1")) is None
    assert store.request_count(addr("192.0.2.1")) == 0
    assert store.members(("ja4", JA4_CHROME)) == set()
    store.observe(request(T0 + 700, "192.0.2.1"))
    assert store.first_seen(addr("192.0.2.1")) == T0 + 700
    assert store.request_count(("ja4", JA4_CHROME)) == 1


def test_max_keys_bounds_the_store_and_evicts_the_least_recent() -> None:
    store = FeatureStore(max_keys=200)
    for i in range(1000):
        store.observe(request(T0 + i, f"10.0.{i // 200}.{i % 200}", http=None))
        assert len(store) <= 200
    assert store.evicted > 0
    assert store.request_count(addr("10.0.4.199")) == 1  # the latest stays
    assert store.first_seen(addr("10.0.0.0")) is None  # the first went
    assert store.request_count(("ja4", JA4_CHROME)) > 0  # busy shared keys stay


def test_memory_per_address_stays_under_4_kib() -> None:
    """Each address in its own /24 (the worst case: its prefix and JA4+prefix
    keys are its own too), with a connection, a ClientHello, requests on two
    routes, a flow and an application event. tracemalloc slows every
    allocation down, so this runs 2,000 addresses; bench/bench_features.py
    runs the same population at 100,000."""
    rng = random.Random(1)
    ja4s = [f"t13d1516h2_8daaf6152771_{i:012x}" for i in range(20)]
    observations: list[Connection | Request | FlowShape] = []
    n = 2000
    for i in range(n):
        a = f"{20 + i // 65536}.{i // 256 % 256}.{i % 256}.1"
        t = T0 + i * 0.01
        j = ja4s[i % 20]
        observations.append(connection(t, a, tcp=TCP_WINDOWS))
        observations.append(connection(t, a, ConnectionStage.HELLO, ja4=j, tcp=TCP_WINDOWS))
        for k in range(3):
            path = "/login" if k == 0 else f"/products/{rng.randrange(10**6)}"
            observations.append(request(t + k, a, path, ja4=j, http=f"h{i % 10}"))
        observations.append(flow(t + 3, a, up=700, down=5000, gap_cv=0.5, ja4=j))
    store = FeatureStore()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for obs in observations:
            store.observe(obs)
        for i in range(n):
            store.observe_app_event(ip(f"{20 + i // 65536}.{i // 256 % 256}.{i % 256}.1"), 1,
                                    "login_failure", T0 + 30)  # fmt: skip
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sum(1 for _ in store.keys("addr")) == n
    assert used / n <= 4096, f"{used / n:.0f} bytes per address"


def test_observe_refuses_what_is_not_an_observation() -> None:
    with pytest.raises(TypeError, match="not an observation"):
        FeatureStore().observe("GET /")  # type: ignore[arg-type]
