"""Reassembles captured ClientHello segments into whole ClientHello handshake messages.

The kernel sends the first segment of each ClientHello and, when the hello
announced more bytes than that segment held, one continuation segment
(HELLO_MAX_SEGMENTS, HELLO_MAX_BYTES in bpf/common.h). Chrome's post-quantum
ClientHello is larger than one MTU, so two segments are common; a hello may
also be split over several TLS records, in one segment or across both. A
second ClientHello after a HelloRetryRequest is usually preceded by a
ChangeCipherSpec record (TLS 1.3 middlebox compatibility mode, RFC 8446 D.4),
which is skipped here.

A hello that cannot be completed (a segment missing or out of order, a capture
cut at the byte limit, records that are not handshake records) is counted in
`stats` and dropped; nothing here raises on input.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sensor import abi
from sensor.events import ClientHelloSegment, Event, Flow, FlowEnd

RECORD_HEADER_LEN = 5
RECORD_CHANGE_CIPHER_SPEC = 0x14
RECORD_HANDSHAKE = 0x16
HANDSHAKE_HEADER_LEN = 4
HANDSHAKE_CLIENT_HELLO = 1
# RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
MAX_RECORD_PAYLOAD = 1 << 14
# A ClientHello larger than this is given up on, whatever the capture limits.
MAX_HELLO_BYTES = 65536
# Hellos waiting for a continuation segment; the oldest is dropped past this.
DEFAULT_MAX_PENDING = 65536

_SEQ_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class CompleteHello:
    """One whole ClientHello handshake message (4-byte header included)."""

    flow: Flow
    hello_index: int
    ts_ns: int  # when its first segment was captured
    handshake: bytes


@dataclass
class _PendingHello:
    ts_ns: int
    next_seq: int  # TCP sequence number the next segment must start at
    segments: int
    payload: bytearray = field(default_factory=bytearray)


class _Incomplete(Exception):
    """The bytes so far may yet become a ClientHello."""


class _Invalid(Exception):
    """The bytes can never become a ClientHello; the message is the stats key."""


class HelloAssembler:
    """Feed ClientHelloSegment events; get CompleteHello as each hello completes.

    State is kept only for hellos still waiting for their continuation, at most
    max_pending of them; a completed or abandoned hello leaves nothing behind.
    """

    def __init__(
        self,
        max_segments: int = abi.HELLO_MAX_SEGMENTS,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.max_segments = max_segments
        self.max_pending = max_pending
        self.stats: Counter[str] = Counter()
        self._pending: dict[tuple[Flow, int], _PendingHello] = {}
        # Hellos completed lately. The kernel takes the next segment too when
        # the first record cannot hold the hello, because it cannot see where a
        # hello split over several records ends: when they all fit in one
        # segment, the next one is surplus, not a hello lost.
        self._completed: OrderedDict[tuple[Flow, int], None] = OrderedDict()

    def __len__(self) -> int:
        """Hellos waiting for a continuation segment."""
        return len(self._pending)

    def feed(self, segment: ClientHelloSegment) -> CompleteHello | None:
        """Take one segment; return the hello it completes, if any."""
        key = (segment.flow, segment.hello_index)
        if not 1 <= segment.segment_index <= self.max_segments:
            self.stats["bad_segment_index"] += 1
            return None
        if segment.segment_index == 1:
            if self._pending.pop(key, None) is not None:
                self.stats["incomplete_replaced"] += 1
            pending = _PendingHello(
                ts_ns=segment.ts_ns,
                next_seq=(segment.seq + segment.payload_len) % _SEQ_MOD,
                segments=1,
            )
        else:
            found = self._pending.pop(key, None)
            if found is None:
                if self._completed.pop(key, False) is None:
                    self.stats["surplus_after_complete"] += 1
                else:
                    self.stats["orphan_segment"] += 1
                return None
            if segment.segment_index != found.segments + 1:
                self.stats["incomplete_segment_skipped"] += 1
                return None
            if segment.seq != found.next_seq:
                # A retransmission, a reordering or a lost segment: the bytes
                # would not be contiguous, so the hello cannot be trusted.
                self.stats["incomplete_out_of_order"] += 1
                return None
            pending = found
            pending.segments += 1
            pending.next_seq = (segment.seq + segment.payload_len) % _SEQ_MOD
        pending.payload += segment.data

        try:
            handshake = extract_client_hello(bytes(pending.payload))
        except _Invalid as exc:
            self.stats[str(exc)] += 1
            return None
        except _Incomplete:
            if segment.truncated:
                # The kernel captured only part of this segment, so whatever
                # follows would leave a hole: the hello is lost.
                self.stats["incomplete_truncated"] += 1
            elif pending.segments >= self.max_segments:
                self.stats["incomplete_segment_limit"] += 1
            else:
                self._remember(key, pending)
            return None
        self.stats["completed"] += 1
        self._completed[key] = None
        if len(self._completed) > self.max_pending:
            self._completed.popitem(last=False)
        return CompleteHello(
            flow=segment.flow,
            hello_index=segment.hello_index,
            ts_ns=pending.ts_ns,
            handshake=handshake,
        )

    def forget(self, flow: Flow) -> None:
        """Drop any hello still waiting on this flow (call on its FlowEnd)."""
        for key in [k for k in self._pending if k[0] == flow]:
            del self._pending[key]
            self.stats["incomplete_flow_ended"] += 1

    def process(self, events: Iterable[Event]) -> Iterator[CompleteHello]:
        """Every complete hello from a stream of events, in order."""
        for event in events:
            if isinstance(event, ClientHelloSegment):
                done = self.feed(event)
                if done is not None:
                    yield done
            elif isinstance(event, FlowEnd) and self._pending:
                self.forget(event.flow)

    def _remember(self, key: tuple[Flow, int], pending: _PendingHello) -> None:
        if len(self._pending) >= self.max_pending:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self.stats["incomplete_evicted"] += 1
        self._pending[key] = pending


def extract_client_hello(stream: bytes) -> bytes:
    """The ClientHello handshake message at the start of a client's TCP byte stream.

    Raises _Incomplete when more bytes could complete it and _Invalid when no
    bytes could. A record cut short at the end of the stream still contributes
    what it has: record payloads are plain handshake bytes at this stage.
    """
    pos = 0
    if len(stream) >= 1 and stream[0] == RECORD_CHANGE_CIPHER_SPEC:
        if len(stream) < RECORD_HEADER_LEN:
            raise _Incomplete
        length = int.from_bytes(stream[3:5], "big")
        pos = RECORD_HEADER_LEN + length
    handshake = bytearray()
    while True:
        if len(stream) - pos < RECORD_HEADER_LEN:
            raise _Incomplete
        if stream[pos] != RECORD_HANDSHAKE:
            raise _Invalid("invalid_record_type")
        if stream[pos + 1] != 0x03:
            raise _Invalid("invalid_record_version")
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        if length == 0 or length > MAX_RECORD_PAYLOAD:
            raise _Invalid("invalid_record_length")
        start = pos + RECORD_HEADER_LEN
        handshake += stream[start : start + length]
        pos = start + length
        if len(handshake) >= HANDSHAKE_HEADER_LEN:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise _Invalid("not_client_hello")
            total = HANDSHAKE_HEADER_LEN + int.from_bytes(handshake[1:4], "big")
            if total > MAX_HELLO_BYTES:
                raise _Invalid("hello_too_large")
            if len(handshake) >= total:
                return bytes(handshake[:total])
