"""Enforcer: turns policy decisions into kernel verdicts, and measures how fast.

Address, CIDR and flow decisions go straight to sensor.verdicts. A JA4
decision cannot be a kernel map entry (the kernel never computes a JA4), so it
reaches the kernel two ways:

- as hello keys (bpf/common.h: a hash of the cipher list, which the kernel
  can compute): every key seen with the JA4, and with no other JA4, is
  written to block_hello, and the kernel drops the next hello with that key
  before it is answered. A key seen with two JA4s (two client stacks that
  share a cipher list) is never written: the kernel cannot tell them apart.
- as a flow block on every new connection whose ClientHello matches, written
  here once the hello is seen. That covers what keys cannot (scoped JA4
  verdicts, shared keys, hellos the kernel could not read), but lands after
  the server answered: a fast client may get a request in first.

Allow, throttle and tarpit on a JA4, and throttle and tarpit on a CIDR, have
no kernel map of their own (the kernel's are per address): each is written as
an address verdict for every address that shows itself under it, at its
ClientHello (a JA4) or its SYN (a CIDR), and once for every address the
engine already knows there when the decision is made. An address's buckets
are written once per decision, not at each of its connections, which would
refill them. A JA4 allow also spares its clients from JA4 blocks.

A client the policy spares from JA4 verdicts (a declared agent or verified
crawler on a blocked bot's stack) gets a hello exemption in the kernel from
its first request on; if the kernel dropped one of its hellos before that,
the flow is unblocked and the client's retransmission passes.

Without VerdictMaps (a replay, a dry run) decisions are only recorded.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.observations import Connection, ConnectionStage
from sensor import abi
from sensor.abi import VerdictKind
from sensor.events import Flow
from sensor.verdicts import VerdictMaps

# A flow block only has to outlive one connection: the kernel's own, for the
# hellos it drops, last as long.
JA4_FLOW_BLOCK_TTL_S = abi.HELLO_FLOW_BLOCK_NS / 1e9
# Distinct hello keys remembered with their JA4 (client stacks, not clients).
HELLO_KEYS_KEPT = 65_536
# How long a spared client's hello exemption lasts; its requests renew it.
HELLO_EXEMPT_TTL_S = 3600.0
# A key seen with two different JA4s.
_SHARED = None


@dataclass
class LatencyLog:
    """Decision latencies in seconds, from the event's kernel time to the map write,
    kept as a bounded ring so a long run does not grow it."""

    capacity: int = 100_000
    samples: list[float] = field(default_factory=list)
    _next: int = 0

    def add(self, seconds: float) -> None:
        if len(self.samples) < self.capacity:
            self.samples.append(seconds)
        else:
            self.samples[self._next] = seconds
            self._next = (self._next + 1) % self.capacity

    def percentile(self, q: float) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


class Enforcer:
    def __init__(
        self,
        verdicts: VerdictMaps | None,
        clock_s: Callable[[], float] = lambda: time.clock_gettime(time.CLOCK_MONOTONIC),
    ) -> None:
        self._verdicts = verdicts
        self._clock_s = clock_s
        # ja4 -> scope -> (expiry, decision); scope None is every source. The
        # policy scopes a JA4 to an address or prefix ("<ja4>@<addr or cidr>")
        # when one address hides many clients, so only that source's flows go.
        self._ja4_blocks: dict[str, dict[Scope, tuple[float, Decision]]] = {}
        # hello key -> the one JA4 seen with it, or _SHARED; least recent first
        self._key_ja4: OrderedDict[int, str | None] = OrderedDict()
        # hello key -> expiry of its block_hello entry (this clock)
        self._kernel_keys: dict[int, float] = {}
        # address -> expiry of its hello exemption (this clock)
        self._exempt: dict[IPAddress, float] = {}
        # target text -> (expiry, decision): the decisions written per address
        # as addresses show themselves (see the module's docstring)
        self._by_source: dict[str, tuple[float, Decision]] = {}
        # target text -> address -> expiry of what was written for it
        self._derived: dict[str, dict[IPAddress, float]] = {}
        if verdicts is not None:
            self._adopt_kernel_keys(verdicts)
        self.applied: list[Decision] = []  # bounded by the caller's log rotation
        self.fingerprint_latency = LatencyLog()
        self.behaviour_latency = LatencyLog()

    @property
    def enforcing(self) -> bool:
        return self._verdicts is not None

    def apply(self, decision: Decision, event_ts: float | None = None) -> None:
        """Writes one decision to the kernel (unless shadow or monitor)."""
        self.applied.append(decision)
        if decision.shadow or decision.action is Action.MONITOR:
            return
        if is_by_source(decision):
            self._by_source[decision.target] = (self._clock_s() + decision.ttl_s, decision)
            self._derived.pop(decision.target, None)  # a new decision: new buckets
            return
        if decision.target_kind is TargetKind.JA4:
            ja4, scope = parse_ja4_target(decision.target)
            expiry = self._clock_s() + decision.ttl_s
            self._ja4_blocks.setdefault(ja4, {})[scope] = (expiry, decision)
            if scope is None:
                for key, seen in list(self._key_ja4.items()):
                    if seen == ja4:
                        self._block_key(key, ja4, expiry, decision)
            return
        if self._verdicts is not None:
            _write(self._verdicts, decision)
            if event_ts is not None:
                self.behaviour_latency.add(self._clock_s() - event_ts)

    def on_connection(self, conn: Connection, spared: bool = False) -> Decision | None:
        """A new ClientHello: block its flow at once if its JA4 is on the list.
        spared: the policy spares this client from JA4 verdicts."""
        ja4 = conn.fingerprint.ja4
        if conn.stage is not ConnectionStage.HELLO or ja4 is None or conn.server is None:
            return None
        flow = Flow(conn.client, conn.client_port, conn.server, conn.server_port)
        key = conn.hello_key
        if key is not None:
            self._learn_key(key, ja4)
        now = self._clock_s()
        if spared or self._ja4_allowed(ja4, conn.client, now):
            self.exempt(conn.client)
            if self._key_blocked(key, now):  # the kernel may have dropped this hello
                self._unblock_flow(flow)
            return None
        source, unscoped = self._live_decision(ja4, conn.client, now)
        if key is not None:
            self._correct_key(key, ja4, flow, source, unscoped, now)
        if source is None:
            return None
        decision = Decision(
            action=Action.BLOCK_FLOW,
            target_kind=TargetKind.FLOW,
            target=str(flow),
            ttl_s=JA4_FLOW_BLOCK_TTL_S,
            reason=f"JA4 {ja4} is blocked: {source.reason}",
            rule=source.rule,
            score=source.score,
            model_versions=source.model_versions,
        )
        if self._verdicts is not None:
            self._verdicts.block_flow(flow, decision.ttl_s, decision.reason)
            self.fingerprint_latency.add(self._clock_s() - conn.ts)
        self.applied.append(decision)
        return decision

    def on_source(self, client: IPAddress, ja4: str | None = None) -> list[Decision]:
        """An address showed itself: at its SYN (ja4 None) or its ClientHello.
        Writes the address verdicts the live JA4 and CIDR decisions in
        _by_source give it, each once per decision; returns them."""
        if not self._by_source:
            return []
        now = self._clock_s()
        made = []
        for target, (expiry, decision) in list(self._by_source.items()):
            if expiry <= now:
                del self._by_source[target]
                self._derived.pop(target, None)
                continue
            if not _covers_source(decision, client, ja4):
                continue
            written = self._derived.setdefault(target, {})
            if written.get(client, -1.0) > now:
                continue
            derived = replace(
                decision,
                target_kind=TargetKind.ADDRESS,
                target=str(client),
                ttl_s=expiry - now,
                reason=f"{decision.reason} (as {target})",
            )
            if self._verdicts is not None:
                _write(self._verdicts, derived)
            written[client] = expiry
            self.applied.append(derived)
            made.append(derived)
        return made

    def _ja4_allowed(self, ja4: str, client: IPAddress, now: float) -> bool:
        return any(
            expiry > now and d.action is Action.ALLOW and _covers_source(d, client, ja4)
            for expiry, d in self._by_source.values()
        )

    def by_source(self) -> dict[str, Decision]:
        """Live decisions written per address as addresses show themselves."""
        now = self._clock_s()
        return {t: d for t, (exp, d) in self._by_source.items() if exp > now}

    def exempt(self, client: IPAddress) -> None:
        """Lets a spared client's hellos pass blocked keys (renewed at half life)."""
        if self._verdicts is None:
            return
        now = self._clock_s()
        if self._exempt.get(client, -1.0) - now > HELLO_EXEMPT_TTL_S / 2:
            return
        self._verdicts.exempt_hello(
            client, HELLO_EXEMPT_TTL_S, "spared from JA4 verdicts by policy"
        )
        self._exempt[client] = now + HELLO_EXEMPT_TTL_S
        for addr, expiry in list(self._exempt.items()):
            if expiry <= now:
                del self._exempt[addr]

    def kernel_hello_keys(self) -> dict[int, str | None]:
        """Live block_hello keys and the JA4 each stands for (None: shared or unknown)."""
        now = self._clock_s()
        return {k: self._key_ja4.get(k) for k, exp in self._kernel_keys.items() if exp > now}

    # ---- hello keys ----

    def _live_decision(
        self, ja4: str, client: IPAddress, now: float
    ) -> tuple[Decision | None, tuple[float, Decision] | None]:
        """The live JA4 decision that covers this client, and the unscoped one
        (expiry, decision) if there is one. Drops expired scopes on the way."""
        scopes = self._ja4_blocks.get(ja4)
        if not scopes:
            return None, None
        source: Decision | None = None
        unscoped: tuple[float, Decision] | None = None
        for scope, (expiry, decision) in list(scopes.items()):
            if now >= expiry:
                del scopes[scope]
            elif scope is None or client in scope:
                source = decision
                if scope is None:
                    unscoped = (expiry, decision)
        if not scopes:
            del self._ja4_blocks[ja4]
        return source, unscoped

    def _correct_key(
        self,
        key: int,
        ja4: str,
        flow: Flow,
        source: Decision | None,
        unscoped: tuple[float, Decision] | None,
        now: float,
    ) -> None:
        """Brings the kernel's copy of this hello's key in line with what its
        JA4 and the other JA4s seen with the key say."""
        blocked = self._key_blocked(key, now)
        if blocked and (source is None or self._key_ja4.get(key) is _SHARED):
            # The kernel dropped a hello it should not have (its key is shared,
            # or was written before a restart for a JA4 no longer blocked):
            # take the key back and let the client's retransmission pass.
            self._unblock_key(key)
            self._unblock_flow(flow)
        elif not blocked and unscoped is not None and self._key_ja4.get(key) == ja4:
            self._block_key(key, ja4, unscoped[0], unscoped[1])

    def _learn_key(self, key: int, ja4: str) -> None:
        if key not in self._key_ja4:
            self._key_ja4[key] = ja4
            if len(self._key_ja4) > HELLO_KEYS_KEPT:
                self._key_ja4.popitem(last=False)
            return
        self._key_ja4.move_to_end(key)
        if self._key_ja4[key] not in (ja4, _SHARED):
            self._key_ja4[key] = _SHARED

    def _key_blocked(self, key: int | None, now: float) -> bool:
        return key is not None and self._kernel_keys.get(key, -1.0) > now

    def _block_key(self, key: int, ja4: str, expiry: float, decision: Decision) -> None:
        if self._verdicts is None:
            return
        ttl = expiry - self._clock_s()
        if ttl <= 0:
            return
        self._verdicts.block_hello(key, ttl, f"JA4 {ja4}: {decision.reason}")
        self._kernel_keys[key] = expiry

    def _unblock_key(self, key: int) -> None:
        self._kernel_keys.pop(key, None)
        if self._verdicts is not None:
            self._verdicts.unblock_hello(key)

    def _unblock_flow(self, flow: Flow) -> None:
        if self._verdicts is not None:
            self._verdicts.unblock_flow(flow)

    def _adopt_kernel_keys(self, verdicts: VerdictMaps) -> None:
        """Keys a previous agent left pinned: kept (the kernel enforces them
        meanwhile) until a hello shows one no longer stands for a blocked JA4."""
        now = self._clock_s()
        for entry in verdicts.list():
            if entry.kind is VerdictKind.BLOCK_HELLO and not entry.expired:
                key = int(entry.target.removeprefix("hello:"), 16)
                self._kernel_keys[key] = now + entry.expires_in_s

    def blocked_ja4s(self) -> dict[str, Decision]:
        """Live JA4 verdicts by their target text."""
        now = self._clock_s()
        return {
            d.target: d
            for scopes in self._ja4_blocks.values()
            for exp, d in scopes.values()
            if exp > now
        }

    def revoke(self, target: str) -> list[IPAddress]:
        """Undoes every verdict on a target at once (feedback: a false positive):
        a JA4 (with its hello keys), a flow, an address or a CIDR, and the
        address verdicts written for it as its addresses showed themselves.
        Returns those addresses: whatever else stands on them goes back in
        through the caller (ControlPlane._unenforce)."""
        cleared = self.revoke_by_source(target)
        if self._verdicts is not None and "->" in target:
            self._verdicts.unblock_flow(_parse_flow(target))
            return cleared
        try:
            ipaddress.ip_network(target, strict=False)
        except ValueError:
            self._revoke_ja4(target)
            return cleared
        if self._verdicts is not None:
            self._verdicts.unblock(target)
        return cleared

    def revoke_by_source(self, target: str) -> list[IPAddress]:
        """Takes back a by-source decision and the address verdicts written for
        it (an allow its allows; a throttle or tarpit every block, throttle and
        tarpit on those addresses: the caller puts back what else stands).
        Returns the addresses."""
        entry = self._by_source.pop(target, None)
        written = self._derived.pop(target, {})
        if entry is None:
            return []
        decision = entry[1]
        for addr in written:
            if self._verdicts is not None:
                if decision.action is Action.ALLOW:
                    self._verdicts.disallow(str(addr))
                else:
                    self._verdicts.unblock(str(addr))
            # What else by-source stood on the address in the maps just
            # cleared (an allow's, or a throttle's and a tarpit's) is written
            # again at the address's next sight.
            for other_target, others in self._derived.items():
                other = self._by_source.get(other_target)
                if other and (other[1].action is Action.ALLOW) == (decision.action is Action.ALLOW):
                    others.pop(addr, None)
        return list(written)

    def _revoke_ja4(self, target: str) -> None:
        ja4, scope = parse_ja4_target(target)
        scopes = self._ja4_blocks.get(ja4)
        if scopes is not None:
            scopes.pop(scope, None)
            if "@" not in target:
                scopes.clear()
            if not scopes:
                del self._ja4_blocks[ja4]
        if None not in self._ja4_blocks.get(ja4, {}):
            for key in [k for k in self._kernel_keys if self._key_ja4.get(k) == ja4]:
                self._unblock_key(key)


Scope = ipaddress.IPv4Network | ipaddress.IPv6Network | None
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ja4_target(target: str) -> tuple[str, Scope]:
    """ "<ja4>" or "<ja4>@<address or CIDR>" -> (ja4, the network it is limited to)."""
    ja4, _, scope = target.partition("@")
    return ja4, ipaddress.ip_network(scope, strict=False) if scope else None


def is_by_source(decision: Decision) -> bool:
    """A decision the kernel holds per address only (see the module's docstring)."""
    if decision.target_kind is TargetKind.JA4:
        return decision.action in (Action.ALLOW, Action.THROTTLE, Action.TARPIT)
    if decision.target_kind is TargetKind.CIDR:
        return decision.action in (Action.THROTTLE, Action.TARPIT)
    return False


def _covers_source(decision: Decision, client: IPAddress, ja4: str | None) -> bool:
    """Whether a by-source decision applies to this address (with this JA4, at
    a hello; a JA4 decision never applies at a SYN, which shows none)."""
    if decision.target_kind is TargetKind.CIDR:
        return client in ipaddress.ip_network(decision.target, strict=False)
    wanted, scope = parse_ja4_target(decision.target)
    return ja4 == wanted and (scope is None or client in scope)


def _write(verdicts: VerdictMaps, d: Decision) -> None:
    reason = f"{d.rule}: {d.reason}"
    if d.action is Action.ALLOW:
        verdicts.allow(d.target, d.ttl_s, reason)
    elif d.action is Action.BLOCK:
        verdicts.block(d.target, d.ttl_s, reason)
    elif d.action is Action.BLOCK_FLOW:
        verdicts.block_flow(_parse_flow(d.target), d.ttl_s, reason)
    elif d.action is Action.TARPIT:
        verdicts.tarpit(d.target, d.ttl_s, reason, syns_to_drop=d.tarpit_syns or 1)
    elif d.action is Action.THROTTLE:
        verdicts.throttle(
            d.target,
            d.ttl_s,
            reason,
            connections_per_s=d.throttle_connections_per_s,
            connection_burst=max(int(d.throttle_connections_per_s * 2), 1),
            packets_per_s=d.throttle_packets_per_s,
            packet_burst=max(int(d.throttle_packets_per_s * 2), 1),
        )


def _parse_flow(text: str) -> Flow:
    """ "src:port->dst:port" (IPv6 in brackets) back to a Flow."""
    left, right = text.split("->")

    def endpoint(part: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        host, _, port = part.rpartition(":")
        return ipaddress.ip_address(host.strip("[]")), int(port)

    src, sport = endpoint(left)
    dst, dport = endpoint(right)
    return Flow(src, sport, dst, dport)
