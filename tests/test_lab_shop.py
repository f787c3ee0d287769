"""The lab's demo shop: its routes and events in-process, then live behind nginx in a namespace."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from lab.api.app import (
    EventForwarder,
    OtpLimiter,
    ShopConfigError,
    app_from_env,
    create_app,
    forwarded_client,
    make_catalogue,
)
from lab.api.server import ShopServer, nginx_config
from lab.netns import LabError, Topology, pids_in_namespace
from lab.tls_server import Certificate
from tests.conftest import require_root

# Starlette 1.x wants httpx2 under its TestClient and warns that plain httpx is
# deprecated; httpx is what the project has, and TestClient works with it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

TOKEN = "agent-token-for-tests"
GOOD = {"user": "alice", "password": "correct-horse"}
BAD = {"user": "alice", "password": "hunter2"}
# What nginx adds: the client claimed 203.0.113.9, nginx appended the real peer.
FORWARDED = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "X-Forwarded-Port": "40001"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(products=100)) as test_client:
        yield test_client


# -- a stand-in for the botwall agent's POST /v1/events ------------------------


class _EventsServer(ThreadingHTTPServer):
    def __init__(self, status: int = 202) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _EventsHandler)


@dataclass
class FakeAgent:
    server: _EventsServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.server.received

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.received)


class _EventsHandler(BaseHTTPRequestHandler):
    server: _EventsServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(
            {
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "event": json.loads(body),
            }
        )
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fake_agent(
    bind: Callable[[Callable[[], _EventsServer]], _EventsServer] = lambda make: make(),
    status: int = 202,
) -> Iterator[FakeAgent]:
    """An events endpoint on 127.0.0.1 answering `status`; `bind` may create its
    socket in another namespace."""
    server = bind(lambda: _EventsServer(status))
    agent = FakeAgent(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield agent
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def silent_agent() -> Iterator[str]:
    """A URL whose server accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- catalogue and browsing ----------------------------------------------------


def test_home_page_is_html_with_a_title_and_products(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>Botwall Demo Shop</title>" in response.text
    first = client.get("/products/1").json()["name"]
    assert first in response.text


def test_catalogue_depends_only_on_the_seed() -> None:
    assert make_catalogue(50, seed=7) == make_catalogue(50, seed=7)
    assert [p.name for p in make_catalogue(50, seed=7)] != [p.name for p in make_catalogue(50, 8)]
    with pytest.raises(ValueError, match="at least one product"):
        make_catalogue(0, seed=7)


def test_products_are_paged_twenty_at_a_time(client: TestClient) -> None:
    first = client.get("/products").json()
    assert (first["page"], first["per_page"], first["total"], first["pages"]) == (1, 20, 100, 5)
    assert [p["id"] for p in first["items"]] == list(range(1, 21))
    last = client.get("/products", params={"page": 5}).json()
    assert [p["id"] for p in last["items"]] == list(range(81, 101))
    assert client.get("/products", params={"page": 6}).json()["items"] == []
    assert client.get("/products", params={"page": 0}).status_code == 422
    assert client.get("/products", params={"page": "two"}).status_code == 422


def test_products_filter_and_search_match_names(client: TestClient) -> None:
    word = client.get("/products/1").json()["name"].split()[-1]
    listed = client.get("/products", params={"q": word.lower()}).json()
    searched = client.get("/search", params={"q": word}).json()
    assert listed["total"] == searched["count"] >= 1
    assert all(word in p["name"] for p in searched["items"])
    assert client.get("/search", params={"q": "no such thing"}).json()["count"] == 0
    assert client.get("/search").status_code == 422


def test_product_and_inventory_status_codes(client: TestClient) -> None:
    product = client.get("/products/7")
    assert product.status_code == 200
    assert product.json()["id"] == 7 and product.json()["price_cents"] > 0
    stock = client.get("/inventory/7").json()
    assert stock["product"] == 7 and stock["in_stock"] >= 0
    for missing in (0, 101, 99999):
        for route in ("/products", "/inventory"):
            response = client.get(f"{route}/{missing}")
            assert response.status_code == 404
            assert response.json() == {"detail": f"product {missing} not found"}
    assert client.get("/products/abc").status_code == 422


# -- accounts ------------------------------------------------------------------


def test_login_accepts_json_and_forms(client: TestClient) -> None:
    for body in ({"json": GOOD}, {"data": GOOD}):
        response = client.post("/login", **body)
        assert response.status_code == 200, response.text
        assert response.json()["user"] == "alice"
        assert response.cookies.get("session")
    # Any user name with the right password is an account.
    assert (
        client.post("/login", json={"user": "zed", "password": "correct-horse"}).status_code == 200
    )


def test_login_refusals(client: TestClient) -> None:
    for body in ({"json": BAD}, {"data": BAD}):
        response = client.post("/login", **body)
        assert response.status_code == 401
        assert response.json() == {"detail": "bad credentials"}
        assert "set-cookie" not in response.headers
    as_json = {"Content-Type": "application/json"}
    assert client.post("/login", content=b"{not json", headers=as_json).status_code == 400
    assert client.post("/login", content=b"[1, 2]", headers=as_json).status_code == 400
    assert client.post("/login", json={"user": "alice"}).status_code == 422
    assert client.post("/login", json={"user": "", "password": "x"}).status_code == 422
    as_text = {"Content-Type": "text/plain"}
    assert client.post("/login", content=b"user=a", headers=as_text).status_code == 415


def test_account_needs_a_session(client: TestClient) -> None:
    assert client.get("/account").status_code == 401
    client.cookies.set("session", "forged")
    assert client.get("/account").status_code == 401
    client.cookies.clear()
    assert (
        client.post("/login", json={"user": "bob", "password": "correct-horse"}).status_code == 200
    )
    profile = client.get("/account")
    assert profile.status_code == 200
    assert profile.json()["user"] == "bob" and profile.json()["name"] == "Bob Nguyen"


# -- cart and checkout ---------------------------------------------------------


def test_cart_and_checkout(client: TestClient) -> None:
    assert client.get("/cart").json() == {"items": [], "total_cents": 0, "currency": "EUR"}
    assert client.post("/checkout").status_code == 400
    assert client.post("/cart", json={"product": 4242}).status_code == 404
    assert client.post("/cart", json={"product": 3, "qty": 0}).status_code == 422
    assert client.post("/cart", json={"qty": 1}).status_code == 422

    added = client.post("/cart", json={"product": 3, "qty": 2})
    assert added.status_code == 200 and added.cookies.get("cart")
    assert client.post("/cart", data={"product": "5"}).status_code == 200  # a form, qty 1
    cart = client.get("/cart").json()
    assert [(i["id"], i["qty"]) for i in cart["items"]] == [(3, 2), (5, 1)]
    assert cart["total_cents"] == sum(i["price_cents"] * i["qty"] for i in cart["items"])

    order = client.post("/checkout")
    assert order.status_code == 200
    assert order.json()["order"] == "ord-000001"
    assert order.json()["total_cents"] == cart["total_cents"]
    assert client.get("/cart").json()["items"] == []
    assert client.post("/checkout").status_code == 400


# -- OTP -----------------------------------------------------------------------


def test_otp_limit_per_phone_number(client: TestClient) -> None:
    for _ in range(3):
        sent = client.post("/otp/send", json={"phone": "+33 6 12 34 56 78"})
        assert sent.status_code == 200 and sent.json()["sent"] is True
    # The same number written differently is still the same number.
    refused = client.post("/otp/send", data={"phone": "+33612345678"})
    assert refused.status_code == 429
    assert 590 <= int(refused.headers["Retry-After"]) <= 600
    assert client.post("/otp/send", json={"phone": "+33612345679"}).status_code == 200


def test_otp_limit_overall(client: TestClient) -> None:
    for n in range(30):
        assert client.post("/otp/send", json={"phone": f"+4915100000{n:03d}"}).status_code == 200
    refused = client.post("/otp/send", json={"phone": "+4915199999999"})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_otp_bad_numbers(client: TestClient) -> None:
    for phone in ("12345", "call me", "+1234567890123456", ""):
        response = client.post("/otp/send", json={"phone": phone})
        assert response.status_code == 400, phone
    assert client.post("/otp/send", json={}).status_code == 422


def test_otp_limits_reopen_after_their_window() -> None:
    now = [1000.0]
    limiter = OtpLimiter(clock=lambda: now[0])
    assert [limiter.try_send("491510000000") for _ in range(3)] == [None, None, None]
    assert limiter.try_send("491510000000") == pytest.approx(600.0)
    now[0] += 601.0
    assert limiter.try_send("491510000000") is None


# -- application events --------------------------------------------------------


def test_forwarded_client_trusts_only_the_last_entry() -> None:
    assert forwarded_client({"x-forwarded-for": "1.1.1.1, 10.0.0.2", "x-forwarded-port": "5"}) == (
        "10.0.0.2",
        5,
    )
    assert forwarded_client({"x-forwarded-for": "fd00:b0::2", "x-forwarded-port": "443"}) == (
        "fd00:b0::2",
        443,
    )
    assert forwarded_client({"x-forwarded-for": "10.0.0.2"}) is None
    assert forwarded_client({"x-forwarded-for": "nonsense", "x-forwarded-port": "5"}) is None
    assert forwarded_client({"x-forwarded-for": "10.0.0.2", "x-forwarded-port": "70000"}) is None
    assert forwarded_client({"x-forwarded-port": "5"}) is None
    assert forwarded_client({"x-forwarded-for": "10.0.0.2", "x-forwarded-port": "\u00b2"}) is None


def test_events_reach_the_agent_with_the_forwarded_client() -> None:
    with fake_agent() as agent:
        events = EventForwarder(agent.url, TOKEN)
        with TestClient(create_app(products=20, events=events)) as shop:
            assert shop.post("/login", json=BAD, headers=FORWARDED).status_code == 401
            assert shop.post("/login", json=GOOD, headers=FORWARDED).status_code == 200
            assert shop.post("/otp/send", json={"phone": "+3361234567"}, headers=FORWARDED)
            assert shop.post("/cart", json={"product": 1}, headers=FORWARDED).status_code == 200
            assert shop.post("/checkout", headers=FORWARDED).status_code == 200
            # Without the proxy's headers the shop cannot name the client: no event.
            assert shop.post("/login", json=BAD).status_code == 401
            assert events.flush(5.0)
        received = agent.wait_for(5)
    assert [r["event"]["kind"] for r in received] == [
        "login_failure",
        "login_success",
        "otp_sent",
        "add_to_cart",
        "checkout",
    ]
    assert received[0] == {
        "path": "/v1/events",
        "authorization": f"Bearer {TOKEN}",
        "event": {"client": "198.51.100.7", "port": 40001, "kind": "login_failure"},
    }
    assert events.stats()["sent"] == 5


def test_events_the_agent_refuses_are_counted() -> None:
    with fake_agent(status=401) as agent:
        events = EventForwarder(agent.url, "wrong-token")
        events.report("198.51.100.7", 40001, "checkout")
        assert events.flush(5.0)
        events.close()
    assert events.stats()["rejected"] == 1
    assert not events.report("198.51.100.7", 40001, "checkout")  # closed
    assert events.stats()["dropped_at_close"] == 1


def test_a_silent_agent_never_slows_the_shop() -> None:
    with silent_agent() as url:
        events = EventForwarder(url, TOKEN, timeout=1.0)
        with TestClient(create_app(products=20, events=events)) as shop:
            started = time.monotonic()
            assert shop.post("/login", json=BAD, headers=FORWARDED).status_code == 401
            # The forwarder waits 1 s for the agent; the shop's answer does not.
            assert time.monotonic() - started < 0.5
            assert events.flush(5.0)
        assert events.stats()["dropped_unreachable"] == 1
        assert events.stats()["sent"] == 0


def test_events_beyond_the_queue_are_dropped_and_counted() -> None:
    with silent_agent() as url:
        events = EventForwarder(url, TOKEN, queue_size=1, timeout=1.0)
        with TestClient(create_app(products=20, events=events)) as shop:
            started = time.monotonic()
            for _ in range(6):
                assert shop.post("/login", json=BAD, headers=FORWARDED).status_code == 401
            assert time.monotonic() - started < 0.9
        stats = events.stats()
    # One in flight, one queued (either may be dropped at close), the rest refused at once.
    assert stats["dropped_queue_full"] >= 4
    assert sum(stats.values()) == 6


def test_forwarder_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="http://"):
        EventForwarder("127.0.0.1:9", TOKEN)
    with pytest.raises(ValueError, match="token"):
        EventForwarder("http://127.0.0.1:9", "")


# -- configuration from the environment ----------------------------------------


def test_app_from_env(tmp_path: Path) -> None:
    with TestClient(app_from_env({"SHOP_PRODUCTS": "30"})) as shop:
        assert shop.get("/products/30").status_code == 200
        assert shop.get("/products/31").status_code == 404
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with fake_agent() as agent:
        env = {"SHOP_EVENTS_URL": agent.url, "SHOP_EVENTS_TOKEN_FILE": str(token_file)}
        with TestClient(app_from_env(env)) as shop:
            assert shop.post("/login", json=BAD, headers=FORWARDED).status_code == 401
        (received,) = agent.wait_for(1)
    assert received["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHOP_PRODUCTS": "many"}, "SHOP_PRODUCTS"),
        ({"SHOP_EVENTS_URL": "http://127.0.0.1:9"}, "go together"),
        (
            {"SHOP_EVENTS_URL": "http://127.0.0.1:9", "SHOP_EVENTS_TOKEN_FILE": "/nonexistent"},
            "read",
        ),
    ],
)
def test_app_from_env_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ShopConfigError, match=message):
        app_from_env(env)


# -- nginx configuration -------------------------------------------------------


@pytest.mark.parametrize(("version", "modern"), [((1, 22, 1), False), ((1, 25, 1), True)])
def test_nginx_config(tmp_path: Path, version: tuple[int, ...], modern: bool) -> None:
    cert = Certificate(tmp_path / "ca", tmp_path / "crt", tmp_path / "key", "h", ())
    text = nginx_config(
        workdir=tmp_path, cert=cert, tls_port=443, upstream_port=8000, hostname="h", version=version
    )
    listen = "ssl;" if modern else "ssl http2;"
    assert f"listen 0.0.0.0:443 {listen}" in text and f"listen [::]:443 {listen}" in text
    assert ("http2 on;" in text) is modern
    for line in (
        "proxy_pass http://127.0.0.1:8000;",
        "proxy_http_version 1.0;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Port $remote_port;",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        f"pid {tmp_path}/nginx.pid;",
    ):
        assert line in text


# -- live: curl -> nginx (TLS) -> uvicorn, in namespaces -----------------------


@dataclass(frozen=True)
class CurlResult:
    body: str
    status: int
    http_version: str
    local_port: int


def curl(topo: Topology, shop: ShopServer, path: str, *extra: str, v6: bool = False) -> CurlResult:
    assert shop.cert is not None
    address = f"[{topo.server_v6}]" if v6 else topo.server_v4
    argv = [
        "curl", "-sS", "--max-time", "5", "--cacert", str(shop.cert.ca_path),
        "--resolve", f"{shop.hostname}:{shop.tls_port}:{address}",
        *extra, f"https://{shop.hostname}:{shop.tls_port}{path}",
        "-w", "\n%{http_code} %{http_version} %{local_port}",
    ]  # fmt: skip
    done = topo.run(topo.client_ns, argv, timeout=20)
    assert done.returncode == 0, done.stderr
    body, _, last = done.stdout.rpartition("\n")
    status, http_version, local_port = last.split()
    return CurlResult(body, int(status), http_version, int(local_port))


def logged(shop: ShopServer, port: int, timeout: float = 2.0) -> dict[str, Any]:
    """nginx's access-log entry for the request from client port `port`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in shop.requests() if r["remote_port"] == port]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, shop.requests()
            return found[0]
        time.sleep(0.02)


@pytest.mark.netns
def test_shop_behind_nginx_live(tmp_path: Path) -> None:
    require_root()
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN)
    with Topology() as topo, fake_agent(bind=topo.call_in_server) as agent:
        with ShopServer(
            topo, events_url=agent.url, events_token_file=token_file, workdir=tmp_path / "shop"
        ) as shop:
            assert shop.nginx is not None and shop.uvicorn is not None
            for v6 in (False, True):
                product = curl(topo, shop, "/products/1", v6=v6)
                assert (product.status, product.http_version) == (200, "2"), product
                assert json.loads(product.body)["id"] == 1
                entry = logged(shop, product.local_port)
                assert entry["remote_addr"] == (topo.client_v6 if v6 else topo.client_v4)
                assert entry["server_protocol"] == "HTTP/2.0" and entry["status"] == 200

            old_tls = curl(topo, shop, "/products/2", "--http1.1", "--tls-max", "1.2")
            assert (old_tls.status, old_tls.http_version) == (200, "1.1")
            assert logged(shop, old_tls.local_port)["ssl_protocol"] == "TLSv1.2"

            # The shop learns the client's own address and source port from nginx,
            # whatever the client claims in the same headers.
            spoofed = ("-H", "X-Forwarded-For: 192.0.2.66", "-H", "X-Forwarded-Port: 1")
            whoami = curl(topo, shop, "/whoami", *spoofed)
            assert json.loads(whoami.body) == {
                "client": topo.client_v4,
                "port": whoami.local_port,
                "proto": "https",
                "peer": "127.0.0.1",
                "http_version": "1.0",
            }

            login = curl(
                topo, shop, "/login", "-H", "Content-Type: application/json", "-d", json.dumps(BAD)
            )
            assert login.status == 401
            assert json.loads(login.body) == {"detail": "bad credentials"}
            (received,) = agent.wait_for(1)
            assert received["authorization"] == f"Bearer {TOKEN}"
            assert received["event"] == {
                "client": topo.client_v4,
                "port": login.local_port,
                "kind": "login_failure",
            }
            # nginx has served requests, so its worker exists by now.
            pids = [shop.nginx.pid, shop.uvicorn.pid, *_children(shop.nginx.pid)]
            assert len(pids) == 3
        assert pids_in_namespace(topo.server_ns) == []
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.netns
def test_shop_server_reports_why_it_did_not_start(topology: Topology) -> None:
    with ShopServer(topology, tls_port=8443):
        # The port is taken: the second nginx gives up after its bind retries
        # (~2.5 s) and says why; the first one's socket must not pass for its own.
        second = ShopServer(topology, tls_port=8443, upstream_port=8001)
        try:
            with pytest.raises(LabError, match=r"(?s)nginx exited with 1.*Address already in use"):
                second.start()
            assert second.nginx is None and second.uvicorn is None
        finally:
            second.cleanup()
        assert not second.workdir.exists()
