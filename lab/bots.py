"""The lab's non-browser clients: app users, a crawler, an AI agent and the bad bots.

Run inside the client namespace as `python -m lab.bots SCENARIO --sources ...`;
every request becomes one RequestRecord (lab/records.py) on stdout. Each
scenario is what the issue describes, with its real-world tell left in and
nothing botwall-specific added:

- human_app: the shop's mobile app (its own TLS configuration, its own
  User-Agent), human visits with human think times.
- crawler: a search crawler with a Googlebot User-Agent from the crawler's
  configured range, walking the catalog politely.
- ai_agent: a declared AI shopping agent (ShopAgent/1.0): search, product,
  cart, checkout, fast, a handful of sessions.
- stuffing_distributed: credential stuffing spread over hundreds of addresses,
  one or two attempts a minute each, impersonating the shop's app User-Agent
  over a stock Python TLS stack (what stuffing kits do).
- ato: account takeover after a stuffing hit: from fresh addresses, one login
  that works, then the account, a cart and a checkout, quickly.
- scraping_sequential: the catalog in id order, several requests a second.
- scraping_stealthy: the catalog in random order with human-like delays,
  rotating over many addresses, with the app's User-Agent.
- hoarding: add to cart again and again, look at inventory, never check out.
- sms_pumping: /otp/send to premium-rate numbers from many addresses.
- sophisticated: a desktop Chrome User-Agent and browser headers over a
  non-browser TLS stack, a new address every few requests.

The loud tools (hydra, wrk) are started by lab.scenarios, not here.
Every loop is bounded by --duration.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lab.journeys import Step, plan_app_visit
from lab.records import SERVER_TIME_HEADER, RequestRecord, emit

HOSTNAME = "api.botwall.test"
ATO_AFTER_STUFFING_S = 20.0

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
APP_UA = "ShopApp/4.2 shopkit/1.3"
GOOGLEBOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
AGENT_UA = "ShopAgent/1.0 (+https://agent.botwall.test/about; AI shopping agent)"
PYTHON_UA = "python-requests/2.31.0"
BROWSER_HEADERS = {
    "Accept": "application/json, text/plain, */*",
    "Accept-Language": "en-GB,en;q=0.9",
    "Accept-Encoding": "gzip, deflate, br",
    "Sec-Fetch-Site": "same-origin",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Dest": "empty",
}
APP_HEADERS = {"Accept": "application/json", "Accept-Encoding": "gzip"}


def stock_tls(ca_file: str | None) -> ssl.SSLContext:
    """Python's default client TLS: what requests, httpx and most bot kits send."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if ca_file is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def app_tls(ca_file: str | None) -> ssl.SSLContext:
    """The shop app's own TLS configuration: TLS 1.2+, AEAD suites only, ALPN
    http/1.1. The lab's stand-in for a mobile app's TLS library: a different
    ClientHello from stock Python, as a real app's is."""
    ctx = stock_tls(ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Connection(http.client.HTTPSConnection):
    """HTTPS to a fixed server address from a chosen source, with SNI naming the shop."""

    def __init__(self, server: str, port: int, source: str, ctx: ssl.SSLContext, timeout: float):
        super().__init__(server, port, timeout=timeout, context=ctx)
        self._server, self._source = server, source

    def connect(self) -> None:
        sock = socket.create_connection(
            (self._server, self.port), self.timeout, source_address=(self._source, 0)
        )
        self.sock = self._context.wrap_socket(sock, server_hostname=HOSTNAME)  # type: ignore[attr-defined]


@dataclass
class Client:
    """One session of one client at one source address (keep-alive when it can)."""

    scenario: str
    label: str
    server: str
    port: int
    source: str
    user_agent: str
    headers: dict[str, str]
    tls: ssl.SSLContext
    stack: str = "python"
    timeout: float = 4.0
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cookies: dict[str, str] = field(default_factory=dict)
    keep_alive: bool = True

    def __post_init__(self) -> None:
        self._conn: _Connection | None = None

    def request(self, method: str, path: str, body: object | None = None) -> int | None:
        headers = {"Host": HOSTNAME, "User-Agent": self.user_agent, **self.headers}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if not self.keep_alive:
            headers["Connection"] = "close"
        started = time.time()
        status: int | None = None
        error: str | None = None
        server_s: float | None = None
        try:
            if self._conn is None:
                self._conn = _Connection(
                    self.server, self.port, self.source, self.tls, self.timeout
                )
            self._conn.request(method, path, body=payload, headers=headers)
            response = self._conn.getresponse()
            response.read()
            status = response.status
            server_s = _server_time(response.getheader(SERVER_TIME_HEADER))
            self._remember_cookies(response.getheader("Set-Cookie"))
            if not self.keep_alive or response.will_close:
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            error = _error_name(exc)
            self.close()  # a dropped or reset connection is not reused
        emit(
            RequestRecord(
                scenario=self.scenario, label=self.label, session=self.session,
                source=self.source, method=method, path=path, status=status, error=error,
                ts=started, elapsed=round(time.time() - started, 4), stack=self.stack,
                server_s=server_s,
            )
        )  # fmt: skip
        return status

    def _remember_cookies(self, header: str | None) -> None:
        # One Set-Cookie header is all the shop sends per answer.
        if header and "=" in header:
            name, _, rest = header.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _server_time(header: str | None) -> float | None:
    """nginx's $request_time ("0.012"), or None where it is missing or garbled."""
    try:
        return float(header) if header else None
    except ValueError:
        return None


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    return type(exc).__name__


# ---- what each scenario does ----------------------------------------------------------


@dataclass
class Run:
    """What a scenario gets to work with."""

    scenario: str
    server: str
    server_v6: str | None
    port: int
    sources: list[str]
    ca_file: str | None
    deadline: float  # time.time() at which every loop stops
    rng: random.Random
    think_scale: float = 1.0

    def left(self) -> float:
        return self.deadline - time.time()

    def sleep(self, seconds: float) -> bool:
        """Sleeps, but never past the deadline; False once the deadline is reached."""
        time.sleep(max(0.0, min(seconds, self.left())))
        return self.left() > 0

    def server_for(self, source: str) -> str:
        return self.server_v6 if ":" in source and self.server_v6 else self.server

    def client(
        self,
        label: str,
        source: str,
        ua: str,
        headers: dict[str, str],
        tls: ssl.SSLContext,
        **kw: object,
    ) -> Client:
        return Client(
            self.scenario, label, self.server_for(source), self.port, source, ua, dict(headers),
            tls, **kw,  # type: ignore[arg-type]
        )  # fmt: skip


def _run_steps(c: Client, steps: Sequence[Step], run: Run) -> None:
    for step in steps:
        if run.left() <= 0:
            return
        c.request(step.method, step.path, step.body)
        if not run.sleep(step.think_s * run.think_scale):
            return


def human_app(run: Run) -> None:
    """Each address is one phone: app visits back to back, human pauses between."""

    def phone(source: str, rng: random.Random) -> None:
        run.sleep(rng.uniform(0, 10))
        while run.left() > 5:
            c = run.client("human", source, APP_UA, APP_HEADERS, app_tls(run.ca_file))
            _run_steps(c, plan_app_visit(rng), run)
            c.close()
            run.sleep(rng.uniform(5, 20) * run.think_scale)

    _per_source(run, phone)


def crawler(run: Run) -> None:
    """A verified crawler: the catalog in id order, one page every 1.5 s, one session."""
    c = run.client(
        "good_bot", run.sources[0], GOOGLEBOT_UA, {"Accept": "*/*"}, stock_tls(run.ca_file)
    )
    product = 1
    while run.left() > 0:
        c.request("GET", f"/products/{product}")
        product = product % 500 + 1
        run.sleep(1.5)


def ai_agent(run: Run) -> None:
    """A declared AI shopping agent buying for its users: fast, purposeful, few sessions."""
    tls = stock_tls(run.ca_file)
    rng = run.rng
    while run.left() > 3:
        c = run.client("ai_agent", rng.choice(run.sources), AGENT_UA, APP_HEADERS, tls)
        query = rng.choice(("kettle", "lamp", "chair", "mug", "desk"))
        c.request("GET", f"/search?q={query}")
        run.sleep(0.5)
        for _ in range(rng.randint(2, 4)):
            product = rng.randint(1, 500)
            c.request("GET", f"/products/{product}")
            c.request("GET", f"/inventory/{product}")
            run.sleep(0.3)
        c.request("POST", "/login", {"user": "agent-user@mail.test", "password": "correct-horse"})
        c.request("POST", "/cart", {"product": rng.randint(1, 500), "qty": 1})
        c.request("POST", "/checkout", {"payment": "card-on-file"})
        c.close()
        run.sleep(rng.uniform(8, 15))


def _stuffer_identity(run: Run, source: str) -> Client:
    # The app's User-Agent and headers, but stock Python TLS: the kit's tell.
    return run.client("bad_bot", source, APP_UA, APP_HEADERS, stock_tls(run.ca_file))


def stuffing_distributed(run: Run) -> None:
    """Every address: a login attempt with a leaked pair every 30-60 s."""

    def address(source: str, rng: random.Random) -> None:
        run.sleep(rng.uniform(0, 30))
        c = _stuffer_identity(run, source)
        c.keep_alive = False  # one attempt per connection, as a proxy pool gives
        while run.left() > 0:
            user = f"user{rng.randrange(10**6)}@mail.test"
            c.request(
                "POST", "/login", {"user": user, "password": f"leaked-{rng.randrange(10**6)}"}
            )
            run.sleep(rng.uniform(30, 60))

    _per_source(run, address)


def ato(run: Run) -> None:
    """Account takeover with a stuffing hit: login works at once, then straight to money."""
    rng = run.rng
    # The takeover follows the stuffing that found the working pairs: it
    # starts once the stuffing campaign has been running for a while.
    if not run.sleep(ATO_AFTER_STUFFING_S):
        return
    for source in run.sources:
        if not run.sleep(rng.uniform(2, 6)):
            return
        c = _stuffer_identity(run, source)
        c.request("POST", "/login", {"user": f"user{rng.randrange(1000)}@mail.test",
                                     "password": "correct-horse"})  # fmt: skip
        c.request("GET", "/account")
        c.request("POST", "/cart", {"product": rng.randint(1, 500), "qty": 5})
        c.request("POST", "/checkout", {"payment": "stored-card"})
        c.close()


def scraping_sequential(run: Run) -> None:
    """The whole catalog in id order from one address, four requests a second."""
    c = run.client("bad_bot", run.sources[0], PYTHON_UA, {"Accept": "*/*"}, stock_tls(run.ca_file))
    product = 1
    while run.left() > 0:
        c.request("GET", f"/products/{product}")
        product += 1
        run.sleep(0.25)


def scraping_stealthy(run: Run) -> None:
    """The catalog in random order, human-like pauses, 3-6 pages per address, then the next."""
    rng = run.rng
    ids = list(range(1, 501))
    rng.shuffle(ids)
    lanes = 4  # concurrent scraping lanes, each rotating addresses

    def lane(index: int, lane_rng: random.Random) -> None:
        sources = run.sources[index::lanes]
        for source in sources:
            c = _stuffer_identity(run, source)
            for _ in range(lane_rng.randint(3, 6)):
                try:
                    product = ids.pop()  # atomic: the lanes share one shuffled catalog
                except IndexError:
                    return
                if run.left() <= 0:
                    return
                c.request("GET", f"/products/{product}")
                if not run.sleep(min(lane_rng.lognormvariate(1.0, 0.5), 10.0)):
                    return
            c.close()

    _start_and_join([(lane, (i, _fork(rng))) for i in range(lanes)])


def hoarding(run: Run) -> None:
    """Carts filled with stock and never paid for."""

    def hoarder(source: str, rng: random.Random) -> None:
        c = run.client("bad_bot", source, CHROME_WINDOWS, BROWSER_HEADERS, stock_tls(run.ca_file))
        while run.left() > 0:
            product = rng.randint(1, 40)  # the scarce, popular items
            c.request("GET", f"/inventory/{product}")
            c.request("POST", "/cart", {"product": product, "qty": 10})
            run.sleep(rng.uniform(1.5, 3.0))

    _per_source(run, hoarder)


def sms_pumping(run: Run) -> None:
    """One-time passwords sent to premium-rate numbers, each address every 3-5 s."""

    def pump(source: str, rng: random.Random) -> None:
        run.sleep(rng.uniform(0, 5))
        c = _stuffer_identity(run, source)
        while run.left() > 0:
            number = f"+88213{rng.randrange(10**7):07d}"  # an international premium range
            c.request("POST", "/otp/send", {"phone": number})
            run.sleep(rng.uniform(3, 5))

    _per_source(run, pump)


def sophisticated(run: Run) -> None:
    """Desktop Chrome's User-Agent and headers over stock Python TLS; a fresh
    address every 3-5 requests; login attempts mixed into catalog views."""
    rng = run.rng
    for source in run.sources:
        c = run.client("bad_bot", source, CHROME_WINDOWS, BROWSER_HEADERS, stock_tls(run.ca_file))
        c.request("GET", "/")
        for _ in range(rng.randint(2, 4)):
            if run.left() <= 0:
                return
            if rng.random() < 0.5:
                c.request("POST", "/login", {"user": f"u{rng.randrange(10**6)}@mail.test",
                                             "password": "Winter2026!"})  # fmt: skip
            else:
                c.request("GET", f"/products/{rng.randint(1, 500)}")
            run.sleep(rng.uniform(1.0, 3.0))
        c.close()
        if not run.sleep(rng.uniform(0.5, 2.0)):
            return


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "human_app": human_app,
    "crawler": crawler,
    "ai_agent": ai_agent,
    "stuffing_distributed": stuffing_distributed,
    "ato": ato,
    "scraping_sequential": scraping_sequential,
    "scraping_stealthy": scraping_stealthy,
    "hoarding": hoarding,
    "sms_pumping": sms_pumping,
    "sophisticated": sophisticated,
}


def _fork(rng: random.Random) -> random.Random:
    return random.Random(rng.randrange(2**63))


def _per_source(run: Run, fn: Callable[[str, random.Random], None]) -> None:
    """`fn(source, rng)` for every source at once, each with its own random stream."""
    _start_and_join([(fn, (source, _fork(run.rng))) for source in run.sources])


def _start_and_join(jobs: Sequence[tuple[Callable[..., None], tuple[object, ...]]]) -> None:
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bots", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--server", required=True, help="the shop's IPv4 address")
    p.add_argument("--server-v6", help="the shop's IPv6 address, for IPv6 sources")
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--sources", required=True, help="comma-separated source addresses")
    p.add_argument("--ca-file", help="CA that signed the shop's certificate")
    p.add_argument("--duration", type=float, required=True, help="seconds until every loop stops")
    p.add_argument("--think-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    if not sources:
        p.error("--sources names no address")
    run = Run(
        scenario=args.scenario, server=args.server, server_v6=args.server_v6, port=args.port,
        sources=sources, ca_file=args.ca_file, deadline=time.time() + args.duration,
        rng=random.Random(args.seed), think_scale=args.think_scale,
    )  # fmt: skip
    worker = threading.Thread(target=SCENARIOS[args.scenario], args=(run,), daemon=True)
    worker.start()
    worker.join(args.duration + 10)  # a request in flight finishes within its timeout
    return 0


if __name__ == "__main__":
    sys.exit(main())
