"""Nanoseconds per packet through the XDP program, path by path, against a bare XDP_PASS.

Each path is one packet run REPEAT times by BPF_PROG_TEST_RUN, which reports the mean
per repetition; a path's figure is the median of RUNS such runs, and its ratio_to_bare
divides it by the median of the bare program (bench/bare_xdp.c) measured right before
it, in the same process, on the same CPU. `python -m bench.datapath` writes
bench/results/datapath.json. Needs root; sends no traffic.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import mmap
import os
import platform
import statistics
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from sensor.libbpf import XDP_ACTIONS, prog_test_run
from sensor.loader import Sensor, SensorSettings, remove_pins
from sensor.verdicts import VerdictMaps

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results/datapath.json"
BARE_SOURCE = REPO / "bench/bare_xdp.c"
REPEAT = 1_000_000
RUNS = 5
BUDGET_RATIO = 3.0  # the budget: at most 3x bare on these paths
BUDGET_PATHS = (
    "established_flow",
    "established_flow_ack",
    "blocked_address",
    "blocked_cidr_10k",
)

CLIENT, SERVER, CPORT = "203.0.113.77", "198.51.100.1", 40000
PREFIXES = 10_000  # loaded into block_cidr (and as many addresses into block_addr)
# 64 MiB instead of the default 4: room for 50-500 ms of records at these rates, so
# the drain thread (see drained()) can sleep between turns and still lose nothing.
RINGBUF_PAGES = 16384
DRAIN_INTERVAL_S = 0.001
VERDICT_TTL_S = 3600


def _frame(flags: str, payload: bytes = b"", dport: int = 443, **tcp: Any) -> bytes:
    fields = {"seq": 1000, "ack": 1, "window": 502, **tcp}
    packet: Packet = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=CLIENT, dst=SERVER, flags="DF")
        / TCP(sport=CPORT, dport=dport, flags=flags, **fields)
    )
    return bytes(packet / Raw(payload) if payload else packet)


def _client_hello(total: int = 517) -> bytes:
    """A ClientHello record of a browser's usual size; the kernel reads only its headers."""
    body = total - 9
    return (
        b"\x16\x03\x01"
        + (body + 4).to_bytes(2, "big")
        + b"\x01"
        + body.to_bytes(3, "big")
        + bytes(body)
    )


def _openssl_like_hello(total: int = 517) -> bytes:
    """A ClientHello record laid out as OpenSSL's: a 32-byte session id and 31
    cipher suites, then a padding extension up to `total`. botwall_hello walks
    the suites (bpf/common.h, hello keys)."""
    suites = b"".join((0xC000 + i).to_bytes(2, "big") for i in range(31))
    head = b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + len(suites).to_bytes(2, "big")
    head += suites + b"\x01\x00"
    pad = total - 9 - len(head) - 2 - 4  # record 5 + handshake 4, extensions' length, ext header
    body = head + (pad + 4).to_bytes(2, "big") + b"\x00\x15" + pad.to_bytes(2, "big") + bytes(pad)
    return b"\x16\x03\x01" + (len(body) + 4).to_bytes(2, "big") + b"\x01" + len(body).to_bytes(
        3, "big"
    ) + body


APP_DATA = b"\x17\x03\x03\x00\x5f" + bytes(95)  # 100 bytes of TLS application data
SYN = _frame(
    "S",
    ack=0,
    window=64240,
    options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)],
)
ESTABLISHED = _frame("PA", APP_DATA)
ESTABLISHED_ACK = _frame("A")
UDP_443 = bytes(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IP(src=CLIENT, dst=SERVER)
    / UDP(sport=CPORT, dport=443)
    / Raw(APP_DATA)
)


# ---- what each path needs in the maps before it runs ----

Prepare = Callable[[Sensor, VerdictMaps], None]


def _nothing(_sensor: Sensor, _verdicts: VerdictMaps) -> None:
    pass


def _open_flow(sensor: Sensor, _verdicts: VerdictMaps) -> None:
    prog_test_run(sensor.xdp_fn.fd, SYN)


def _many_prefixes(verdicts: VerdictMaps) -> None:
    """PREFIXES blocked CIDRs, as a blocklist mixes them: 70% IPv4 /24s, 10% IPv4 /32s,
    20% IPv6 /48s; none holds CLIENT."""
    for i in range(PREFIXES):
        if i % 10 < 7:
            net = f"10.{i // 256}.{i % 256}.0/24"
        elif i % 10 < 8:
            net = f"192.168.{i // 256 % 256}.{i % 256}/32"
        else:
            net = f"2001:db8:{i:x}::/48"
        verdicts.block(net, VERDICT_TTL_S, "bench")


def _many_addresses(verdicts: VerdictMaps) -> None:
    for i in range(PREFIXES):
        verdicts.block(f"100.64.{i // 256}.{i % 256}", VERDICT_TTL_S, "bench")


def _under_verdicts(sensor: Sensor, verdicts: VerdictMaps) -> None:
    _many_addresses(verdicts)
    _many_prefixes(verdicts)
    _open_flow(sensor, verdicts)


def _block_address(sensor: Sensor, verdicts: VerdictMaps) -> None:
    _many_addresses(verdicts)
    verdicts.block(CLIENT, VERDICT_TTL_S, "bench")


def _block_cidr(sensor: Sensor, verdicts: VerdictMaps) -> None:
    _many_prefixes(verdicts)
    verdicts.block(f"{CLIENT}/24", VERDICT_TTL_S, "bench")


def _hello_keys_blocked(sensor: Sensor, verdicts: VerdictMaps) -> None:
    # A JA4 verdict in force, on another stack: every new hello pays the key walk.
    verdicts.block_hello(1, VERDICT_TTL_S, "bench")


def _throttle(sensor: Sensor, verdicts: VerdictMaps) -> None:
    # One packet per second, no burst: every repetition after the first is dropped.
    verdicts.throttle(CLIENT, VERDICT_TTL_S, "bench", packets_per_s=1, packet_burst=1)


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    packet: bytes
    prepare: Prepare = _nothing
    writes_events: bool = False


CASES = (
    Case("non_tcp", "UDP to port 443", UDP_443),
    Case("tcp_unwatched_port", "TCP data segment to port 22", _frame("PA", APP_DATA, dport=22)),
    Case(
        "established_flow",
        "100-byte data segment of an open flow, no verdict loaded",
        ESTABLISHED,
        _open_flow,
    ),
    Case(
        "established_flow_ack",
        "pure ACK of an open flow (the client acknowledging the server's data), "
        "no verdict loaded: no clock read, one flow lookup",
        ESTABLISHED_ACK,
        _open_flow,
    ),
    Case(
        "established_flow_under_verdicts",
        f"the same with {PREFIXES} CIDRs and {PREFIXES} addresses blocked, none its own: "
        "each packet pays a clock read, a hash miss and a trie miss",
        ESTABLISHED,
        _under_verdicts,
    ),
    Case(
        "syn",
        "SYN with Linux's options: a SYN event each time; its flow exists after "
        "the first repetition, so flow creation is not in this figure",
        SYN,
        writes_events=True,
    ),
    Case(
        "client_hello",
        "517-byte ClientHello with FIN set, so each repetition opens a "
        "flow, captures the hello (a hello event) and ends the flow (a flow_end event)",
        _frame("FPA", _client_hello()),
        writes_events=True,
    ),
    Case(
        "client_hello_key_walk",
        "OpenSSL-shaped 517-byte ClientHello (31 suites) with FIN set, while a JA4 "
        "verdict holds another stack's key: client_hello plus the tail call to "
        "botwall_hello and its walk over the cipher suites; the hello passes",
        _frame("FPA", _openssl_like_hello()),
        _hello_keys_blocked,
        writes_events=True,
    ),
    Case(
        "new_flow_data_fin",
        "the same with application data instead of a hello: "
        "client_hello minus this is the cost of the capture",
        _frame("FPA", APP_DATA + bytes(417)),
        writes_events=True,
    ),
    Case(
        "blocked_address",
        f"data segment from an address in block_addr ({PREFIXES + 1} addresses there, no CIDR)",
        ESTABLISHED,
        _block_address,
    ),
    Case(
        "blocked_cidr_10k",
        f"data segment from an address in a blocked /24, "
        f"{PREFIXES + 1} prefixes in block_cidr (no address blocked)",
        ESTABLISHED,
        _block_cidr,
    ),
    Case("throttled", "data segment from a source over its packet rate", ESTABLISHED, _throttle),
)


# ---- the ring buffer, kept empty while a path writes records ----


@contextlib.contextmanager
def drained(sensor: Sensor) -> Iterator[None]:
    """Keeps the ring buffer from filling during a million-record run: every
    DRAIN_INTERVAL_S a thread moves the consumer position up to the producer's,
    discarding records unread (a Python callback per record could not keep up).

    What gets measured is the kernel's side: reserve, write, submit. A consumer
    spinning on the position would add a cache-line transfer to every record and a
    wake-up each time it caught up, more than doubling a SYN's cost on a 2-CPU
    machine; a consumer that polls, as the agent does, costs one wake-up per turn."""
    fd = sensor.table("events").map_fd
    page = mmap.PAGESIZE
    consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
    producer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
    stop = threading.Event()

    def discard() -> None:
        while not stop.wait(DRAIN_INTERVAL_S):
            struct.pack_into("<Q", consumer, 0, struct.unpack_from("<Q", producer, 0)[0])

    thread = threading.Thread(target=discard, name="ringbuf-discard", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        consumer.close()
        producer.close()


# ---- measuring ----


def _interleaved(prog_fd: int, bare_fd: int, packet: bytes) -> tuple[list[int], list[int], int]:
    """RUNS runs of the sensor, each right after a run of the bare program on the same
    packet, so a noisy moment of a shared machine hits both: ns per repetition of
    each run, sensor's and bare's, and the sensor's last action."""
    runs, bare_runs, retval = [], [], 0
    for _ in range(RUNS):
        bare_runs.append(prog_test_run(bare_fd, packet, repeat=REPEAT).duration_ns)
        result = prog_test_run(prog_fd, packet, repeat=REPEAT)
        runs.append(result.duration_ns)
        retval = result.retval
    return runs, bare_runs, retval


def _reset(sensor: Sensor, verdicts: VerdictMaps) -> None:
    verdicts.clear()
    for name in ("flows", "sources", "tarpit_syns"):
        sensor.table(name).clear()


def _measure(sensor: Sensor, bare_fd: int) -> dict[str, Any]:
    verdicts = VerdictMaps(sensor.table)
    cases: dict[str, Any] = {}
    bare_all: list[int] = []
    for case in CASES:
        _reset(sensor, verdicts)
        case.prepare(sensor, verdicts)
        before = sensor.counters()
        with drained(sensor) if case.writes_events else contextlib.nullcontext():
            runs, bare_runs, retval = _interleaved(sensor.xdp_fn.fd, bare_fd, case.packet)
        after = sensor.counters()
        ns, bare_ns = statistics.median(runs), statistics.median(bare_runs)
        bare_all += bare_runs
        events = {
            c.name.lower(): after[c] - before[c]
            for c in after
            if c.name.startswith("EVENT_") and after[c] != before[c]
        }
        cases[case.name] = {
            "what": case.what,
            "action": XDP_ACTIONS.get(retval, str(retval)),
            "ns": ns,
            "ratio_to_bare": round(ns / bare_ns, 2),
            "bare_ns": bare_ns,
            "runs_ns": runs,
            "bare_runs_ns": bare_runs,
            "events_in_all_runs": events,
        }
    return {"bare_ns": statistics.median(bare_all), "cases": cases}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mitigations() -> dict[str, str]:
    """The CPU mitigations that tax every call and return in the kernel, helpers included:
    they set how much a helper call costs here, so they belong next to the numbers."""
    found: dict[str, str] = {}
    root = Path("/sys/devices/system/cpu/vulnerabilities")
    for name in ("spectre_v2", "retbleed", "spec_rstack_overflow"):
        with contextlib.suppress(OSError):
            found[name] = (root / name).read_text().strip()
    return found


def run() -> dict[str, Any]:
    """Loads the sensor and the bare program, measures every case, unloads both."""
    from bcc import BPF
    from bcc import __version__ as bcc_version

    previous = os.sched_getaffinity(0)
    bench_cpu = min(previous)
    pin_dir = f"/sys/fs/bpf/botwall-bench-{uuid.uuid4().hex[:12]}"
    sensor = Sensor(
        SensorSettings(
            tls_ports=(443,), http_ports=(80,), pin_dir=pin_dir, ringbuf_pages=RINGBUF_PAGES
        )
    )
    bare = BPF(src_file=str(BARE_SOURCE).encode())
    os.sched_setaffinity(0, {bench_cpu})  # the test run executes on the calling CPU
    try:
        measured = _measure(sensor, bare.load_func(b"bare_xdp", BPF.XDP).fd)
    finally:
        os.sched_setaffinity(0, previous)
        bare.cleanup()
        sensor.close()
        remove_pins(pin_dir)

    cases = measured["cases"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mitigations": _mitigations(),
        "bcc": bcc_version,
        "repeat": REPEAT,
        "runs": RUNS,
        "statistic": "median over runs of the kernel's mean ns per repetition",
        "ring_buffer": f"{RINGBUF_PAGES * mmap.PAGESIZE >> 20} MiB, drained during "
        f"the cases that write events: every {DRAIN_INTERVAL_S * 1000:g} ms a thread "
        "advances the consumer position, discarding records unread; event_lost in "
        "events_in_all_runs counts records the kernel could not reserve all the same",
        "bare_ns": measured["bare_ns"],
        "cases": cases,
        "budget": {
            "max_ratio_to_bare": BUDGET_RATIO,
            "paths": {
                name: {
                    "ratio_to_bare": cases[name]["ratio_to_bare"],
                    "within": cases[name]["ratio_to_bare"] <= BUDGET_RATIO,
                }
                for name in BUDGET_PATHS
            },
        },
    }


def table(result: dict[str, Any]) -> str:
    """The cases as a plain-text table, for the terminal and for reports."""
    lines = [f"{'path':34} {'action':9} {'ns':>7} {'x bare':>7}  events"]
    for name, case in result["cases"].items():
        events = ", ".join(f"{k}={v}" for k, v in case["events_in_all_runs"].items())
        lines.append(
            f"{name:34} {case['action']:9} {case['ns']:7.0f} {case['ratio_to_bare']:7.2f}  {events}"
        )
    lines.append(f"bare XDP_PASS: {result['bare_ns']:.0f} ns")
    return "\n".join(lines)


def main() -> None:
    result = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
