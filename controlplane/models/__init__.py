"""botwall's detection models and the contract they share.

Five models, each a scikit-learn-style estimator (STYLE.md): `__init__` only
stores parameters, `fit` returns self, learned state ends in `_`, and an
unfitted model raises sklearn's NotFittedError.

- consistency.ConsistencyModel: clients whose layers contradict each other,
  and crawlers claimed from outside their published ranges.
- baseline.BaselineAnomaly: how far a client is from this host's usual traffic.
- journey.JourneyModel: endpoint sequences a person would not take.
- supervised.SupervisedClassifier: what operators' labels taught.
- campaign.CampaignDetector: many polite addresses that together are one bot.

Each model answers in the same currency: `findings(...)` returns Findings, a
Reason (controlplane.decisions) whose points are this model's own confidence
on a 0-100 scale, plus what it rests on; `explain(...)` is their Reasons and
`score(...)` their noisy-OR in 0..1. controlplane.scoring weighs the models
against each other; persist saves and loads them safely.

Submodules import this package for the shared helpers below, so this module
must not import them back.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from controlplane.decisions import Reason

# Observation kinds a finding can rest on (decisions.Risk.evidence).
EVIDENCE_KINDS = frozenset({"syn", "tls", "http", "flow", "app"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a model found, with what it rests on.

    reason.points is the model's confidence alone (0-100); the scorer rescales
    it when it combines models. evidence names observation kinds directly;
    features names the feature columns behind it, which the scorer maps to
    kinds (it alone knows where each feature comes from).
    """

    reason: Reason
    evidence: frozenset[str] = frozenset()
    features: tuple[str, ...] = ()

    @property
    def probability(self) -> float:
        return min(max(self.reason.points / 100.0, 0.0), 1.0)


def noisy_or(probabilities: Iterable[float]) -> float:
    """P(at least one of independent detectors is right): 1 - prod(1 - p)."""
    survive = 1.0
    for p in probabilities:
        survive *= 1.0 - min(max(p, 0.0), 1.0)
    return 1.0 - survive


def ensure_fitted(model: object) -> None:
    """sklearn's check_is_fitted, for the scoring hot path: every model here
    sets version_ last in fit(), so its presence is the whole check, and
    sklearn's walk over the estimator's attributes costs more than a finding."""
    if getattr(model, "version_", None) is None:
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(
            f"This {type(model).__name__} instance is not fitted yet. Call 'fit' first."
        )


def model_version(kind: str, *parts: bytes | str) -> str:
    """A version such as "baseline-20261121T2300-3f2a": the kind, the UTC minute
    of the fit, and 4 hex digits of a digest of what it learned from, so two
    fits on the same data in the same minute share a version and others almost
    surely differ."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
    return f"{kind}-{stamp}-{digest.hexdigest()[:4]}"


def as_matrix(X: object, feature_names: Sequence[str]) -> np.ndarray:
    """X as a 2-D float64 array whose columns are feature_names, or a ValueError."""
    array = np.asarray(X, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {array.shape}")
    if array.shape[1] != len(feature_names):
        raise ValueError(
            f"X has {array.shape[1]} columns but {len(feature_names)} feature names were given"
        )
    if len(set(feature_names)) != len(feature_names):
        raise ValueError("feature names must be unique")
    return array


def row_from(features: Mapping[str, float], feature_names: Sequence[str]) -> np.ndarray:
    """One feature dict as a row in the model's column order; a missing or
    non-finite feature is NaN, which each model treats as "not observed"."""
    row = np.full(len(feature_names), np.nan)
    for i, name in enumerate(feature_names):
        value = features.get(name)
        if value is not None:
            row[i] = float(value)
    row[~np.isfinite(row)] = np.nan
    return row


def nan_median(rows: np.ndarray) -> np.ndarray:
    """Column medians ignoring NaN; 0 for a column never observed (np.nanmedian
    warns on those, and a feature nobody has is best imputed as absent)."""
    out = np.zeros(rows.shape[1])
    observed = ~np.isnan(rows)
    for j in range(rows.shape[1]):
        if observed[:, j].any():
            out[j] = float(np.median(rows[observed[:, j], j]))
    return out


def describe(name: str, descriptions: Mapping[str, str] | None) -> str:
    """A feature's words for an operator, or its name when nobody wrote any."""
    return (descriptions or {}).get(name, name)


def format_value(name: str, value: float) -> str:
    """Shares as percentages, everything else with three significant digits."""
    if not math.isfinite(value):
        return "unknown"
    if "share" in name or "ratio" in name:
        return f"{100 * value:.0f}%"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below low, 1 at or above high, linear between."""
    if high <= low:
        return 1.0 if value >= high else 0.0
    return min(max((value - low) / (high - low), 0.0), 1.0)


def fit_rarity(values: np.ndarray, share: float = 0.05) -> dict[str, Any]:
    """What rarity() needs to know of a statistic's training values ("higher is
    stranger"): the values, sorted, and the scale of their upper tail."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"sorted": np.zeros(1), "scale": 1.0}
    threshold = float(np.quantile(values, 1.0 - share))
    excess = values[values > threshold] - threshold
    scale = float(excess.mean()) if excess.size else 0.0
    if scale <= 0:
        # Everyone in the top share had the same value: fall back to the
        # spread of the whole sample, so one step past it is not infinitely rare.
        scale = float(values.std()) or 1.0
    return {"sorted": values, "scale": scale}


def rarity(value: float | np.ndarray, fitted: Mapping[str, Any]) -> np.ndarray:
    """-log10 of the share of training values at least as high as `value`.

    Inside the training range the share is empirical, (count + 1) / (n + 1),
    so values training did see, however lumpy (a feature that is 0 for 99% of
    clients), are exactly as rare as they were. Past the largest training
    value it is extrapolated with an exponential tail whose scale is the mean
    excess over training's top 5% (peaks over threshold): heavy-tailed
    training data widens it, so people's long tails stay plausible while a
    value far beyond everything seen becomes very rare.
    """
    sorted_values, scale = fitted["sorted"], fitted["scale"]
    n = sorted_values.size
    value = np.asarray(value, dtype=np.float64)
    at_least = n - np.searchsorted(sorted_values, value, side="left")
    share = (at_least + 1.0) / (n + 1.0)
    beyond = np.maximum(value - sorted_values[-1], 0.0) / scale
    return -np.log10(share) + beyond / np.log(10.0)


def rarity_anomaly(
    decades: float | np.ndarray, *, alarm_rate: float = 1e-3, width: float = 0.35
) -> np.ndarray:
    """0..1 from rarity in decades: 0.5 at alarm_rate (1 client in 1000),
    about 0.05 at 1 in 100 and 0.95 at 1 in 10000 (width: decades per logit)."""
    z = (np.asarray(decades, dtype=np.float64) + np.log10(alarm_rate)) / width
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


__all__ = [
    "EVIDENCE_KINDS",
    "Finding",
    "as_matrix",
    "describe",
    "fit_rarity",
    "format_value",
    "model_version",
    "nan_median",
    "noisy_or",
    "ramp",
    "rarity",
    "rarity_anomaly",
    "row_from",
]
