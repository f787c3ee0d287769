"""Synthetic but realistic API traffic for the model tests: people, crawlers
and bad bots as observations.Request lists, and the per-client and per-cluster
features a FeatureStore would compute from them.

People browse in sessions drawn from a Markov chain over pages (home, search,
product with its stock widget, cart, checkout, login with the odd mistyped
password, one-time codes) with heavy-tailed think times: log-normal, plus a
Pareto tail for the tab left open. Bots are the ones botwall must catch, each
built the way such tools really are. Everything is seeded: same seed, same
traffic.

The feature code here stands in for controlplane/features.py so the model
tests do not depend on it; the names are the ones that module will provide.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from controlplane.decisions import ClusterKey
from controlplane.models.baseline import BaselineAnomaly, endpoint_group
from controlplane.models.campaign import CAMPAIGN_FEATURES, CampaignDetector
from controlplane.models.consistency import ConsistencyModel, parse_tcp_signature
from controlplane.models.journey import JourneyModel
from controlplane.models.supervised import SupervisedClassifier
from controlplane.observations import (
    SENSITIVE_CLASSES,
    ClientFingerprint,
    EndpointClass,
    Request,
    endpoint_class,
    path_identifier,
    route_template,
)
from controlplane.scoring import ClientView
from sensor.fingerprint.consistency import check_consistency

WINDOW_S = 600.0

# JA4s from sensor/fingerprint/client_stacks.toml (captured from real clients).
JA4_CHROME = "t13d1517h2_8daaf6152771_cb7bf5808d99"
JA4_FIREFOX = "t13d1617h2_86a278354501_3cbfd9057e0d"
JA4_REQUESTS = "t13d3112h1_e8f1e7e78f70_b26ce05bbdd6"
JA4_GO = "t13d1910h2_9dc949149365_97f8aa674fd9"
JA4_SAFARI = "t13d2014h2_a09f3c656075_14788d8d241b"  # in no table row: unknown, not a lie
# Chrome's cipher suites with other extensions: an automated Chromium build.
JA4_AUTOMATION = "t13d1516h2_8daaf6152771_02713d6af862"
JA4_ROTATOR = "t13d1516h2_8daaf6152771_9b8f4c2e1d3a"

# SYN signatures in sensor.fingerprint.tcp's compact form.
TCP_LINUX = "4:64:1460:mss*44:7:M,S,T,N,W:df"
TCP_WINDOWS = "4:128:1460:mss*44:8:M,N,W,N,N,S:df"
TCP_MACOS = "4:64:1460:65535:6:M,N,W,N,N,T,S,E:df"

UA_CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
UA_FIREFOX_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
)
UA_CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36"
)
UA_SAFARI_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Safari/605.1.15"
)
UA_GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GOOGLEBOT_RANGES = {"googlebot": ["66.249.64.0/19", "2001:4860:4801::/48"]}

# (User-Agent, JA4, SYN, HTTP fingerprint, share of people)
BROWSERS = (
    (UA_CHROME_WINDOWS, JA4_CHROME, TCP_WINDOWS, "a1c3e5f7b9d2", 0.55),
    (UA_FIREFOX_WINDOWS, JA4_FIREFOX, TCP_WINDOWS, "b2d4f6a8c0e1", 0.15),
    (UA_CHROME_ANDROID, JA4_CHROME, TCP_LINUX, "c3e5a7b9d1f2", 0.18),
    (UA_SAFARI_MAC, JA4_SAFARI, TCP_MACOS, "d4f6b8c0e2a3", 0.12),
)

CLIENT_FEATURES = (
    "req_rate_60s",  # requests in the last minute
    "req_rate_600s",  # requests per minute over the last 10 minutes
    "gap_median_s",
    "gap_cv_600s",
    "sensitive_share_600s",
    "login_failure_share",
    "catalog_share",
    "cart_share",
    "checkout_share",
    "otp_share",
    "login_share",
    "distinct_route_share",
    "error_share",
    "cookie_share",
    "referer_share",
    "sequential_id_share",
)

DESCRIPTIONS = {
    "req_rate_60s": "requests in the last minute",
    "req_rate_600s": "requests per minute",
    "gap_median_s": "median seconds between requests",
    "gap_cv_600s": "variability of the gaps between requests",
    "sensitive_share_600s": "share of requests to login, OTP, cart, checkout or search",
    "login_failure_share": "share of failed logins",
    "catalog_share": "share of catalog requests",
    "cart_share": "share of cart requests",
    "checkout_share": "share of checkout requests",
    "otp_share": "share of one-time-code requests",
    "login_share": "share of login requests",
    "distinct_route_share": "share of distinct endpoints",
    "error_share": "share of error responses",
    "cookie_share": "share of requests with a cookie",
    "referer_share": "share of requests with a Referer",
    "sequential_id_share": "share of catalog steps to the next identifier",
}


# Where a person goes next from each page ("end" leaves).
PAGES: dict[str, dict[str, float]] = {
    "start": {"home": 0.5, "search": 0.2, "product": 0.2, "login": 0.1},
    "home": {
        "search": 0.33,
        "product": 0.35,
        "login": 0.1,
        "account": 0.05,
        "cart": 0.05,
        "end": 0.12,
    },
    "search": {"product": 0.6, "search": 0.17, "home": 0.05, "end": 0.18},
    "product": {"product": 0.33, "search": 0.15, "add": 0.22, "home": 0.05, "end": 0.25},
    "add": {"product": 0.3, "cart": 0.4, "checkout": 0.12, "end": 0.18},
    "cart": {"checkout": 0.5, "product": 0.2, "remove": 0.08, "end": 0.22},
    "remove": {"cart": 0.5, "product": 0.3, "end": 0.2},
    "checkout": {"end": 0.6, "home": 0.2, "account": 0.2},
    "login": {"home": 0.4, "account": 0.3, "product": 0.1, "cart": 0.1, "end": 0.1},
    "account": {"home": 0.3, "product": 0.2, "end": 0.5},
}


@dataclass
class Client:
    kind: str  # "human", "stuffing", "scraper", ...
    label: str  # "human", "bot", "good_bot"
    address: str
    user_agent: str
    ja4: str
    tcp: str
    http_fingerprint: str
    requests: list[Request] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        return [f"{r.method} {r.route}" for r in self.requests]

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


class Traffic:
    """A seeded source of clients; each method returns fresh ones."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self._next_addr = 0
        # Product popularity: a few best sellers, a long tail (Zipf-like).
        self.products = 1000 + self.rng.permutation(1000)
        weights = 1.0 / np.arange(1, 1001) ** 0.9
        self.product_weights = weights / weights.sum()

    # ---- plumbing ----

    def _address(self, prefix: str = "10") -> str:
        self._next_addr += 1
        n = self._next_addr
        return f"{prefix}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def _client(self, kind: str, label: str, browser: tuple | None = None, **kw: str) -> Client:
        if browser is None:
            shares = np.array([b[4] for b in BROWSERS])
            browser = BROWSERS[self.rng.choice(len(BROWSERS), p=shares / shares.sum())]
        ua, ja4, tcp, http_fp, _ = browser
        fields = {"user_agent": ua, "ja4": ja4, "tcp": tcp, "http_fingerprint": http_fp}
        fields.update(kw)
        address = fields.pop("address", None) or self._address()
        return Client(kind, label, address, **fields)

    def _request(
        self,
        client: Client,
        ts: float,
        method: str,
        path: str,
        status: int = 200,
        *,
        cookie: bool = True,
        referer: bool = True,
    ) -> None:
        route = route_template(path)
        client.requests.append(
            Request(
                ts=ts,
                client=ipaddress.ip_address(client.address),
                client_port=40000 + len(client.requests),
                method=method,
                path=path,
                route=route,
                endpoint_class=endpoint_class(route),
                status=status,
                user_agent=client.user_agent,
                http_fingerprint=client.http_fingerprint,
                fingerprint=ClientFingerprint(
                    ja4=client.ja4, tcp_signature=client.tcp, os_family=None
                ),
                has_cookie=cookie,
                has_referer=referer,
                has_accept_language=True,
            )
        )

    def _think(self) -> float:
        """A person's pause between pages: log-normal around 8 s, and now and
        then a long Pareto-tailed pause (reading, another tab)."""
        pause = float(self.rng.lognormal(np.log(8.0), 0.9))
        if self.rng.random() < 0.1:
            pause += 20.0 * float(self.rng.pareto(1.5) + 1.0)
        return pause

    def _widget(self) -> float:
        """The delay before a page's own scripted call (the stock widget)."""
        return float(self.rng.uniform(0.05, 0.4))

    def _product(self) -> int:
        return int(self.rng.choice(self.products, p=self.product_weights))

    # ---- people ----

    def human(self, start: float | None = None) -> Client:
        client = self._client("human", "human")
        t = float(self.rng.uniform(0, WINDOW_S * 0.8)) if start is None else start
        page, product, first = "start", self._product(), True
        while len(client.requests) < 60:
            options = PAGES[page]
            page = str(self.rng.choice(list(options), p=list(options.values())))
            if page == "end":
                break
            cookie = not first or self.rng.random() < 0.6  # returning visitors
            first = False
            t = self._human_page(client, page, t, product, cookie)
            if page in ("product", "search"):
                product = self._product()
            t += self._think()
        if not client.requests:
            self._request(client, t, "GET", "/")
        return client

    def _human_page(self, client: Client, page: str, t: float, product: int, cookie: bool) -> float:
        def req(method: str, path: str, status: int = 200, dt: float = 0.0) -> None:
            nonlocal t
            t += dt
            self._request(client, t, method, path, status, cookie=cookie)

        if page == "home":
            req("GET", "/")
        elif page == "search":
            req("GET", "/search")
        elif page == "product":
            req("GET", f"/products/{product}")
            req("GET", f"/inventory/{product}", dt=self._widget())
            if self.rng.random() < 0.2:
                req("GET", f"/products/{product}/reviews", dt=self._widget())
        elif page == "add":
            req("POST", "/cart/items")
        elif page == "cart":
            req("GET", "/cart")
        elif page == "remove":
            req("DELETE", f"/cart/items/{product}")
        elif page == "checkout":
            req("GET", "/checkout")
            t += self._think()
            req("POST", "/orders", status=201)
        elif page == "login":
            req("GET", "/login")
            t += float(self.rng.lognormal(np.log(6.0), 0.5))  # typing
            while self.rng.random() < 0.12:  # a mistyped password, then a retry
                req("POST", "/login", status=401)
                t += float(self.rng.lognormal(np.log(5.0), 0.5))
            req("POST", "/login")
            if self.rng.random() < 0.3:  # two-factor by SMS
                req("POST", "/otp/send", dt=self._widget())
                t += float(self.rng.lognormal(np.log(15.0), 0.4))
                req("POST", "/otp/verify")
        elif page == "account":
            req("GET", "/account")
        return t

    def humans(self, n: int) -> list[Client]:
        return [self.human() for _ in range(n)]

    # ---- bad bots ----

    def credential_stuffing(self, n_addrs: int = 500) -> list[Client]:
        """One tool behind many residential addresses: each posts a login every
        30-60 s (1-2 a minute, under any per-address limit), 96% failing."""
        browser = (UA_CHROME_WINDOWS, JA4_AUTOMATION, TCP_WINDOWS, "e5a7c9b1d3f4", 0)
        clients = []
        for _ in range(n_addrs):
            client = self._client("stuffing", "bot", browser, address=self._address("100"))
            t = float(self.rng.uniform(0, 30))
            while t < WINDOW_S:
                status = 401 if self.rng.random() < 0.96 else 200
                self._request(client, t, "POST", "/login", status, cookie=False)
                t += float(self.rng.uniform(30, 60))
            clients.append(client)
        return clients

    def stealthy_scraper(self) -> Client:
        """Walks the catalog in identifier order with a person's pauses, loading
        the stock widget like the page would."""
        client = self._client("scraper", "bot", BROWSERS[0])
        t, ident = float(self.rng.uniform(0, 30)), int(self.rng.integers(1000, 1500))
        while t < WINDOW_S:
            self._request(client, t, "GET", f"/products/{ident}")
            self._request(
                client, t + float(self.rng.uniform(0.1, 0.3)), "GET", f"/inventory/{ident}"
            )
            ident += 1
            t += float(self.rng.lognormal(np.log(6.0), 0.6))
        return client

    def inventory_hoarder(self) -> Client:
        """Holds scarce stock: checks a few hot items and adds them to carts over
        and over, never checking out."""
        client = self._client("hoarder", "bot", BROWSERS[0])
        hot = [int(p) for p in self.products[:5]]
        t = float(self.rng.uniform(0, 30))
        while t < WINDOW_S:
            item = hot[int(self.rng.integers(len(hot)))]
            self._request(client, t, "GET", f"/inventory/{item}")
            t += float(self.rng.uniform(0.5, 2.0))
            self._request(client, t, "POST", "/cart/items", 201)
            t += float(self.rng.uniform(4.0, 10.0))
        return client

    def sms_pumper(self) -> Client:
        """Sends one-time codes to premium numbers: OTP requests and nothing else."""
        client = self._client("sms_pump", "bot", BROWSERS[2])
        t = float(self.rng.uniform(0, 30))
        while t < WINDOW_S:
            self._request(client, t, "POST", "/otp/send", cookie=False)
            t += float(self.rng.uniform(6.0, 20.0))
        return client

    def browser_ua_python_tls(self) -> Client:
        """A Chrome-on-Windows User-Agent typed into python-requests on Linux."""
        client = self._client(
            "ua_liar", "bot", (UA_CHROME_WINDOWS, JA4_REQUESTS, TCP_LINUX, "f6b8d0c2e4a5", 0)
        )
        t = float(self.rng.uniform(0, 30))
        while t < WINDOW_S:
            if self.rng.random() < 0.2:
                self._request(client, t, "GET", "/search", cookie=False, referer=False)
            else:
                self._request(
                    client, t, "GET", f"/products/{self._product()}", cookie=False, referer=False
                )
            t += float(self.rng.uniform(2.0, 8.0))
        return client

    def crawler(self, address: str) -> Client:
        """Googlebot's behaviour: the catalog in order, about one page a second."""
        client = self._client(
            "crawler",
            "good_bot",
            (UA_GOOGLEBOT, JA4_GO, TCP_LINUX, "a7c9e1b3d5f6", 0),
            address=address,
        )
        t, ident = 0.0, 1000
        while t < WINDOW_S / 2:
            self._request(client, t, "GET", f"/products/{ident}", cookie=False, referer=False)
            ident += 1
            t += float(self.rng.uniform(0.8, 1.5))
        return client

    def rotating_proxies(self, n_addrs: int = 300) -> list[Client]:
        """One scraper behind a residential proxy pool: a fresh address every
        one to three search requests, one rare TLS fingerprint throughout."""
        browser = (UA_CHROME_WINDOWS, JA4_ROTATOR, TCP_WINDOWS, "b8d0f2a4c6e7", 0)
        clients = []
        for _ in range(n_addrs):
            client = self._client("rotator", "bot", browser, address=self._address("172"))
            t = float(self.rng.uniform(0, WINDOW_S - 10))
            for _ in range(int(self.rng.integers(1, 4))):
                self._request(client, t, "GET", "/search", cookie=False)
                t += float(self.rng.uniform(1.0, 3.0))
            clients.append(client)
        return clients


# ---- features ----


def client_features(client: Client) -> dict[str, float]:
    """A client's features at its last request, over the windows their names say."""
    requests = client.requests
    now = requests[-1].ts
    recent = [r for r in requests if now - r.ts < WINDOW_S]
    n = len(recent)
    ts = np.array([r.ts for r in recent])
    gaps = np.diff(ts)
    classes = Counter(r.endpoint_class for r in recent)
    logins = [r for r in recent if r.endpoint_class == EndpointClass.LOGIN and r.method == "POST"]
    ids = [
        i
        for r in recent
        if r.endpoint_class == EndpointClass.CATALOG and (i := path_identifier(r.path)) is not None
    ]
    diffs = [b - a for a, b in pairwise(ids) if b != a]
    return {
        "req_rate_60s": float(sum(1 for r in recent if now - r.ts < 60.0)),
        "req_rate_600s": n / (WINDOW_S / 60.0),
        "gap_median_s": float(np.median(gaps)) if len(gaps) else float("nan"),
        "gap_cv_600s": float(gaps.std() / gaps.mean())
        if len(gaps) > 1 and gaps.mean() > 0
        else float("nan"),
        "sensitive_share_600s": sum(classes[c] for c in SENSITIVE_CLASSES) / n,
        "login_failure_share": (
            sum(1 for r in logins if r.status and r.status >= 400) / len(logins)
        )
        if logins
        else 0.0,
        "catalog_share": classes[EndpointClass.CATALOG] / n,
        "cart_share": classes[EndpointClass.CART] / n,
        "checkout_share": classes[EndpointClass.CHECKOUT] / n,
        "otp_share": classes[EndpointClass.OTP] / n,
        "login_share": classes[EndpointClass.LOGIN] / n,
        "distinct_route_share": len({r.route for r in recent}) / n,
        "error_share": sum(1 for r in recent if r.status and r.status >= 400) / n,
        "cookie_share": sum(r.has_cookie for r in recent) / n,
        "referer_share": sum(r.has_referer for r in recent) / n,
        "sequential_id_share": (sum(1 for d in diffs if d == 1) / len(diffs))
        if len(diffs) >= 3
        else 0.0,
    }


def client_group(client: Client) -> str:
    return endpoint_group(Counter(r.endpoint_class for r in client.requests))


def feature_matrix(clients: Sequence[Client]) -> np.ndarray:
    rows = [client_features(c) for c in clients]
    return np.array([[row[name] for name in CLIENT_FEATURES] for row in rows])


def inconsistent(client: Client) -> bool:
    return _inconsistent(client.ja4, client.tcp, client.user_agent)


@functools.lru_cache(maxsize=64)
def _inconsistent(ja4: str, tcp: str, user_agent: str) -> bool:
    layers = check_consistency(ja4=ja4, tcp=parse_tcp_signature(tcp), user_agent=user_agent)
    return not layers.consistent


def cluster_features(
    clients: Sequence[Client],
    *,
    baseline_share: float,
    known_addresses: frozenset[str] = frozenset(),
) -> dict[str, float]:
    """One cluster key's aggregates over the window (campaign.CAMPAIGN_FEATURES).

    baseline_share: the share of this host's baseline clients that carried the
    key (what the FeatureStore's long-term counters know).
    """
    requests = [r for c in clients for r in c.requests if r.ts < WINDOW_S]
    addrs = {c.address for c in clients}
    logins = [r for r in requests if r.endpoint_class == EndpointClass.LOGIN and r.method == "POST"]
    sensitive = sum(1 for r in requests if r.endpoint_class in SENSITIVE_CLASSES)
    minutes: dict[int, set[str]] = {}
    for r in requests:
        minutes.setdefault(int(r.ts // 60), set()).add(str(r.client))
    synchrony = float(np.mean([len(a) / len(addrs) for a in minutes.values()])) if minutes else 0.0
    n_req = max(len(requests), 1)
    return {
        "distinct_addrs": float(len(addrs)),
        "requests_600s": float(len(requests)),
        "login_attempts_600s": float(len(logins)),
        "login_failure_share": (
            sum(1 for r in logins if r.status and r.status >= 400) / len(logins)
        )
        if logins
        else 0.0,
        "sensitive_share_600s": sensitive / n_req,
        "per_addr_rate_600s": len(requests) / max(len(addrs), 1) / (WINDOW_S / 60.0),
        "synchrony": synchrony,
        "fingerprint_rarity": 1.0 - baseline_share,
        "new_addr_share": len(addrs - known_addresses) / max(len(addrs), 1),
        "inconsistent_share": sum(inconsistent(c) for c in clients) / max(len(clients), 1),
    }


# ---- trained models, shared by the test modules ----


@dataclass(frozen=True)
class Trained:
    consistency: ConsistencyModel
    baseline: BaselineAnomaly
    journey: JourneyModel
    supervised: SupervisedClassifier
    campaign: CampaignDetector
    baseline_humans: tuple[Client, ...]


def labelled_clients(seed: int) -> list[Client]:
    """Clients as operators would have labelled them: mostly people, a few of
    each bot, some crawlers."""
    traffic = Traffic(seed)
    clients = traffic.humans(1200)
    clients += traffic.credential_stuffing(60)
    for make in (
        traffic.stealthy_scraper,
        traffic.inventory_hoarder,
        traffic.sms_pumper,
        traffic.browser_ua_python_tls,
    ):
        clients += [make() for _ in range(30)]
    clients += [traffic.crawler(f"66.249.66.{i}") for i in range(1, 31)]
    return clients


def campaign_baseline(humans: Sequence[Client]) -> np.ndarray:
    """Cluster aggregates of ordinary traffic: each browser's JA4 and HTTP
    fingerprint, in four windows of people, half of whom came back."""
    rows = []
    for window in range(4):
        people = humans[window::4]
        returning = frozenset(c.address for c in people[::2])
        for key in ("ja4", "http_fingerprint"):
            groups: dict[str, list[Client]] = {}
            for c in people:
                groups.setdefault(getattr(c, key), []).append(c)
            for members in groups.values():
                share = len(members) / len(people)
                row = cluster_features(members, baseline_share=share, known_addresses=returning)
                rows.append([row[name] for name in CAMPAIGN_FEATURES])
    return np.array(rows)


@functools.cache
def trained() -> Trained:
    humans = Traffic(1).humans(2000)
    X = feature_matrix(humans)
    labelled = labelled_clients(4)
    return Trained(
        consistency=ConsistencyModel(crawler_ranges=GOOGLEBOT_RANGES).fit(),
        baseline=BaselineAnomaly(descriptions=DESCRIPTIONS).fit(
            X, feature_names=list(CLIENT_FEATURES), groups=[client_group(c) for c in humans]
        ),
        journey=JourneyModel().fit([c.steps for c in humans]),
        supervised=SupervisedClassifier(descriptions=DESCRIPTIONS).fit(
            feature_matrix(labelled),
            [c.label for c in labelled],
            feature_names=list(CLIENT_FEATURES),
        ),
        campaign=CampaignDetector().fit(
            campaign_baseline(humans), feature_names=list(CAMPAIGN_FEATURES)
        ),
        baseline_humans=tuple(humans),
    )


def cluster_keys(client: Client) -> list[ClusterKey]:
    return [("ja4", client.ja4), ("http", client.http_fingerprint)]


def view(client: Client, *, with_clusters: bool = False) -> ClientView:
    """What the engine would hand the scorer for this client."""
    return ClientView(
        key=("addr", client.address),
        features=client_features(client),
        address=client.address,
        user_agent=client.user_agent,
        ja4=client.ja4,
        tcp=client.tcp,
        steps=client.steps,
        paths=client.paths,
        group=client_group(client),
        clusters=cluster_keys(client) if with_clusters else (),
        ts=client.requests[-1].ts,
    )
