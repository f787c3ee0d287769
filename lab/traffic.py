"""Labelled traffic for the lab: human journeys and bad bots, from chosen source addresses.

Run inside the client namespace as `python -m lab.traffic SCENARIO ...`; each
request is printed as one JSON line (scenario, source, method, path, status or
error, start time, elapsed), so a test or the lab report can tell when a
client was mitigated. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
CHROME_LINUX = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
PYTHON_REQUESTS = "python-requests/2.31.0"
BROWSER_HEADERS = {
    "Accept": "application/json, text/plain, */*",
    "Accept-Language": "en-GB,en;q=0.9",
    "Accept-Encoding": "gzip, deflate",
}

_print_lock = threading.Lock()


@dataclass
class Client:
    """One client at one source address, with one keep-alive connection at a time."""

    scenario: str
    server: str
    port: int
    source: str
    user_agent: str
    headers: dict[str, str]
    timeout: float = 2.0

    def __post_init__(self) -> None:
        self._conn: http.client.HTTPConnection | None = None
        self.cookie: str | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, referer: str | None = None
    ) -> int | None:
        headers = {"User-Agent": self.user_agent, **self.headers}
        if self.cookie:
            headers["Cookie"] = self.cookie
        if referer:
            headers["Referer"] = referer
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        started = time.time()
        status: int | None = None
        error: str | None = None
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self.server, self.port, timeout=self.timeout, source_address=(self.source, 0)
                )
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            self.close()  # a dropped or reset connection is not reused
        _emit(
            {
                "scenario": self.scenario,
                "source": self.source,
                "method": method,
                "path": path,
                "status": status,
                "error": error,
                "ts": started,
                "elapsed": round(time.time() - started, 4),
            }
        )
        return status

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _emit(record: dict[str, object]) -> None:
    with _print_lock:
        print(json.dumps(record), flush=True)


def scrape(c: Client, count: int, rate: float, sequential: bool, rng: random.Random) -> None:
    """A catalog walk: /products/1, /products/2, ... or the same ids shuffled."""
    ids = list(range(1, count + 1))
    if not sequential:
        rng.shuffle(ids)
    for product_id in ids:
        c.request("GET", f"/products/{product_id}")
        time.sleep(1.0 / rate)


def stuff(c: Client, attempts: int, interval: float, rng: random.Random) -> None:
    """Credential stuffing: POST /login with leaked pairs, politely spaced."""
    for n in range(attempts):
        user = f"user{rng.randrange(10**6)}@mail.test"
        c.request("POST", "/login", body=f"user={user}&password=leaked{n}".encode())
        time.sleep(interval * rng.uniform(0.9, 1.1))


def human(c: Client, sessions: int, rng: random.Random, think_scale: float) -> None:
    """Browse, search, look at products, sometimes log in (with the odd typo),
    add to cart and check out, with heavy-tailed think times."""

    def think() -> None:
        # Log-normal think times: mostly seconds, now and then much longer.
        time.sleep(min(rng.lognormvariate(0.0, 0.8) * think_scale, 8 * think_scale))

    for _ in range(sessions):
        c.request("GET", "/")
        think()
        c.request("GET", f"/search?q=item{rng.randrange(50)}", referer="/")
        think()
        for _ in range(rng.randint(1, 4)):
            c.request("GET", f"/products/{rng.randrange(1, 500)}", referer="/search")
            think()
        if rng.random() < 0.5:
            c.request("GET", "/login")
            think()
            if rng.random() < 0.2:  # a typo first
                c.request("POST", "/login", body=b"user=me@mail.test&password=wrong")
                think()
            c.request("POST", "/login", body=b"user=me@mail.test&password=correct-horse")
            c.cookie = "session=abc123"
            think()
        if rng.random() < 0.6:
            c.request("POST", "/cart", body=b"product=1&qty=1", referer="/products/1")
            think()
            if rng.random() < 0.7:
                c.request("POST", "/checkout", body=b"pay=card", referer="/cart")
                think()


def _run_threads(targets: Sequence[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.traffic", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=("scrape", "stuff", "human"))
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sources", required=True, help="comma-separated source addresses")
    p.add_argument(
        "--count", type=int, default=50, help="requests, attempts or sessions per source"
    )
    p.add_argument("--rate", type=float, default=10.0, help="scrape: requests per second")
    p.add_argument("--interval", type=float, default=5.0, help="stuff: seconds between attempts")
    p.add_argument("--random-order", action="store_true", help="scrape: shuffle the ids")
    p.add_argument("--think-scale", type=float, default=1.0, help="human: think-time scale")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=300.0, help="hard stop for the whole run")
    args = p.parse_args(argv)

    sources = [s for s in args.sources.split(",") if s]
    rng = random.Random(args.seed)

    def client_for(source: str, ua: str, headers: dict[str, str]) -> Client:
        return Client(args.scenario, args.server, args.port, source, ua, headers, args.timeout)

    def job(source: str, seed: int) -> Callable[[], None]:
        local = random.Random(seed)
        if args.scenario == "scrape":
            c = client_for(source, PYTHON_REQUESTS, {"Accept": "*/*"})
            return lambda: scrape(c, args.count, args.rate, not args.random_order, local)
        if args.scenario == "stuff":
            # A browser User-Agent over a Linux TCP stack: the lie the models look for.
            c = client_for(source, CHROME_WINDOWS, {"Accept": "*/*"})
            return lambda: stuff(c, args.count, args.interval, local)
        c = client_for(source, CHROME_LINUX, dict(BROWSER_HEADERS))
        return lambda: human(c, args.count, local, args.think_scale)

    jobs = [job(src, rng.randrange(2**31)) for src in sources]
    runner = threading.Thread(target=_run_threads, args=(jobs,), daemon=True)
    runner.start()
    runner.join(args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
