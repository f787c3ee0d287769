"""The lab's ground truth: one JSON line per request a lab client made.

Every traffic generator (Python clients, Chromium tabs, hydra, wrk) writes
these records, and the report reads nothing else from the clients. A record
says who the client really was (`label`, `scenario`, `session`), what it asked
and what it got, as the client saw it: a status, or the error that stood in
for one (a timeout when botwall drops, a slow connect when it tarpits).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal, TextIO, get_args

Label = Literal["human", "good_bot", "ai_agent", "bad_bot"]
LABELS: tuple[str, ...] = get_args(Label)

# A request that took this long outside the server was delayed (botwall's
# tarpit drops SYNs, so the connect waits for the kernel's 1 s SYN
# retransmission; a throttle's drops wait for TCP's retransmissions).
DELAYED_S = 0.9
# The lab's nginx says how long it took itself (its $request_time: from the
# request's first byte to the answer, the app included) in this header, so
# that a slow server (an emulated VM) is not mistaken for a delay botwall made.
SERVER_TIME_HEADER = "X-Lab-Server-Time"


@dataclass(frozen=True)
class RequestRecord:
    scenario: str  # e.g. "human_browser", "stuffing_distributed"
    label: str  # one of LABELS: what the client really is
    session: str  # unique per client session: the unit the report counts
    source: str  # the source address the request left from
    method: str
    path: str
    status: int | None  # the HTTP status, None when there was no answer
    error: str | None  # why there was no answer (timeout, reset, refused, ...)
    ts: float  # wall-clock start of the request (time.time())
    elapsed: float  # seconds until the answer or the error
    stack: str = ""  # the client stack: python, chromium, hydra, wrk, go, ...
    server_s: float | None = None  # SERVER_TIME_HEADER, where the client read it

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r} is not one of {LABELS}")

    @property
    def mitigated(self) -> bool:
        """Met a drop, a delay or a block, as the client saw it: no answer, or
        an answer that took DELAYED_S longer than the server spent on it."""
        return self.status is None or self.elapsed - (self.server_s or 0.0) >= DELAYED_S

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


_emit_lock = threading.Lock()


def emit(record: RequestRecord, out: TextIO | None = None) -> None:
    """Write one record as a JSON line; safe from many threads."""
    stream = out if out is not None else sys.stdout
    with _emit_lock:
        stream.write(record.to_json() + "\n")
        stream.flush()


def parse_records(lines: Iterable[str]) -> Iterator[RequestRecord]:
    """Records from JSON lines; blank lines are skipped, anything else that is
    not a record raises ValueError naming the line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield RequestRecord(**json.loads(line))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"line {number} is not a request record: {exc}") from None
