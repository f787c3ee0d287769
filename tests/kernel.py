"""Harness for kernel tests: the real sensor, loaded once, driven one packet at a time.

Not a test module. Each test module that needs the kernel defines its own
fixture around `loaded_sensor()` (tests/conftest.py belongs to the namespace
tests), so a module pays for one BCC compile and every test in it starts from
`KernelSensor.reset()`. Packets go through BPF_PROG_TEST_RUN: no interface, no
traffic, the program's return value is the XDP action.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, SupportsBytes

import pytest

from sensor import abi
from sensor.abi import Counter
from sensor.events import DecodeStats, Event, Flow, decode
from sensor.libbpf import XDP_ACTIONS, prog_test_run
from sensor.loader import Sensor, SensorSettings, remove_pins
from sensor.verdicts import NS_PER_S, VerdictMaps, monotonic_ns

# Verdicts written through KernelSensor.past are stamped this far back in kernel
# time, so any TTL shorter than this is already expired when it lands. Kernel time
# starts at boot: keep it well below any plausible uptime.
PAST_S = 10

# Kernel-written maps a test may leave entries in; reset() empties them.
STATE_MAPS = ("flows", "sources", "tarpit_syns")


def require_root() -> None:
    """Fail, never skip: a kernel test that did not run is not a passing test."""
    if os.geteuid() != 0:
        pytest.fail(
            f"kernel tests load eBPF programs and need root (euid {os.geteuid()}); "
            "they are never skipped: run pytest as root",
            pytrace=False,
        )


@dataclass(frozen=True)
class Outcome:
    """What one packet did: the XDP action, the counters it moved, the records it wrote."""

    action: str  # "XDP_PASS", "XDP_DROP", ...
    counter_deltas: dict[Counter, int]  # non-zero deltas only
    events: list[Event]


class KernelSensor:
    """A loaded Sensor with its ring buffer open, a verdict writer and a packet runner."""

    def __init__(self, sensor: Sensor) -> None:
        self.sensor = sensor
        self.verdicts = VerdictMaps(sensor.table)
        # A clock PAST_S behind the kernel's: what it writes is born expired.
        self.past = VerdictMaps(sensor.table, clock=_past_clock)
        self._records: list[bytes] = []
        sensor.table("events").open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: int, size: int) -> None:
        self._records.append(ctypes.string_at(data, size))

    def run(self, packet: bytes | SupportsBytes) -> Outcome:
        """Runs the XDP program once on a packet (bytes or a scapy packet)."""
        before = self.sensor.counters()
        result = prog_test_run(self.sensor.xdp_fn.fd, bytes(packet))
        after = self.sensor.counters()
        deltas = {c: after[c] - before[c] for c in after if after[c] != before[c]}
        return Outcome(XDP_ACTIONS.get(result.retval, str(result.retval)), deltas, self.drain())

    def run_all(self, packets: Iterable[bytes | SupportsBytes]) -> list[Outcome]:
        return [self.run(packet) for packet in packets]

    def drain(self) -> list[Event]:
        """Every record in the ring buffer, decoded; a record that does not decode fails."""
        self.sensor.bpf.ring_buffer_consume()
        records, self._records = self._records, []
        stats = DecodeStats()
        events = [decode(record, stats) for record in records]
        assert not stats.refused, f"the kernel wrote records user space refuses: {stats.refused}"
        return [event for event in events if event is not None]

    def reset(self) -> None:
        """No verdict, no flow, no source, no unread record: a clean slate between tests."""
        self.verdicts.clear()
        for name in STATE_MAPS:
            self.sensor.table(name).clear()
        self.drain()

    # ---- map state, for tests that look past the events ----

    def flow_state(self, flow: Flow) -> abi.FlowState | None:
        return self._lookup("flows", _flow_tuple(flow), abi.FlowState)

    def source_state(self, addr: abi.IPAddress) -> abi.SourceState | None:
        return self._lookup("sources", abi.addr16(addr), abi.SourceState)

    def flow_count(self) -> int:
        return sum(1 for _ in self.sensor.table("flows"))

    def _lookup(self, name: str, key: ctypes.Structure | ctypes.Union, mirror: Any) -> Any:
        table = self.sensor.table(name)
        try:
            value = table[table.Key.from_buffer_copy(key)]
        except KeyError:
            return None
        return mirror.from_buffer_copy(value)


def _past_clock() -> int:
    now = monotonic_ns()
    assert now > PAST_S * NS_PER_S, "booted less than PAST_S ago: cannot write the past"
    return now - PAST_S * NS_PER_S


def _flow_tuple(flow: Flow) -> abi.FlowTuple:
    key = abi.FlowTuple(sport=flow.sport, dport=flow.dport, ip_version=flow.ip_version)
    key.saddr = abi.addr16(flow.src)
    key.daddr = abi.addr16(flow.dst)
    return key


def kernel_test_settings(pin_dir: str, **overrides: Any) -> SensorSettings:
    """TLS on 443, HTTP on 80, verdict maps pinned in a directory of their own."""
    return SensorSettings(tls_ports=(443,), http_ports=(80,), pin_dir=pin_dir, **overrides)


@contextlib.contextmanager
def loaded_sensor(**overrides: Any) -> Iterator[KernelSensor]:
    """Compiles and loads the sensor (never attached), removes it and its pins after.

    overrides: more SensorSettings fields, e.g. extra_cflags."""
    require_root()
    pin_dir = f"/sys/fs/bpf/botwall-test-{uuid.uuid4().hex[:12]}"
    sensor: Sensor | None = None
    try:
        sensor = Sensor(kernel_test_settings(pin_dir, **overrides))
        yield KernelSensor(sensor)
    finally:
        if sensor is not None:
            sensor.close()
        remove_pins(pin_dir)
