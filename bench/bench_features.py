"""FeatureStore on one core: microseconds per observation of a realistic mixed
stream, microseconds per feature vector, and bytes per tracked address at
100,000 addresses.

The stream is ten minutes of a busy API: people in browser sessions (a
connection, a ClientHello, page loads of a few API calls within a few hundred
milliseconds, think times of seconds to minutes, the flow summary at the end,
logins with the odd failure) and the bots botwall is for: a credential stuffer
at one login a minute from 500 addresses, a sequential scraper, an inventory
hoarder. Everything is seeded. The memory population is the worst case: every
address alone in its /24, with a connection, a ClientHello, requests on two
routes, a flow and an application event each. `python -m bench.bench_features`
writes bench/results/features.json.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import platform
import random
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.features import FEATURE_NAMES, FeatureStore
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results/features.json"
T0 = 1_700_000_000.0
TARGET_EVENTS_PER_S = 50_000  # the whole engine's budget; features get a share of it
TARGET_US_PER_KEY = 10.0
MEMORY_ADDRESSES = 100_000
MEMORY_BUDGET_BYTES = 4096
REPEATS = 3

BROWSERS = [  # (JA4, TCP signature, User-Agent): five common stacks
    ("t13d1517h2_8daaf6152771_cb7bf5808d99", "4:128:1460:65535:mss,nop,ws,nop,nop,sok:8",
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/124.0.0.0 Safari/537.36"),
    ("t13d1517h2_8daaf6152771_cb7bf5808d99", "4:64:1460:65535:mss,nop,ws,nop,nop,ts,sok:6",
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0.0.0 Safari/537.36"),
    ("t13d1617h2_86a278354501_3cbfd9057e0d", "4:128:1460:65535:mss,nop,ws,nop,nop,sok:8",
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("t13d2014h2_a09f3c656075_14788d8d241b", "4:64:1460:65535:mss,nop,ws,nop,nop,ts,sok:6",
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Version/17.4 Safari/605.1.15"),
    ("t13d1517h2_8daaf6152771_cb7bf5808d99", "4:64:1460:65535:mss,sok,ts,nop,ws:7",
     "Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/124.0.0.0 Mobile Safari/537.36"),
]  # fmt: skip
PYTHON = ("t13d3112h1_e8f1e7e78f70_b26ce05bbdd6", "4:64:1460:64240:mss,sok,ts,nop,ws:7",
          "python-requests/2.31.0")  # fmt: skip
PAGES = {  # a page and the API calls its load makes
    "/": ["/", "/search?q=", "/products/{n}", "/products/{n}", "/cart"],
    "/search": ["/search", "/products/{n}", "/products/{n}", "/products/{n}"],
    "/product": ["/products/{n}", "/products/{n}/reviews", "/inventory/{n}", "/cart"],
    "/cart": ["/cart", "/products/{n}", "/checkout"],
    "/login": ["/login", "/account"],
}


@dataclass
class AppEvent:
    ts: float
    client: IPAddress
    kind: str


Event = Connection | Request | FlowShape | AppEvent


def _request(ts: float, client: IPAddress, path: str, stack: tuple[str, str, str], *,
             fp: ClientFingerprint, status: int = 200, method: str = "GET",
             cookie: bool = True) -> Request:  # fmt: skip
    route = route_template(path)
    return Request(
        ts=ts,
        client=client,
        client_port=40000,
        method=method,
        path=path,
        route=route,
        endpoint_class=endpoint_class(route),
        status=status,
        user_agent=stack[2],
        http_fingerprint=f"h{abs(hash((stack[2], cookie))) % 4096:04x}",
        fingerprint=fp,
        has_cookie=cookie,
        has_referer=cookie,
    )


def _session(rng: random.Random, client: IPAddress, start: float, end: float,
             stack: tuple[str, str, str]) -> list[Event]:  # fmt: skip
    """A person: one keep-alive connection, page loads, think times, a flow at the end."""
    ja4, tcp, _ = stack
    syn_fp = ClientFingerprint(tcp_signature=tcp, os_family="x")
    fp = ClientFingerprint(ja4=ja4, tcp_signature=tcp, os_family="x")
    out: list[Event] = [
        Connection(start, client, 40000, 443, ConnectionStage.SYN, syn_fp),
        Connection(start + 0.03, client, 40000, 443, ConnectionStage.HELLO, fp),
    ]
    t = start + 0.06
    while t < end:
        page = rng.choice(list(PAGES))
        for call in PAGES[page]:
            path = call.replace("{n}", str(rng.randrange(1, 5000))).split("?")[0]
            method = "POST" if page == "/login" and call == "/login" else "GET"
            status = 401 if method == "POST" and rng.random() < 0.1 else 200
            out.append(_request(t, client, path, stack, fp=fp, status=status, method=method))
            if method == "POST":
                kind = "login_failure" if status == 401 else "login_success"
                out.append(AppEvent(t + 0.01, client, kind))
            t += rng.uniform(0.01, 0.12)
        t += min(rng.lognormvariate(2.3, 1.0), 300.0)  # reading: median 10 s
    out.append(FlowShape(t, client, 40000, 443, t - start, 2000 + 900 * len(out),
                         30000 * len(out), 2 * len(out), 4.0, 2.5, 0, fp))  # fmt: skip
    return out


def traffic(seed: int = 1, people: int = 3000, duration_s: float = 600.0) -> list[Event]:
    """Ten minutes of a busy API, in time order."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i in range(people):
        # people cluster in consumer ISPs' prefixes: about four to a /24
        client = ipaddress.ip_address(f"81.{i // 1024}.{i // 4 % 256}.{10 + i % 4 * 50}")
        start = rng.uniform(0.0, duration_s)
        length = rng.uniform(30.0, 300.0)
        stack = BROWSERS[rng.randrange(len(BROWSERS))]
        events.extend(_session(rng, client, T0 + start, T0 + min(start + length, duration_s),
                               stack))  # fmt: skip
    # credential stuffing: 500 addresses, one login a minute each, all failing
    fp = ClientFingerprint(ja4=PYTHON[0], tcp_signature=PYTHON[1], os_family="linux")
    for i in range(500):
        client = ipaddress.ip_address(f"{100 + i % 50}.{i // 50}.{i % 256}.7")
        t = T0 + rng.uniform(0.0, 60.0)
        while t < T0 + duration_s:
            events.append(_request(t, client, "/login", PYTHON, fp=fp, status=401,
                                   method="POST", cookie=False))  # fmt: skip
            events.append(AppEvent(t + 0.01, client, "login_failure"))
            t += 60.0
    # a scraper walking the catalog at two pages a second
    client = ipaddress.ip_address("198.51.100.99")
    for n in range(int(2 * duration_s)):
        events.append(_request(T0 + n / 2, client, f"/products/{n}", PYTHON, fp=fp,
                               cookie=False))  # fmt: skip
    # an inventory hoarder: carts, never checks out
    client = ipaddress.ip_address("203.0.113.77")
    for n in range(int(duration_s / 5)):
        events.append(_request(T0 + 5 * n, client, "/cart", BROWSERS[0], fp=fp, method="POST"))
        events.append(AppEvent(T0 + 5 * n + 0.01, client, "add_to_cart"))
    events.sort(key=lambda e: e.ts)
    return events


def _feed(store: FeatureStore, events: Sequence[Event]) -> None:
    observe, app = store.observe, store.observe_app_event
    for e in events:
        if type(e) is AppEvent:
            app(e.client, 0, e.kind, e.ts)
        else:
            observe(e)  # type: ignore[arg-type]


def _best_seconds(work: Callable[[], object], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def _per_kind(events: Sequence[Event]) -> dict[str, float]:
    """Microseconds per observation of each kind, each kind fed alone into a
    store warmed with the whole stream's first half."""
    half = len(events) // 2
    result = {}
    for name, kind in (("request", Request), ("connection", Connection),
                       ("flow", FlowShape), ("app_event", AppEvent)):  # fmt: skip
        selected = [e for e in events[half:] if type(e) is kind]
        if not selected:
            continue
        timings: list[float] = []
        for _ in range(REPEATS):
            store = FeatureStore()
            _feed(store, events[:half])
            gc.collect()
            start = time.perf_counter()
            _feed(store, selected)
            timings.append(time.perf_counter() - start)
        result[name] = round(min(timings) / len(selected) * 1e6, 2)
    return result


def memory_population(n: int, seed: int = 1) -> list[Event]:
    """Every address alone in its /24: its prefix and JA4+prefix keys are its own."""
    rng = random.Random(seed)
    ja4s = [f"t13d1516h2_8daaf6152771_{i:012x}" for i in range(20)]
    tcp = BROWSERS[0][1]
    events: list[Event] = []
    for i in range(n):
        client = ipaddress.ip_address(f"{20 + i // 65536}.{i // 256 % 256}.{i % 256}.1")
        t = T0 + i * 0.001
        stack = (ja4s[i % 20], tcp, BROWSERS[i % 5][2])
        fp = ClientFingerprint(ja4=stack[0], tcp_signature=tcp, os_family="windows")
        events.append(Connection(t, client, 40000, 443, ConnectionStage.SYN,
                                 ClientFingerprint(tcp_signature=tcp)))  # fmt: skip
        events.append(Connection(t, client, 40000, 443, ConnectionStage.HELLO, fp))
        for k in range(3):
            path = "/login" if k == 0 else f"/products/{rng.randrange(10**6)}"
            events.append(_request(t + k, client, path, stack, fp=fp))
        events.append(FlowShape(t + 3, client, 40000, 443, 3.0, 700, 5000, 6, 0.5, 0.5, 0, fp))
        events.append(AppEvent(t + 3, client, "login_failure"))
    return events


def measure_memory(n: int = MEMORY_ADDRESSES) -> dict[str, Any]:
    """Bytes per address and per key, by tracemalloc (slow: it hooks every allocation)."""
    events = memory_population(n)
    store = FeatureStore(max_keys=4 * n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _feed(store, events)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    addresses = sum(1 for _ in store.keys("addr"))
    return {
        "addresses": addresses,
        "keys": len(store),
        "bytes_per_address": round(used / addresses),
        "bytes_per_key": round(used / len(store)),
        "meets_budget": used / addresses <= MEMORY_BUDGET_BYTES,
    }


def _pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run(memory_addresses: int = MEMORY_ADDRESSES) -> dict[str, Any]:
    previous = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpu = _pin_to_one_core()
    try:
        result = _measure(memory_addresses)
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    result["cpu"] = cpu
    return result


def _measure(memory_addresses: int) -> dict[str, Any]:
    events = traffic()
    store = FeatureStore()
    _feed(store, events)
    keys_per_request = len(store.keys_for(next(e for e in events if type(e) is Request)))
    seconds = _best_seconds(lambda: _feed(FeatureStore(), events))
    per_kind = _per_kind(events)

    keys = list(store.keys())
    now = events[-1].ts
    vector_s = _best_seconds(lambda: store.matrix(keys, now))
    clients = sum(1 for _ in store.keys("addr"))
    result: dict[str, Any] = {
        "observations": len(events),
        "clients": clients,
        "keys": len(keys),
        "us_per_observation": round(seconds / len(events) * 1e6, 2),
        "observations_per_s": round(len(events) / seconds),
        "us_per_kind": per_kind,
        "keys_per_request": keys_per_request,
        "us_per_request_key": round(per_kind["request"] / keys_per_request, 2),
        "meets_us_per_key": per_kind["request"] / keys_per_request < TARGET_US_PER_KEY,
        "us_per_vector": round(vector_s / len(keys) * 1e6, 1),
        "features": len(FEATURE_NAMES),
        "target_engine_events_per_s": TARGET_EVENTS_PER_S,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if memory_addresses:
        result["memory"] = measure_memory(memory_addresses)
    return result


def main() -> None:
    result = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
