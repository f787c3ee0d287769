"""Human shoppers: their journeys, and Chromium tabs making them, each from its own address."""

from __future__ import annotations

import collections
import contextlib
import io
import ipaddress
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from lab import clients
from lab.api.server import ShopServer
from lab.browser import (
    ALIAS_POOL_V4,
    ALIAS_POOL_V6,
    BrowserClosed,
    BrowserHumans,
    CdpError,
    CdpTimeout,
    DevToolsPipe,
    _net_error,
    chromium_major,
    desktop_user_agent,
    route_sources,
    tab_seed,
    wait_event,
)
from lab.journeys import (
    APP_THINK_CAP_S,
    PASSWORD,
    THINK_CAP_S,
    Step,
    mistype,
    plan_app_visit,
    plan_visit,
    think_time,
)
from lab.netns import Topology, pids_in_namespace
from lab.records import RequestRecord, parse_records
from lab.tls_server import REPO_ROOT

# -- journeys ---------------------------------------------------------------------

VISITS = 5000


@pytest.fixture(scope="module")
def web_visits() -> list[list[Step]]:
    rng = random.Random(20240601)
    return [plan_visit(rng) for _ in range(VISITS)]


def share(count: int, total: int) -> float:
    return count / total


def test_a_plan_depends_only_on_its_seed() -> None:
    assert plan_visit(random.Random(7)) == plan_visit(random.Random(7))
    assert plan_app_visit(random.Random(7)) == plan_app_visit(random.Random(7))
    assert len({tuple(plan_visit(random.Random(seed))) for seed in range(20)}) == 20
    with pytest.raises(FrozenInstanceError):
        plan_visit(random.Random(7))[0].path = "/admin"  # type: ignore[misc]


def test_web_visits_follow_the_shop_floor(web_visits: list[list[Step]]) -> None:
    for plan in web_visits:
        paths = [s.path for s in plan]
        assert plan[0] == Step("GET", "/", think_s=plan[0].think_s)
        assert paths[1].startswith("/search?q=") and len(paths[1]) > len("/search?q=")
        products = [p for p in paths if p.startswith("/products/")]
        assert 1 <= len(products) <= 4
        assert all(1 <= int(p.rsplit("/", 1)[1]) <= 500 for p in products)
        for i, path in enumerate(paths):
            if path.startswith("/inventory/"):  # a stock check follows its product page
                assert paths[i - 1] == "/products/" + path.rsplit("/", 1)[1]
        assert 3 <= len(plan) <= 16
        logins = [s for s in plan if s.path == "/login"]
        # A mistyped password, if any, comes right before the right one.
        assert [s.expect_ok for s in logins] in ([], [True], [False, True])
        for login in logins:
            assert login.method == "POST" and login.body is not None
            assert (login.body["password"] == PASSWORD) == login.expect_ok
        if "/account" in paths:
            assert paths.index("/account") > paths.index("/login")
        if "/checkout" in paths:
            assert paths[-1] == "/checkout"
            assert "/login" in paths and "/cart" in paths
            cart = plan[paths.index("/cart")]
            assert cart.method == "POST" and cart.body is not None
            assert f"/products/{cart.body['product']}" in paths  # something it looked at
            assert cart.body["qty"] in (1, 2, 3)
        assert all(s.expect_ok for s in plan if s.path != "/login")


def test_web_visit_proportions(web_visits: list[list[Step]]) -> None:
    def visits_with(predicate: object) -> float:
        assert callable(predicate)
        return share(sum(1 for plan in web_visits if predicate([s.path for s in plan])), VISITS)

    logins = [s for plan in web_visits for s in plan if s.path == "/login" and s.expect_ok]
    typos = [s for plan in web_visits for s in plan if not s.expect_ok]
    product_pages = [s for plan in web_visits for s in plan if s.path.startswith("/products/")]
    stock_checks = [s for plan in web_visits for s in plan if s.path.startswith("/inventory/")]
    # The docstring's numbers: 57% log in, 15% of logins start with a typo,
    # 45% fill a cart, 34% check out, 17.5% look at their account.
    assert visits_with(lambda p: "/login" in p) == pytest.approx(0.569, abs=0.03)
    assert share(len(typos), len(logins)) == pytest.approx(0.15, abs=0.025)
    assert visits_with(lambda p: "/cart" in p) == pytest.approx(0.45, abs=0.03)
    assert visits_with(lambda p: "/checkout" in p) == pytest.approx(0.3375, abs=0.03)
    assert visits_with(lambda p: "/account" in p) == pytest.approx(0.175, abs=0.025)
    assert share(len(stock_checks), len(product_pages)) == pytest.approx(0.30, abs=0.025)
    assert share(len(product_pages), VISITS) == pytest.approx(2.5, abs=0.1)
    # Popular products get most of the looks: the first tenth of the catalogue over half.
    popular = [s for s in product_pages if int(s.path.rsplit("/", 1)[1]) <= 50]
    assert share(len(popular), len(product_pages)) == pytest.approx(0.64, abs=0.03)


def test_think_times_are_heavy_tailed_and_capped(web_visits: list[list[Step]]) -> None:
    for plan in web_visits:
        assert plan[-1].think_s == 0.0
    pauses = sorted(s.think_s for plan in web_visits for s in plan[:-1])
    assert all(0 < p <= THINK_CAP_S for p in pauses)
    median = statistics.median(pauses)
    p90 = pauses[int(0.9 * len(pauses))]
    assert 2.0 <= median <= 3.0
    assert p90 / median > 2.5  # a long tail, not a bell around the median
    assert pauses[-1] == THINK_CAP_S  # the cap is reached, and holds
    assert sum(p > 10 for p in pauses) / len(pauses) > 0.02

    # think_scale compresses a visit without changing its shape.
    full = plan_visit(random.Random(3))
    short = plan_visit(random.Random(3), think_scale=0.01)
    assert [(s.method, s.path, s.body) for s in full] == [(s.method, s.path, s.body) for s in short]
    assert [s.think_s for s in short] == pytest.approx([s.think_s * 0.01 for s in full])
    rng = random.Random(1)
    assert all(think_time(rng, think_scale=0.5) <= THINK_CAP_S * 0.5 for _ in range(1000))


def test_app_visits_log_in_first_and_pause_less(web_visits: list[list[Step]]) -> None:
    rng = random.Random(99)
    visits = [plan_app_visit(rng) for _ in range(VISITS)]
    for plan in visits:
        paths = [s.path for s in plan]
        assert plan[0].method == "POST" and paths[0] == "/login"
        assert plan[0].body is not None and plan[0].body["password"] == PASSWORD
        assert paths.count("/login") == 1 and all(s.expect_ok for s in plan)
        assert "/" not in paths and not any(p.startswith("/search") for p in paths)
        assert paths[1] == "/products?page=1"
        assert 3 <= len(plan) <= 13
        if "/checkout" in paths:
            assert paths[-3:] == ["/cart", "/cart", "/checkout"]
    app_pauses = [s.think_s for plan in visits for s in plan[:-1]]
    web_pauses = [s.think_s for plan in web_visits for s in plan[:-1]]
    assert max(app_pauses) <= APP_THINK_CAP_S
    assert 1.2 <= statistics.median(app_pauses) < statistics.median(web_pauses)
    checkouts = sum(1 for plan in visits if plan[-1].path == "/checkout")
    assert share(checkouts, VISITS) == pytest.approx(0.44, abs=0.03)


def test_a_typo_is_never_the_password() -> None:
    rng = random.Random(5)
    typos = {mistype(PASSWORD, rng) for _ in range(2000)}
    assert PASSWORD not in typos
    assert len(typos) > 30  # swaps, misses, slips and caps, all over the word


# -- the DevTools pipe, against a fake browser ------------------------------------------


class FakeBrowser:
    """The far end of a DevTools pipe: answers Echo (with an event first), Fail with an
    error, never answers Hang, holds Later's answer until the next command, and
    closes its end on Quit."""

    def __init__(self) -> None:
        commands_r, commands_w = os.pipe()
        messages_r, messages_w = os.pipe()
        self._in, self._out = commands_r, messages_w
        self.pipe = DevToolsPipe(commands_w, messages_r)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _send(self, *messages: dict[str, object]) -> None:
        # Several messages in one write: the reader must split them.
        data = b"".join(json.dumps(m).encode() + b"\0" for m in messages)
        view = memoryview(data)
        while view:
            view = view[os.write(self._out, view) :]

    def _serve(self) -> None:
        buffered = b""
        held: dict[str, object] | None = None
        while chunk := os.read(self._in, 1 << 16):
            buffered += chunk
            while b"\0" in buffered:
                raw, buffered = buffered.split(b"\0", 1)
                command = json.loads(raw)
                reply: dict[str, object] = {"id": command["id"]}
                if "sessionId" in command:
                    reply["sessionId"] = command["sessionId"]
                method = command["method"]
                if method == "Quit":
                    os.close(self._out)
                    os.close(self._in)
                    return
                if method == "Echo":
                    event = {"method": "Test.echoed", "params": command["params"]}
                    if "sessionId" in command:
                        event["sessionId"] = command["sessionId"]
                    self._send(event, {**reply, "result": command["params"]})
                elif method == "Fail":
                    self._send({**reply, "error": {"code": -32000, "message": "no such thing"}})
                elif method == "Later":
                    held = {**reply, "result": {"late": True}}
                    continue
                if held is not None:
                    self._send(held)
                    held = None

    def close(self) -> None:
        with contextlib.suppress(BrowserClosed):
            self.pipe.call("Quit", timeout=0.5)
        self._thread.join(5)
        self.pipe.close()


@pytest.fixture
def fake_browser() -> Iterator[FakeBrowser]:
    fake = FakeBrowser()
    yield fake
    fake.close()


def test_answers_go_to_their_callers_and_events_to_their_sessions(
    fake_browser: FakeBrowser,
) -> None:
    pipe = fake_browser.pipe
    first, second = pipe.subscribe("S1"), pipe.subscribe("S2")
    assert pipe.call("Echo", {"n": 1}, session="S1") == {"n": 1}
    assert pipe.call("Echo", {"n": 2}, session="S2") == {"n": 2}
    assert pipe.call("Echo", {"n": 3}) == {"n": 3}  # browser-level: its event goes nowhere
    assert wait_event(first, "Test.echoed", 1.0) == {
        "method": "Test.echoed", "params": {"n": 1}, "sessionId": "S1"
    }  # fmt: skip
    assert wait_event(second, "Test.echoed", 1.0)["params"] == {"n": 2}  # type: ignore[index]
    assert first.empty() and second.empty()
    assert wait_event(first, "Test.echoed", 0.05) is None

    # An answer that comes after a later command's still reaches its own caller.
    late: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: late.update(pipe.call("Later", timeout=5)))
    waiter.start()
    time.sleep(0.1)
    assert pipe.call("Echo", {"n": 4}) == {"n": 4}
    waiter.join(5)
    assert late == {"late": True}

    # Many callers at once, and messages far larger than one read.
    big = "x" * 300_000
    results: list[object] = [None] * 16

    def caller(i: int) -> None:
        results[i] = pipe.call("Echo", {"i": i, "pad": big})

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [{"i": i, "pad": big} for i in range(16)]


def test_errors_timeouts_and_a_vanished_browser(fake_browser: FakeBrowser) -> None:
    pipe = fake_browser.pipe
    with pytest.raises(CdpError, match="no such thing"):
        pipe.call("Fail")
    with pytest.raises(CdpTimeout):
        pipe.call("Hang", timeout=0.1)
    assert pipe.call("Echo", {"still": "working"}) == {"still": "working"}

    events = pipe.subscribe("S1")
    outcome: list[BaseException] = []

    def hang() -> None:
        try:
            pipe.call("Hang", timeout=10)
        except BrowserClosed as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=hang)
    waiter.start()
    time.sleep(0.1)
    started = time.monotonic()
    fake_browser.close()
    waiter.join(5)
    assert len(outcome) == 1 and time.monotonic() - started < 2  # not the 10 s timeout
    with pytest.raises(BrowserClosed):
        wait_event(events, "Test.echoed", 5)
    with pytest.raises(BrowserClosed):
        pipe.call("Echo")


def test_user_agent_and_net_errors() -> None:
    agent = desktop_user_agent(156)
    assert "Chrome/156.0.0.0 Safari/537.36" in agent and "Headless" not in agent
    assert agent.startswith("Mozilla/5.0 (X11; Linux x86_64)")
    assert _net_error("net::ERR_CONNECTION_REFUSED") == "refused"
    assert _net_error("net::ERR_CONNECTION_TIMED_OUT") == "timeout"
    assert _net_error("net::ERR_CONNECTION_RESET") == "reset"
    assert _net_error("net::ERR_SSL_PROTOCOL_ERROR") == "ssl_protocol_error"


# -- live: Chromium tabs in the lab ---------------------------------------------------

SEED = 0  # its three tabs' plans hold a typo, /account, a stock check and a checkout
THINK_SCALE = 0.01


@pytest.fixture(scope="module")
def shop(module_topology: Topology) -> Iterator[ShopServer]:
    with ShopServer(module_topology) as server:
        yield server


def wait_namespace_empty(ns: str, timeout: float = 3.0) -> list[int]:
    """Processes still in `ns` after up to `timeout` seconds (killed ones take a moment)."""
    deadline = time.monotonic() + timeout
    while (left := pids_in_namespace(ns)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def served(shop: ShopServer, since: float, until: float) -> list[dict[str, Any]]:
    """nginx's log entries for requests that ended within [since, until + 1 s]."""
    time.sleep(0.1)  # nginx writes each line once its answer is out
    return [r for r in shop.requests() if since <= r["msec"] <= until + 1.0]


@pytest.mark.netns
def test_each_tab_shops_from_its_own_source_address(
    module_topology: Topology, shop: ShopServer
) -> None:
    topo = module_topology
    sources, _ = topo.add_client_addresses(3)
    plans = [
        plan_visit(random.Random(tab_seed(SEED, n)), think_scale=THINK_SCALE) for n in range(3)
    ]
    planned = [s for plan in plans for s in plan]
    assert {"/account", "/checkout"} <= {s.path for s in planned}, "pick another SEED"
    assert any(not s.expect_ok for s in planned), "pick another SEED"

    out = io.StringIO()
    humans = BrowserHumans(
        topo, sources, visits_per_tab=1, think_scale=THINK_SCALE, seed=SEED, out=out,
        deadline_s=30,
    )  # fmt: skip
    since = time.time()
    humans.run()
    until = time.time()
    records = list(parse_records(out.getvalue().splitlines()))

    # Each tab made its one visit, as planned, from its own address.
    sessions: dict[str, list[RequestRecord]] = collections.defaultdict(list)
    for record in records:
        sessions[record.session].append(record)
    assert set(sessions) == set(humans.plans_)
    assert sorted(r[0].source for r in sessions.values()) == sorted(sources)
    for session, made in sessions.items():
        n = sources.index(made[0].source)
        assert humans.plans_[session] == plans[n]
        assert {r.source for r in made} == {sources[n]}
        assert [(r.method, r.path) for r in made] == [(s.method, s.path) for s in plans[n]]
        for record, step in zip(made, plans[n], strict=True):
            assert record.error is None and record.status is not None, record
            if step.expect_ok:
                assert 200 <= record.status < 300, record
            else:
                assert record.status == 401, record
            assert (record.scenario, record.label, record.stack) == (
                "human_browser", "human", "chromium"
            )  # fmt: skip
            assert 0 < record.elapsed < 3.0

    # The shop saw those three addresses and no other, each with a desktop Chrome.
    entries = served(shop, since, until)
    assert {e["remote_addr"] for e in entries} == set(sources)
    for source in sources:
        made = [r for r in records if r.source == source]
        seen = [
            e for e in entries if e["remote_addr"] == source and e["request_uri"] != "/favicon.ico"
        ]
        assert [(e["request_method"], e["request_uri"]) for e in seen] == [
            (r.method, r.path) for r in made
        ]
    agents = {e["http_user_agent"] for e in entries}
    assert agents == {desktop_user_agent(chromium_major())}
    assert all(ipaddress.ip_address(a) in ALIAS_POOL_V4 for a in humans.server_aliases_)

    # Chromium and all its helpers are gone.
    assert wait_namespace_empty(topo.client_ns) == []
    print(f"Chromium up in {humans.startup_s_:.2f}s; 3 visits in {humans.elapsed_s_:.2f}s")


@pytest.mark.netns
def test_route_sources_for_both_families_and_repeated_calls(
    module_topology: Topology, shop: ShopServer
) -> None:
    topo = module_topology
    v4, v6 = topo.add_client_addresses(2, 1)
    first = route_sources(topo, [v4[0], v6[0]])
    (second,) = route_sources(topo, [v4[1]])
    assert ipaddress.ip_address(first[0]) in ALIAS_POOL_V4
    assert ipaddress.ip_address(first[1]) in ALIAS_POOL_V6
    assert ipaddress.ip_address(second) == ipaddress.ip_address(first[0]) + 1
    # curl binds nothing: the route alone picks the source.
    for source, alias in ((v4[0], first[0]), (v6[0], first[1]), (v4[1], second)):
        before = len(shop.requests())
        result = clients.curl(topo, alias, 443, servername=None, insecure=True, path="/products/1")
        assert result.ok, result
        assert result.local_address == source
        deadline = time.monotonic() + 2.0  # nginx logs a request once its answer is out
        while len(shop.requests()) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [e["remote_addr"] for e in shop.requests()[before:]] == [source]


@pytest.mark.netns
def test_dropped_and_refused_home_pages_are_recorded_as_errors(
    module_topology: Topology,
) -> None:
    topo = module_topology
    # Nobody owns the first alias (the server drops it: forwarding is off);
    # nothing listens on port 4444 of the second (Chromium refuses some low ports).
    out = io.StringIO()
    BrowserHumans(
        topo, [topo.client_v4, topo.client_v4], server_aliases=["10.203.0.1", topo.server_v4],
        base_port=4444, think_scale=THINK_SCALE, out=out, deadline_s=20, timeout_s=1.5,
    ).run()  # fmt: skip
    records = sorted(parse_records(out.getvalue().splitlines()), key=lambda r: r.error or "")
    assert [(r.path, r.status, r.error) for r in records] == [
        ("/", None, "refused"),
        ("/", None, "timeout"),
    ]  # the visitor leaves when the home page does not come
    assert records[1].elapsed >= 1.4 and records[1].mitigated
    assert wait_namespace_empty(topo.client_ns) == []


@pytest.mark.netns
def test_the_deadline_ends_the_visits_and_chromium(
    module_topology: Topology, shop: ShopServer
) -> None:
    topo = module_topology
    sources, _ = topo.add_client_addresses(3)
    out = io.StringIO()
    humans = BrowserHumans(
        topo, sources, visits_per_tab=1000, think_scale=0.2, seed=1, out=out, deadline_s=3.0,
        timeout_s=2.0,
    )  # fmt: skip
    started = time.monotonic()
    humans.run()
    elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < 3.0 + 2.0 + 1.0 + 1.5  # deadline, a last request's grace, slack
    records = list(parse_records(out.getvalue().splitlines()))
    assert records and all(r.status is not None for r in records)
    assert {r.source for r in records} <= set(sources)
    assert wait_namespace_empty(topo.client_ns) == []


@pytest.mark.netns
def test_command_line_inside_the_client_namespace(
    module_topology: Topology, shop: ShopServer
) -> None:
    topo = module_topology
    sources, _ = topo.add_client_addresses(2)
    aliases = route_sources(topo, sources)
    argv = [
        sys.executable, "-m", "lab.browser", "--sources", ",".join(sources),
        "--server-aliases", ",".join(aliases), "--think-scale", str(THINK_SCALE),
        "--seed", "4", "--visits-per-tab", "1", "--deadline-s", "20",
    ]  # fmt: skip
    done = topo.run(topo.client_ns, argv, timeout=40, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    # stdout is records and nothing else.
    records = list(parse_records(done.stdout.splitlines()))
    assert len(done.stdout.splitlines()) == len(records) > 0
    assert {r.source for r in records} == set(sources)
    assert len({r.session for r in records}) == 2
    assert "Chromium up in" in done.stderr
    assert wait_namespace_empty(topo.client_ns) == []
