"""Risk scores 0-100 for clients and cluster keys, combined from every trained
model, with the reasons in words and the versions of the models behind them.

How the models combine (a noisy-OR of capped model probabilities):

    p_mi = points_mi / 100            finding i of model m, its own confidence
    s_m  = 1 - prod_i (1 - p_mi)      model m's score
    P    = 1 - prod_m (1 - w_m s_m)   w_m: the most model m alone may say
    score = 100 P

Each model is a detector that may or may not fire; P is the chance that at
least one that fired is right, if they err independently. The cap w_m says
how far one model is trusted alone: a Chrome User-Agent over python-requests'
ClientHello is nearly proof (w = 0.95), a vector unlike this host's baseline
is only unusual (w = 0.6), so an anomaly alone scores at most 60 and needs a
second model to reach a blocking score.

Each reason's points are its share of the evidence: -ln(1 - P) is the sum of
the models' -ln(1 - w_m s_m), and a model's share is split among its findings
in proportion to their -ln(1 - p_mi). The points of a Risk's reasons add up to
its score, and an operator can read them as "this much came from that".
Beyond max_reasons the weakest are folded into one "more_reasons" entry, so
the sum still holds.

An untrained or absent model multiplies P's complement by 1: it is missing,
not a vote for "human". Before the learning period ends only the models that
need no traffic (consistency rules, campaigns with default thresholds)
speak, and model_versions says which ones did.

A client inherits the strongest campaign among its cluster keys (as a finding
of the campaign model): each address of a distributed attack is polite alone.
A client whose address is in the published ranges of the crawler it claims
to be is capped (verified_crawler_cap): its operator is known, and policy
decides what crawlers may do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from controlplane.decisions import ClusterKey, Reason, Risk
from controlplane.models import EVIDENCE_KINDS, Finding, noisy_or, row_from
from controlplane.models.baseline import BaselineAnomaly
from controlplane.models.campaign import CampaignDetector, key_words
from controlplane.models.consistency import ConsistencyModel
from controlplane.models.journey import JourneyModel
from controlplane.models.supervised import SupervisedClassifier
from sensor.fingerprint.tcp import TcpSignature

DEFAULT_WEIGHTS: dict[str, float] = {
    "consistency": 0.95,
    "campaign": 0.95,
    "supervised": 0.9,
    "journey": 0.85,
    "baseline": 0.6,
    "rate": 0.95,
}

# A person behind a browser or an app does not keep up three requests a
# second for ten seconds; a flood or a loud scraper does from its first
# seconds. The rule needs no learning, so it speaks from the first tick.
HUMAN_MAX_RPS = 3.0
RATE_POINTS_AT_LIMIT = 55.0
RATE_POINTS_PER_RPS = 10.0  # above the limit, up to RATE_POINTS_MAX
RATE_POINTS_MAX = 95.0


def rate_findings(features: Mapping[str, float]) -> list[Finding]:
    """A sustained request rate beyond a person's, as a finding."""
    rps = features.get("req_rate_10s", 0.0)
    if not rps >= HUMAN_MAX_RPS:  # also false for NaN
        return []
    points = min(
        RATE_POINTS_MAX, RATE_POINTS_AT_LIMIT + RATE_POINTS_PER_RPS * (rps - HUMAN_MAX_RPS)
    )
    text = f"{rps:.1f} requests/s over 10 s; people stay under {HUMAN_MAX_RPS:g}"
    return [Finding(Reason("request_rate", text, points, "rate"), features=("req_rate_10s",))]


# Where a feature comes from, by name prefix; anything else comes from requests.
_PREFIX_EVIDENCE = (
    ("syn_", "syn"),
    ("tls_", "tls"),
    ("ja4_", "tls"),
    ("flow_", "flow"),
    ("app_", "app"),
)

# A finding this sure is as sure as anything gets; keeps the logarithms finite.
_MAX_P = 0.999


@dataclass(frozen=True, slots=True)
class ClientView:
    """What the scorer needs to know about one client (from features.py and the
    observations): its feature vector, its layers, and its recent journey."""

    key: ClusterKey  # ("addr", "198.51.100.7")
    features: Mapping[str, float] = field(default_factory=dict)
    address: str | None = None
    user_agent: str | None = None
    anonymous: bool = False  # it sent requests, none with a User-Agent
    ja4: str | None = None
    tcp: TcpSignature | str | None = None  # a TcpSignature or its compact form
    steps: Sequence[str] = ()  # journey.step() tokens, oldest first
    paths: Sequence[str] | None = None  # the raw paths of those steps
    group: str | None = None  # baseline.endpoint_group() of the client
    clusters: Sequence[ClusterKey] = ()  # its cluster keys, to inherit campaigns
    ts: float = 0.0


class _Models(NamedTuple):
    """The per-client models as one batch read them."""

    consistency: ConsistencyModel | None
    baseline: BaselineAnomaly | None
    journey: JourneyModel | None
    supervised: SupervisedClassifier | None


def _fitted(model: Any) -> bool:
    if model is None:
        return False
    return getattr(model, "version_", None) is not None  # see models.ensure_fitted


class RiskScorer:
    """Combines the models into decisions.Risk; models may be None or unfitted.

    weights: model name -> cap w_m (DEFAULT_WEIGHTS for any not given).
    feature_evidence: feature name -> observation kind ("syn", "tls", "http",
        "flow", "app"); unnamed features go by prefix, else "http".
    """

    def __init__(
        self,
        *,
        consistency: ConsistencyModel | None = None,
        baseline: BaselineAnomaly | None = None,
        journey: JourneyModel | None = None,
        supervised: SupervisedClassifier | None = None,
        campaign: CampaignDetector | None = None,
        weights: Mapping[str, float] | None = None,
        feature_evidence: Mapping[str, str] | None = None,
        verified_crawler_cap: float = 20.0,
        max_reasons: int = 5,
    ) -> None:
        self.consistency = consistency
        self.baseline = baseline
        self.journey = journey
        self.supervised = supervised
        self.campaign = campaign
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        if not all(0.0 <= w <= 1.0 for w in self.weights.values()):
            raise ValueError(f"model weights are caps on a probability, 0..1: {self.weights}")
        self.feature_evidence = dict(feature_evidence or {})
        unknown = set(self.feature_evidence.values()) - EVIDENCE_KINDS
        if unknown:
            raise ValueError(
                f"unknown evidence kinds {sorted(unknown)}; use {sorted(EVIDENCE_KINDS)}"
            )
        self.verified_crawler_cap = verified_crawler_cap
        self.max_reasons = max_reasons

    def trained(self) -> dict[str, bool]:
        """Which models can speak now."""
        return {
            name: _fitted(getattr(self, name))
            for name in ("consistency", "baseline", "journey", "supervised", "campaign")
        }

    # ---- clusters ----

    def score_cluster(
        self, key: ClusterKey, features: Mapping[str, float], ts: float = 0.0
    ) -> Risk:
        """A cluster key's campaign risk from its aggregate features."""
        findings: dict[str, list[Finding]] = {}
        versions: dict[str, str] = {}
        if _fitted(self.campaign):
            assert self.campaign is not None
            findings["campaign"] = self.campaign.findings(features, key)
            versions["campaign"] = self.campaign.version_
        return self.combine(key, findings, versions, ts=ts)

    # ---- clients ----

    def score_client(
        self, view: ClientView, cluster_risks: Mapping[ClusterKey, Risk] | None = None
    ) -> Risk:
        return self.score_clients([view], cluster_risks)[0]

    def score_clients(
        self, views: Sequence[ClientView], cluster_risks: Mapping[ClusterKey, Risk] | None = None
    ) -> list[Risk]:
        """Score many clients; the vector models score them in one batch each.

        The models are read once for the whole batch: learning may swap one
        from its thread, and a batch must not mix two versions."""
        models = _Models(self.consistency, self.baseline, self.journey, self.supervised)
        trained = {name: _fitted(getattr(models, name)) for name in _Models._fields}
        trained["campaign"] = _fitted(self.campaign)
        baseline_p = supervised_p = None
        if trained["baseline"] and views:
            assert models.baseline is not None
            names = models.baseline.feature_names_in_
            matrix = np.stack([row_from(v.features, names) for v in views])
            baseline_p = models.baseline.score_samples(matrix, [v.group for v in views])
        if trained["supervised"] and views:
            assert models.supervised is not None
            names = models.supervised.feature_names_in_
            matrix = np.stack([row_from(v.features, names) for v in views])
            supervised_p = models.supervised.bot_probability(matrix)
        risks = []
        for i, view in enumerate(views):
            risks.append(
                self._score_one(
                    view,
                    models,
                    trained,
                    None if baseline_p is None else float(baseline_p[i]),
                    None if supervised_p is None else float(supervised_p[i]),
                    cluster_risks or {},
                )
            )
        return risks

    def _score_one(
        self,
        view: ClientView,
        models: _Models,
        trained: Mapping[str, bool],
        baseline_p: float | None,
        supervised_p: float | None,
        cluster_risks: Mapping[ClusterKey, Risk],
    ) -> Risk:
        findings: dict[str, list[Finding]] = {}
        versions: dict[str, str] = {}
        cap = None
        notes: list[Reason] = []
        if trained["consistency"]:
            assert models.consistency is not None
            assessment = models.consistency.assess(
                user_agent=view.user_agent,
                ja4=view.ja4,
                tcp=view.tcp,
                client=view.address,
                anonymous=view.anonymous,
            )
            findings["consistency"] = list(assessment.findings)
            versions["consistency"] = models.consistency.version_
            if assessment.verified_crawler is not None:
                cap = self.verified_crawler_cap
                notes.append(
                    Reason(
                        "verified_crawler",
                        f"{view.address} is in {assessment.verified_crawler}'s published "
                        f"ranges; score capped at {cap:.0f}",
                        0.0,
                        "consistency",
                    )
                )
        if trained["baseline"] and baseline_p is not None:
            assert models.baseline is not None
            findings["baseline"] = models.baseline.findings(view.features, view.group, baseline_p)
            versions["baseline"] = models.baseline.version_
        if trained["journey"] and view.steps:
            assert models.journey is not None
            findings["journey"] = models.journey.findings(view.steps, view.paths)
            versions["journey"] = models.journey.version_
        if trained["supervised"] and supervised_p is not None:
            assert models.supervised is not None
            findings["supervised"] = models.supervised.findings(view.features, supervised_p)
            versions["supervised"] = models.supervised.version_
        findings["rate"] = rate_findings(view.features)
        inherited = self._campaign_membership(view, cluster_risks)
        if inherited is not None:
            finding, version = inherited
            findings.setdefault("campaign", []).append(finding)
            if version:
                versions["campaign"] = version
        return self.combine(view.key, findings, versions, ts=view.ts, cap=cap, notes=notes)

    def _campaign_membership(
        self, view: ClientView, cluster_risks: Mapping[ClusterKey, Risk]
    ) -> tuple[Finding, str | None] | None:
        # The strongest campaign only: the same attack seen through two keys
        # (its JA4 and its HTTP fingerprint) is one piece of evidence, not two.
        member_of = [cluster_risks[k] for k in view.clusters if k in cluster_risks]
        best = max((r for r in member_of if r.reasons), key=lambda r: r.score, default=None)
        if best is None or best.score <= 0:
            return None
        top = best.reasons[0]
        reason = Reason(
            top.code,
            f"member of a campaign on {key_words(best.key)}: {top.text}",
            round(best.score, 1),
            "campaign",
        )
        return Finding(reason, evidence=best.evidence), best.model_versions.get("campaign")

    # ---- the combination ----

    def combine(
        self,
        key: ClusterKey,
        findings: Mapping[str, Sequence[Finding]],
        versions: Mapping[str, str],
        *,
        ts: float = 0.0,
        cap: float | None = None,
        notes: Sequence[Reason] = (),
    ) -> Risk:
        """The module docstring's noisy-OR, with each reason's share as its points."""
        terms: list[tuple[Finding, str, float]] = []  # finding, model, its -ln share
        total = 0.0
        for model, found in findings.items():
            if not found:
                continue
            w = self.weights.get(model, 0.5)
            s = noisy_or(f.probability for f in found)
            model_term = -math.log(1.0 - min(w * s, _MAX_P))
            own = [-math.log(1.0 - min(f.probability, _MAX_P)) for f in found]
            own_total = sum(own) or 1.0
            for f, o in zip(found, own, strict=True):
                terms.append((f, model, model_term * o / own_total))
            total += model_term
        score = 100.0 * (1.0 - math.exp(-total))
        if cap is not None:
            score = min(score, cap)
        reasons = [
            Reason(f.reason.code, f.reason.text, round(score * share / total, 1), model)
            for f, model, share in terms
            if total > 0
        ]
        reasons.sort(key=lambda r: -r.points)
        if len(reasons) > self.max_reasons:
            # Fold the weakest into one, so the points still add up to the score.
            kept, rest = reasons[: self.max_reasons - 1], reasons[self.max_reasons - 1 :]
            words = ", ".join(f"{r.code} ({r.points:g})" for r in rest)
            folded = Reason(
                "more_reasons",
                f"{len(rest)} weaker reasons: {words}",
                round(sum(r.points for r in rest), 1),
                "scoring",
            )
            reasons = sorted([*kept, folded], key=lambda r: -r.points)
        evidence: set[str] = set()
        for f, _model, share in terms:
            if share > 0:
                evidence |= f.evidence
                evidence |= {self._evidence_of(name) for name in f.features}
        return Risk(
            key=key,
            score=round(score, 1),
            # Notes (the crawler cap) carry no points: they follow the reasons.
            reasons=(*reasons, *notes),
            model_versions=dict(versions),
            evidence=frozenset(evidence),
            ts=ts,
        )

    def _evidence_of(self, feature: str) -> str:
        if feature in self.feature_evidence:
            return self.feature_evidence[feature]
        for prefix, kind in _PREFIX_EVIDENCE:
            if feature.startswith(prefix):
                return kind
        return "http"


__all__ = ["DEFAULT_WEIGHTS", "ClientView", "RiskScorer"]
