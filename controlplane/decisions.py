"""The types that cross from scoring to policy to enforcement.

Risk is what the models say of one client or cluster (a score with its reasons
and the versions of the models that produced it); Decision is what the policy
makes of it (an action on a target with a TTL), and what the engine writes to
the kernel through sensor.verdicts and records in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

ClusterKey = tuple[str, str]  # (kind, value): ("addr", "10.0.0.1"), ("ja4", "t13d..."), ...


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason behind a score, in words an operator can act on."""

    code: str  # stable, machine-readable: "ua_tls_mismatch", "journey_improbable"
    text: str  # "User-Agent claims Chrome but the ClientHello is python-requests"
    points: float  # its share of the 0-100 score
    model: str  # which model said it: "consistency", "baseline", "journey", ...


@dataclass(frozen=True, slots=True)
class Risk:
    """A risk score 0-100 for one client address or cluster key."""

    key: ClusterKey
    score: float  # 0 (surely human) .. 100 (surely a bad bot)
    reasons: tuple[Reason, ...]  # strongest first
    model_versions: dict[str, str] = field(default_factory=dict)
    evidence: frozenset[str] = frozenset()  # what was seen: "syn", "tls", "http", "flow", "app"
    ts: float = 0.0

    def top(self, n: int = 3) -> tuple[Reason, ...]:
        return self.reasons[:n]


class Action(StrEnum):
    ALLOW = "allow"  # explicitly allowed: the kernel passes it, whatever else
    MONITOR = "monitor"  # recorded, nothing enforced
    THROTTLE = "throttle"
    TARPIT = "tarpit"
    BLOCK = "block"
    BLOCK_FLOW = "block_flow"  # one connection, or every new connection with a JA4


class TargetKind(StrEnum):
    ADDRESS = "addr"
    CIDR = "cidr"
    JA4 = "ja4"  # enforced as flow blocks on new connections whose ClientHello matches
    FLOW = "flow"  # "src:port->dst:port"


@dataclass(frozen=True, slots=True)
class Decision:
    """An action on one target, with everything the audit trail needs."""

    action: Action
    target_kind: TargetKind
    target: str
    ttl_s: float
    reason: str  # one line, the top reason in words
    rule: str  # the policy rule that fired
    score: float
    model_versions: dict[str, str] = field(default_factory=dict)
    shadow: bool = False  # decided but not enforced (shadow mode)
    throttle_connections_per_s: float = 0.0
    throttle_packets_per_s: float = 0.0
    tarpit_syns: int = 0
    ts: float = 0.0  # when it was decided (the sensor's clock, seconds)
