"""The engine: the loop from sensor events to kernel verdicts.

    events -> Observer -> observations -> FeatureStore
                                 \\-> Enforcer.on_connection (JA4 verdicts, at the hello)
    every score_every_s of event time:
        dirty cluster keys -> RiskScorer.score_cluster -> campaign risks
        dirty clients      -> RiskScorer.score_clients -> Risk
        risks              -> PolicyEngine.decide      -> Decisions -> Enforcer

Scoring is batched per tick, not per event: the vector models score a batch
in the time they take for one row, and one tick of a loud bot is a few of its
requests. A client is rescored when it has sent RESCORE_AFTER_REQUESTS more
requests or rescore_every_s has passed, so scoring costs follow what clients
do, not how many events they cause. Time is the events' own (the sensor's
monotonic clock), so a replay decides exactly as the live run did.

A learning period (learning_s of event time, from the first client seen:
an agent started on a quiet host learns nothing from the quiet) collects
this host's own traffic; at its end the baseline anomaly and journey models (those named in
`learn`) are fitted on it and start to speak. Until then only the rules that
need no traffic (consistency, campaigns with default thresholds) do. The
baseline's 10-minute windows need a learning period longer than that to see
steady-state clients; the journey model only needs sessions.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from controlplane.decisions import Action, ClusterKey, Decision, Risk, TargetKind
from controlplane.enforce import Enforcer
from controlplane.features import FEATURE_NAMES, MIX_WINDOW_S, FeatureStore
from controlplane.models.baseline import RESERVOIR_SIZE, BaselineAnomaly, endpoint_group
from controlplane.models.journey import JourneyModel, step
from controlplane.observations import (
    Connection,
    ConnectionStage,
    EndpointClass,
    Observation,
    Observer,
    Request,
)
from controlplane.policy import DecisionContext, PolicyEngine
from controlplane.scoring import ClientView, RiskScorer
from sensor.events import Event
from sensor.sources import EventSource

# Cluster kinds scored for campaigns. Prefix keys alone are too broad (a
# campus /24), so they count only combined with a fingerprint.
CAMPAIGN_KINDS = ("ja4", "tcp", "http", "ja4+prefix", "ja4+tcp")
# A client is scored at its first requests, then again once rescore_every_s
# has passed or it has sent this many more requests, whichever comes first:
# a loud client is judged every tick, a quiet one rarely.
RESCORE_AFTER_REQUESTS = 5
log = logging.getLogger("botwall.engine")
LOW_RISK = 10.0
LOW_RISK_RESCORE_S = 30.0
LOW_RISK_RESCORE_REQUESTS = 20
# What has been idle this long is forgotten (risks, cadence, feature state).
PRUNE_AFTER_S = 1200.0
PRUNE_EVERY_S = 60.0
# A client that is new or looked risky is scored this soon after its request,
# not at the next regular tick: a loud bot makes dozens of requests in one
# score_every_s, and each one it gets through is one too many.
URGENT_TICK_S = 0.01
# A session's first requests are scored one by one: a catalog walk or a login
# run shows in four or five requests, and a clear score at the first says
# nothing about the fifth.
YOUNG_STEPS = 8
# A score below this decides nothing: spare the policy the call.
MIN_SCORE_TO_DECIDE = 25.0
# A session is one address's requests with no pause longer than SESSION_GAP_S;
# the journey model judges its first STEPS_KEPT steps, where a client shows
# what it came for. Learning and scoring cut sessions the same way. People
# pause for minutes (reading, typing an address): at 30 s, a checkout after
# such a pause began a session of its own, "checkout without a cart", and 8
# of 300 synthetic shoppers got a verdict for it within 2 minutes.
SESSION_GAP_S = 300.0
STEPS_KEPT = 32
FLOWS_KEPT = 8  # a client's latest connections, to cut them under a tarpit
# Too few sessions teach the journey model nothing it can be trusted with.
MIN_JOURNEY_SESSIONS = 10
MIN_BASELINE_VECTORS = 200
# Features that grow with a client's age whatever it does: against a baseline
# learned in a bounded period, every client would drift away from it.
NOT_BASELINE = frozenset({"age_s"})
# A cut connection's 5-tuple is not reused for a while: a short block is enough.
CUT_FLOW_TTL_S = 120.0
# The learning period samples each client active in the last LEARN_ACTIVE_S
# once every LEARN_SAMPLE_EVERY_S of event time (see _Learning).
LEARN_SAMPLE_EVERY_S = 5.0
LEARN_ACTIVE_S = 60.0
# The baseline's 10-minute windows fill from the agent's start: in a shorter
# period every client looks new and slow, and once the windows fill every
# steady client looks anomalous (measured on the synthetic stream: a 650 s
# period put a verdict on 113 of 300 humans in the next 10 minutes, a 1,300 s
# one on none for the baseline's reasons).
BASELINE_MIN_LEARNING_S = 2 * MIX_WINDOW_S


@dataclass(slots=True)
class _Profile:
    """The latest of one client address, for its ClientView and its context.
    Slotted and plain-typed: there is one per tracked client."""

    user_agent: str | None = None
    ja4: str | None = None
    tcp: str | None = None
    endpoint_class: EndpointClass = EndpointClass.OTHER
    classes: dict[EndpointClass, int] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)  # this session's, at most STEPS_KEPT
    paths: list[str] = field(default_factory=list)
    last_request_ts: float = -math.inf
    flows: list[str] = field(default_factory=list)  # the latest FLOWS_KEPT
    fingerprints: set[tuple[str | None, str | None]] = field(default_factory=set)
    last_ts: float = 0.0
    last_scored: float = -math.inf
    last_score: float = 100.0  # unscored: as urgent as the riskiest
    requests_since_scored: int = 0
    due_at: float | None = None  # its live entry in Engine._due_at
    spared: bool = False  # by policy from JA4 verdicts, as of its latest User-Agent


@dataclass
class EngineStats:
    events: int = 0
    observations: int = 0
    ticks: int = 0
    clients_scored: int = 0
    clusters_scored: int = 0
    decisions: int = 0
    busy_s: float = 0.0  # wall time spent in process() and tick()

    @property
    def events_per_s(self) -> float:
        return self.events / self.busy_s if self.busy_s else math.nan


@dataclass
class _Learning:
    """The learning period's sample: every client active in the last
    LEARN_ACTIVE_S, every LEARN_SAMPLE_EVERY_S of event time, kept as a uniform
    reservoir of at most max_vectors. Uniform over the whole period: a busy
    host offers far more than max_vectors, and keeping the first ones would
    teach the baseline what clients look like at their first request."""

    until: float | None  # event time the period ends; None: not started
    duration_s: float
    vectors: list[np.ndarray] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    sessions: list[list[str]] = field(default_factory=list)
    # The baseline keeps no more than its own reservoir's worth of them.
    max_vectors: int = RESERVOIR_SIZE
    offered: int = 0  # vectors offered to the reservoir so far
    next_sample: float = -math.inf
    # Seeded: a replay learns exactly what the live run learned.
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def slot(self) -> int | None:
        """Where the next vector offered goes, or None where it is not kept:
        drawn before the vector is computed, as most offers are not kept."""
        self.offered += 1
        if len(self.vectors) < self.max_vectors:
            return len(self.vectors)
        slot = self.rng.randrange(self.offered)
        return slot if slot < self.max_vectors else None

    def keep(self, slot: int, vector: np.ndarray, group: str) -> None:
        if slot == len(self.vectors):
            self.vectors.append(vector)
            self.groups.append(group)
        else:
            self.vectors[slot] = vector
            self.groups[slot] = group

    def offer(self, vector: np.ndarray, group: str) -> None:
        slot = self.slot()
        if slot is not None:
            self.keep(slot, vector, group)


class Engine:
    def __init__(
        self,
        *,
        scorer: RiskScorer,
        policy: PolicyEngine,
        enforcer: Enforcer,
        features: FeatureStore | None = None,
        observer: Observer | None = None,
        score_every_s: float = 0.5,
        rescore_every_s: float = 2.0,
        learning_s: float = 0.0,
        learn: tuple[str, ...] = ("baseline", "journey"),
        max_profiles: int = 200_000,
        on_decisions: Callable[[list[Decision], Risk], None] | None = None,
        on_scored: Callable[[list[tuple[Risk, Mapping[str, float]]]], None] | None = None,
        on_learned: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.scorer = scorer
        self.policy = policy
        self.enforcer = enforcer
        self.features = features or FeatureStore()
        self.observer = observer or Observer()
        self.score_every_s = score_every_s
        self.rescore_every_s = rescore_every_s
        self._cluster_scored: dict[ClusterKey, float] = {}
        self._next_prune = -math.inf
        self._features_cache: dict[ClusterKey, dict[str, float]] = {}
        self._features_at = math.nan
        self.stats = EngineStats()
        # The latest risk per cluster, and per client scoring LOW_RISK or more
        # (a lower score is in the client's profile, without its reasons).
        self.risks: dict[ClusterKey, Risk] = {}
        # Called with each risk's new decisions before they are enforced.
        self._on_decisions = on_decisions
        # Every tick's client risks with the features they were scored on
        # (continuous learning, drift), and the learning period's vectors.
        self._on_scored = on_scored
        self._on_learned = on_learned
        self._profiles: OrderedDict[str, _Profile] = OrderedDict()
        self._max_profiles = max_profiles
        # Clients with something new since they were last scored. Those due
        # by their request count are in _due_now; every one of them has an
        # entry in _due_at, a heap of (time it is due by its cadence, address),
        # so a tick looks at the clients that are due, not at every client
        # that is active but waiting.
        self._dirty_clients: set[str] = set()
        self._due_now: dict[str, None] = {}
        self._due_at: list[tuple[float, str]] = []
        self._dirty_clusters: set[ClusterKey] = set()
        self._cluster_risks: dict[ClusterKey, Risk] = {}
        self._active: dict[tuple[str, Action], float] = {}  # (target, action) -> until
        self._next_tick: float | None = None
        self._urgent = False  # a client due for scoring at once (URGENT_TICK_S)
        self._last_tick = -math.inf
        self._now = 0.0
        self._learning = _Learning(None, learning_s) if learning_s > 0 else None
        self._learn_models = frozenset(learn)
        if 0 < learning_s < BASELINE_MIN_LEARNING_S and "baseline" in self._learn_models:
            log.warning(
                "a learning period of %.0f s is too short for the baseline model (it needs "
                "%.0f s: its 10-minute windows must fill first); it will not be fitted",
                learning_s, BASELINE_MIN_LEARNING_S,
            )  # fmt: skip
            self._learn_models -= {"baseline"}

    # ---- input ----

    def process(self, event: Event) -> list[Decision]:
        """One sensor event; returns the decisions it (or a tick it closed) made."""
        started = time.perf_counter()
        self.stats.events += 1
        self._now = event.ts_ns / 1e9
        decisions: list[Decision] = []
        for obs in self.observer.feed(event):
            self.stats.observations += 1
            self._observe(obs, decisions)
        if self._next_tick is None:
            self._next_tick = self._now + self.score_every_s
        elif self._now >= self._next_tick or (
            self._urgent and self._now - self._last_tick >= URGENT_TICK_S
        ):
            decisions.extend(self._tick_inner(self._now))
        self.stats.busy_s += time.perf_counter() - started
        return decisions

    def app_event(self, client: str, port: int, kind: str, ts: float | None = None) -> None:
        """An application's word about a client: login_success, login_failure,
        otp_sent, add_to_cart, checkout. Raises ValueError for an unknown kind."""
        import ipaddress

        addr = ipaddress.ip_address(client)
        self.features.observe_app_event(addr, port, kind, ts if ts is not None else self._now)
        profile = self._profiles.get(str(addr))
        if profile is not None:  # else it is scored from its first request on
            self._mark_dirty(str(addr), profile)

    def run(self, source: EventSource, *, stop: Callable[[], bool] | None = None) -> None:
        """Consumes a source until it ends (a capture) or stop() says so (live)."""
        for event in source.events():
            self.process(event)
            if stop is not None and stop():
                break
        self.tick(self._now)

    def run_live(self, source: Any, stop: Callable[[], bool], poll_ms: int = 100) -> None:
        """Polls a live source (BccSensor) until stop() says so. While events
        pause, ticks go on in kernel time (CLOCK_MONOTONIC, the clock event
        timestamps are in), so a client that went quiet is still decided on."""
        while not stop():
            events = source.poll(poll_ms)
            for event in events:
                self.process(event)
            if self._urgent:
                self.tick()
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            if not events and (self._next_tick is None or now >= self._next_tick):
                self._now = now
                self.tick(now)

    @property
    def urgent(self) -> bool:
        """A client is due for scoring at once (new, or risky last time)."""
        return self._urgent

    def tick(self, now: float | None = None) -> list[Decision]:
        """Scores what changed and applies the policy; process() calls it as
        event time passes, a live loop may call it when events pause."""
        started = time.perf_counter()
        out = self._tick_inner(self._now if now is None else now)
        self.stats.busy_s += time.perf_counter() - started
        return out

    # ---- observations ----

    def _observe(self, obs: Observation, decisions: list[Decision]) -> None:
        keys = self.features.observe(obs)
        addr = keys[0][1]  # the address's own key comes first: str() of an address is slow
        profile = self._profile(addr)
        profile.last_ts = obs.ts
        fp = obs.fingerprint
        if fp.ja4:
            profile.ja4 = fp.ja4
        if fp.tcp_signature:
            profile.tcp = fp.tcp_signature
        if isinstance(obs, Connection):
            if obs.stage in (ConnectionStage.SYN, ConnectionStage.HELLO):
                # JA4 and CIDR decisions the kernel holds per address
                self.enforcer.on_source(obs.client, fp.ja4)
            if obs.stage is ConnectionStage.HELLO:
                spared = self.policy.spared_from_ja4_verdicts(addr, profile.user_agent)
                made = self.enforcer.on_connection(obs, spared=spared)
                if made is not None:
                    decisions.append(made)
                    self.stats.decisions += 1
            if obs.server is not None:
                client, server = (
                    _hostport(addr, obs.client_port),
                    _hostport(str(obs.server), obs.server_port),
                )
                profile.flows.append(f"{client}->{server}")
                del profile.flows[:-FLOWS_KEPT]
            if obs.stage is ConnectionStage.SYN:
                return  # a SYN alone says little; its client is scored on more
        if isinstance(obs, Request):
            if obs.user_agent and obs.user_agent != profile.user_agent:
                profile.spared = self.policy.spared_from_ja4_verdicts(addr, obs.user_agent)
            if profile.spared:  # before its next hello meets a blocked key in the kernel
                self.enforcer.exempt(obs.client)
            profile.user_agent = obs.user_agent or profile.user_agent
            profile.endpoint_class = obs.endpoint_class
            profile.classes[obs.endpoint_class] = profile.classes.get(obs.endpoint_class, 0) + 1
            if obs.ts - profile.last_request_ts > SESSION_GAP_S:
                self._end_session(addr, profile)
            profile.last_request_ts = obs.ts
            if len(profile.steps) < STEPS_KEPT:
                profile.steps.append(step(obs.method, obs.route))
                profile.paths.append(obs.path)
            profile.fingerprints.add((fp.ja4, obs.http_fingerprint))
            profile.requests_since_scored += 1
            # Due by its request count: scored at the next urgent tick, not at
            # the regular one, which a flood outruns by hundreds of requests.
            _, due_after = self._cadence(profile.last_score, len(profile.steps))
            if profile.requests_since_scored >= due_after:
                self._due_now[addr] = None
                self._urgent = True
        self._mark_dirty(addr, profile)
        for key in keys:
            if key[0] in CAMPAIGN_KINDS:
                self._dirty_clusters.add(key)

    def _mark_dirty(self, addr: str, profile: _Profile) -> None:
        self._dirty_clients.add(addr)
        if profile.due_at is None:
            every_s, _ = self._cadence(profile.last_score, len(profile.steps))
            profile.due_at = profile.last_scored + every_s
            heapq.heappush(self._due_at, (profile.due_at, addr))

    def _end_session(self, addr: str, profile: _Profile) -> None:
        if self._learning is not None and len(profile.steps) >= 2:
            self._learning.sessions.append(list(profile.steps))
        profile.steps = []
        profile.paths = []

    def clients(self) -> list[str]:
        """The addresses the engine tracks, least recently seen first."""
        return list(self._profiles)

    def fingerprints(self, addr: str) -> dict[str, str | None] | None:
        """The latest JA4, TCP signature and User-Agent seen from an address."""
        profile = self._profiles.get(addr)
        if profile is None:
            return None
        return {"ja4": profile.ja4, "tcp": profile.tcp, "user_agent": profile.user_agent}

    def _profile(self, addr: str) -> _Profile:
        profile = self._profiles.get(addr)
        if profile is None:
            profile = _Profile()
            self._profiles[addr] = profile
            if len(self._profiles) > self._max_profiles:
                self._profiles.popitem(last=False)
        else:
            self._profiles.move_to_end(addr)
        return profile

    # ---- scoring ----

    def _tick_inner(self, now: float) -> list[Decision]:
        self._next_tick = now + self.score_every_s
        self._urgent = False
        self._last_tick = now
        self.stats.ticks += 1
        self._learn(now)
        if now >= self._next_prune:
            self._prune(now)
            self._next_prune = now + PRUNE_EVERY_S
        decisions: list[Decision] = []

        clusters, waiting_keys = [], set()
        for key in self._dirty_clusters:
            if now - self._cluster_scored.get(key, -math.inf) >= self.rescore_every_s:
                clusters.append(key)
                self._cluster_scored[key] = now
            else:
                waiting_keys.add(key)
        self._dirty_clusters = waiting_keys
        for key in clusters:
            risk = self.scorer.score_cluster(
                key, campaign_inputs(self._features_now(key, now), key), ts=now
            )
            self.stats.clusters_scored += 1
            self._cluster_risks[key] = risk
            self.risks[key] = risk
            if risk.score >= MIN_SCORE_TO_DECIDE:
                shares = self.features.member_features
                members = tuple(
                    m
                    for m in sorted(self.features.members(key))
                    if takes_part(partial(shares, ("addr", m), now), key, risk)
                )
                ctx = DecisionContext(
                    members=members,
                    member_fingerprints={m: self._fingerprint_count(m) for m in members},
                    ja4=key[1].split("|")[0] if key[0].startswith("ja4") else None,
                    now=now,
                )
                decisions.extend(self._decide(risk, ctx))

        views = [self._view(addr, now) for addr in self._due_clients(now)]
        if views:
            risks = self.scorer.score_clients(views, self._cluster_risks)
            if self._on_scored is not None:
                features = (view.features for view in views)
                self._on_scored(list(zip(risks, features, strict=True)))
            for risk in risks:
                self.stats.clients_scored += 1
                self._profiles[risk.key[1]].last_score = risk.score
                # The full Risk (reasons, versions) only where it says something:
                # most clients are plainly human, and one Risk each would cost
                # more memory than everything else kept about them.
                if risk.score >= LOW_RISK:
                    self.risks[risk.key] = risk
                else:
                    self.risks.pop(risk.key, None)
                if risk.score >= MIN_SCORE_TO_DECIDE:
                    decisions.extend(self._decide(risk, self._context(risk.key[1], now)))
        return decisions

    def _due_clients(self, now: float) -> list[str]:
        """The dirty clients due for scoring, by request count or by time,
        marked as scored now."""
        profiles, dirty = self._profiles, self._dirty_clients
        due = {addr: None for addr in self._due_now if addr in dirty}
        self._due_now.clear()
        later = []
        # An entry's time is a hint (a client's cadence changes with its
        # session): the cadence itself decides, as it does for request counts.
        while self._due_at and self._due_at[0][0] <= now:
            at, addr = heapq.heappop(self._due_at)
            profile = profiles.get(addr)
            if profile is None:  # forgotten
                dirty.discard(addr)
                continue
            if profile.due_at != at:
                continue  # scored since, and queued again if it did something new
            profile.due_at = None
            if addr not in dirty:
                continue
            every_s, _ = self._cadence(profile.last_score, len(profile.steps))
            if now - profile.last_scored >= every_s:
                due[addr] = None
            else:
                profile.due_at = profile.last_scored + every_s
                later.append((profile.due_at, addr))
        for entry in later:
            heapq.heappush(self._due_at, entry)
        scored = []
        for addr in due:
            dirty.discard(addr)
            profile = profiles.get(addr)
            if profile is not None:
                profile.last_scored = now
                profile.requests_since_scored = 0
                profile.due_at = None  # its entry, if any, is stale
                scored.append(addr)
        return scored

    def _features_now(self, key: ClusterKey, now: float) -> dict[str, float]:
        """A key's features, computed once per tick: a member of several
        campaigns, or a client that is also a member, is asked for repeatedly."""
        if self._features_at != now:
            self._features_cache.clear()
            self._features_at = now
        found = self._features_cache.get(key)
        if found is None:
            found = self._features_cache[key] = self.features.features(key, now)
        return found

    def _cadence(self, last_score: float, session_steps: int) -> tuple[float, int]:
        """(seconds, requests) until a client is scored again, by how risky it
        looked last time: a clear human is looked at again after 20 more
        requests or 30 s, an uncertain one on the short cadence, a risky one
        (or one never scored, or in its first YOUNG_STEPS of a session, where
        a loud bot shows itself) at every tick it is active."""
        if last_score >= MIN_SCORE_TO_DECIDE + 15 or session_steps < YOUNG_STEPS:
            return 0.0, 1
        if last_score >= LOW_RISK:
            return self.rescore_every_s, RESCORE_AFTER_REQUESTS
        return LOW_RISK_RESCORE_S, LOW_RISK_RESCORE_REQUESTS

    def _prune(self, now: float) -> None:
        """Bounded memory: forget what belongs to clients and keys gone idle."""
        self._active = {k: until for k, until in self._active.items() if until > now}
        horizon = now - PRUNE_AFTER_S
        for table in (self.risks, self._cluster_risks, self._cluster_scored):
            stale = [k for k in table if (self.features.last_seen(k) or -math.inf) < horizon]
            for key in stale:
                del table[key]
        self.features.evict_idle(now, PRUNE_AFTER_S)

    def _view(self, addr: str, now: float) -> ClientView:
        profile = self._profiles[addr]
        key: ClusterKey = ("addr", addr)
        features = self._features_now(key, now)
        return ClientView(
            key=key,
            features=features,
            address=addr,
            user_agent=profile.user_agent,
            # requests seen (profile.classes counts them) and none named its sender
            anonymous=bool(profile.classes) and not profile.user_agent,
            ja4=profile.ja4,
            tcp=profile.tcp,
            steps=tuple(profile.steps),
            paths=tuple(profile.paths),
            group=endpoint_group(profile.classes),
            clusters=tuple(
                k
                for k in self._cluster_keys(profile, addr)
                if takes_part(lambda: features, k, self._cluster_risks[k])
            ),
            ts=now,
        )

    def _cluster_keys(self, profile: _Profile, addr: str) -> Iterable[ClusterKey]:
        for key in self._cluster_risks:
            if (profile.ja4 and profile.ja4 in key[1]) or (profile.tcp and profile.tcp == key[1]):
                yield key

    def _context(self, addr: str, now: float) -> DecisionContext:
        profile = self._profiles.get(addr, _Profile())
        return DecisionContext(
            client=addr,
            endpoint_class=profile.endpoint_class,
            user_agent=profile.user_agent,
            fingerprints_at_address=max(len(profile.fingerprints), 1),
            ja4=profile.ja4,
            flows=tuple(profile.flows),
            now=now,
        )

    def _fingerprint_count(self, addr: str) -> int:
        profile = self._profiles.get(addr)
        return max(len(profile.fingerprints), 1) if profile else 1

    def _decide(self, risk: Risk, ctx: DecisionContext) -> list[Decision]:
        made: list[Decision] = []
        for decided in self._with_cuts(self.policy.decide(risk, ctx), ctx):
            decision = replace(decided, ts=risk.ts)
            key = (decision.target, decision.action)
            # Re-deciding a live verdict every tick would rewrite the same map
            # entry; renew only once it is past half its life.
            until = self._active.get(key)
            if until is not None and ctx.now is not None and ctx.now < until:
                continue
            if ctx.now is not None:
                self._active[key] = ctx.now + decision.ttl_s / 2
            made.append(decision)
        if not made:
            return made
        # The callback (the agent's store) first: a verdict reaches the kernel
        # only once its record exists. All of one risk's decisions (a tarpit
        # and its cuts, a campaign's members) go in one call: one transaction,
        # one fsync, where one each kept a flood's cuts 20 ms behind its tarpit.
        if self._on_decisions is not None:
            self._on_decisions(made, risk)
        for decision in made:
            self.enforcer.apply(decision, event_ts=risk.ts)
        self.stats.decisions += len(made)
        return made

    @staticmethod
    def _with_cuts(decisions: list[Decision], ctx: DecisionContext) -> list[Decision]:
        """A tarpit delays new connections only: a client on a keep-alive
        connection would never feel it. Its open flows are cut too, so its
        next request needs a new connection, and that one pays."""
        out = list(decisions)
        for d in decisions:
            if d.action is Action.TARPIT and d.target_kind is TargetKind.ADDRESS and not d.shadow:
                out.extend(
                    Decision(
                        action=Action.BLOCK_FLOW,
                        target_kind=TargetKind.FLOW,
                        target=flow,
                        ttl_s=min(d.ttl_s, CUT_FLOW_TTL_S),
                        reason=f"connection cut so the tarpit applies: {d.reason}",
                        rule=f"{d.rule}/cut",
                        score=d.score,
                        model_versions=d.model_versions,
                    )
                    for flow in ctx.flows
                    if flow.startswith(f"{_host(d.target)}:")
                )
        return out

    # ---- learning ----

    def learning_state(self) -> dict[str, Any]:
        """ "waiting" for the first client, "learning" until its end, or "done"."""
        learning = self._learning
        if learning is None:
            return {"state": "done"}
        if learning.until is None:
            return {"state": "waiting", "duration_s": learning.duration_s}
        return {
            "state": "learning",
            "left_s": max(0.0, learning.until - self._now),
            "sessions": len(learning.sessions),
            "vectors": len(learning.vectors),
        }

    def _learn(self, now: float) -> None:
        learning = self._learning
        if learning is None:
            return
        if learning.until is None:
            if not self._profiles:
                return  # the period starts with the first client, not with the agent
            learning.until = now + learning.duration_s
        if now < learning.until:
            if now < learning.next_sample:
                return
            learning.next_sample = now + LEARN_SAMPLE_EVERY_S
            # Every client active lately, at a steady cadence: a client's
            # behaviour as it unfolds, its pauses included, not only at the
            # moments it changed. Profiles are kept least recently seen first.
            for addr in reversed(self._profiles):
                profile = self._profiles[addr]
                if now - profile.last_ts > LEARN_ACTIVE_S:
                    break
                slot = learning.slot()
                if slot is not None:
                    vector = self.features.vector(("addr", addr), now)
                    learning.keep(slot, vector, endpoint_group(profile.classes))
            return
        # Sessions still open count as they are so far.
        open_sessions = [list(p.steps) for p in self._profiles.values() if len(p.steps) >= 2]
        self._learning = None
        self.fit_baseline(learning.vectors, learning.groups, learning.sessions + open_sessions)
        if self._on_learned is not None and learning.vectors:
            self._on_learned(np.stack(learning.vectors))

    def fit_baseline(
        self, vectors: list[np.ndarray], groups: list[str], sessions: list[list[str]]
    ) -> None:
        """Fits the unsupervised models on this host's traffic and lets them speak."""
        if "baseline" in self._learn_models and len(vectors) >= MIN_BASELINE_VECTORS:
            columns = [i for i, name in enumerate(FEATURE_NAMES) if name not in NOT_BASELINE]
            baseline = BaselineAnomaly(random_state=0)
            baseline.fit(
                np.stack(vectors)[:, columns],
                feature_names=[FEATURE_NAMES[i] for i in columns],
                groups=groups,
            )
            self.scorer.baseline = baseline
        usable = [s for s in sessions if len(s) >= 2]
        if "journey" in self._learn_models and len(usable) >= MIN_JOURNEY_SESSIONS:
            self.scorer.journey = JourneyModel().fit(usable)
        log.info(
            "learning done on %d vectors and %d sessions; models speaking: %s",
            len(vectors), len(usable),
            ", ".join(name for name, on in self.scorer.trained().items() if on) or "none",
        )  # fmt: skip


# Keys many ordinary clients share: being one of their members proves nothing.
BROAD_KINDS = frozenset({"tcp", "prefix"})


def takes_part(member: Callable[[], Mapping[str, float]], key: ClusterKey, campaign: Risk) -> bool:
    """Whether one address's own behaviour is part of a cluster's campaign.

    A campaign is seen on a key many addresses share, and innocent clients may
    share it too: every Linux client has Linux's TCP signature, a browser's
    JA4 is the same for all its users. A member inherits the campaign's risk,
    and its verdict, only if it does what the campaign does.

    member: the address's features (features.MEMBER_FEATURES at least),
    asked for only where the campaign's kind needs them."""
    code = campaign.reasons[0].code if campaign.reasons else ""
    if code == "credential_stuffing":
        features = member()
        failing = max(
            features.get("login_failure_share", 0.0), features.get("login_error_share", 0.0)
        )
        return features.get("login_share", 0.0) >= 0.3 and failing >= 0.5
    if code == "sensitive_flood":
        return member().get("sensitive_share", 0.0) >= 0.8
    # The key itself is the signal (a rare or lying fingerprint): sharing it
    # counts, unless the key is one that ordinary clients share.
    return key[0] not in BROAD_KINDS


def campaign_inputs(features: Mapping[str, float], key: ClusterKey) -> dict[str, float]:
    """The campaign model's inputs, from a cluster key's FeatureStore features."""
    requests = features.get("req_rate_600s", 0.0) * 600.0
    logins = requests * features.get("login_share", 0.0)
    # The application's own word on failures wins; else 401/403 on /login.
    failures = max(features.get("login_failure_share", 0.0), features.get("login_error_share", 0.0))
    sync = max(features.get("addr_sync", 0.0), 0.0)
    rarity_by_kind = {
        "ja4": "ja4_rarity",
        "tcp": "tcp_rarity",
        "http": "http_rarity",
        "ja4+prefix": "ja4_rarity",
        "ja4+tcp": "ja4_rarity",
    }
    return {
        "distinct_addrs": features.get("distinct_addrs", 0.0),
        "requests_600s": requests,
        "login_attempts_600s": logins,
        "login_failure_share": failures,
        "sensitive_share_600s": features.get("sensitive_share", 0.0),
        # Fano factor - 1 is 0 for independent clients, n-1 for n in lockstep:
        # squash it to 0..1.
        "synchrony": sync / (1.0 + sync),
        # The store's rarity is -ln(share) in nats; the model reads 0..1,
        # and 1 - e^-rarity is about 1 - share.
        "fingerprint_rarity": 1.0
        - math.exp(-features.get(rarity_by_kind.get(key[0], "ja4_rarity"), 0.0)),
        "new_addr_share": features.get("new_addr_share", 0.0),
    }


def _host(host: str) -> str:
    """An address as it stands in a "host:port" flow text: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def _hostport(host: str, port: int) -> str:
    return f"{_host(host)}:{port}"


def stats_dict(engine: Engine) -> dict[str, Any]:
    """Counters and latencies, for the admin API and benchmarks."""
    s = engine.stats
    fp, bh = engine.enforcer.fingerprint_latency, engine.enforcer.behaviour_latency
    return {
        "events": s.events,
        "observations": s.observations,
        "ticks": s.ticks,
        "clients_scored": s.clients_scored,
        "clusters_scored": s.clusters_scored,
        "decisions": s.decisions,
        "events_per_s": s.events_per_s,
        "fingerprint_latency_p50_s": fp.percentile(50),
        "fingerprint_latency_p99_s": fp.percentile(99),
        "behaviour_latency_p50_s": bh.percentile(50),
        "behaviour_latency_p99_s": bh.percentile(99),
        "observer": dict(engine.observer.stats),
        # Which models speak, and whether the learning period is still on:
        # what an operator checks first when a bot goes unflagged.
        "models": engine.scorer.trained(),
        "learning": engine.learning_state(),
    }
