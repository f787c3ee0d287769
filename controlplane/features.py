"""Per-client and per-cluster behaviour over sliding windows, queried as feature vectors.

A FeatureStore keeps one small state per key: a source address, or a cluster
key that many addresses share (JA4, TCP signature, HTTP fingerprint, network
prefix, and the JA4+prefix and JA4+TCP combinations), so that a campaign
spread thin over 500 addresses is still one busy thing to look at.
Observations update every key they name; the models read one vector per key,
in FEATURE_NAMES order, with FEATURE_DESCRIPTIONS for the reasons they give.

How the windows are approximated (exact sliding windows would keep every
event of every key):

- Every windowed quantity is an exponentially decayed sum whose mean lifetime
  is the window W (a half-life of W ln 2). For arrivals at a steady rate r the
  sum tends to r * W, as an exact count over the last W seconds does, so "per
  second over W" is sum / W; a share is the ratio of two sums of the same
  lifetime. After a step change the estimate follows with time constant W
  instead of jumping after W seconds. tests/test_features.py checks the
  steady state against exact window counts (within 15 %).
- Decay is lazy and costs nothing per key on the hot path: a sum is stored
  scaled by exp((t - E) / W), where E is a store-wide epoch, so an event at t
  adds the same precomputed weight to every key it names, and a read at `now`
  multiplies by exp(-(now - E) / W). E moves forward every RESCALE_AFTER_S so
  that the scaled numbers stay far from overflow; a key still in an older
  epoch is rebased the next time it is written.
- Windows: request and connection rates over 10 s, 60 s and 10 min; every
  share, the timing statistics, flow shapes and application events over
  10 min (MIX_WINDOW_S); the host's fingerprint baseline over an hour.
- Timing: the gaps between an address's consecutive requests, clamped to
  [0, MIX_WINDOW_S] (a return after two days is not inter-request timing). A
  cluster pools its members' gaps: 500 addresses each polling every 60 s are
  as regular as one of them, where their interleaved stream would look random.
  The minimum gap is exact over the current and previous 10-minute epochs.
- Enumeration: over the key's last ENUM_PAIRS consecutive requests that both
  carry a numeric identifier (observations.path_identifier), the exact share
  where the identifier moved by one. A cluster's requests are interleaved, so
  a walk shared round-robin among many addresses still steps by one.
- Distinct addresses under a cluster key: exact, from the member sample, while
  at most `max_members` addresses share the key; beyond, a HyperLogLog of
  1,024 registers (3.25 % standard error). Both count the addresses seen in
  the current and the previous 10-minute epoch, so over the last 10 to 20 min.
  The sample keeps the `max_members` that joined last, with their last-seen
  times to the second.
- Synchronisation (addr_sync): the Fano factor (variance / mean) of the number
  of the key's addresses becoming active in each 1-second slot over 10 min,
  minus 1. Independent clients arrive as a Poisson process, whose Fano factor
  is 1, so they score about 0; a scheduler firing n addresses in the same
  second scores about n - 1. Counting address activations rather than
  requests keeps a browser's burst of page-load calls from looking like a
  coordinated one.
- Rarity: -ln of the fingerprint's share of this host's decayed sightings of
  its kind (each request counts its JA4, TCP signature and HTTP fingerprint;
  each connection its TCP signature at the SYN and its JA4 at the hello).

Memory is bounded: at most `max_keys` stored keys (least recently seen go
first), capped member samples, route tables, fingerprint sets and baseline
tables. A prefix that has held one address only is not stored at all: its
address's state stands for it until a second address arrives (see
FeatureStore).
"""

from __future__ import annotations

import ipaddress
import math
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Final

import numpy as np

from controlplane.decisions import ClusterKey
from controlplane.observations import (
    SENSITIVE_CLASSES,
    Connection,
    ConnectionStage,
    EndpointClass,
    FlowShape,
    IPAddress,
    Observation,
    Request,
    path_identifier,
)

# ---- the feature vector ----

# (name, words for risk reasons, evidence kind: decisions.Risk.evidence)
_FEATURES: Final[tuple[tuple[str, str, str], ...]] = (
    ("req_rate_10s", "requests per second over 10 s", "http"),
    ("req_rate_60s", "requests per second over 60 s", "http"),
    ("req_rate_600s", "requests per second over 10 min", "http"),
    ("conn_rate_10s", "new connections per second over 10 s", "syn"),
    ("conn_rate_60s", "new connections per second over 60 s", "syn"),
    ("conn_rate_600s", "new connections per second over 10 min", "syn"),
    ("requests_per_conn", "requests per connection", "http"),
    ("gap_mean_s", "mean seconds between requests", "http"),
    ("gap_cv", "variation of the time between requests", "http"),
    ("gap_min_s", "shortest seconds between requests", "http"),
    ("gap_entropy", "spread of the time between requests (bits)", "http"),
    ("route_entropy", "spread over endpoints (bits)", "http"),
    ("distinct_routes", "distinct endpoints over 10 min", "http"),
    ("sensitive_share", "share of requests to sensitive endpoints", "http"),
    ("login_share", "share of requests to login", "http"),
    ("otp_share", "share of requests for one-time codes", "http"),
    ("cart_share", "share of requests to the cart", "http"),
    ("checkout_share", "share of requests to checkout", "http"),
    ("search_share", "share of requests to search", "http"),
    ("catalog_share", "share of requests to the catalog", "http"),
    ("cookie_share", "share of requests with a cookie", "http"),
    ("referer_share", "share of requests with a Referer", "http"),
    ("sequential_id_share", "share of requests stepping to the next identifier", "http"),
    ("status_401_share", "share of 401 Unauthorized answers", "http"),
    ("status_403_share", "share of 403 Forbidden answers", "http"),
    ("status_404_share", "share of 404 Not Found answers", "http"),
    ("status_429_share", "share of 429 Too Many Requests answers", "http"),
    ("status_4xx_share", "share of client-error (4xx) answers", "http"),
    ("login_error_share", "share of login requests answered with an error", "http"),
    ("flow_bytes_up_mean", "bytes sent per connection", "flow"),
    ("flow_bytes_up_cv", "variation of bytes sent per connection", "flow"),
    ("flow_bytes_down_mean", "bytes received per connection", "flow"),
    ("flow_bytes_down_cv", "variation of bytes received per connection", "flow"),
    ("flow_duration_mean_s", "seconds per connection", "flow"),
    ("flow_segments_mean", "data segments per connection", "flow"),
    ("flow_gap_cv", "variation of packet gaps inside connections", "flow"),
    ("login_failure_share", "share of failed logins", "app"),
    ("login_failures_600s", "failed logins over 10 min", "app"),
    ("otp_sends_600s", "one-time codes sent over 10 min", "app"),
    ("cart_adds_600s", "cart additions over 10 min", "app"),
    ("cart_per_checkout", "cart additions per checkout", "app"),
    ("ja4_rarity", "rarity of the TLS fingerprint on this host", "tls"),
    ("tcp_rarity", "rarity of the TCP stack on this host", "syn"),
    ("http_rarity", "rarity of the HTTP header fingerprint on this host", "http"),
    ("distinct_addrs", "addresses sharing this key", "syn"),
    ("new_addr_share", "share of its addresses first seen in the last 10 min", "syn"),
    ("addr_sync", "addresses acting in the same second", "syn"),
    ("distinct_ja4", "distinct TLS fingerprints seen", "tls"),
    ("distinct_tcp", "distinct TCP stacks seen", "syn"),
    ("distinct_user_agents", "distinct User-Agents seen", "http"),
    ("age_s", "seconds since first seen", "syn"),
)

FEATURE_NAMES: Final[tuple[str, ...]] = tuple(name for name, _, _ in _FEATURES)
FEATURE_DESCRIPTIONS: Final[dict[str, str]] = {name: words for name, words, _ in _FEATURES}
# What each feature rests on, for decisions.Risk.evidence.
FEATURE_EVIDENCE: Final[dict[str, str]] = {name: kind for name, _, kind in _FEATURES}

MIX_WINDOW_S: Final = 600.0
# What a key with no observation of a kind reads: no two requests inside the
# window means a gap of at least the window; everything else reads 0.
FEATURE_DEFAULTS: Final[dict[str, float]] = {
    name: (MIX_WINDOW_S if name in ("gap_mean_s", "gap_min_s") else 0.0) for name in FEATURE_NAMES
}
# What a campaign's members are told apart by (FeatureStore.member_features).
MEMBER_FEATURES: Final = (
    "sensitive_share", "login_share", "login_error_share", "login_failure_share"
)  # fmt: skip

# ---- keys ----

KIND_ADDR: Final = "addr"
KIND_PREFIX: Final = "prefix"
KIND_JA4: Final = "ja4"
KIND_TCP: Final = "tcp"
KIND_HTTP: Final = "http"
KIND_JA4_PREFIX: Final = "ja4+prefix"
KIND_JA4_TCP: Final = "ja4+tcp"
KEY_KINDS: Final = (
    KIND_ADDR,
    KIND_PREFIX,
    KIND_JA4,
    KIND_TCP,
    KIND_HTTP,
    KIND_JA4_PREFIX,
    KIND_JA4_TCP,
)

APP_LOGIN_SUCCESS: Final = "login_success"
APP_LOGIN_FAILURE: Final = "login_failure"
APP_OTP_SENT: Final = "otp_sent"
APP_CHECKOUT: Final = "checkout"
APP_ADD_TO_CART: Final = "add_to_cart"

# ---- tuning ----

BASELINE_WINDOW_S: Final = 3600.0  # the host's fingerprint baseline
RESCALE_AFTER_S: Final = 600.0  # keeps exp((t - E) / 10 s) below e^60
ENUM_PAIRS: Final = 32
MAX_DISTINCT_FINGERPRINTS: Final = 64  # per key and kind; counting stops there
MAX_ROUTES_PER_KEY: Final = 64
MAX_ROUTE_NAMES: Final = 10_000  # distinct route templates host-wide
MAX_BASELINE: Final = 50_000  # fingerprints per kind in the baseline
MAX_AGE_S: Final = 86_400.0  # age_s saturates at a day
OTHER_ROUTE: Final = "(other)"

_HLL_P: Final = 10
_HLL_M: Final = 1 << _HLL_P
_HLL_ALPHA: Final = 0.7213 / (1.0 + 1.079 / _HLL_M)
_HLL_INV_POW2: Final = np.array([2.0**-r for r in range(66)])
_MASK64: Final = (1 << 64) - 1

# Octave bins of the gap: under 1/4 s (parallel or machine speed), [1/4, 1/2),
# ..., [128, 256), 256 s and more.
_GAP_BIN_LOW: Final = -3
_GAP_BINS: Final = 12
_ENUM_MASK: Final = (1 << ENUM_PAIRS) - 1
_V6_TAG: Final = 1 << 128  # keeps ::a.b.c.d apart from a.b.c.d in the address index
_DISTINCT_ROUTE_WEIGHT: Final = math.exp(-1.0)  # one hit within the last 10 min

# Scaled decayed sums, one float64 array per key. [0:2] decay with the 10 s
# window, [2:4] with 60 s, everything from _REQ600 on with 10 min. The flow and
# application counters come last and are appended on a key's first flow or
# application event: most keys never see one of the two.
_REQ10, _CONN10, _REQ60, _CONN60 = 0, 1, 2, 3
_REQ600, _CONN600, _COOKIE, _REFERER = 4, 5, 6, 7
# One counter per class that has a share of its own or is sensitive, so that
# sensitive_share follows observations.SENSITIVE_CLASSES.
_CLASSES: Final = tuple(
    cls
    for cls in EndpointClass
    if cls in SENSITIVE_CLASSES
    or cls in (EndpointClass.LOGIN, EndpointClass.OTP, EndpointClass.CART,
               EndpointClass.CHECKOUT, EndpointClass.SEARCH, EndpointClass.CATALOG)
)  # fmt: skip
_CLASS0 = 8
_STATUS_N = _CLASS0 + len(_CLASSES)
_S401, _S403, _S404, _S429, _S4XX = range(_STATUS_N + 1, _STATUS_N + 6)
_LOGIN_ANSWERED, _LOGIN_ERRORS = _S4XX + 1, _S4XX + 2
_GAP_N, _GAP_SUM, _GAP_SQ = range(_LOGIN_ERRORS + 1, _LOGIN_ERRORS + 4)
_SYNC_S1, _SYNC_S2 = _GAP_SQ + 1, _GAP_SQ + 2
_HIST = _SYNC_S2 + 1
_N_BASE: Final = _HIST + _GAP_BINS
_FLOW_N, _UP, _UP2, _DOWN, _DOWN2, _DUR, _SEGS, _FGAP_N, _FGAP_SUM = range(_N_BASE, _N_BASE + 9)
_APP_OK, _APP_FAIL, _APP_OTP, _APP_CART, _APP_CHECKOUT = range(_N_BASE + 9, _N_BASE + 14)
_N_COUNTERS: Final = _N_BASE + 14
# An array("d") costs 8 bytes a counter. A list would be about twice as fast to
# update (CPython specialises list[int] += float) but would cost 32 bytes for
# each counter a key has touched: 0.5 KiB more per key for 0.3 us less per update.
_ZEROS: Final = array("d", bytes(8 * _N_BASE))
_MORE_ZEROS: Final = array("d", bytes(8 * (_N_COUNTERS - _N_BASE)))

_CLASS_SLOT: Final[dict[str, int]] = {cls: _CLASS0 + i for i, cls in enumerate(_CLASSES)}
_STATUS_SLOT: Final[dict[int, int]] = {401: _S401, 403: _S403, 404: _S404, 429: _S429}
_APP_SLOT: Final[dict[str, int]] = {
    APP_LOGIN_SUCCESS: _APP_OK,
    APP_LOGIN_FAILURE: _APP_FAIL,
    APP_OTP_SENT: _APP_OTP,
    APP_CHECKOUT: _APP_CHECKOUT,
    APP_ADD_TO_CART: _APP_CART,
}
APP_EVENT_KINDS: Final = frozenset(_APP_SLOT)
_JA4_KINDS: Final = frozenset({KIND_JA4, KIND_JA4_PREFIX, KIND_JA4_TCP})
_MAX_KEYS_PER_EVENT: Final = 7  # addr, prefix, ja4, tcp, http, ja4+prefix, ja4+tcp


def network_prefix(addr: IPAddress) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 one: what one customer,
    one hosting tenant or one proxy pool usually holds."""
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is None:
            return str(ipaddress.IPv6Network(((int(addr) >> 64) << 64, 64)))
        addr = mapped
    n = int(addr)
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.0/24"


def _address_index(addr: IPAddress) -> int:
    n = int(addr)
    return n | _V6_TAG if addr.version == 6 else n


def _address_hash(index: int) -> int:
    """A well-mixed 64-bit hash of an address index (the SplitMix64 finalizer).
    Not Python's hash(): that is salted per process, and a replayed capture
    must give the same estimates, hence the same verdicts, every time."""
    z = ((index ^ (index >> 64)) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _DistinctSketch:
    """Distinct addresses of the current and the previous 10-minute epoch, as
    two HyperLogLogs: their union counts the last 10 to 20 minutes."""

    __slots__ = ("current", "epoch", "previous")

    def __init__(self) -> None:
        self.current = bytearray(_HLL_M)
        self.previous = bytearray(_HLL_M)
        self.epoch = -1

    def add(self, h: int, ts: float) -> None:
        """Add an address by its _address_hash, seen at ts."""
        e = int(ts // MIX_WINDOW_S)
        if e > self.epoch:
            self.previous = self.current if e == self.epoch + 1 else bytearray(_HLL_M)
            self.current = bytearray(_HLL_M)
            self.epoch = e
        # A late event from an earlier epoch lands in the current one: it is
        # still inside the 20 minutes the union covers.
        rank = 64 - _HLL_P - (h >> _HLL_P).bit_length() + 1
        i = h & (_HLL_M - 1)
        if rank > self.current[i]:
            self.current[i] = rank

    def estimate(self, now: float) -> float:
        e = int(now // MIX_WINDOW_S)
        current = np.frombuffer(self.current, dtype=np.uint8)
        if e == self.epoch:
            registers = np.maximum(current, np.frombuffer(self.previous, dtype=np.uint8))
        elif e == self.epoch + 1:
            registers = current
        else:
            return 0.0
        return _hll_estimate(registers)


class _KeyState:
    """Everything one key remembers; sums in `c` are scaled to `epoch`.

    Tables of which most keys only ever need one entry start out as that
    entry: `routes` is a route name until a second route is seen (until then
    its weight is the key's request sum), `members` an address until a second
    address is.
    """

    __slots__ = (
        "act_n", "act_sec", "c", "enum_bits", "enum_pairs", "epoch", "first_seen", "gap_epoch",
        "gap_min", "gap_min_prev", "http", "ja4", "ja4_seen", "key", "last_id", "last_seen",
        "members", "requests", "routes", "sketch", "tcp", "tcp_seen", "ua", "ua_seen",
    )  # fmt: skip

    def __init__(self, key: ClusterKey, ts: float, epoch: float) -> None:
        self.key = key
        self.epoch = epoch
        self.c = array("d", _ZEROS)
        self.first_seen = ts
        self.last_seen = ts
        self.requests = 0
        self.gap_min = math.inf  # the shortest gap of the current 10-minute epoch,
        self.gap_min_prev = math.inf  # and of the previous one
        self.gap_epoch = -1
        self.routes: str | dict[str, float] | None = None
        self.last_id: int | None = None
        self.enum_bits = 0  # one bit per identifier pair, newest lowest: 1 = moved by one
        self.enum_pairs = 0
        self.act_sec = -1  # the second of the latest activation, and how many
        self.act_n = 0  # of the key's addresses became active in it
        self.members: str | dict[str, float] | None = None  # address -> last seen
        self.sketch: _DistinctSketch | None = None  # once members overflow
        self.ja4: str | None = None  # the latest of each fingerprint, interned
        self.tcp: str | None = None
        self.http: str | None = None
        self.ua: int | None = None  # hash of the latest User-Agent
        self.ja4_seen: set[str] | None = None  # made when a second distinct value comes
        self.tcp_seen: set[str] | None = None
        self.ua_seen: set[int] | None = None

    def copy_as(self, key: ClusterKey, member: str) -> _KeyState:
        """This key's history under another key whose only member it was."""
        twin = _KeyState(key, self.first_seen, self.epoch)
        for name in _KeyState.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.key = key
        twin.c = array("d", self.c)
        if isinstance(self.routes, dict):
            twin.routes = dict(self.routes)
        for name in ("ja4_seen", "tcp_seen", "ua_seen"):
            seen = getattr(self, name)
            setattr(twin, name, None if seen is None else set(seen))
        twin.members = member
        twin.sketch = None
        return twin


class _AddressState(_KeyState):
    """An address key: also its prefix, its recent routes, and the states of
    the cluster keys its latest request named."""

    __slots__ = ("hash", "index", "last_req_ts", "linked", "prefix", "recent", "recent_at")

    def __init__(self, key: ClusterKey, ts: float, epoch: float, prefix: str, index: int) -> None:
        super().__init__(key, ts, epoch)
        self.prefix = prefix
        self.index = index  # in FeatureStore._by_address
        self.hash = _address_hash(index)  # for the HyperLogLogs of its clusters
        self.recent: list[str] = []  # a ring of route names
        self.recent_at = 0
        self.last_req_ts: float | None = None
        # (ja4, tcp, http, states) of its latest request: _keyed_states
        self.linked: tuple[str | None, str | None, str | None, list[_KeyState]] | None = None


class FeatureStore:
    """Per-key behaviour in decayed windows; observe() is the hot path.

    A prefix key that has seen one address only is that address's key under
    another name (every observation updates both the same way), so it is not
    stored twice: it becomes a state of its own, copied from the address's,
    when a second address shows up. With addresses spread one per /24, as
    residential proxies are, this saves one key in three, in memory and work.
    """

    def __init__(
        self,
        *,
        max_keys: int = 250_000,
        max_members: int = 256,
        recent_routes: int = 32,
    ) -> None:
        if max_keys < 10 * _MAX_KEYS_PER_EVENT or max_members < 2 or recent_routes < 1:
            raise ValueError("need max_keys >= 70, max_members >= 2 and recent_routes >= 1")
        self._max_keys = max_keys  # states stored; prefixes of one address are not
        self._max_members = max_members
        self._recent_n = recent_routes
        self._states: dict[ClusterKey, _KeyState] = {}
        self._by_address: dict[int, _AddressState] = {}  # by _address_index
        self._lone: dict[str, _AddressState] = {}  # prefix -> the one address seen in it
        self._routes: dict[str, str] = {}  # interned route templates
        self._epoch = 0.0
        self._w_ts = math.nan  # the time the weights below are for
        self._w10 = self._w60 = self._w600 = self._wbase = 1.0
        # host-wide decayed sightings per fingerprint, scaled like the key sums
        self._baseline: dict[str, dict[str, float]] = {KIND_JA4: {}, KIND_TCP: {}, KIND_HTTP: {}}
        self._baseline_total: dict[str, float] = {KIND_JA4: 0.0, KIND_TCP: 0.0, KIND_HTTP: 0.0}
        self.evicted = 0

    # ---- observing ----

    def observe(self, obs: Observation) -> list[ClusterKey]:
        """Update every key the observation names; returns the keys updated,
        the address's own first (keys_for's, but that a prefix with one
        address so far is kept under the address's key), so the caller need
        not build them again."""
        if len(self._states) > self._max_keys - _MAX_KEYS_PER_EVENT:
            # Room first, so that nothing this event touches can be evicted.
            self._evict_oldest(obs.ts)
        if isinstance(obs, Request):
            states = self._observe_request(obs)
        elif isinstance(obs, Connection):
            states = self._observe_connection(obs)
        elif isinstance(obs, FlowShape):
            states = self._observe_flow(obs)
        else:
            raise TypeError(f"not an observation: {type(obs).__name__}")
        return [st.key for st in states]

    def observe_app_event(self, client: IPAddress, port: int, kind: str, ts: float) -> None:
        """An application's word about a client (login_failure, otp_sent, ...).

        It counts for the address, its prefix, and the cluster keys of the
        address's latest fingerprints. The port is part of the feedback API,
        but no per-connection state is kept here to join it on."""
        slot = _APP_SLOT.get(kind)
        if slot is None:
            raise ValueError(
                f"unknown application event {kind!r}: one of {sorted(APP_EVENT_KINDS)}"
            )
        if len(self._states) > self._max_keys - _MAX_KEYS_PER_EVENT:
            self._evict_oldest(ts)
        if ts != self._w_ts:
            self._set_weights(ts)
        addr = self._address_state(client, ts)
        states, _ = self._keyed_states(addr, addr.ja4, addr.tcp, addr.http, ts)
        self._touch(states, addr, ts, None, None, None, None, activity=False)
        w600 = self._w600
        for st in states:
            if len(st.c) < _N_COUNTERS:
                st.c = st.c + _MORE_ZEROS  # exactly sized: extend() would over-allocate
            st.c[slot] += w600

    def keys_for(self, obs: Observation) -> list[ClusterKey]:
        """The keys an observation updates: the address, its prefix, and each
        fingerprint and combination it carries."""
        addr = obs.client
        fp = obs.fingerprint
        http = obs.http_fingerprint if isinstance(obs, Request) else None
        return _cluster_keys(str(addr), network_prefix(addr), fp.ja4, fp.tcp_signature, http)

    def _observe_request(self, r: Request) -> list[_KeyState]:
        ts = r.ts
        if ts != self._w_ts:
            self._set_weights(ts)
        w10, w60, w600 = self._w10, self._w60, self._w600
        addr = self._address_state(r.client, ts)
        fp = r.fingerprint
        ja4, tcp, http = fp.ja4, fp.tcp_signature, r.http_fingerprint
        if ja4 is not None:
            ja4 = self._sighting(KIND_JA4, ja4)
        if tcp is not None:
            tcp = self._sighting(KIND_TCP, tcp)
        if http is not None:
            http = self._sighting(KIND_HTTP, http)
        states, same_keys = self._keyed_states(addr, ja4, tcp, http, ts)
        ua = r.user_agent
        self._touch(
            states, addr, ts, ja4, tcp, http, None if ua is None else hash(ua), same_keys=same_keys
        )

        route = self._routes.get(r.route)
        if route is None:
            route = self._route_name(r.route)
        recent = addr.recent
        if len(recent) < self._recent_n:
            recent.append(route)
        else:
            recent[addr.recent_at] = route
            addr.recent_at = (addr.recent_at + 1) % self._recent_n
        class_slot = _CLASS_SLOT.get(r.endpoint_class, -1)
        ident = path_identifier(r.path) if "{id}" in route else None
        status = r.status
        status_slot = -1 if status is None else _STATUS_SLOT.get(status, -1)
        client_error = status is not None and 400 <= status < 500
        login = r.endpoint_class is EndpointClass.LOGIN
        cookie, referer = r.has_cookie, r.has_referer
        epoch_no = int(ts // MIX_WINDOW_S)
        # The gap since the address's previous request, which every key it
        # names pools: a cluster's timing is its members' timing, so 500
        # addresses each polling every 60 s are as regular as one of them.
        # gap < 0: the address's first request, no gap.
        gap, hist, gap_w, gap_sq_w = -1.0, _HIST, 0.0, 0.0
        last = addr.last_req_ts
        if last is None or ts > last:
            addr.last_req_ts = ts
        if last is not None:
            gap = min(max(ts - last, 0.0), MIX_WINDOW_S)  # late events count as simultaneous
            if gap > 0.0:
                b = math.frexp(gap)[1] - 1 - _GAP_BIN_LOW  # floor(log2 gap), shifted
                hist += 0 if b < 0 else _GAP_BINS - 1 if b >= _GAP_BINS else b
            gap_w, gap_sq_w = gap * w600, gap * gap * w600

        for st in states:
            c = st.c
            st.requests += 1
            c[_REQ10] += w10
            c[_REQ60] += w60
            c[_REQ600] += w600
            if class_slot >= 0:
                c[class_slot] += w600
            if cookie:
                c[_COOKIE] += w600
            if referer:
                c[_REFERER] += w600
            if status is not None:
                c[_STATUS_N] += w600
                if status_slot >= 0:
                    c[status_slot] += w600
                if client_error:
                    c[_S4XX] += w600
                if login:
                    c[_LOGIN_ANSWERED] += w600
                    if status >= 400:
                        c[_LOGIN_ERRORS] += w600

            if gap >= 0.0:
                c[_GAP_N] += w600
                c[_GAP_SUM] += gap_w
                c[_GAP_SQ] += gap_sq_w
                c[hist] += w600
                if epoch_no != st.gap_epoch:
                    st.gap_min_prev = st.gap_min if epoch_no == st.gap_epoch + 1 else math.inf
                    st.gap_min = gap
                    st.gap_epoch = epoch_no
                elif gap < st.gap_min:
                    st.gap_min = gap

            routes = st.routes
            if routes is None:
                st.routes = route
            elif isinstance(routes, str):
                if routes is not route:  # a second route: the first has had every request
                    st.routes = {routes: c[_REQ600] - w600, route: w600}
            elif route in routes:
                routes[route] += w600
            elif len(routes) < MAX_ROUTES_PER_KEY:
                routes[route] = w600
            else:
                routes[OTHER_ROUTE] = routes.get(OTHER_ROUTE, 0.0) + w600

            if ident is not None:
                prev = st.last_id
                if prev is not None:
                    hit = 1 if ident - prev == 1 or prev - ident == 1 else 0
                    st.enum_bits = ((st.enum_bits << 1) | hit) & _ENUM_MASK
                    if st.enum_pairs < ENUM_PAIRS:
                        st.enum_pairs += 1
                st.last_id = ident
        return states

    def _observe_connection(self, conn: Connection) -> list[_KeyState]:
        """A SYN counts a connection for every key it names. The ClientHello of
        the same connection comes later and only adds the JA4: it counts the
        connection again only for the JA4 keys, which the SYN could not name."""
        ts = conn.ts
        if ts != self._w_ts:
            self._set_weights(ts)
        addr = self._address_state(conn.client, ts)
        fp = conn.fingerprint
        ja4, tcp = fp.ja4, fp.tcp_signature
        syn = conn.stage is ConnectionStage.SYN
        # The baseline counts a connection once per fingerprint kind: the TCP
        # signature at its SYN, the JA4 at its ClientHello.
        if ja4 is not None:
            ja4 = sys.intern(ja4) if syn else self._sighting(KIND_JA4, ja4)
        if tcp is not None:
            tcp = self._sighting(KIND_TCP, tcp) if syn else sys.intern(tcp)
        states, _ = self._keyed_states(addr, ja4, tcp, None, ts)
        self._touch(states, addr, ts, ja4, tcp, None, None)
        w10, w60, w600 = self._w10, self._w60, self._w600
        for st in states:
            if syn or st.key[0] in _JA4_KINDS:
                c = st.c
                c[_CONN10] += w10
                c[_CONN60] += w60
                c[_CONN600] += w600
        return states

    def _observe_flow(self, flow: FlowShape) -> list[_KeyState]:
        ts = flow.ts
        if ts != self._w_ts:
            self._set_weights(ts)
        addr = self._address_state(flow.client, ts)
        fp = flow.fingerprint
        ja4 = None if fp.ja4 is None else sys.intern(fp.ja4)
        tcp = None if fp.tcp_signature is None else sys.intern(fp.tcp_signature)
        states, _ = self._keyed_states(addr, ja4, tcp, None, ts)
        self._touch(states, addr, ts, ja4, tcp, None, None)
        w = self._w600
        up, down = float(flow.bytes_up), float(flow.bytes_down)
        duration, segments, gap_cv = flow.duration_s, flow.data_segments, flow.gap_cv
        for st in states:
            c = st.c
            if len(c) < _N_COUNTERS:
                c = st.c = c + _MORE_ZEROS  # exactly sized: extend() would over-allocate
            c[_FLOW_N] += w
            c[_UP] += up * w
            c[_UP2] += up * up * w
            c[_DOWN] += down * w
            c[_DOWN2] += down * down * w
            c[_DUR] += duration * w
            c[_SEGS] += segments * w
            if gap_cv is not None:
                c[_FGAP_N] += w
                c[_FGAP_SUM] += gap_cv * w
        return states

    def _touch(
        self,
        states: list[_KeyState],
        addr: _AddressState,
        ts: float,
        ja4: str | None,
        tcp: str | None,
        http: str | None,
        ua: int | None,
        *,
        activity: bool = True,
        same_keys: bool = False,
    ) -> None:
        """What every observation does to every key it names: bring the key to
        the current epoch, note the time, the member, whether the address just
        became active, and the fingerprints.

        same_keys: the keys are those of the address's previous request. Then
        the members are noted only when the address activates: their times
        are to the second, and a page load's burst costs one update, not ten.
        """
        epoch = self._epoch
        sec = math.floor(ts)
        # An address "activates" in the first second it shows activity in;
        # later events of that second are one action of one client.
        activated = activity and sec != addr.act_sec
        note_members = activated or not same_keys
        w600 = self._w600
        addr_s = addr.key[1]
        epoch_start = (ts // MIX_WINDOW_S) * MIX_WINDOW_S
        for st in states:
            if st.epoch is not epoch:
                self._rebase(st)
            if note_members and st is not addr:
                members = st.members
                if members is None:
                    st.members = addr_s
                elif isinstance(members, str):
                    if members != addr_s:  # the lone member was last seen when the key was
                        st.members = {members: st.last_seen, addr_s: ts}
                else:
                    before = members.get(addr_s)
                    members[addr_s] = ts
                    if before is None and len(members) > self._max_members:
                        self._overflow(st, members)
                    # an address already seen in this epoch is in its registers
                    if st.sketch is not None and (before is None or before < epoch_start):
                        st.sketch.add(addr.hash, ts)
            if ts > st.last_seen:
                st.last_seen = ts
            if activated:
                # S1 sums the activations, S2 the squares of the per-second
                # counts: the k-th activation of a second adds k^2 - (k-1)^2.
                c = st.c
                c[_SYNC_S1] += w600
                if sec == st.act_sec:
                    c[_SYNC_S2] += (2 * st.act_n + 1) * w600
                    st.act_n += 1
                else:
                    c[_SYNC_S2] += w600
                    st.act_sec = sec
                    st.act_n = 1
            # The distinct-value sets are made at the second value and stop
            # growing at MAX_DISTINCT_FINGERPRINTS.
            if ja4 is not None and ja4 is not st.ja4:
                if st.ja4_seen is not None:
                    if len(st.ja4_seen) < MAX_DISTINCT_FINGERPRINTS:
                        st.ja4_seen.add(ja4)
                elif st.ja4 is not None:
                    st.ja4_seen = {st.ja4, ja4}
                st.ja4 = ja4
            if tcp is not None and tcp is not st.tcp:
                if st.tcp_seen is not None:
                    if len(st.tcp_seen) < MAX_DISTINCT_FINGERPRINTS:
                        st.tcp_seen.add(tcp)
                elif st.tcp is not None:
                    st.tcp_seen = {st.tcp, tcp}
                st.tcp = tcp
            if http is not None:
                st.http = http
            if ua is not None and ua != st.ua:
                if st.ua_seen is not None:
                    if len(st.ua_seen) < MAX_DISTINCT_FINGERPRINTS:
                        st.ua_seen.add(ua)
                elif st.ua is not None:
                    st.ua_seen = {st.ua, ua}
                st.ua = ua

    # ---- state ----

    def _set_weights(self, ts: float) -> None:
        rel = ts - self._epoch
        # The epoch only moves forward: a late event just weighs less, and
        # exp() of a negative number cannot overflow.
        if rel > RESCALE_AFTER_S:
            self._new_epoch(ts)
            rel = 0.0
        self._w_ts = ts
        self._w10 = math.exp(rel / 10.0)
        self._w60 = math.exp(rel / 60.0)
        self._w600 = math.exp(rel / MIX_WINDOW_S)
        self._wbase = math.exp(rel / BASELINE_WINDOW_S)

    def _new_epoch(self, ts: float) -> None:
        """Move E to ts. Keys follow lazily (_rebase); the baseline tables are
        bounded and rescaled here, dropping what has decayed to nothing."""
        factor = math.exp(-(ts - self._epoch) / BASELINE_WINDOW_S)
        for kind, table in self._baseline.items():
            for fp in [fp for fp, v in table.items() if v * factor < 0.01]:
                del table[fp]
            for fp in table:
                table[fp] *= factor
            self._baseline_total[kind] *= factor
        # States compare their epoch with this one by identity: a new object
        # each time, which a stale state keeps alive until it is rebased.
        self._epoch = float(ts)

    def _rebase(self, st: _KeyState) -> None:
        """Bring one key's scaled sums from its epoch to the store's."""
        dt = self._epoch - st.epoch
        c = st.c
        k10, k60, k600 = math.exp(-dt / 10.0), math.exp(-dt / 60.0), math.exp(-dt / MIX_WINDOW_S)
        c[_REQ10] *= k10
        c[_CONN10] *= k10
        c[_REQ60] *= k60
        c[_CONN60] *= k60
        c[_REQ600:] = array("d", map(k600.__mul__, c[_REQ600:]))  # one C loop
        routes = st.routes
        if isinstance(routes, dict):
            # A route hit once 10 min ago weighs about 0.37; below 0.01 it is
            # about 45 min gone: forget it, so the table holds recent routes.
            st.routes = {r: w * k600 for r, w in routes.items() if w * k600 >= 0.01}
        st.epoch = self._epoch

    def _address_state(self, client: IPAddress, ts: float) -> _AddressState:
        index = _address_index(client)
        st = self._by_address.get(index)
        if st is None:
            addr_s = str(client)
            prefix = sys.intern(network_prefix(client))
            st = _AddressState((KIND_ADDR, addr_s), ts, self._epoch, prefix, index)
            self._states[st.key] = st
            self._by_address[index] = st
        return st

    def _keyed_states(
        self, addr: _AddressState, ja4: str | None, tcp: str | None, http: str | None, ts: float
    ) -> tuple[list[_KeyState], bool]:
        """The states of the keys an event of the address names, and whether
        they are exactly those of its previous request.

        A client's events mostly repeat its keys, so the list built for its
        latest request is kept and reused while the fingerprints match (they
        are interned: `is` compares them); a connection or a flow names the
        same keys but the HTTP one, which comes last. Evictions drop the lists.
        """
        linked = addr.linked
        if linked is not None and linked[0] is ja4 and linked[1] is tcp:
            if linked[2] is http:
                return linked[3], True
            if http is None:
                return linked[3][:-1], False
        states = self._states_for(addr, ja4, tcp, http, ts)
        if http is not None:
            addr.linked = (ja4, tcp, http, states)
        return states, False

    def _states_for(
        self, addr: _AddressState, ja4: str | None, tcp: str | None, http: str | None, ts: float
    ) -> list[_KeyState]:
        states = self._states
        prefix = addr.prefix
        out: list[_KeyState] = [addr]
        prefix_state = states.get((KIND_PREFIX, prefix))
        if prefix_state is not None:
            out.append(prefix_state)
        else:
            lone = self._lone.get(prefix)
            if lone is None:
                self._lone[prefix] = addr  # the address stands for its prefix
            elif lone is not addr:
                out.append(self._split_prefix(prefix, lone))
        keys = []
        if ja4 is not None:
            keys.append((KIND_JA4, ja4))
            keys.append((KIND_JA4_PREFIX, f"{ja4}|{prefix}"))
            if tcp is not None:
                keys.append((KIND_JA4_TCP, f"{ja4}|{tcp}"))
        if tcp is not None:
            keys.append((KIND_TCP, tcp))
        if http is not None:
            keys.append((KIND_HTTP, http))
        epoch = self._epoch
        for key in keys:
            st = states.get(key)
            if st is None:
                st = states[key] = _KeyState(key, ts, epoch)
            out.append(st)
        return out

    def _split_prefix(self, prefix: str, lone: _AddressState) -> _KeyState:
        """A second address in a prefix: the prefix gets a state of its own,
        starting as a copy of the first address's, which it was so far."""
        del self._lone[prefix]
        st = lone.copy_as((KIND_PREFIX, prefix), lone.key[1])
        self._states[st.key] = st
        lone.linked = None  # its cached states lack the new one
        return st

    def _sighting(self, kind: str, fp: str) -> str:
        """Count one sighting of a fingerprint in the host's baseline; return it interned."""
        fp = sys.intern(fp)
        table = self._baseline[kind]
        w = self._wbase
        if fp in table:
            table[fp] += w
        else:
            table[fp] = w
            if len(table) > MAX_BASELINE:
                _prune_baseline(table)
        self._baseline_total[kind] += w
        return fp

    def _route_name(self, route: str) -> str:
        if len(self._routes) >= MAX_ROUTE_NAMES:
            return OTHER_ROUTE  # random paths must not grow the table
        name = sys.intern(route)
        self._routes[name] = name
        return name

    def _overflow(self, st: _KeyState, members: dict[str, float]) -> None:
        """More addresses than the member sample holds: drop the one that joined
        first (a FIFO: an LRU would reorder the dict on every request), and
        from now on count distinct addresses with a HyperLogLog."""
        del members[next(iter(members))]
        if st.sketch is None:
            st.sketch = _DistinctSketch()
            for addr_s, seen in sorted(members.items(), key=lambda item: item[1]):
                own = self._states.get((KIND_ADDR, addr_s))
                if isinstance(own, _AddressState):
                    h = own.hash
                else:  # evicted meanwhile: parse it again
                    h = _address_hash(_address_index(ipaddress.ip_address(addr_s)))
                st.sketch.add(h, seen)

    # ---- eviction ----

    def evict_idle(self, now: float, idle_s: float) -> int:
        """Forget keys not seen for idle_s seconds; returns how many."""
        cutoff = now - idle_s
        return self._evict([k for k, st in self._states.items() if st.last_seen < cutoff])

    def _evict_oldest(self, now: float) -> None:
        """Make room for 5 % of max_keys by dropping the least recently seen
        keys. The cut-off comes from a sample of last-seen times, so one
        eviction is two passes over the keys, once per max_keys / 20 new keys."""
        states = self._states
        want = len(states) - (self._max_keys - max(self._max_keys // 20, _MAX_KEYS_PER_EVENT))
        step = max(1, len(states) // 2048)
        sample = sorted(st.last_seen for st in islice(states.values(), 0, None, step))
        cutoff = sample[min(len(sample) - 1, want * len(sample) // len(states))]
        victims = [k for k, st in states.items() if st.last_seen < cutoff]
        if len(victims) < want:  # ties at the cut-off: the first created go first
            chosen = set(victims)
            victims.extend(islice((k for k in states if k not in chosen), want - len(victims)))
        self._evict(victims)

    def _evict(self, keys: Sequence[ClusterKey]) -> int:
        """Forget keys; returns how many, counting prefixes that were only
        their address's other name."""
        forgotten = len(keys)
        if keys:
            # The addresses' cached state lists may hold the evicted: drop them
            # all (a pass like the one that chose the keys), rather than let
            # them keep dead states alive.
            for addr in self._by_address.values():
                addr.linked = None
        for key in keys:
            st = self._states.pop(key)
            if isinstance(st, _AddressState):
                self._by_address.pop(st.index, None)
                if self._lone.get(st.prefix) is st:
                    del self._lone[st.prefix]
                    forgotten += 1
        self.evicted += forgotten
        return forgotten

    # ---- queries ----

    def __len__(self) -> int:
        return len(self._states) + len(self._lone)

    def __contains__(self, key: object) -> bool:
        return key in self._states or self._lone_for(key) is not None

    def keys(self, kind: str | None = None) -> Iterator[ClusterKey]:
        """Every tracked key, or those of one kind: a snapshot, so observing
        while iterating is safe."""
        keys = [k for k in self._states if kind is None or k[0] == kind]
        if kind is None or kind == KIND_PREFIX:
            keys.extend((KIND_PREFIX, prefix) for prefix in self._lone)
        return iter(keys)

    def members(self, key: ClusterKey) -> set[str]:
        """Addresses seen under a key: all of them up to max_members, else the
        max_members that joined it last."""
        st = self._state(key)
        if st is None:
            return set()
        members = _members_of(st, key)
        return {members} if isinstance(members, str) else set(members or ())

    def recent_routes(self, addr_key: ClusterKey, n: int | None = None) -> list[str]:
        """The address's latest route templates, oldest first: the last n, at
        most `recent_routes` (the constructor's)."""
        st = self._states.get(addr_key)
        if not isinstance(st, _AddressState):
            return []
        ring = st.recent
        ordered = ring[st.recent_at :] + ring[: st.recent_at]
        return ordered if n is None else ordered[max(0, len(ordered) - n) :]

    def first_seen(self, key: ClusterKey) -> float | None:
        st = self._state(key)
        return None if st is None else st.first_seen

    def last_seen(self, key: ClusterKey) -> float | None:
        st = self._state(key)
        return None if st is None else st.last_seen

    def request_count(self, key: ClusterKey) -> int:
        """Requests under the key since it was first seen (not windowed)."""
        st = self._state(key)
        return 0 if st is None else st.requests

    def rarity(self, kind: str, fingerprint: str, now: float) -> float:
        """-ln of the fingerprint's share of this host's decayed sightings of
        its kind, add-one smoothed: 0 when nothing else was ever seen,
        ln(N + 1) for a fingerprint never seen among N sightings."""
        table = self._baseline.get(kind)
        if table is None:
            raise ValueError(f"no baseline for {kind!r}: one of {sorted(self._baseline)}")
        decay = math.exp(-max(now - self._epoch, 0.0) / BASELINE_WINDOW_S)
        count = table.get(fingerprint, 0.0) * decay
        total = self._baseline_total[kind] * decay
        return math.log((total + 1.0) / (count + 1.0))

    def features(self, key: ClusterKey, now: float) -> dict[str, float]:
        """The key's features at `now` (no earlier than its latest observation).
        A key never seen, or evicted, reads FEATURE_DEFAULTS."""
        st = self._state(key)
        if st is None:
            return dict(FEATURE_DEFAULTS)
        return self._compute(st, key, now)

    def member_features(self, key: ClusterKey, now: float) -> dict[str, float]:
        """Of features(), the MEMBER_FEATURES only: what a campaign's members
        are told apart by (engine.takes_part), which a tick asks of up to
        max_members addresses of each campaign. They are shares, so `now`
        does not change them."""
        f = {name: FEATURE_DEFAULTS[name] for name in MEMBER_FEATURES}
        st = self._state(key)
        if st is not None:
            c = st.c
            if len(c) < _N_COUNTERS:
                c = c + _MORE_ZEROS
            _member_shares(f, c)
        return f

    def vector(self, key: ClusterKey, now: float) -> np.ndarray:
        """features() as float64 in FEATURE_NAMES order: the order its dict is
        in, as it starts from a copy of FEATURE_DEFAULTS and adds no key."""
        values = self.features(key, now)
        return np.fromiter(values.values(), dtype=np.float64, count=len(FEATURE_NAMES))

    def matrix(self, keys: Iterable[ClusterKey], now: float) -> np.ndarray:
        """One row per key, columns in FEATURE_NAMES order."""
        rows = [self.vector(key, now) for key in keys]
        if not rows:
            return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float64)
        return np.vstack(rows)

    def _state(self, key: ClusterKey) -> _KeyState | None:
        st = self._states.get(key)
        return st if st is not None else self._lone_for(key)

    def _lone_for(self, key: object) -> _AddressState | None:
        if isinstance(key, tuple) and len(key) == 2 and key[0] == KIND_PREFIX:
            return self._lone.get(key[1])
        return None

    def _new_address_share(self, st: _KeyState, key: ClusterKey, now: float) -> float:
        """Of the key's sampled addresses seen in the last 10 min, the share whose
        own address key was first seen in that time too (or is gone: evicted,
        so with no history to speak of)."""
        since = now - MIX_WINDOW_S
        members = _members_of(st, key)
        if members is None:
            return 0.0
        if isinstance(members, str):
            members = {members: st.last_seen}
        states = self._states
        recent = new = 0
        for addr_s, seen in members.items():  # up to max_members: one pass
            if seen >= since:
                recent += 1
                own = states.get((KIND_ADDR, addr_s))
                if own is None or own.first_seen >= since:
                    new += 1
        return new / recent if recent else 0.0

    def _compute(self, st: _KeyState, key: ClusterKey, now: float) -> dict[str, float]:
        c = st.c
        if len(c) < _N_COUNTERS:  # no flow and no application event yet
            c = c + _MORE_ZEROS
        dt = max(now - st.epoch, 0.0)  # a query from before the epoch reads at the epoch
        d10, d60, d600 = math.exp(-dt / 10.0), math.exp(-dt / 60.0), math.exp(-dt / MIX_WINDOW_S)
        f = dict(FEATURE_DEFAULTS)

        f["req_rate_10s"] = c[_REQ10] * d10 / 10.0
        f["req_rate_60s"] = c[_REQ60] * d60 / 60.0
        f["req_rate_600s"] = c[_REQ600] * d600 / MIX_WINDOW_S
        f["conn_rate_10s"] = c[_CONN10] * d10 / 10.0
        f["conn_rate_60s"] = c[_CONN60] * d60 / 60.0
        f["conn_rate_600s"] = c[_CONN600] * d600 / MIX_WINDOW_S
        if c[_CONN600] > 0.0:  # 0 when no connection was seen (requests joined via a proxy)
            f["requests_per_conn"] = c[_REQ600] / c[_CONN600]

        if c[_GAP_N] > 0.0:
            f["gap_mean_s"] = c[_GAP_SUM] / c[_GAP_N]
            f["gap_cv"] = _cv(c[_GAP_N], c[_GAP_SUM], c[_GAP_SQ])
            f["gap_entropy"] = _entropy(c[_HIST : _HIST + _GAP_BINS])
        epoch_no = int(now // MIX_WINDOW_S)
        if epoch_no == st.gap_epoch:
            f["gap_min_s"] = min(st.gap_min, st.gap_min_prev, MIX_WINDOW_S)
        elif epoch_no == st.gap_epoch + 1:
            f["gap_min_s"] = min(st.gap_min, MIX_WINDOW_S)

        routes = st.routes
        if isinstance(routes, dict):
            f["route_entropy"] = _entropy(routes.values())
            f["distinct_routes"] = float(
                sum(1 for w in routes.values() if w * d600 >= _DISTINCT_ROUTE_WEIGHT)
            )
        elif routes is not None:
            f["distinct_routes"] = float(c[_REQ600] * d600 >= _DISTINCT_ROUTE_WEIGHT)
        if c[_REQ600] > 0.0:
            n = c[_REQ600]
            f["otp_share"] = c[_CLASS_SLOT[EndpointClass.OTP]] / n
            f["cart_share"] = c[_CLASS_SLOT[EndpointClass.CART]] / n
            f["checkout_share"] = c[_CLASS_SLOT[EndpointClass.CHECKOUT]] / n
            f["search_share"] = c[_CLASS_SLOT[EndpointClass.SEARCH]] / n
            f["catalog_share"] = c[_CLASS_SLOT[EndpointClass.CATALOG]] / n
            f["cookie_share"] = c[_COOKIE] / n
            f["referer_share"] = c[_REFERER] / n
        if st.enum_pairs:
            hits = (st.enum_bits & ((1 << st.enum_pairs) - 1)).bit_count()
            f["sequential_id_share"] = hits / st.enum_pairs
        if c[_STATUS_N] > 0.0:
            n = c[_STATUS_N]
            f["status_401_share"] = c[_S401] / n
            f["status_403_share"] = c[_S403] / n
            f["status_404_share"] = c[_S404] / n
            f["status_429_share"] = c[_S429] / n
            f["status_4xx_share"] = c[_S4XX] / n

        if c[_FLOW_N] > 0.0:
            n = c[_FLOW_N]
            f["flow_bytes_up_mean"] = c[_UP] / n
            f["flow_bytes_up_cv"] = _cv(n, c[_UP], c[_UP2])
            f["flow_bytes_down_mean"] = c[_DOWN] / n
            f["flow_bytes_down_cv"] = _cv(n, c[_DOWN], c[_DOWN2])
            f["flow_duration_mean_s"] = c[_DUR] / n
            f["flow_segments_mean"] = c[_SEGS] / n
        if c[_FGAP_N] > 0.0:
            f["flow_gap_cv"] = c[_FGAP_SUM] / c[_FGAP_N]

        _member_shares(f, c)
        f["login_failures_600s"] = c[_APP_FAIL] * d600
        f["otp_sends_600s"] = c[_APP_OTP] * d600
        f["cart_adds_600s"] = c[_APP_CART] * d600
        f["cart_per_checkout"] = c[_APP_CART] * d600 / (c[_APP_CHECKOUT] * d600 + 1.0)

        if st.ja4 is not None:
            f["ja4_rarity"] = self.rarity(KIND_JA4, st.ja4, now)
        if st.tcp is not None:
            f["tcp_rarity"] = self.rarity(KIND_TCP, st.tcp, now)
        if st.http is not None:
            f["http_rarity"] = self.rarity(KIND_HTTP, st.http, now)

        f["distinct_addrs"] = _distinct_addresses(st, key, now)
        f["new_addr_share"] = self._new_address_share(st, key, now)
        f["addr_sync"] = _sync(st, now, d600)
        f["distinct_ja4"] = _distinct(st.ja4_seen, st.ja4)
        f["distinct_tcp"] = _distinct(st.tcp_seen, st.tcp)
        f["distinct_user_agents"] = _distinct(st.ua_seen, st.ua)
        f["age_s"] = min(max(now - st.first_seen, 0.0), MAX_AGE_S)
        return f


# ---- helpers ----


def _cluster_keys(
    addr_s: str, prefix: str, ja4: str | None, tcp: str | None, http: str | None
) -> list[ClusterKey]:
    keys: list[ClusterKey] = [(KIND_ADDR, addr_s), (KIND_PREFIX, prefix)]
    if ja4 is not None:
        keys.append((KIND_JA4, ja4))
        keys.append((KIND_JA4_PREFIX, f"{ja4}|{prefix}"))
        if tcp is not None:
            keys.append((KIND_JA4_TCP, f"{ja4}|{tcp}"))
    if tcp is not None:
        keys.append((KIND_TCP, tcp))
    if http is not None:
        keys.append((KIND_HTTP, http))
    return keys


def _members_of(st: _KeyState, key: ClusterKey) -> str | dict[str, float] | None:
    """The key's member sample: an address key (or a prefix it stands for) is
    its own only member."""
    if isinstance(st, _AddressState):
        return st.key[1]
    return st.members


def _distinct(seen: set[str] | set[int] | None, latest: object) -> float:
    if seen is not None:
        return float(len(seen))
    return 0.0 if latest is None else 1.0


def _distinct_addresses(st: _KeyState, key: ClusterKey, now: float) -> float:
    """Addresses seen under the key in the current and previous 10-minute epochs."""
    if key[0] == KIND_ADDR:
        return 1.0
    if st.sketch is not None:
        return st.sketch.estimate(now)
    since = (now // MIX_WINDOW_S - 1.0) * MIX_WINDOW_S
    members = _members_of(st, key)
    if isinstance(members, str):
        return 1.0 if st.last_seen >= since else 0.0
    return float(sum(1 for seen in (members or {}).values() if seen >= since))


def _sync(st: _KeyState, now: float, d600: float) -> float:
    """Fano factor - 1 of per-second address activations over 10 min."""
    s1 = st.c[_SYNC_S1] * d600
    s2 = st.c[_SYNC_S2] * d600
    if s1 <= 0.0:
        return 0.0
    # The decayed number of 1-second slots watched: 600 in steady state, fewer
    # while the key is young (at least the one slot it was first seen in).
    slots = max(MIX_WINDOW_S * -math.expm1(-max(now - st.first_seen, 0.0) / MIX_WINDOW_S), 1.0)
    mean = s1 / slots
    variance = max(s2 / slots - mean * mean, 0.0)
    return max(variance / mean - 1.0, 0.0)


def _prune_baseline(table: dict[str, float]) -> None:
    """Forget the rarer half: a flood of random fingerprints must not grow the
    table, and a fingerprint forgotten reads as rare again, as it is."""
    cut = sorted(table.values())[len(table) // 2]
    for fp in [fp for fp, v in table.items() if v < cut]:
        del table[fp]


def _member_shares(f: dict[str, float], c: array[float]) -> None:
    """The MEMBER_FEATURES of a key's counters (all _N_COUNTERS of them)."""
    if c[_REQ600] > 0.0:
        n = c[_REQ600]
        f["sensitive_share"] = sum(c[_CLASS_SLOT[cls]] for cls in SENSITIVE_CLASSES) / n
        f["login_share"] = c[_CLASS_SLOT[EndpointClass.LOGIN]] / n
    if c[_LOGIN_ANSWERED] > 0.0:
        f["login_error_share"] = c[_LOGIN_ERRORS] / c[_LOGIN_ANSWERED]
    logins = c[_APP_OK] + c[_APP_FAIL]
    if logins > 0.0:
        f["login_failure_share"] = c[_APP_FAIL] / logins


def _cv(n: float, total: float, squares: float) -> float:
    """Coefficient of variation from a weighted count, sum and sum of squares."""
    mean = total / n
    if mean <= 0.0:
        return 0.0
    return math.sqrt(max(squares / n - mean * mean, 0.0)) / mean


def _entropy(weights: Iterable[float]) -> float:
    """Shannon entropy in bits of a histogram of non-negative weights."""
    values = [w for w in weights if w > 0.0]
    if len(values) < 2:
        return 0.0
    total = sum(values)
    return max(-sum([w / total * math.log2(w / total) for w in values]), 0.0)


def _hll_estimate(registers: np.ndarray) -> float:
    """HyperLogLog cardinality, with linear counting for small counts."""
    m = len(registers)
    # Powers of two from 2^0 to 2^-42 over 1,024 registers sum exactly in
    # any order (a rank of 43 or more has odds of 2^-43 an address).
    z = float(_HLL_INV_POW2[registers].sum())
    estimate = _HLL_ALPHA * m * m / z
    zeros = m - int(np.count_nonzero(registers))
    if estimate <= 2.5 * m and zeros:
        estimate = m * math.log(m / zeros)
    return estimate
