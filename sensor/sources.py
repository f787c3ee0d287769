"""Where events come from: the EventSource protocol, BccSensor (live kernel)
and ReplaySource (a pcap, unprivileged), which yield the same typed events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from sensor.events import Event


@runtime_checkable
class EventSource(Protocol):
    """A stream of typed sensor events. Iteration ends when the source is exhausted
    (a capture) or closed (live)."""

    def events(self) -> Iterator[Event]: ...

    def close(self) -> None: ...
