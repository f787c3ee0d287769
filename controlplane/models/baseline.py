"""An unsupervised model of this host's own traffic: how unusual one client's
feature vector is, and which features make it so.

Isolation forests, one per endpoint-class group with a global one beside them.
A client that only logs in and one that browses the catalog are both normal,
but their vectors live in different places; one forest over all of them calls
the smaller group "rare" and so anomalous. A group with too few vectors of its
own falls back to the global forest. Isolation forests need no distribution
assumptions, take heavy-tailed features (think times, rates) without scaling,
and fit in well under a second on thousands of vectors, so the model can be
refitted often.

A forest alone dilutes an extreme in one feature: a split on that feature is
drawn at one node in n_features, so a scraper at 30 times the usual request
rate but ordinary everywhere else isolates barely faster than a person. Each
feature's own rarity is therefore measured too: the share of the group's
training values at least as far out on the same side (empirical, so a share
that is 0 for 99% of people is exactly as rare as it was), extrapolated past
the extremes on a signed-log scale (rates and pauses are heavy tailed: ten
times the usual is a step, not ten). The rarest feature of a vector is a
statistic of its own, and a vector's anomaly is the larger of the forest's
and this one's.

Both statistics become 0..1 the same way: how rare the value was among the
training vectors (models.rarity: empirical inside the training range, an
exponential tail past it), mapped so that 1 client in 1/alarm_rate (1000)
scores 0.5. Calibrating the maximum, not each feature, keeps many features
from making every tenth person an outlier.

Learning is continuous: `partial_fit` keeps a bounded reservoir of recent
vectors (each new vector replaces a random slot once it is full, so a vector
survives k later arrivals with probability (1 - 1/size)^k: an exponential
window about `reservoir_size` vectors long) and refits every `refit_every`
vectors. The caller decides what is fed in; feeding it clients already judged
to be bots would teach the model that bots are normal.

Scoring does not go through IsolationForest.score_samples: that costs about
5 ms per call whatever the batch size, most of the scorer's budget for one
client. After each fit the trees are flattened into arrays and walked with
numpy, level by level, for every tree at once; a test checks the result
against score_samples.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import IsolationForest

from controlplane.decisions import Reason
from controlplane.models import (
    Finding,
    as_matrix,
    describe,
    ensure_fitted,
    fit_rarity,
    format_value,
    model_version,
    nan_median,
    rarity,
    rarity_anomaly,
    row_from,
)
from controlplane.observations import EndpointClass

MODEL = "baseline"
GLOBAL = "*"  # the forest over every group
# Vectors kept to fit on: a uniform sample of everything offered.
RESERVOIR_SIZE = 5000

# Groups of endpoint classes whose clients behave alike.
ENDPOINT_GROUPS: dict[EndpointClass, str] = {
    EndpointClass.LOGIN: "auth",
    EndpointClass.OTP: "auth",
    EndpointClass.ACCOUNT: "auth",
    EndpointClass.CART: "commerce",
    EndpointClass.CHECKOUT: "commerce",
    EndpointClass.INVENTORY: "commerce",
    EndpointClass.CATALOG: "browse",
    EndpointClass.SEARCH: "browse",
    EndpointClass.OTHER: "browse",
}


_FLAT_COLUMNS: weakref.WeakKeyDictionary[
    BaselineAnomaly, dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]
] = weakref.WeakKeyDictionary()


def endpoint_group(classes: Mapping[EndpointClass, int]) -> str:
    """The group a client belongs to: the group of most of its requests."""
    totals: dict[str, int] = {}
    for cls, count in classes.items():
        group = ENDPOINT_GROUPS.get(cls, "browse")
        totals[group] = totals.get(group, 0) + count
    if not totals:
        return GLOBAL
    return max(sorted(totals), key=lambda g: totals[g])


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n) of Liu et al.: the mean depth an unsuccessful search reaches in a
    binary search tree of n points; what an unfinished branch is still worth."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def flatten_forest(forest: IsolationForest) -> dict[str, Any]:
    """A fitted forest as plain arrays: every tree's nodes end to end.

    A leaf points to itself on both sides, so a walk of max_depth steps lands
    every row on its leaf whatever depth that leaf is at. Each leaf carries its
    path length: its depth plus c(samples left in it).
    """
    lefts, rights, features, thresholds, values, roots = [], [], [], [], [], []
    offset, max_depth = 0, 0
    for tree, columns in zip(forest.estimators_, forest.estimators_features_, strict=True):
        t = tree.tree_
        n = t.node_count
        left = t.children_left.astype(np.int64)
        right = t.children_right.astype(np.int64)
        depth = np.zeros(n, dtype=np.int64)
        for node in range(n):  # children always come after their parent
            if left[node] >= 0:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        leaf = left < 0
        own = np.arange(n)
        left = np.where(leaf, own, left) + offset
        right = np.where(leaf, own, right) + offset
        # A tree trained on a column subset numbers its features within it.
        feature = np.where(leaf, 0, np.asarray(columns)[np.maximum(t.feature, 0)])
        value = depth + _average_path_length(t.n_node_samples)
        lefts.append(left)
        rights.append(right)
        features.append(feature)
        thresholds.append(t.threshold)
        values.append(np.where(leaf, value, 0.0))
        roots.append(offset)
        offset += n
        max_depth = max(max_depth, int(depth.max()))
    left, right = np.concatenate(lefts), np.concatenate(rights)
    return {
        "left": left,
        "right": right,
        "children": _children(left, right),
        "feature": np.concatenate(features),
        "threshold": np.concatenate(thresholds),
        "value": np.concatenate(values),
        "roots": np.asarray(roots, dtype=np.int64),
        "max_depth": max_depth,
        "normaliser": float(_average_path_length(np.array([forest.max_samples_]))[0]),
    }


def _children(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Both children of every node side by side: node n's next node is
    children[2n + go_left], one lookup a step where np.where took three."""
    return np.stack([right, left], axis=1).ravel()


def flat_anomaly(flat: Mapping[str, Any], X: np.ndarray) -> np.ndarray:
    """Liu et al.'s anomaly score 2^(-mean path length / c(psi)) in (0, 1]; higher
    is stranger. It is -IsolationForest.score_samples, computed from arrays."""
    # sklearn's trees compare float32 copies of X against float64 thresholds.
    X = np.asarray(X, dtype=np.float32).astype(np.float64)
    n_rows, n_columns = X.shape
    values = X.ravel()
    row_starts = (np.arange(n_rows) * n_columns)[:, None]
    nodes = np.broadcast_to(flat["roots"], (n_rows, flat["roots"].size))
    feature, threshold = flat["feature"], flat["threshold"]
    children = flat.get("children")
    if children is None:  # a forest saved before children were kept
        children = _children(flat["left"], flat["right"])
    for _ in range(flat["max_depth"]):
        go_left = values.take(row_starts + feature.take(nodes)) <= threshold.take(nodes)
        nodes = children.take(2 * nodes + go_left)
    mean_path = flat["value"].take(nodes).mean(axis=1)
    if flat["normaliser"] == 0:
        return np.ones(X.shape[0])
    return np.power(2.0, -mean_path / flat["normaliser"])


class BaselineAnomaly(BaseEstimator):
    """How unusual a client is for this host, per endpoint-class group.

    fit(X, feature_names=..., groups=...) on the learning period's vectors;
    partial_fit(...) afterwards; score(features, group) -> 0..1;
    explain(features, group) -> the features furthest from the baseline
    (robust z-scores against the training median and IQR, among those rarer
    than 1 in 100 here), in words from `descriptions`.
    """

    kind: ClassVar[str] = "baseline"

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_samples: int = 256,
        reservoir_size: int = RESERVOIR_SIZE,
        refit_every: int = 1000,
        min_samples: int = 200,
        min_group_samples: int = 500,
        alarm_rate: float = 1e-4,
        z_threshold: float = 3.0,
        max_features_named: int = 3,
        descriptions: Mapping[str, str] | None = None,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.reservoir_size = reservoir_size
        self.refit_every = refit_every
        self.min_samples = min_samples
        self.min_group_samples = min_group_samples
        self.alarm_rate = alarm_rate
        self.z_threshold = z_threshold
        self.max_features_named = max_features_named
        self.descriptions = descriptions
        self.random_state = random_state

    def __sklearn_is_fitted__(self) -> bool:
        # The reservoir exists from the first partial_fit; the model is only
        # usable once a forest has been fitted on enough of it.
        return hasattr(self, "forests_")

    # ---- learning ----

    def fit(
        self,
        X: object,
        y: object = None,
        *,
        feature_names: Sequence[str],
        groups: Sequence[str] | None = None,
    ) -> BaselineAnomaly:
        """Start over from the learning period's vectors (rows of X)."""
        for name in ("forests_", "reservoir_", "reservoir_groups_", "seen_", "since_fit_"):
            self.__dict__.pop(name, None)
        matrix = as_matrix(X, feature_names)
        if matrix.shape[0] < self.min_samples:
            raise ValueError(
                f"baseline needs at least {self.min_samples} vectors, got {matrix.shape[0]}"
            )
        self._add(matrix, list(feature_names), groups)
        return self.refit()

    def partial_fit(
        self,
        X: object,
        y: object = None,
        *,
        feature_names: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> BaselineAnomaly:
        """Add recent vectors; refit once there are enough, then every refit_every."""
        names = (
            feature_names if feature_names is not None else getattr(self, "feature_names_in_", None)
        )
        if names is None:
            raise ValueError("the first partial_fit needs feature_names")
        self._add(as_matrix(X, names), list(names), groups)
        fitted = self.__sklearn_is_fitted__()
        if (not fitted and len(self.reservoir_) >= self.min_samples) or (
            fitted and self.since_fit_ >= self.refit_every
        ):
            self.refit()
        return self

    def refit(self) -> BaselineAnomaly:
        """Fit the forests and the robust statistics on the reservoir as it is now."""
        X = self.reservoir_
        if X.shape[0] < self.min_samples:
            raise ValueError(f"baseline needs at least {self.min_samples} vectors to fit")
        groups = np.asarray(self.reservoir_groups_, dtype=object)
        members = {GLOBAL: np.ones(len(X), dtype=bool)}
        for group in sorted(set(self.reservoir_groups_) - {GLOBAL}):
            mask = groups == group
            # A group of every vector would be the global forest over again.
            if self.min_group_samples <= mask.sum() < len(X):
                members[group] = mask
        forests, medians, scales, columns, tail_scales = {}, {}, {}, {}, {}
        forest_rarity, marginal_rarity = {}, {}
        for group, mask in members.items():
            rows = X[mask]
            median = nan_median(rows)
            rows = np.where(np.isnan(rows), median, rows)
            forest = IsolationForest(
                n_estimators=self.n_estimators,
                max_samples=min(self.max_samples, len(rows)),
                random_state=self.random_state,
            ).fit(rows)
            flat = flatten_forest(forest)
            raw = flat_anomaly(flat, rows)
            forests[group] = flat
            medians[group] = median
            scales[group] = _robust_scale(rows)
            logged = _symlog(rows)
            columns[group] = np.sort(logged, axis=0)
            tail_scales[group] = np.stack(
                [_tail_scale(logged[:, j]) for j in range(logged.shape[1])], axis=1
            )
            worst = self._feature_rarity(logged, columns[group], tail_scales[group], own=True).max(
                axis=1
            )
            marginal_rarity[group] = fit_rarity(worst)
            forest_rarity[group] = fit_rarity(raw)
        self.forests_ = forests
        self.median_ = medians
        self.scale_ = scales
        self.forest_rarity_ = forest_rarity  # per group: the forest scores' distribution
        self.feature_sorted_ = columns  # per group: each feature's training values, signed-log
        self.feature_tail_scale_ = tail_scales  # per group: [upper, lower] tail scale per feature
        self.marginal_rarity_ = marginal_rarity  # the same for the most extreme feature
        self.n_samples_fit_ = len(X)
        self.since_fit_ = 0
        self.version_ = model_version(
            self.kind, X.tobytes(), "|".join(self.feature_names_in_), repr(sorted(members))
        )
        return self

    def _add(self, X: np.ndarray, names: list[str], groups: Sequence[str] | None) -> None:
        if groups is not None and len(groups) != len(X):
            raise ValueError(f"{len(groups)} groups for {len(X)} vectors")
        labels = [GLOBAL] * len(X) if groups is None else [str(g) for g in groups]
        if not hasattr(self, "reservoir_"):
            self.feature_names_in_ = names
            self.reservoir_ = np.empty((0, len(names)))
            self.reservoir_groups_: list[str] = []
            self.seen_ = 0
            self.since_fit_ = 0
        elif names != list(self.feature_names_in_):
            raise ValueError(
                f"feature names changed: fitted on {list(self.feature_names_in_)}, got {names}"
            )
        room = max(self.reservoir_size - len(self.reservoir_), 0)
        self.reservoir_ = np.vstack([self.reservoir_, X[:room]])
        self.reservoir_groups_.extend(labels[:room])
        rest = X[room:]
        if len(rest):
            # Seeded by how much was seen before, so a replay is deterministic
            # without keeping a random generator in the persisted state.
            rng = np.random.default_rng([self.random_state, self.seen_])
            slots = rng.integers(0, self.reservoir_size, size=len(rest))
            # A later vector wins a slot drawn twice, as it would one at a time.
            last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
            self.reservoir_[slots[last]] = rest[last]
            for i in last:
                self.reservoir_groups_[slots[i]] = labels[room + i]
        self.seen_ += len(X)
        self.since_fit_ += len(X)

    # ---- scoring ----

    def score_samples(self, X: object, groups: Sequence[str | None] | None = None) -> np.ndarray:
        """0..1 per row of X: how far past the edge of the baseline each one is."""
        ensure_fitted(self)
        matrix = as_matrix(X, self.feature_names_in_)
        labels = [None] * len(matrix) if groups is None else list(groups)
        out = np.zeros(len(matrix))
        keys = np.asarray([self._group(g) for g in labels], dtype=object)
        for group in set(keys):
            mask = keys == group
            rows = matrix[mask]
            rows = np.where(np.isnan(rows), self.median_[group], rows)
            raw = flat_anomaly(self.forests_[group], rows)
            worst = self.feature_rarity(rows, group).max(axis=1)
            decades = np.maximum(
                rarity(raw, self.forest_rarity_[group]),
                rarity(worst, self.marginal_rarity_[group]),
            )
            out[mask] = rarity_anomaly(decades, alarm_rate=self.alarm_rate)
        return out

    def feature_rarity(self, rows: np.ndarray, group: str) -> np.ndarray:
        """Per row and feature: how rare the value is among the group's training
        values, in decades, on whichever side of the median it lies.

        The same as _feature_rarity, in one searchsorted for every feature:
        each column is sorted, so laid end to end with offsets wider than any
        signed-log value they form one sorted array in which a value plus its
        column's offset lands inside its own column. Per-feature numpy calls
        on one row cost more than the search itself (scoring is per tick)."""
        columns = self.feature_sorted_[group]
        scales = self.feature_tail_scale_[group]
        n, m = columns.shape
        flat, offsets = self._flat_columns(group)
        x = np.atleast_2d(_symlog(rows))
        shifted = x + offsets
        starts = np.arange(m) * n
        above = n - (np.searchsorted(flat, shifted, side="left") - starts)
        below = np.searchsorted(flat, shifted, side="right") - starts
        up = -np.log10((above + 1.0) / (n + 1.0)) + np.maximum(x - columns[-1], 0.0) / (
            scales[0] * np.log(10.0)
        )
        down = -np.log10((below + 1.0) / (n + 1.0)) + np.maximum(columns[0] - x, 0.0) / (
            scales[1] * np.log(10.0)
        )
        return np.maximum(up, down)

    def _flat_columns(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        """Derived from feature_sorted_, cached per fitted state, off the
        estimator so it is never persisted with it."""
        cache = _FLAT_COLUMNS.setdefault(self, {})
        key = (group, id(self.feature_sorted_[group]))
        if key not in cache:
            columns = self.feature_sorted_[group]
            span = 2.0 * (float(np.abs(columns).max()) + 1e3)  # wider than any value
            offsets = np.arange(columns.shape[1]) * span
            cache[key] = ((columns + offsets).T.ravel(), offsets)
        return cache[key]

    @staticmethod
    def _feature_rarity(
        logged: np.ndarray, columns: np.ndarray, scales: np.ndarray, *, own: bool = False
    ) -> np.ndarray:
        """Two-sided models.rarity, per column: the share of training values at
        least as far out on the value's side, extrapolated past the extremes.

        own: the rows are the training values themselves; each is judged
        against the others (leave one out). In-sample, no training vector is
        ever past the largest value, while one new person in n per feature
        is; calibrating on in-sample rarities would make every such person an
        outlier.
        """
        n = columns.shape[0] - int(own)
        out = np.empty_like(logged)
        for j in range(logged.shape[1]):
            column, x = columns[:, j], logged[:, j]
            above = columns.shape[0] - np.searchsorted(column, x, side="left") - int(own)
            below = np.searchsorted(column, x, side="right") - int(own)
            top, bottom = column[-1], column[0]
            if own and column.size > 1:
                # The extreme row's "others" end at the runner-up.
                top = np.where(x >= column[-1], column[-2], column[-1])
                bottom = np.where(x <= column[0], column[1], column[0])
            up = -np.log10((above + 1.0) / (n + 1.0)) + np.maximum(x - top, 0.0) / (
                scales[0, j] * np.log(10.0)
            )
            down = -np.log10((below + 1.0) / (n + 1.0)) + np.maximum(bottom - x, 0.0) / (
                scales[1, j] * np.log(10.0)
            )
            out[:, j] = np.maximum(up, down)
        return out

    def score(self, features: Mapping[str, float], group: str | None = None) -> float:
        ensure_fitted(self)
        return float(
            self.score_samples(row_from(features, self.feature_names_in_)[None], [group])[0]
        )

    def deviations(
        self, features: Mapping[str, float], group: str | None = None
    ) -> list[tuple[str, float, float]]:
        """(feature, value, robust z) for observed features, furthest first."""
        ensure_fitted(self)
        key = self._group(group)
        row = row_from(features, self.feature_names_in_)
        z = (row - self.median_[key]) / self.scale_[key]
        order = np.argsort(-np.nan_to_num(np.abs(z), nan=-1.0), kind="stable")
        return [
            (self.feature_names_in_[i], float(row[i]), float(z[i]))
            for i in order
            if np.isfinite(z[i])
        ]

    def findings(
        self,
        features: Mapping[str, float],
        group: str | None = None,
        probability: float | None = None,
        min_probability: float = 0.05,
    ) -> list[Finding]:
        """One finding naming the features furthest from the baseline, or none.

        probability may be passed in when the caller scored a batch already.
        """
        p = self.score(features, group) if probability is None else probability
        if p < min_probability:
            return []
        key = self._group(group)
        names = list(self.feature_names_in_)
        deviating = self.deviations(features, group)
        # Named as "far" only if also rare here: on a heavy-tailed feature a
        # large z is common (a long pause), and naming it would mislead.
        row = row_from(features, names)
        row = np.where(np.isnan(row), self.median_[key], row)
        rare = dict(zip(names, self.feature_rarity(row[None], key)[0], strict=True))
        strong = [d for d in deviating if abs(d[2]) >= self.z_threshold and rare[d[0]] >= 2.0]
        named = (strong or deviating)[: self.max_features_named]
        parts = []
        for name, value, _z in named:
            usual = float(self.median_[key][names.index(name)])
            words = describe(name, self.descriptions)
            parts.append(
                f"{words} {format_value(name, value)} (usually {format_value(name, usual)})"
            )
        where = "this host's usual traffic" if key == GLOBAL else f"this host's usual {key} traffic"
        lead = "far from" if strong else "an unusual combination for"
        text = f"{lead} {where}: " + "; ".join(parts)
        reason = Reason("baseline_anomaly", text, round(100 * p, 1), MODEL)
        return [Finding(reason, features=tuple(n for n, _, _ in named))]

    def explain(self, features: Mapping[str, float], group: str | None = None) -> list[Reason]:
        return [f.reason for f in self.findings(features, group)]

    def _group(self, group: str | None) -> str:
        return group if group is not None and group in self.forests_ else GLOBAL


def _tail_scale(column: np.ndarray) -> np.ndarray:
    """[upper, lower] exponential tail scales of one feature (models.fit_rarity)."""
    return np.array([fit_rarity(column)["scale"], fit_rarity(-column)["scale"]])


def _symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _robust_scale(rows: np.ndarray) -> np.ndarray:
    """Per feature: IQR / 1.349 (the standard deviation, for a normal), falling
    back to the standard deviation when most values are equal (a share that is
    usually 0) and to 1 when the feature never varied."""
    q75, q25 = np.percentile(rows, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = rows.std(axis=0)
    scale = np.where(scale > 0, scale, std)
    return np.where(scale > 0, scale, 1.0)


__all__ = [
    "ENDPOINT_GROUPS",
    "GLOBAL",
    "BaselineAnomaly",
    "endpoint_group",
    "flat_anomaly",
    "flatten_forest",
]
