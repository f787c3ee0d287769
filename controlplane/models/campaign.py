"""Campaigns: many addresses that share a cluster key (a JA4, a TCP signature,
an HTTP fingerprint, a network prefix, or a combination) and together behave
like one bot, though each address alone is polite.

The input is one cluster key's aggregate features over a window (names in
CAMPAIGN_FEATURES). The score is breadth times behaviour, signal by signal:

    score = noisy_or(breadth(distinct_addrs) * p for p in behaviour signals)

Breadth alone is never enough: one popular browser's JA4 is shared by
thousands of people, so the key's popularity says nothing until what those
addresses do together is something people do not do: fail most of hundreds of
logins, spend nearly every request on sensitive endpoints, rotate through
fresh addresses under a fingerprint this host has never seen, or claim one
client while their TLS stack is another. Low per-address rate and synchrony
(addresses active in lockstep) describe how a campaign hides; they strengthen
a campaign that behaves like one but do not make one.

Thresholds start from floors that hold on any host; fit() on this host's own
cluster aggregates raises them where its normal traffic already comes close
(a host whose users mistype passwords a lot gets a higher failure threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator

from controlplane.decisions import ClusterKey, Reason
from controlplane.models import Finding, as_matrix, ensure_fitted, model_version, noisy_or, ramp

MODEL = "campaign"

CAMPAIGN_FEATURES = (
    "distinct_addrs",  # addresses seen with this key in the window
    "requests_600s",  # requests from all of them together
    "login_attempts_600s",  # login-class requests
    "login_failure_share",  # of those, the share answered with a failure
    "sensitive_share_600s",  # share of requests to sensitive endpoint classes
    "per_addr_rate_600s",  # requests per minute per address (derived when absent)
    "synchrony",  # 0..1: mean share of the addresses active in each minute
    "fingerprint_rarity",  # 0..1: 1 - the key's share of this host's baseline clients
    "new_addr_share",  # share of the addresses first seen in this window
    "inconsistent_share",  # share of the addresses whose layers contradict each other
)

# Behaviour features whose baseline quantile can raise a threshold.
_LEARNED = ("login_failure_share", "sensitive_share_600s", "new_addr_share", "inconsistent_share")

KEY_WORDS = {
    "ja4": "JA4",
    "tcp": "TCP signature",
    "http": "HTTP fingerprint",
    "prefix": "network prefix",
    "addr": "address",
}
KEY_EVIDENCE = {"ja4": "tls", "tcp": "syn", "http": "http"}


def key_words(key: ClusterKey | None) -> str:
    """("ja4", "t13d1516h2_8daaf6152771_e5627efa2ab1") -> "JA4 t13d1516h2_8daa…"."""
    if key is None:
        return "one cluster key"
    kind, value = key
    kinds = "+".join(KEY_WORDS.get(k, k) for k in kind.split("+"))
    short = value if len(value) <= 20 else value[:17] + "…"
    return f"{kinds} {short}"


def _key_evidence(key: ClusterKey | None) -> frozenset[str]:
    kinds = {"http"}  # the behaviour features come from requests
    if key is not None:
        kinds |= {KEY_EVIDENCE[k] for k in key[0].split("+") if k in KEY_EVIDENCE}
    return frozenset(kinds)


def _rate(per_min: float) -> str:
    return f"~{per_min:.1f}/min" if per_min < 10 else f"~{per_min:.0f}/min"


class CampaignDetector(BaseEstimator):
    """score(features, key) -> 0..1 campaign strength; explain -> Reasons in words.

    fit() with no data uses the floors; fit(X, feature_names=...) on baseline
    cluster aggregates learns this host's thresholds.
    """

    kind: ClassVar[str] = "campaign"

    def __init__(
        self,
        *,
        window_s: float = 600.0,
        min_addrs: int = 5,
        breadth_scale: float = 20.0,
        failure_floor: float = 0.5,
        min_login_attempts: int = 30,
        sensitive_floor: float = 0.8,
        min_requests: int = 100,
        rarity_floor: float = 0.99,
        new_addr_floor: float = 0.8,
        max_requests_per_addr: float = 3.0,
        min_rotation_addrs: int = 50,
        inconsistent_floor: float = 0.5,
        synchrony_floor: float = 0.6,
        margin: float = 0.1,
        quantile: float = 0.99,
    ) -> None:
        self.window_s = window_s
        self.min_addrs = min_addrs
        self.breadth_scale = breadth_scale
        self.failure_floor = failure_floor
        self.min_login_attempts = min_login_attempts
        self.sensitive_floor = sensitive_floor
        self.min_requests = min_requests
        self.rarity_floor = rarity_floor
        self.new_addr_floor = new_addr_floor
        self.max_requests_per_addr = max_requests_per_addr
        self.min_rotation_addrs = min_rotation_addrs
        self.inconsistent_floor = inconsistent_floor
        self.synchrony_floor = synchrony_floor
        self.margin = margin
        self.quantile = quantile

    def fit(
        self, X: object = None, y: object = None, *, feature_names: Sequence[str] | None = None
    ) -> CampaignDetector:
        """Thresholds: the floors, raised above this host's own clusters' tail."""
        floors = {
            "login_failure_share": self.failure_floor,
            "sensitive_share_600s": self.sensitive_floor,
            "new_addr_share": self.new_addr_floor,
            "inconsistent_share": self.inconsistent_floor,
        }
        thresholds = dict(floors)
        n_clusters = 0
        if X is not None:
            if feature_names is None:
                raise ValueError("fit(X) needs feature_names")
            matrix = as_matrix(X, feature_names)
            names = list(feature_names)
            # Only broad clusters are what a campaign is compared with; one
            # person's cluster of one address may fail every login it makes.
            broad = np.ones(len(matrix), dtype=bool)
            if "distinct_addrs" in names:
                broad = matrix[:, names.index("distinct_addrs")] >= self.min_addrs
            n_clusters = int(broad.sum())
            for name in _LEARNED:
                if name in names and n_clusters:
                    values = matrix[broad, names.index(name)]
                    values = values[np.isfinite(values)]
                    if values.size:
                        tail = float(np.quantile(values, self.quantile)) + self.margin
                        # A share threshold above 1 could never fire.
                        thresholds[name] = min(max(floors[name], tail), 0.99)
        self.thresholds_ = thresholds
        self.n_clusters_fit_ = n_clusters
        self.feature_names_in_ = list(CAMPAIGN_FEATURES)
        self.version_ = model_version(
            self.kind, repr(sorted(thresholds.items())), repr(self.get_params())
        )
        return self

    # ---- scoring ----

    def breadth(self, distinct_addrs: float) -> float:
        """0 below min_addrs, then rising to 1: about 0.6 at 20 addresses, 0.9 at 50."""
        if not math.isfinite(distinct_addrs) or distinct_addrs < self.min_addrs:
            return 0.0
        return 1.0 - math.exp(-(distinct_addrs - 1.0) / self.breadth_scale)

    def findings(
        self, features: Mapping[str, float], key: ClusterKey | None = None
    ) -> list[Finding]:
        ensure_fitted(self)

        def get(name: str, default: float = 0.0) -> float:
            value = features.get(name)
            return float(value) if value is not None and math.isfinite(value) else default

        addrs = get("distinct_addrs")
        breadth = self.breadth(addrs)
        if breadth == 0.0:
            return []
        requests = get("requests_600s")
        minutes = self.window_s / 60.0
        per_addr = get("per_addr_rate_600s", requests / max(addrs, 1) / minutes)
        attempts = get("login_attempts_600s")
        failures = get("login_failure_share")
        sensitive = get("sensitive_share_600s")
        rarity = get("fingerprint_rarity")
        new = get("new_addr_share")
        lying = get("inconsistent_share")
        synchrony = get("synchrony")
        t = self.thresholds_
        window = f"{minutes:.0f} min" if minutes >= 1 else f"{self.window_s:.0f} s"
        who = f"{addrs:.0f} addresses share {key_words(key)}"
        each = f"each address at {_rate(per_addr)}"

        signals: list[tuple[str, float, str, tuple[str, ...]]] = []
        if attempts >= self.min_login_attempts and failures >= t["login_failure_share"]:
            p = 0.8 + 0.17 * ramp(failures, t["login_failure_share"], 0.95) * ramp(
                attempts, self.min_login_attempts, 10 * self.min_login_attempts
            )
            text = (
                f"{who} and together sent {attempts:.0f} login attempts in {window}, "
                f"{100 * failures:.0f}% failures, {each}"
            )
            signals.append(
                ("credential_stuffing", p, text, ("login_attempts_600s", "login_failure_share"))
            )
        if requests >= self.min_requests and sensitive >= t["sensitive_share_600s"]:
            p = 0.6 + 0.3 * ramp(sensitive, t["sensitive_share_600s"], 1.0)
            text = (
                f"{who} and together sent {requests:.0f} requests in {window}, "
                f"{100 * sensitive:.0f}% of them to sensitive endpoints, {each}"
            )
            signals.append(("sensitive_flood", p, text, ("requests_600s", "sensitive_share_600s")))
        requests_per_addr = requests / max(addrs, 1)
        if (
            addrs >= self.min_rotation_addrs
            and rarity >= self.rarity_floor
            and new >= t["new_addr_share"]
            and requests_per_addr <= self.max_requests_per_addr
        ):
            text = (
                f"{who}, a fingerprint this host's baseline almost never saw; "
                f"{100 * new:.0f}% of the addresses are new and each sent "
                f"~{requests_per_addr:.1f} requests before the next took over"
            )
            signals.append(("proxy_rotation", 0.85, text, ("fingerprint_rarity", "new_addr_share")))
        if lying >= t["inconsistent_share"]:
            text = (
                f"{100 * lying:.0f}% of the {addrs:.0f} addresses sharing {key_words(key)} "
                "claim a client their TLS or TCP stack contradicts"
            )
            signals.append(("shared_lying_fingerprint", 0.9 * lying, text, ("inconsistent_share",)))
        if not signals:
            return []
        # Lockstep activity across many addresses is how a campaign hides its
        # rate; it makes each behaviour surer, never a campaign on its own.
        boost = 0.5 * ramp(synchrony, self.synchrony_floor, 1.0)
        evidence = _key_evidence(key)
        out = []
        for code, p, text, used in signals:
            if boost > 0:
                p = 1.0 - (1.0 - p) * (1.0 - boost)
                text += f", {100 * synchrony:.0f}% of them active in the same minutes"
            reason = Reason(code, text, round(100 * breadth * p, 1), MODEL)
            out.append(Finding(reason, evidence=evidence, features=("distinct_addrs", *used)))
        out.sort(key=lambda f: -f.reason.points)
        return out

    def score(self, features: Mapping[str, float], key: ClusterKey | None = None) -> float:
        """Noisy-OR of breadth x each behaviour signal, 0..1."""
        found = self.findings(features, key)
        return noisy_or(f.probability for f in found)

    def explain(self, features: Mapping[str, float], key: ClusterKey | None = None) -> list[Reason]:
        return [f.reason for f in self.findings(features, key)]


__all__ = ["CAMPAIGN_FEATURES", "CampaignDetector", "key_words"]
