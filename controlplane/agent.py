"""`botwall run`: the sensor, the engine, the store and the admin API in one process.

    ControlPlane   store + engine + enforcer + policy + learning: everything the
                   admin API talks to, and nothing that needs the kernel (the
                   API tests build one with Enforcer(None)).
    Agent          a ControlPlane over a live Sensor: attaches XDP, reconciles
                   the pinned verdict maps with the store, runs the engine loop
                   in the main thread and the admin API (uvicorn) in another.

Order of writes: the store first, then the kernel. A verdict in the kernel
without its record would be one nobody can account for or revoke; a record
whose kernel write failed is put right by the next reconcile (at start).

Threads: the engine loop owns the Engine; API handlers run in uvicorn's
threadpool. One lock (`ControlPlane.lock`) serialises every use of the
Engine and the Enforcer, which are not thread-safe. The Store has its own lock.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.decisions import Action, Decision, Risk, TargetKind
from controlplane.enforce import Enforcer, is_by_source
from controlplane.engine import Engine, stats_dict
from controlplane.features import FEATURE_NAMES
from controlplane.learning import (
    KIND as SUPERVISED_KIND,
)
from controlplane.learning import (
    STATUS_SHADOW,
    DriftMonitor,
    LearningLoop,
    Retrainer,
    TrainingSet,
    confident_label,
)
from controlplane.models import row_from
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.policy import Policy, PolicyEngine
from controlplane.scoring import RiskScorer
from controlplane.settings import Settings, load_settings
from controlplane.store import (
    DB_NAME,
    DecisionRecord,
    ModelNotFound,
    ModelRecord,
    Store,
    canonical_target,
    kernel_key,
    reconcile,
)
from sensor.abi import VerdictKind
from sensor.errors import BotwallError, PolicyError
from sensor.verdicts import VerdictMaps

log = logging.getLogger("botwall.agent")

TOKEN_FILE = "admin.token"
# A client an operator says is human is allowed this long: long enough for the
# models to learn the label (or the operator to look), short enough that a
# mistaken label does not open the door for good.
FEEDBACK_ALLOW_TTL_S = 900.0
MANUAL_RULE = "manual"
EXPIRE_EVERY_S = 10.0
# See freeze_long_lived().
FREEZE_EVERY_S = 30.0
POLL_MS = 100
# A label on a JA4, a cluster or a CIDR teaches the models through the
# addresses the engine knows under it, at most this many of them.
MAX_LABELLED_MEMBERS = 1000
# Without a learning period, drift is measured against the first clients scored.
DRIFT_REFERENCE_VECTORS = 2000
# Risky clients are kept in the store this often (what /v1/clients/{addr}
# shows once the engine has forgotten them), and for this long.
SNAPSHOT_EVERY_S = 30.0
SNAPSHOT_KEEP_S = 7 * 86400.0
# Throttle rates a manual throttle gets when the operator names none.
DEFAULT_THROTTLE_CONN_PER_S = 1.0
DEFAULT_THROTTLE_PKT_PER_S = 50.0


class StoreRegistry:
    """learning.ModelRegistry over the Store: the learner's vocabulary (kind,
    "shadow") mapped to the store's (one version namespace, "candidate")."""

    def __init__(self, store: Store, actor: str = "learning") -> None:
        self.store = store
        self.actor = actor

    def register_model(
        self,
        *,
        kind: str,
        version: str,
        path: str,
        feature_names: Sequence[str],
        status: str,
        comparison: Mapping[str, Any] | None,
    ) -> None:
        self.store.register_model(
            kind,
            version,
            path,
            {"feature_names": list(feature_names)},
            "candidate" if status == STATUS_SHADOW else status,
            actor=self.actor,
            comparison=comparison,
        )

    def set_model_status(
        self, kind: str, version: str, status: str, actor: str | None = None
    ) -> None:
        self.store.set_model_status(
            version, "candidate" if status == STATUS_SHADOW else status, actor or self.actor
        )

    def live_model(self, kind: str) -> _PathRecord | None:
        record = self.store.live_model(kind)
        return None if record is None else _PathRecord(record)

    def model(self, kind: str, version: str) -> _PathRecord | None:
        try:
            record = self.store.get_model(version)
        except ModelNotFound:
            return None
        return _PathRecord(record) if record.kind == kind else None


class _PathRecord:
    """A store ModelRecord as learning.ModelRecord sees it (path as text)."""

    def __init__(self, record: ModelRecord) -> None:
        self.version = record.version
        self.path = str(record.path)


def _finite(features: Mapping[str, float]) -> dict[str, float]:
    # A feature not yet defined for a client is NaN; the store refuses NaN.
    return {k: float(v) for k, v in features.items() if math.isfinite(v)}


def _target_kind(target: str) -> TargetKind:
    """What a target text names: "a/b" a CIDR, "x_y_z" a JA4, else an address."""
    if "->" in target:
        return TargetKind.FLOW
    if "_" in target:
        return TargetKind.JA4
    if "/" in target:
        return TargetKind.CIDR
    return TargetKind.ADDRESS


class ControlPlane:
    """What the admin API works on. No kernel needed: `verdicts` None means the
    Enforcer records decisions without writing maps."""

    def __init__(
        self,
        store: Store,
        *,
        verdicts: VerdictMaps | None = None,
        policy_file: Path | None = None,
        score_every_s: float = 0.5,
        learning_s: float = 0.0,
        learn_models: Sequence[str] = ("baseline", "journey"),
        counters: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.store = store
        self.verdicts = verdicts
        self.lock = threading.RLock()
        self.started_at = time.time()
        self._counters = counters
        self.policy_text, policy = self._initial_policy(policy_file)
        self.policy_engine = PolicyEngine(policy)
        self.enforcer = Enforcer(verdicts)
        self.scorer = RiskScorer(
            consistency=ConsistencyModel().fit(), campaign=CampaignDetector().fit()
        )
        self.engine = Engine(
            scorer=self.scorer,
            policy=self.policy_engine,
            enforcer=self.enforcer,
            score_every_s=score_every_s,
            learning_s=learning_s,
            learn=tuple(learn_models),
            on_decisions=self._on_engine_decisions,
            on_scored=self._on_scored,
            on_learned=self._on_learned,
        )
        self.training = TrainingSet()
        # Feature drift of the clients scored, against the learning period's
        # traffic (or the first DRIFT_REFERENCE_VECTORS clients scored).
        self.drift = DriftMonitor()
        self._drift_reference: list[np.ndarray] = []
        self._snapshotted: dict[str, float] = {}  # addr -> ts of the risk last stored
        self.learning = LearningLoop(
            self.training,
            Retrainer(store.state_dir / "models", StoreRegistry(store)),
            self.scorer,
        )
        self.store_errors = 0
        # Set by the Agent: asks its loop to detach and stop (POST /v1/detach).
        self.on_detach: Callable[[str, bool], None] | None = None
        self._load_learning_state()

    def _load_learning_state(self) -> None:
        """Stored labels back into the training set; the live supervised model
        back into the scorer. A model file that is refused is logged and left
        out: the agent runs on the other models rather than not at all."""
        for label in self.store.labels():
            if label.features:
                self.training.add_feedback(
                    label.features,
                    label.label,
                    key=(label.subject_kind, label.subject),
                    ts=label.ts,
                )
        live = self.store.live_model(SUPERVISED_KIND)
        if live is not None:
            try:
                self.learning.promote_version(live.version)
            except (BotwallError, ValueError, OSError) as exc:
                log.error("live model %s not loaded: %s", live.version, exc)

    def _initial_policy(self, policy_file: Path | None) -> tuple[str, Policy]:
        """The store's current policy (what an operator last PUT), else the file, else default."""
        stored = self.store.current_policy()
        if stored is not None:
            try:
                return stored, Policy.validate_text(stored)
            except PolicyError as exc:
                log.error("stored policy no longer validates (%s); falling back", exc)
        if policy_file is not None:
            text = Path(policy_file).read_text(encoding="utf-8")
            return text, Policy.from_toml(text, Path(policy_file).parent)
        from importlib import resources

        text = resources.files("controlplane").joinpath("default_policy.toml").read_text("utf-8")
        return text, Policy.from_toml(text)

    # ---- start-up ----

    def restore(self) -> dict[str, int]:
        """Puts the kernel in line with the store (reconcile), re-arms JA4
        verdicts and writes the policy's allow list."""
        with self.lock:
            written = removed = 0
            if self.verdicts is not None:
                report = reconcile(
                    self.store, self.verdicts, keep=self.policy_engine.policy.allow_decisions()
                )
                written, removed = report.written, report.removed
                held = report.enforcer_decisions
            else:
                now = self.store.clock()
                held = [
                    r.with_remaining_ttl(now)
                    for r in self.store.live_decisions(now)
                    if r.decision.target_kind is TargetKind.JA4 or is_by_source(r.decision)
                ]
            for decision in held:
                self.enforcer.apply(decision)
            self._write_allow_list()
            return {"written": written, "removed": removed, "by_enforcer": len(held)}

    def _write_allow_list(self) -> None:
        for decision in self.policy_engine.policy.allow_decisions():
            self.enforcer.apply(decision)

    # ---- engine decisions ----

    def _on_engine_decisions(self, decisions: list[Decision], _risk: Risk) -> None:
        """Records one risk's engine decisions in one transaction (the engine
        calls this before it enforces them). A store failure is logged and
        counted, never allowed to stop the engine."""
        try:
            # No fsync (see store's docstring): it cost 2 of a flood verdict's 3 ms.
            self.store.record_decisions(
                decisions, source="engine", actor="engine", wait_for_disk=False
            )
        except (BotwallError, ValueError) as exc:
            self.store_errors += 1
            targets = ", ".join(d.target for d in decisions)
            log.error("could not record decisions on %s: %s", targets, exc)

    def _on_scored(self, scored: list[tuple[Risk, Mapping[str, float]]]) -> None:
        """Each tick's client risks: the confident ones join the training set
        (the operator's labels stand over them), all of them the drift monitor."""
        rows = []
        for risk, features in scored:
            rows.append(row_from(features, FEATURE_NAMES))
            sure = confident_label(risk.score)
            if sure is not None:
                self.training.add_confident(features, sure[0], sure[1], key=risk.key)
        if self.drift.fitted:
            self.drift.update_many(np.stack(rows))
            return
        self._drift_reference.extend(rows)
        if len(self._drift_reference) >= DRIFT_REFERENCE_VECTORS:
            self._on_learned(np.stack(self._drift_reference))

    def _on_learned(self, vectors: np.ndarray) -> None:
        """The learning period's vectors become the drift reference."""
        self.drift.fit(vectors)
        self._drift_reference = []

    def save_snapshots(self) -> int:
        """Stores every risky client whose risk changed since it was last
        stored, and drops snapshots older than SNAPSHOT_KEEP_S; returns how
        many were stored. A store failure is logged and counted."""
        with self.lock:
            fresh = [
                (risk, self.engine.fingerprints(risk.key[1]) or {})
                for key, risk in self.engine.risks.items()
                if key[0] == "addr" and self._snapshotted.get(key[1]) != risk.ts
            ]
            rows = [
                (
                    risk.key[1],
                    risk.score,
                    [asdict(r) for r in risk.reasons],
                    _finite(self.engine.features.features(risk.key, risk.ts)),
                    fingerprints,
                    None,
                )
                for risk, fingerprints in fresh
            ]
        try:
            if rows:
                self.store.save_snapshots(rows)
            self.store.prune_snapshots(SNAPSHOT_KEEP_S)
        except (BotwallError, ValueError) as exc:
            self.store_errors += 1
            log.error("could not store %d client snapshots: %s", len(rows), exc)
            return 0
        with self.lock:
            self._snapshotted.update((risk.key[1], risk.ts) for risk, _ in fresh)
            # Clients whose risk the engine dropped (now low, or pruned) are
            # forgotten here too: the next risk they get is stored again.
            self._snapshotted = {
                addr: ts
                for addr, ts in self._snapshotted.items()
                if ("addr", addr) in self.engine.risks
            }
        return len(rows)

    # ---- reads ----

    def stats(self) -> dict[str, Any]:
        with self.lock:
            engine = stats_dict(self.engine)
            hello_keys = self.enforcer.kernel_hello_keys()
        kernel = dict(self._counters()) if self._counters is not None else {}
        return {
            "uptime_s": time.time() - self.started_at,
            "enforcing": self.enforcer.enforcing,
            "engine": engine,
            "kernel": kernel,
            "events_lost": kernel.get("event_lost", 0),
            "decision_latency": {
                k: v for k, v in engine.items() if k.endswith(("_p50_s", "_p99_s"))
            },
            "store_errors": self.store_errors,
            "live_decisions": len(self.store.live_decisions()),
            # JA4 verdicts the kernel enforces at the hello: key -> JA4
            "hello_keys": {f"{k:016x}": ja4 for k, ja4 in hello_keys.items()},
        }

    def drift_report(self) -> dict[str, Any]:
        """PSI per feature of recent clients against the reference (see DriftMonitor)."""
        with self.lock:
            report = self.drift.report()
            report["reference_pending"] = len(self._drift_reference)
        return report

    def latency_samples(self) -> list[float]:
        with self.lock:
            return [
                *self.enforcer.fingerprint_latency.samples,
                *self.enforcer.behaviour_latency.samples,
            ]

    def _risk_dict(self, risk: Risk) -> dict[str, Any]:
        return {
            "kind": risk.key[0],
            "key": risk.key[1],
            "score": risk.score,
            "reasons": [asdict(r) for r in risk.reasons],
            "model_versions": dict(risk.model_versions),
            "evidence": sorted(risk.evidence),
            "ts": risk.ts,
        }

    def clients(self, sort: str = "risk", limit: int = 50) -> list[dict[str, Any]]:
        with self.lock:
            risks = [r for k, r in self.engine.risks.items() if k[0] == "addr"]
        if sort == "risk":
            risks.sort(key=lambda r: (-r.score, r.key[1]))
        elif sort == "recent":
            risks.sort(key=lambda r: -r.ts)
        else:
            risks.sort(key=lambda r: r.key[1])
        return [{"addr": r.key[1], **self._risk_dict(r)} for r in risks[:limit]]

    def client(self, addr: str) -> dict[str, Any] | None:
        """One client: its risk (if it said anything), features and decisions;
        None if the engine has never seen it and nothing is recorded."""
        canonical = canonical_target(TargetKind.ADDRESS, addr)
        key = ("addr", canonical)
        with self.lock:
            risk = self.engine.risks.get(key)
            fingerprints = self.engine.fingerprints(canonical)
            seen = self.engine.features.last_seen(key)
            features = _finite(self.engine.features.features(key, seen)) if seen is not None else {}
        decisions = [r.as_dict() for r in self.store.list_decisions(target=canonical)]
        if risk is None and seen is None and not decisions and fingerprints is None:
            return None
        return {
            "addr": canonical,
            "fingerprints": fingerprints or {"ja4": None, "tcp": None, "user_agent": None},
            "risk": None if risk is None else self._risk_dict(risk),
            "last_seen": seen,
            "features": features,
            "decisions": decisions,
        }

    def clusters(self) -> list[dict[str, Any]]:
        with self.lock:
            risks = [r for k, r in self.engine.risks.items() if k[0] != "addr"]
        risks.sort(key=lambda r: -r.score)
        return [self._risk_dict(r) for r in risks]

    def decisions(
        self, limit: int = 100, include_expired: bool = False, include_revoked: bool = False
    ) -> list[DecisionRecord]:
        return self.store.list_decisions(
            limit=limit, include_expired=include_expired, include_revoked=include_revoked
        )

    # ---- decisions ----

    def add_decision(
        self,
        action: str,
        target: str,
        ttl_s: float,
        reason: str,
        actor: str,
        *,
        source: str = "manual",
        throttle_connections_per_s: float = 0.0,
        throttle_packets_per_s: float = 0.0,
        tarpit_syns: int = 0,
    ) -> DecisionRecord:
        """A manual verdict: recorded, then enforced. ValueError for a target
        the action cannot apply to (store._TARGETS_OF), naming both."""
        act = Action(action)
        kind = _target_kind(target)
        if act is Action.BLOCK and kind is TargetKind.FLOW:
            act = Action.BLOCK_FLOW
        if act is Action.THROTTLE and not (throttle_connections_per_s or throttle_packets_per_s):
            throttle_connections_per_s = DEFAULT_THROTTLE_CONN_PER_S
            throttle_packets_per_s = DEFAULT_THROTTLE_PKT_PER_S
        decision = Decision(
            action=act,
            target_kind=kind,
            target=target,
            ttl_s=ttl_s,
            reason=reason,
            rule=MANUAL_RULE if source == "manual" else source,
            score=0.0 if act is Action.ALLOW else 100.0,
            throttle_connections_per_s=throttle_connections_per_s,
            throttle_packets_per_s=throttle_packets_per_s,
            tarpit_syns=tarpit_syns,
            ts=time.clock_gettime(time.CLOCK_MONOTONIC),
        )
        record = self.store.record_decision(decision, source=source, actor=actor)
        with self.lock:
            self.enforcer.apply(record.decision)
            if is_by_source(record.decision):
                self._apply_to_known_addresses(record.decision)
        return record

    def _apply_to_known_addresses(self, decision: Decision) -> None:
        """A JA4 or CIDR decision the Enforcer writes per address, for the
        addresses the engine already knows under it: the others get theirs at
        their next connection. Under self.lock."""
        if decision.target_kind is TargetKind.CIDR:
            net = ipaddress.ip_network(decision.target, strict=False)
            for addr in self.engine.clients():
                ip = ipaddress.ip_address(addr)
                if ip in net:
                    self.enforcer.on_source(ip)
            return
        ja4 = decision.target.partition("@")[0]
        for addr in self.engine.features.members(("ja4", ja4)):
            self.enforcer.on_source(ipaddress.ip_address(addr), ja4)

    def revoke(self, decision_id: str, actor: str, reason: str = "revoked") -> DecisionRecord:
        """Ends a decision: the store first, then the kernel; other live
        decisions on the same target (and the allow list) are put back."""
        record = self.store.revoke_decision(decision_id, actor, reason)
        self._unenforce(record.decision)
        return record

    def _unenforce(self, decision: Decision) -> None:
        target = decision.target
        with self.lock:
            cleared: list[Any] = []  # addresses given verdicts by a JA4 or CIDR decision
            if is_by_source(decision):
                cleared = self.enforcer.revoke_by_source(target)
            elif decision.target_kind is TargetKind.JA4:
                cleared = self.enforcer.revoke(target)
            elif self.verdicts is not None:
                key = kernel_key(decision)
                if key is not None:
                    _remove_kernel(self.verdicts, key[0], target)
            # Whatever else stands on this target, and on the addresses it
            # cleared, goes back in, with the TTL it has left.
            targets = {target, *(str(addr) for addr in cleared)}
            now = self.store.clock()
            for other in self.store.live_decisions(now):
                if other.decision.target in targets:
                    self.enforcer.apply(other.with_remaining_ttl(now))
            for allow in self.policy_engine.policy.allow_decisions():
                if allow.target in targets:
                    self.enforcer.apply(allow)

    # ---- policy ----

    def set_policy(self, text: str, actor: str) -> None:
        """Validates, stores and swaps in a policy; PolicyError leaves the old one running."""
        policy = Policy.validate_text(text)
        self.store.save_policy(text, actor)
        with self.lock:
            self.policy_engine.reload(policy)
            self.policy_text = text
            self._write_allow_list()

    # ---- feedback and application events ----

    def feedback(
        self, subject_kind: str, subject: str, label: str, actor: str, note: str | None = None
    ) -> dict[str, Any]:
        """An operator's label. "human" or "good_bot" undoes the verdicts on the
        subject at once (and allows an address or CIDR for a while); every
        label is stored and goes to the training set."""
        features: dict[str, float] | None = None
        members: dict[str, dict[str, float]] = {}
        if subject_kind == "addr":
            key = ("addr", canonical_target(TargetKind.ADDRESS, subject))
            with self.lock:
                seen = self.engine.features.last_seen(key)
                if seen is not None:
                    features = _finite(self.engine.features.features(key, seen))
        else:
            members = self._labelled_members(subject_kind, subject)
        undoes = label in ("human", "good_bot")

        def to_revoke(canonical: str) -> list[str]:
            if not undoes:
                return []
            return [
                live.id
                for live in self.store.live_decisions()
                if live.decision.action is not Action.ALLOW
                and _covers(subject_kind, canonical, live.decision)
            ]

        def to_allow(canonical: str) -> Decision | None:
            if not undoes or subject_kind not in ("addr", "cidr"):
                return None
            return Decision(
                action=Action.ALLOW,
                target_kind=TargetKind.ADDRESS if subject_kind == "addr" else TargetKind.CIDR,
                target=canonical,
                ttl_s=FEEDBACK_ALLOW_TTL_S,
                reason=f"feedback: labelled {label} by {actor}",
                rule="feedback",
                score=0.0,
                ts=time.clock_gettime(time.CLOCK_MONOTONIC),
            )

        # The label and what it undoes are one transaction: a crash leaves the
        # whole of it or none, and the kernel follows (now, or at reconcile).
        record, revoked, allowed = self.store.add_label_with_effects(
            subject_kind, subject, label, actor, note, features,
            revoke=to_revoke, allow=to_allow, revoke_reason=f"feedback: labelled {label}",
        )  # fmt: skip
        for gone in revoked:
            self._unenforce(gone.decision)
        if allowed is not None:
            with self.lock:
                self.enforcer.apply(allowed.decision)
        if features:
            self.training.add_feedback(features, label, key=("addr", record.subject))
        # A JA4, cluster or CIDR label teaches through its addresses. The
        # label is stored without features: they are the members', which
        # change; the training set has them as of now.
        for addr, member_features in members.items():
            self.training.add_feedback(member_features, label, key=("addr", addr))
        return {
            "label_id": record.id,
            "subject_kind": subject_kind,
            "subject": record.subject,
            "label": label,
            "revoked": [r.id for r in revoked],
            "allow_decision": None if allowed is None else allowed.id,
        }

    def _labelled_members(self, subject_kind: str, subject: str) -> dict[str, dict[str, float]]:
        """The features of the addresses a JA4, cluster or CIDR label covers,
        as the engine knows them now (at most MAX_LABELLED_MEMBERS)."""
        with self.lock:
            if subject_kind == "cidr":
                net = ipaddress.ip_network(subject, strict=False)
                addrs = [a for a in self.engine.clients() if ipaddress.ip_address(a) in net]
            elif subject_kind in ("ja4", "cluster"):
                kind, _, value = (
                    subject.partition(":") if subject_kind == "cluster" else ("ja4", "", subject)
                )
                addrs = sorted(self.engine.features.members((kind, value)))
            else:
                return {}
            out: dict[str, dict[str, float]] = {}
            for addr in addrs[:MAX_LABELLED_MEMBERS]:
                seen = self.engine.features.last_seen(("addr", addr))
                if seen is not None:
                    out[addr] = _finite(self.engine.features.features(("addr", addr), seen))
            return out

    def app_event(self, client: str, port: int, kind: str) -> None:
        with self.lock:
            self.engine.app_event(client, port, kind)

    # ---- models ----

    def models(self) -> list[dict[str, Any]]:
        out = []
        for m in self.store.models():
            row = asdict(m)
            row["path"] = str(m.path)
            out.append(row)
        return out

    def retrain(self) -> dict[str, Any]:
        outcome = self.learning.run_once(force=True)
        return asdict(outcome)

    def promote(self, version: str, actor: str) -> dict[str, Any]:
        self.store.get_model(version)  # ModelNotFound (404) before anything else
        self.learning.promote_version(version, actor=actor)
        return self.models_by_version()[version]

    def models_by_version(self) -> dict[str, dict[str, Any]]:
        return {m["version"]: m for m in self.models()}

    # ---- housekeeping ----

    def request_detach(self, actor: str, *, keep_verdicts: bool = False) -> bool:
        """Asks the agent to take its programs off and stop (and, unless
        keep_verdicts, to remove its pinned verdicts); False without an agent."""
        if self.on_detach is None:
            return False
        self.store.audit(actor, "agent.detach", "agent", {"keep_verdicts": keep_verdicts})
        self.on_detach(actor, keep_verdicts)
        return True

    def close(self) -> None:
        self.learning.stop(timeout=5)
        self.store.close()


def _covers(subject_kind: str, subject: str, d: Decision) -> bool:
    """Whether a decision acts on a labelled subject."""
    target = d.target
    if subject_kind == "ja4":
        return target.split("@")[0] == subject
    if subject_kind == "cluster":
        return target == subject or target.split("@")[0] == subject.partition(":")[2]
    net = ipaddress.ip_network(subject, strict=False)
    if d.target_kind is TargetKind.ADDRESS:
        return ipaddress.ip_address(target) in net
    if d.target_kind is TargetKind.CIDR:
        return ipaddress.ip_network(target) == net
    if d.target_kind is TargetKind.FLOW:
        host = target.split("->")[0].rpartition(":")[0].strip("[]")
        return ipaddress.ip_address(host) in net
    _, _, scope = target.partition("@")  # a JA4 scoped to this source
    return bool(scope) and ipaddress.ip_network(scope, strict=False).subnet_of(net)  # type: ignore[arg-type]


def _remove_kernel(verdicts: VerdictMaps, kind: VerdictKind, target: str) -> None:
    if kind in (VerdictKind.ALLOW, VerdictKind.ALLOW_CIDR):
        verdicts.disallow(target)
    elif kind is VerdictKind.BLOCK_FLOW:
        from controlplane.store import parse_flow

        verdicts.unblock_flow(parse_flow(target))
    else:
        verdicts.unblock(target)


# ---- the admin token ----


def admin_token(settings: Settings) -> str:
    """The configured token, else the one in {state_dir}/admin.token, made
    (mode 0600, never logged) at the first start."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.state_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="ascii").strip()
        if len(token) >= 32:
            path.chmod(0o600)
            return token
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


# ---- the API server ----


class ApiServer:
    """uvicorn in a thread of its own, stopped by should_exit."""

    def __init__(self, app: Any, host: str, port: int, sock: socket.socket | None = None) -> None:
        """sock: an already bound listening socket (tests bind port 0 and pass it)."""
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        # uvicorn installs signal handlers only in the main thread: in this
        # one it leaves SIGTERM to the agent, which stops it with should_exit.
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [sock] if sock is not None else None},
            name="botwall-api",
            daemon=True,
        )

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise BotwallError("the admin API did not start (is its port in use?)")
            if time.monotonic() > deadline:
                raise BotwallError("the admin API did not start in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ---- the agent ----


class Agent:
    """The whole agent over a live kernel."""

    def __init__(self, settings: Settings) -> None:
        from sensor.loader import Sensor, SensorSettings
        from sensor.sources import BccSensor

        self.settings = settings
        self.sensor = Sensor(
            SensorSettings(
                tls_ports=tuple(settings.tls_ports),
                http_ports=tuple(settings.http_ports),
                pin_dir=settings.pin_dir,
            )
        )
        if self.sensor.proven_sizes:
            log.info("this kernel's verifier needed bpf/parsing.h's proven helper sizes")
        store: Store | None = None
        try:
            self.verdicts = VerdictMaps(self.sensor.table)
            self.store = store = Store(settings.state_dir / DB_NAME)
            self.plane = ControlPlane(
                store,
                verdicts=self.verdicts,
                policy_file=settings.policy_file,
                score_every_s=settings.score_every_s,
                learning_s=settings.learning_s,
                learn_models=settings.learn_models,
                counters=self._counters,
            )
            self.token = admin_token(settings)
            self.source = BccSensor(self.sensor, idle_timeout_s=settings.idle_timeout_s)
        except BaseException:
            if store is not None:
                store.close()
            self.sensor.close()
            raise
        self.api: ApiServer | None = None
        # POST /v1/detach: the loop stops, close() removes everything.
        self._detach = threading.Event()
        self._keep_verdicts = True
        self.plane.on_detach = self._request_detach

    def _request_detach(self, _actor: str, keep_verdicts: bool) -> None:
        self._keep_verdicts = keep_verdicts
        self._detach.set()

    @property
    def detaching(self) -> bool:
        return self._detach.is_set()

    def _counters(self) -> dict[str, int]:
        return {c.name.lower(): n for c, n in self.sensor.counters().items()}

    def start(self) -> None:
        from controlplane.api.main import create_app

        report = self.plane.restore()
        log.info("reconciled the kernel with the store: %s", report)
        for ifname in self.settings.ifaces:
            attached = self.sensor.attach(
                ifname, mode=self.settings.xdp_mode, netns=self.settings.netns
            )
            self.store.audit(
                "agent", "sensor.attach", f"iface:{ifname}", {"mode": attached.xdp_mode}
            )
            log.info("attached to %s (%s)", ifname, attached.xdp_mode)
        self.api = ApiServer(
            create_app(self.plane, self.token), self.settings.api_host, self.settings.api_port
        )
        self.api.start()
        self.plane.learning.start()

    def run(self, stop: Callable[[], bool]) -> None:
        """The engine loop, as Engine.run_live but under the control plane's lock."""
        engine, next_expiry = self.plane.engine, time.monotonic() + EXPIRE_EVERY_S
        next_freeze = time.monotonic() + FREEZE_EVERY_S
        next_allow = time.monotonic() + self._allow_renew_s()
        next_snapshot = time.monotonic() + SNAPSHOT_EVERY_S
        next_tick = 0.0
        while not stop() and not self._detach.is_set():
            events = self.source.poll(POLL_MS)
            now = time.clock_gettime(time.CLOCK_MONOTONIC)
            with self.plane.lock:
                for event in events:
                    engine.process(event)  # ticks by itself as event time passes
                if engine.urgent:  # a new or risky client: decide now, not next tick
                    engine.tick()
                # While events pause, ticks go on in kernel time (the clock
                # event timestamps are in), so a client gone quiet is still decided on.
                if not events and now >= next_tick:
                    engine.tick(now)
            if events or now >= next_tick:
                next_tick = now + engine.score_every_s
            if time.monotonic() >= next_expiry:
                with self.plane.lock:
                    self.verdicts.expire()
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
            if time.monotonic() >= next_snapshot:  # the store takes its own lock
                self.plane.save_snapshots()
                next_snapshot = time.monotonic() + SNAPSHOT_EVERY_S
            if time.monotonic() >= next_allow:  # the allow list outlives its TTL
                with self.plane.lock:
                    self.plane._write_allow_list()
                next_allow = time.monotonic() + self._allow_renew_s()
            if time.monotonic() >= next_freeze:
                freeze_long_lived()
                next_freeze = time.monotonic() + FREEZE_EVERY_S

    def _allow_renew_s(self) -> float:
        return max(self.plane.policy_engine.policy.config.allow.ttl_s / 2, 1.0)

    def close(self) -> None:
        """Detaches; the pinned verdicts stay until their TTL (fail open, keep
        enforcing), unless POST /v1/detach asked for them to go too."""
        if self.api is not None:
            self.api.stop()
        for attachment in list(self.sensor.attachments):
            try:
                self.store.audit("agent", "sensor.detach", f"iface:{attachment.ifname}")
            except BotwallError as exc:
                log.error("audit of detach failed: %s", exc)
        self.sensor.close()
        self.source.close()
        if self._detach.is_set() and not self._keep_verdicts:
            from sensor.loader import remove_pins

            remove_pins(self.settings.pin_dir)
            log.info("removed the pinned verdict maps in %s", self.settings.pin_dir)
        self.plane.close()


def freeze_long_lived() -> None:
    """Moves every object that survived this far out of the cyclic collector's
    generations (gc.freeze), after collecting the young ones.

    The engine keeps about 13 container objects per client for as long as it
    tracks the client: 1.3 million at 100,000 clients, which one full
    collection walks in about 0.7 s (bench/results/engine.json), with no event
    processed and no verdict written meanwhile; building up to that many
    clients took eight of them. Frozen objects are never walked. What they
    hold is still freed by reference counting when the engine forgets a
    client: its state forms no reference cycles (tests/test_agent_gc.py), so
    freezing it loses nothing. Only cyclic garbage already old at a freeze
    would stay, and the young collection just before catches nearly all of it.
    """
    gc.collect(1)
    gc.freeze()


# ---- command line ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="botwall run", description="Run the agent: sensor, engine, store, admin API."
    )
    p.add_argument("--iface", action="append", help="interface to attach to (repeatable)")
    p.add_argument("--netns", help="network namespace the interfaces are in")
    p.add_argument("--config", help="TOML config file (e.g. /etc/botwall/botwall.toml)")
    p.add_argument("--state-dir", help="default /var/lib/botwall")
    p.add_argument("--tls-port", type=int, action="append", help="default 443 (repeatable)")
    p.add_argument("--http-port", type=int, action="append", help="repeatable")
    p.add_argument("--api-host", help="default 127.0.0.1")
    p.add_argument("--api-port", type=int, help="default 9440")
    p.add_argument("--xdp-mode", choices=("auto", "native", "generic"))
    p.add_argument("--pin-dir", help="default /sys/fs/bpf/botwall")
    p.add_argument("--policy-file", help="policy TOML used when the store holds none")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="botwall: %(levelname)s %(message)s")
    stopping = threading.Event()

    def request_stop(_signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    tls_ports = args.tls_port
    if tls_ports is None and args.http_port:
        tls_ports = []  # only plaintext ports were asked for
    try:
        settings = load_settings(
            args.config,
            ifaces=args.iface,
            netns=args.netns,
            state_dir=args.state_dir,
            tls_ports=tls_ports,
            http_ports=args.http_port,
            api_host=args.api_host,
            api_port=args.api_port,
            xdp_mode=args.xdp_mode,
            pin_dir=args.pin_dir,
            policy_file=args.policy_file,
        )
        if not settings.ifaces:
            raise BotwallError("no interface: give --iface (or ifaces in the config)")
        agent = Agent(settings)
    except (BotwallError, OSError) as exc:
        print(f"botwall run: {exc}", file=sys.stderr)
        return 2
    try:
        agent.start()
        print(
            f"botwall: running on {', '.join(settings.ifaces)}; admin API on "
            f"http://{settings.api_host}:{settings.api_port}",
            file=sys.stderr,
            flush=True,
        )
        agent.run(stopping.is_set)
    except BotwallError as exc:
        print(f"botwall run: {exc}", file=sys.stderr)
        return 2
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
