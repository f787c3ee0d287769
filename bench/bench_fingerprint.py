"""Fingerprinting throughput on one core: ClientHellos per second through parse + JA4 + JA3,
measured against a plain bytes copy of the same input, and SYN signatures per second.

The hellos and SYNs are the real ones in shared/fixtures/tls, replayed through
ReplaySource and HelloAssembler as live traffic would be. `python -m
bench.bench_fingerprint` writes bench/results/fingerprint.json.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sensor.events import SynEvent
from sensor.fingerprint.ja3 import ja3
from sensor.fingerprint.ja4 import ja4, ja4_r
from sensor.fingerprint.reassembly import HelloAssembler
from sensor.fingerprint.tls import parse_client_hello
from sensor.replay import ReplaySource

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared/fixtures/tls"
RESULTS = REPO / "bench/results/fingerprint.json"
TARGET_HELLOS_PER_S = 30_000
MIN_SECONDS = 1.0  # each measurement repeats its loop until it has run this long
REPEATS = 5  # and keeps the best of this many, the least disturbed by the machine


def _fixture_traffic() -> tuple[list[bytes], list[SynEvent]]:
    if not FIXTURES.is_dir():
        raise SystemExit(f"fixtures missing: {FIXTURES}")
    hellos: list[bytes] = []
    syns: list[SynEvent] = []
    for capture in sorted(FIXTURES.glob("*.pcap*")):
        events = list(ReplaySource(capture).events())
        syns.extend(e for e in events if isinstance(e, SynEvent))
        hellos.extend(h.handshake for h in HelloAssembler().process(events))
    return hellos, syns


def _best_ns_per_item(work: Callable[[], None], items: int) -> float:
    """Nanoseconds per item of the fastest of REPEATS timed runs of work()."""
    loops = 1
    while True:  # size the loop so one run lasts about MIN_SECONDS / REPEATS
        start = time.perf_counter_ns()
        for _ in range(loops):
            work()
        elapsed = time.perf_counter_ns() - start
        if elapsed * REPEATS >= MIN_SECONDS * 1e9:
            break
        loops *= 2
    best = elapsed
    for _ in range(REPEATS - 1):
        start = time.perf_counter_ns()
        for _ in range(loops):
            work()
        best = min(best, time.perf_counter_ns() - start)
    return best / (loops * items)


def _pin_to_one_core() -> int | None:
    """Run on one CPU, as the sensor's fingerprinting loop does; returns it."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def _syn_signature_function() -> Callable[[SynEvent], Any] | None:
    try:
        module = importlib.import_module("sensor.fingerprint.tcp")
    except ImportError:
        return None
    function = getattr(module, "syn_signature", None)
    return function if callable(function) else None


def run() -> dict[str, Any]:
    hellos, syns = _fixture_traffic()
    previous_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpu = _pin_to_one_core()
    try:
        result = _measure(hellos, syns)
    finally:
        if previous_affinity is not None:
            os.sched_setaffinity(0, previous_affinity)
    result["cpu"] = cpu
    return result


def _measure(hellos: Sequence[bytes], syns: Sequence[SynEvent]) -> dict[str, Any]:
    views = [memoryview(h) for h in hellos]

    def copy_only() -> None:
        for view in views:
            bytes(view)

    def parse_only() -> None:
        for raw in hellos:
            parse_client_hello(raw)

    def full() -> None:
        for raw in hellos:
            hello = parse_client_hello(raw)
            ja4(hello)
            ja3(hello)

    parsed = [parse_client_hello(h) for h in hellos]

    def ja4_only() -> None:
        for hello in parsed:
            ja4(hello)

    def ja4_r_only() -> None:
        for hello in parsed:
            ja4_r(hello)

    def ja3_only() -> None:
        for hello in parsed:
            ja3(hello)

    copy_ns = _best_ns_per_item(copy_only, len(hellos))
    full_ns = _best_ns_per_item(full, len(hellos))
    result: dict[str, Any] = {
        "hellos": len(hellos),
        "mean_hello_bytes": round(sum(map(len, hellos)) / len(hellos), 1),
        "hellos_per_s": round(1e9 / full_ns),
        "ns_per_hello": round(full_ns),
        "ns_per_stage": {
            "parse": round(_best_ns_per_item(parse_only, len(hellos))),
            "ja4": round(_best_ns_per_item(ja4_only, len(parsed))),
            "ja4_r": round(_best_ns_per_item(ja4_r_only, len(parsed))),
            "ja3": round(_best_ns_per_item(ja3_only, len(parsed))),
        },
        "copy_ns_per_hello": round(copy_ns, 1),
        "ratio_to_copy": round(full_ns / copy_ns, 1),
        "target_hellos_per_s": TARGET_HELLOS_PER_S,
        "meets_target": 1e9 / full_ns >= TARGET_HELLOS_PER_S,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }

    syn_signature = _syn_signature_function()
    if syn_signature is None:
        result["syn_signatures_per_s"] = None
        result["syn_note"] = "sensor.fingerprint.tcp.syn_signature not present: not measured"
    elif not syns:
        result["syn_signatures_per_s"] = None
        result["syn_note"] = "no SYN in the fixture captures"
    else:

        def signatures() -> None:
            for syn in syns:
                syn_signature(syn)

        result["syns"] = len(syns)
        result["syn_signatures_per_s"] = round(1e9 / _best_ns_per_item(signatures, len(syns)))
    return result


def main() -> None:
    result = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
