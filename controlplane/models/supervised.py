"""A classifier trained from operators' labels ("bot", "human", "good_bot") on
feature vectors, with probabilities that mean what they say.

Gradient-boosted trees (HistGradientBoostingClassifier): they take raw,
heavy-tailed, partly missing features as they are. Labels are imbalanced (a
few confirmed bots among many humans), so the trees see balanced class
weights, which makes them look hard at the rare class; the calibration that
follows (CalibratedClassifierCV) is fitted on unweighted held-out folds, which
brings the probabilities back to the labelled base rates. Calibration is
isotonic when there is enough data for a free-form curve, else sigmoid (two
parameters, hard to overfit).

The class weights shape the trees' loss but not their bins: the features are
cut at unweighted quantiles before fitting (see _snap_to_levels), which keeps
scikit-learn from placing every bin edge with a weighted percentile of its own.

Explanations are occlusion: a feature's contribution is how much P(bot) falls
when that one feature is set to a typical human's value. All features go in
one predict_proba batch, about as cheap as scoring the client once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import ThreadpoolController

from controlplane.decisions import Reason
from controlplane.models import (
    Finding,
    as_matrix,
    describe,
    ensure_fitted,
    format_value,
    model_version,
    nan_median,
    row_from,
)

MODEL = "supervised"
LABELS = ("bot", "human", "good_bot")
BOT = "bot"


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()  # inspecting the loaded libraries is slow: once


def _snap_to_levels(matrix: np.ndarray, max_levels: int) -> np.ndarray:
    """matrix with each feature of more than max_levels distinct values moved
    to the nearest of max_levels unweighted quantiles (NaN stays NaN).

    The boosters bin every feature into at most max_bins bins before growing
    trees. Given sample weights (class_weight="balanced" makes them),
    scikit-learn 1.9 places each edge of a feature with more distinct values
    than that with a separate weighted-percentile call, which took more than
    half of a fit. A feature with few enough distinct values is instead cut halfway
    between neighbouring values, at once. After snapping, those halfway points
    are the cuts between these quantiles, so a booster bins raw values at
    prediction exactly as the snapped ones it was trained on: the fitted model
    needs no transform of its own and is saved and loaded as before. Only the
    bins are unweighted (as LightGBM's are, and scikit-learn's were before it
    took weights into binning); the loss still weighs the classes.
    """
    snapped = matrix.copy()
    for column in snapped.T:  # views: assignments write into snapped
        seen = ~np.isnan(column)
        values = column[seen]
        if len(np.unique(values)) <= max_levels:
            continue
        # inverted_cdf: every level is a value seen in training.
        quantiles = np.linspace(0.0, 1.0, max_levels)
        levels = np.unique(np.quantile(values, quantiles, method="inverted_cdf"))
        cuts = (levels[:-1] + levels[1:]) / 2
        # side="left": a value on a cut goes below it, as the booster's bins do.
        column[seen] = levels[np.searchsorted(cuts, values, side="left")]
    return snapped


class SupervisedClassifier(BaseEstimator):
    """P(bot) from labelled vectors: fit(X, y, feature_names=...);
    score(features) -> calibrated P(bot); explain(features) -> Reasons naming
    the features that raised it most.

    Below min_probability (about the labelled base rate) there is no finding:
    to the scorer's noisy-OR a detector that says "probably not" is silent,
    not a small vote that every person would collect.
    """

    kind: ClassVar[str] = "supervised"

    def __init__(
        self,
        *,
        max_iter: int = 100,
        learning_rate: float = 0.1,
        max_leaf_nodes: int = 15,
        min_samples_leaf: int = 10,
        l2_regularization: float = 1.0,
        calibration_folds: int = 3,
        min_isotonic_samples: int = 1000,
        min_contribution: float = 0.05,
        max_features_named: int = 3,
        min_probability: float = 0.1,
        descriptions: Mapping[str, str] | None = None,
        n_threads: int | None = 1,
        random_state: int = 0,
    ) -> None:
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.calibration_folds = calibration_folds
        self.min_isotonic_samples = min_isotonic_samples
        self.min_contribution = min_contribution
        self.max_features_named = max_features_named
        self.min_probability = min_probability
        self.descriptions = descriptions
        self.n_threads = n_threads
        self.random_state = random_state

    def fit(
        self, X: object, y: Sequence[str], *, feature_names: Sequence[str]
    ) -> SupervisedClassifier:
        matrix = as_matrix(X, feature_names)
        labels = np.asarray([str(v) for v in y], dtype=object)
        if len(labels) != len(matrix):
            raise ValueError(f"{len(labels)} labels for {len(matrix)} vectors")
        unknown = sorted(set(labels) - set(LABELS))
        if unknown:
            raise ValueError(f"unknown labels {unknown}; expected some of {list(LABELS)}")
        classes, counts = np.unique(labels, return_counts=True)
        if BOT not in classes or len(classes) < 2:
            raise ValueError("training needs 'bot' examples and at least one other label")
        folds = min(self.calibration_folds, int(counts.min()))
        if folds < 2:
            rare = classes[int(counts.argmin())]
            raise ValueError(f"need at least 2 examples of every label; {rare!r} has 1")
        # Isotonic regression fits a free step function per class: it needs
        # every fold's held-out part to hold enough of each class.
        isotonic = len(labels) >= self.min_isotonic_samples and counts.min() >= 50 * folds
        method = "isotonic" if isotonic else "sigmoid"
        trees = HistGradientBoostingClassifier(
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf,
            l2_regularization=self.l2_regularization,
            class_weight="balanced",
            early_stopping=False,  # deterministic and no silent holdout of rare labels
            random_state=self.random_state,
        )
        # ensemble=False: the calibrator learns from cross-validated predictions
        # and one booster is refitted on everything. An ensemble of `folds`
        # boosters calibrates no better here and costs `folds` times as much
        # per prediction, which the occlusion explanation multiplies again.
        calibrated = CalibratedClassifierCV(trees, method=method, cv=folds, ensemble=False)
        with self._threads():
            calibrated.fit(_snap_to_levels(matrix, trees.max_bins), labels)
        self.model_ = calibrated
        self.classes_ = [str(c) for c in calibrated.classes_]
        self.feature_names_in_ = list(feature_names)
        self.calibration_ = method
        self.class_counts_ = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        # What a typical human looks like: the occlusion reference.
        reference_rows = matrix[labels != BOT]
        self.reference_ = nan_median(reference_rows)
        self.version_ = model_version(
            self.kind, matrix.tobytes(), "|".join(labels), "|".join(self.feature_names_in_)
        )
        return self

    # ---- scoring ----

    def predict_proba(self, X: object) -> np.ndarray:
        ensure_fitted(self)
        matrix = as_matrix(X, self.feature_names_in_)
        with self._threads():
            return self.model_.predict_proba(matrix)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        # The boosters parallelise with OpenMP. For the few rows a scorer asks
        # about, and the few thousand it trains on, threads cost more than they
        # save, and on a busy host OpenMP's spin-waiting costs far more: on a
        # loaded two-core host a fit of 1,500 rows, 51 features and three
        # labels took 8 to 9 s on two threads and 3.5 s on one (1.1 to 1.6 s
        # with two labels). None leaves the thread count to OpenMP.
        if self.n_threads is None:
            yield
            return
        with _threadpools().limit(limits=self.n_threads, user_api="openmp"):
            yield

    def bot_probability(self, X: object) -> np.ndarray:
        """Calibrated P(bot) per row of X."""
        return self.predict_proba(X)[:, self.classes_.index(BOT)]

    def score(self, features: Mapping[str, float]) -> float:
        ensure_fitted(self)
        return float(self.bot_probability(row_from(features, self.feature_names_in_)[None])[0])

    def contributions(self, features: Mapping[str, float]) -> tuple[float, np.ndarray]:
        """(P(bot), per-feature drop in P(bot) when set to the human reference)."""
        ensure_fitted(self)
        row = row_from(features, self.feature_names_in_)
        batch = np.repeat(row[None], len(row) + 1, axis=0)
        idx = np.arange(len(row))
        batch[idx + 1, idx] = self.reference_
        p = self.bot_probability(batch)
        return float(p[0]), p[0] - p[1:]

    def findings(
        self, features: Mapping[str, float], probability: float | None = None
    ) -> list[Finding]:
        """One finding with P(bot) and the features that raised it most, or none
        below min_probability. probability may come from a batch already scored;
        the occlusion batch is only run for clients that need explaining."""
        if probability is not None and probability < self.min_probability:
            return []
        p, contribution = self.contributions(features)
        if p < self.min_probability:
            return []
        names = self.feature_names_in_
        row = row_from(features, names)
        ranked = np.argsort(-contribution, kind="stable")
        order = [i for i in ranked if contribution[i] >= self.min_contribution]
        order = order[: self.max_features_named]
        parts = [
            f"{describe(names[i], self.descriptions)} {format_value(names[i], row[i])} "
            f"(humans {format_value(names[i], self.reference_[i])}, +{contribution[i]:.2f})"
            for i in order
        ]
        text = (
            f"classifier trained on {sum(self.class_counts_.values())} labelled clients "
            f"gives P(bot) {p:.2f}"
        )
        if parts:
            text += ", mostly for " + "; ".join(parts)
        reason = Reason("supervised_bot", text, round(100 * p, 1), MODEL)
        return [Finding(reason, features=tuple(names[i] for i in order))]

    def explain(self, features: Mapping[str, float]) -> list[Reason]:
        return [f.reason for f in self.findings(features)]


__all__ = ["LABELS", "SupervisedClassifier"]
