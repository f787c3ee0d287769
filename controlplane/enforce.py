"""Enforcer: turns policy decisions into kernel verdicts, and measures how fast.

Address, CIDR and flow decisions go straight to sensor.verdicts. A JA4
decision cannot be a kernel map entry (the kernel never computes a JA4), so it
is held here and applied as a flow block to every new connection whose
ClientHello matches, as soon as the hello is seen: for a client that waits for
the server's reply, that is before its handshake completes.

Without VerdictMaps (a replay, a dry run) decisions are only recorded.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.observations import Connection, ConnectionStage
from sensor.events import Flow
from sensor.verdicts import VerdictMaps

# A flow block only has to outlive one connection.
JA4_FLOW_BLOCK_TTL_S = 120.0


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
        if decision.target_kind is TargetKind.JA4:
            ja4, scope = parse_ja4_target(decision.target)
            expiry = self._clock_s() + decision.ttl_s
            self._ja4_blocks.setdefault(ja4, {})[scope] = (expiry, decision)
            return
        if self._verdicts is not None:
            _write(self._verdicts, decision)
            if event_ts is not None:
                self.behaviour_latency.add(self._clock_s() - event_ts)

    def on_connection(self, conn: Connection) -> Decision | None:
        """A new ClientHello: block its flow at once if its JA4 is on the list."""
        ja4 = conn.fingerprint.ja4
        if conn.stage is not ConnectionStage.HELLO or ja4 is None or conn.server is None:
            return None
        scopes = self._ja4_blocks.get(ja4)
        if not scopes:
            return None
        now = self._clock_s()
        source: Decision | None = None
        for scope, (expiry, decision) in list(scopes.items()):
            if now >= expiry:
                del scopes[scope]
            elif scope is None or conn.client in scope:
                source = decision
        if not scopes:
            del self._ja4_blocks[ja4]
        if source is None:
            return None
        flow = Flow(conn.client, conn.client_port, conn.server, conn.server_port)
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

    def blocked_ja4s(self) -> dict[str, Decision]:
        """Live JA4 verdicts by their target text."""
        now = self._clock_s()
        return {
            d.target: d
            for scopes in self._ja4_blocks.values()
            for exp, d in scopes.values()
            if exp > now
        }

    def revoke(self, target: str) -> None:
        """Undoes every verdict on a target at once (feedback: a false positive)."""
        ja4, scope = parse_ja4_target(target)
        scopes = self._ja4_blocks.get(ja4)
        if scopes is not None:
            scopes.pop(scope, None)
            if "@" not in target:
                scopes.clear()
            if not scopes:
                del self._ja4_blocks[ja4]
        if self._verdicts is None:
            return
        if "->" in target:
            self._verdicts.unblock_flow(_parse_flow(target))
        else:
            self._verdicts.unblock(target)


Scope = ipaddress.IPv4Network | ipaddress.IPv6Network | None


def parse_ja4_target(target: str) -> tuple[str, Scope]:
    """ "<ja4>" or "<ja4>@<address or CIDR>" -> (ja4, the network it is limited to)."""
    ja4, _, scope = target.partition("@")
    return ja4, ipaddress.ip_network(scope, strict=False) if scope else None


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
