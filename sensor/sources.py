"""Where events come from: the EventSource protocol, BccSensor (live kernel)
and ReplaySource (a pcap, unprivileged), which yield the same typed events."""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sensor import abi
from sensor.abi import FlowEndReason
from sensor.events import DecodeStats, Event, FlowEnd, decode, flow_end_from_state, flow_from_abi
from sensor.verdicts import NS_PER_S, monotonic_ns

if TYPE_CHECKING:
    from sensor.loader import Sensor


@runtime_checkable
class EventSource(Protocol):
    """A stream of typed sensor events. Iteration ends when the source is exhausted
    (a capture) or closed (live)."""

    def events(self) -> Iterator[Event]: ...

    def close(self) -> None: ...


class BccSensor:
    """Live events from the kernel's ring buffer, plus the idle-flow sweep.

    The kernel reports a flow's end on FIN and RST; a flow that just stops is
    found here, by sweeping the flow table for entries idle longer than
    idle_timeout_s, and reported as FlowEnd(IDLE)."""

    def __init__(self, sensor: Sensor, idle_timeout_s: float = 30.0, poll_ms: int = 100) -> None:
        self._sensor = sensor
        self._pending: deque[Event] = deque()
        self._closed = False
        self._idle_ns = int(idle_timeout_s * NS_PER_S)
        self._poll_ms = poll_ms
        self._next_sweep_ns = 0
        self.stats = DecodeStats()
        sensor.table("events").open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        event = decode(ctypes.string_at(data, size), self.stats)
        if event is not None:
            self._pending.append(event)
        return 0

    def poll(self, timeout_ms: int | None = None) -> list[Event]:
        """Waits up to timeout_ms for records; returns what arrived, in order."""
        self._sensor.bpf.ring_buffer_poll(self._poll_ms if timeout_ms is None else timeout_ms)
        now = monotonic_ns()
        if now >= self._next_sweep_ns:
            self._pending.extend(self.sweep_idle(now))
            self._next_sweep_ns = now + min(self._idle_ns, NS_PER_S)
        out = list(self._pending)
        self._pending.clear()
        return out

    def events(self) -> Iterator[Event]:
        while not self._closed:
            yield from self.poll()

    def sweep_idle(self, now_ns: int) -> list[FlowEnd]:
        """Ends and removes flows with no packet for idle_timeout_s."""
        flows = self._sensor.table("flows")
        ended: list[FlowEnd] = []
        for key, state in list(flows.items()):
            if now_ns - state.last_ns <= self._idle_ns:
                continue
            try:
                del flows[key]
            except KeyError:
                continue  # the kernel ended it meanwhile (FIN/RST)
            st = abi.FlowState.from_buffer_copy(state)
            flow = flow_from_abi(abi.FlowTuple.from_buffer_copy(key))
            ended.append(flow_end_from_state(now_ns, flow, FlowEndReason.IDLE, st))
        return ended

    def close(self) -> None:
        self._closed = True


def __getattr__(name: str) -> Any:
    # ReplaySource lives in sensor/replay.py (scapy); imported on first use.
    if name == "ReplaySource":
        from sensor.replay import ReplaySource

        return ReplaySource
    raise AttributeError(name)
