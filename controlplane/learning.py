"""Learning from labels: the training set, retraining of the supervised
classifier, its shadow evaluation against the live model, promotion, and
feature drift.

    operator feedback (API) ─► TrainingSet ◄─ confident verdicts (engine)
                                   │ snapshot; per label the newest part is held out
                                   ▼
    LearningLoop (thread) ─► Retrainer.retrain ─► Candidate (fitted on the older part)
                                   │ evaluate: candidate and live model on the holdout
                                   ▼
                               Comparison ─► registry (status "shadow", file saved)
                                   │ fewer or equal false positives AND catches as
                                   │ many bots, one of them strictly: promoted
                                   ▼
                 RiskScorer.supervised = candidate; registry: new "live", old "retired"

    DriftMonitor: population stability index per feature, reference vs. recent.

Self-training is the risk in a loop like this: the live scorer's confident
verdicts become the next model's labels, so a mistake can confirm itself. Three
things keep that in check: operator feedback outweighs verdicts and replaces a
verdict on the same client at once; verdict buckets are capped per label, so
one loud attack cannot fill the set; and nothing goes live unless it beats the
live model on recent labels on both counts.

The registry (controlplane/store.py) and the label store are reached through
the small protocols below, so this module does not depend on SQLite and tests
use in-memory fakes.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from controlplane.features import FEATURE_DESCRIPTIONS, FEATURE_NAMES
from controlplane.models import row_from
from controlplane.models.persist import ModelLoadError, load_model, save_model
from controlplane.models.supervised import BOT, LABELS, SupervisedClassifier
from controlplane.scoring import RiskScorer
from sensor.errors import BotwallError

log = logging.getLogger(__name__)

KIND: Final = SupervisedClassifier.kind  # the registry's model kind for everything here

SOURCE_FEEDBACK: Final = "feedback"  # an operator or the application said so
SOURCE_VERDICT: Final = "verdict"  # the scorer was confident
Source = Literal["feedback", "verdict"]

STATUS_SHADOW: Final = "shadow"  # evaluated beside the live model, not promoted
STATUS_LIVE: Final = "live"
STATUS_RETIRED: Final = "retired"  # was live, replaced


# ---- errors ----
#
#   BotwallError (sensor/errors.py)
#   └── LearningError
#       ├── NotEnoughLabels   too few labels of a class to train or to judge
#       └── PromotionError    a version the registry does not know
#   ModelLoadError (persist.py) is raised as is: a tampered or mismatched file.


class LearningError(BotwallError):
    """Root of the errors this module raises on purpose."""


class NotEnoughLabels(LearningError):
    """Too few labels to retrain; not a failure, a reason to wait.

    part: "training" or "holdout"; counts: examples per label in that part;
    needed: the minimum of bots, and of non-bots (human + good_bot), it needs.
    """

    def __init__(self, part: str, counts: Mapping[str, int], needed: int) -> None:
        self.part = part
        self.counts = dict(counts)
        self.needed = needed
        have = ", ".join(f"{label} {n}" for label, n in self.counts.items())
        super().__init__(
            f"not enough labels to retrain: the {part} part needs {needed} bot and "
            f"{needed} human or good_bot examples, it has {have}"
        )


class PromotionError(LearningError):
    """A promotion that cannot be done, in words (an unknown version)."""


# ---- what this module needs from the store ----


class LabelSource(Protocol):
    """Stored labels to rebuild a training set from at start-up."""

    def labels(self) -> Iterable[tuple[Mapping[str, float], str]]: ...


class ModelRecord(Protocol):
    """One registered model version, as the registry returns it."""

    @property
    def version(self) -> str: ...

    @property
    def path(self) -> str: ...


class ModelRegistry(Protocol):
    """Where model versions, their files, statuses and comparisons are recorded."""

    def register_model(
        self,
        *,
        kind: str,
        version: str,
        path: str,
        feature_names: Sequence[str],
        status: str,
        comparison: Mapping[str, Any] | None,
    ) -> None: ...

    def set_model_status(
        self, kind: str, version: str, status: str, actor: str | None = None
    ) -> None:
        """actor: who changed it, when not the learner itself (a hand promotion)."""
        ...

    def live_model(self, kind: str) -> ModelRecord | None: ...

    def model(self, kind: str, version: str) -> ModelRecord | None: ...


# ---- the training set ----


def confident_label(
    score: float, *, bot_score: float = 90.0, human_score: float = 10.0
) -> tuple[str, float] | None:
    """A verdict sure enough to learn from, as (label, confidence), or None.

    A risk score at or above bot_score is a bot with confidence score/100; at
    or below human_score a human with confidence 1 - score/100. Everything in
    between is what the model is unsure of, and learning from its own guesses
    there would only teach it its own mistakes.
    """
    if not math.isfinite(score):
        return None
    if score >= bot_score:
        return BOT, min(score / 100.0, 1.0)
    if score <= human_score:
        return "human", min(1.0 - score / 100.0, 1.0)
    return None


@dataclass(frozen=True, slots=True, eq=False)
class LabelledData:
    """An immutable snapshot of labelled vectors, one row per example.

    X has columns in feature_names order, NaN where a feature was not
    observed; y holds labels from supervised.LABELS; weights, sources and ts
    (seconds) go with each row.
    """

    feature_names: tuple[str, ...]
    X: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    sources: np.ndarray
    ts: np.ndarray

    @classmethod
    def empty(cls, feature_names: Sequence[str]) -> LabelledData:
        return cls(
            tuple(feature_names),
            np.zeros((0, len(feature_names))),
            np.array([], dtype=object),
            np.zeros(0),
            np.array([], dtype=object),
            np.zeros(0),
        )

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict[str, int]:
        """Examples per label, every label named (0 when absent)."""
        return {label: int(np.count_nonzero(self.y == label)) for label in LABELS}

    def subset(self, index: np.ndarray) -> LabelledData:
        return LabelledData(
            self.feature_names,
            self.X[index],
            self.y[index],
            self.weights[index],
            self.sources[index],
            self.ts[index],
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[LabelledData, LabelledData]:
        """(train, holdout): of each label, the newest `fraction` is held out.

        Newest, because the holdout stands for the traffic the model will meet
        next, and a model that only interpolates its own past should not look
        good on it. Per label, because labels arrive in bursts (one attack,
        then a day of feedback on people) and a single time cut could leave
        the holdout without a class. Equal timestamps are ordered by a seeded
        shuffle, so the split is reproducible.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction must be between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        held = np.zeros(len(self), dtype=bool)
        for label in LABELS:
            idx = np.flatnonzero(self.y == label)
            n_held = round(len(idx) * fraction)
            if n_held == 0:
                continue
            # lexsort sorts by its last key first: time, then the random tiebreak.
            order = np.lexsort((rng.permutation(len(idx)), self.ts[idx]))
            held[idx[order[len(idx) - n_held :]]] = True
        return self.subset(np.flatnonzero(~held)), self.subset(np.flatnonzero(held))


@dataclass(frozen=True, slots=True, eq=False)
class _Example:
    vector: np.ndarray  # read-only, feature_names order
    label: str
    weight: float
    source: Source
    ts: float
    seq: int  # order of arrival in the whole set, for "evict the oldest"


class _Bucket:
    """At most `cap` examples of one (source, label), each under an identity
    (the client's key, or an anonymous token) so a client appears once.

    When full, evict="oldest" drops the example that arrived first, and
    evict="random" replaces one at random. The random policy keeps a fading
    memory: after k more arrivals an example is still there with probability
    (1 - 1/cap)^k, about exp(-k/cap). The bucket follows the traffic, yet a
    burst of one attack as large as the cap leaves about 37 % of what came
    before (a newest-only window would keep none of it, and a uniform
    reservoir would soon stop admitting anything new).
    """

    __slots__ = ("cap", "evict", "ids", "items", "pos", "rng")

    def __init__(self, cap: int, evict: Literal["oldest", "random"], rng: random.Random) -> None:
        self.cap = cap
        self.evict = evict
        self.rng = rng
        self.items: list[_Example] = []
        self.ids: list[Hashable] = []
        self.pos: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, ident: Hashable) -> _Example | None:
        i = self.pos.get(ident)
        return None if i is None else self.items[i]

    def put(self, ident: Hashable, example: _Example) -> Hashable | None:
        """Adds or replaces; returns the identity evicted to make room, if any."""
        i = self.pos.get(ident)
        if i is not None:
            self.items[i] = example
            return None
        if len(self.items) < self.cap:
            self.pos[ident] = len(self.items)
            self.items.append(example)
            self.ids.append(ident)
            return None
        if self.evict == "random":
            i = self.rng.randrange(self.cap)
        else:
            i = min(range(len(self.items)), key=lambda j: self.items[j].seq)
        evicted = self.ids[i]
        del self.pos[evicted]
        self.items[i], self.ids[i], self.pos[ident] = example, ident, i
        return evicted

    def remove(self, ident: Hashable) -> bool:
        i = self.pos.pop(ident, None)
        if i is None:
            return False
        last = len(self.items) - 1
        if i != last:  # move the last example into the hole: O(1)
            self.items[i], self.ids[i] = self.items[last], self.ids[last]
            self.pos[self.ids[i]] = i
        self.items.pop()
        self.ids.pop()
        return True


class TrainingSet:
    """Bounded labelled examples for the supervised classifier.

    Operator feedback (add_feedback) is taken whole, at weight feedback_weight,
    up to max_feedback_per_label per label (then the oldest goes): people
    label little, and every label counts. Confident verdicts (add_confident)
    are plentiful, so they weigh less (verdict_weight), are capped at
    max_verdicts_per_label per label with random replacement (_Bucket), and
    human verdicts are sampled (human_sample_rate) from long-lived clients
    only (age_s >= human_min_age_s): a client seen for an hour without ever
    looking like a bot is good evidence of a person; one seen for ten seconds
    is not evidence of anything.

    Examples given a key (the client address, or any hashable) are one per
    key: feedback on a key replaces whatever was there at once, whatever its
    label or source (the operator's word on a false positive undoes the
    verdict's label before the next retrain), and later verdicts on that key
    are ignored. Thread-safe: the engine adds verdicts, the API feedback, and
    the learning thread takes snapshots.
    """

    def __init__(
        self,
        feature_names: Sequence[str] = FEATURE_NAMES,
        *,
        max_feedback_per_label: int = 5_000,
        max_verdicts_per_label: int = 5_000,
        feedback_weight: float = 1.0,
        verdict_weight: float = 0.5,
        min_confidence: float = 0.9,
        human_sample_rate: float = 0.1,
        human_min_age_s: float = 3_600.0,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(set(feature_names)) != len(feature_names):
            raise ValueError("feature names must be unique")
        if min(max_feedback_per_label, max_verdicts_per_label) < 1:
            raise ValueError("per-label caps must be at least 1")
        self.feature_names = tuple(feature_names)
        self.feedback_weight = feedback_weight
        self.verdict_weight = verdict_weight
        self.min_confidence = min_confidence
        self.human_sample_rate = human_sample_rate
        self.human_min_age_s = human_min_age_s
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        for label in LABELS:
            self._buckets[SOURCE_FEEDBACK, label] = _Bucket(
                max_feedback_per_label, "oldest", self._rng
            )
            self._buckets[SOURCE_VERDICT, label] = _Bucket(
                max_verdicts_per_label, "random", self._rng
            )
        self._where: dict[Hashable, tuple[str, str]] = {}  # identity -> its bucket
        self._seq = 0
        self._revision = 0

    # ---- adding ----

    def add_feedback(
        self,
        features: Mapping[str, float],
        label: str,
        *,
        key: Hashable | None = None,
        ts: float | None = None,
    ) -> None:
        """An operator's (or the application's) label; recorded at once."""
        _check_label(label)
        with self._lock:
            self._put(key, features, label, self.feedback_weight, SOURCE_FEEDBACK, ts)

    def add_confident(
        self,
        features: Mapping[str, float],
        label: str,
        confidence: float,
        *,
        key: Hashable | None = None,
        ts: float | None = None,
    ) -> bool:
        """A verdict the scorer was sure of (see confident_label); returns
        whether it was kept. Refused: below min_confidence, a key the
        operator has labelled, a human too young or not sampled."""
        _check_label(label)
        if not math.isfinite(confidence) or confidence < self.min_confidence:
            return False
        with self._lock:
            where = self._where.get(key) if key is not None else None
            if where is not None and where[0] == SOURCE_FEEDBACK:
                return False  # the operator's word stands
            if label == "human" and where is None:
                # Refreshing a human already sampled is free; a new one is sampled.
                age = features.get("age_s", 0.0)
                if not age >= self.human_min_age_s:  # NaN (age unknown) is too young
                    return False
                if self._rng.random() >= self.human_sample_rate:
                    return False
            self._put(key, features, label, self.verdict_weight, SOURCE_VERDICT, ts)
            return True

    def load_feedback(self, source: LabelSource) -> int:
        """Adds every stored label as feedback (at start-up); returns how many."""
        n = 0
        for features, label in source.labels():
            self.add_feedback(features, label)
            n += 1
        return n

    def forget(self, key: Hashable) -> bool:
        """Removes a key's example (a label given by mistake)."""
        with self._lock:
            where = self._where.pop(key, None)
            if where is None:
                return False
            self._buckets[where].remove(key)
            self._revision += 1
            return True

    def _put(
        self,
        key: Hashable | None,
        features: Mapping[str, float],
        label: str,
        weight: float,
        source: Source,
        ts: float | None,
    ) -> None:
        vector = row_from(features, self.feature_names)
        vector.flags.writeable = False
        self._seq += 1
        stamp = self._clock() if ts is None else ts
        example = _Example(vector, label, weight, source, stamp, self._seq)
        ident: Hashable = key if key is not None else object()  # object(): a unique token
        old = self._where.get(ident)
        if old is not None and old != (source, label):
            self._buckets[old].remove(ident)
        evicted = self._buckets[source, label].put(ident, example)
        if evicted is not None:
            del self._where[evicted]
        self._where[ident] = (source, label)
        self._revision += 1

    # ---- reading ----

    @property
    def revision(self) -> int:
        """Grows with every change: a retrain is worth it only if it moved."""
        return self._revision

    def __len__(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buckets.values())

    def label_of(self, key: Hashable) -> str | None:
        """The label the set holds for a key now, whatever its source."""
        with self._lock:
            where = self._where.get(key)
            return None if where is None else where[1]

    def source_of(self, key: Hashable) -> str | None:
        with self._lock:
            where = self._where.get(key)
            return None if where is None else where[0]

    def class_counts(self) -> dict[str, int]:
        """Examples per label, all sources together."""
        with self._lock:
            return {
                label: sum(len(self._buckets[s, label]) for s in (SOURCE_FEEDBACK, SOURCE_VERDICT))
                for label in LABELS
            }

    def counts_by_source(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                source: {label: len(self._buckets[source, label]) for label in LABELS}
                for source in (SOURCE_FEEDBACK, SOURCE_VERDICT)
            }

    def snapshot(self) -> LabelledData:
        """Everything, as arrays; later additions do not change it."""
        with self._lock:
            examples = [e for b in self._buckets.values() for e in b.items]
        if not examples:
            return LabelledData.empty(self.feature_names)
        examples.sort(key=lambda e: e.seq)
        return LabelledData(
            self.feature_names,
            np.stack([e.vector for e in examples]),
            np.array([e.label for e in examples], dtype=object),
            np.array([e.weight for e in examples], dtype=np.float64),
            np.array([e.source for e in examples], dtype=object),
            np.array([e.ts for e in examples], dtype=np.float64),
        )

    def matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, weights) of every example, X in feature_names order."""
        data = self.snapshot()
        return data.X, data.y, data.weights

    def holdout(self, fraction: float = 0.25, seed: int = 0) -> tuple[LabelledData, LabelledData]:
        """(train, holdout) of a snapshot; see LabelledData.split."""
        return self.snapshot().split(fraction, seed)


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {list(LABELS)}")


# ---- evaluation ----


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """How one model does on a holdout at the decision threshold.

    A false positive is a human or a good bot given P(bot) >= threshold;
    detection is the share of bots given it. AUC (ranking, threshold-free)
    and Brier score (mean squared error of P(bot), lower is better) are shown
    to the operator but do not decide promotion: the policy acts on the
    threshold, so that is where the two models are compared.
    """

    version: str
    false_positive_rate: float
    detection_rate: float
    false_positives: int
    negatives: int  # humans and good bots in the holdout
    detected: int
    bots: int
    auc: float | None  # None when the holdout lacks a class
    brier: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "false_positive_rate": self.false_positive_rate,
            "detection_rate": self.detection_rate,
            "false_positives": self.false_positives,
            "negatives": self.negatives,
            "detected": self.detected,
            "bots": self.bots,
            "auc": self.auc,
            "brier": self.brier,
        }


@dataclass(frozen=True, slots=True)
class Comparison:
    """A candidate beside the live model (None: there was none) on one holdout,
    with the promotion decision and its reason; as_dict() is what the registry
    stores and the API shows."""

    candidate: ModelMetrics
    live: ModelMetrics | None
    threshold: float
    holdout: dict[str, int]  # examples per label
    trained_on: dict[str, int]  # the candidate's training examples per label
    evaluated_at: float
    promote: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.as_dict(),
            "live": None if self.live is None else self.live.as_dict(),
            "threshold": self.threshold,
            "holdout": dict(self.holdout),
            "trained_on": dict(self.trained_on),
            "evaluated_at": self.evaluated_at,
            "promote": self.promote,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True, eq=False)
class Candidate:
    """A freshly fitted model, with the holdout it has not seen."""

    model: SupervisedClassifier
    holdout: LabelledData
    trained_on: dict[str, int]
    dropped: tuple[str, ...] = ()  # labels too rare to learn, left out of training
    weighted: bool = False  # whether example weights reached the fit

    @property
    def version(self) -> str:
        return str(self.model.version_)


OutcomeStatus = Literal["promoted", "shadow", "skipped", "error"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one retraining round did, for the loop's stats and the API."""

    status: OutcomeStatus
    reason: str
    ts: float
    version: str | None = None
    comparison: dict[str, Any] | None = None


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _aligned(data: LabelledData, names: Sequence[str]) -> np.ndarray:
    """data.X with the columns a model was trained on, in its order; columns
    the data lacks are NaN ("not observed"), as row_from does for one client."""
    if tuple(names) == data.feature_names:
        return data.X
    column = {name: i for i, name in enumerate(data.feature_names)}
    out = np.full((len(data), len(names)), np.nan)
    for j, name in enumerate(names):
        if name in column:
            out[:, j] = data.X[:, column[name]]
    return out


# ---- retraining and promotion ----


class Retrainer:
    """Fits candidates, compares them with the live model, and promotes.

    models_dir: where model files are written (persist.save_model), one per
        version, named after it.
    registry: the ModelRegistry that records versions, statuses and comparisons.
    classifier: a SupervisedClassifier whose parameters every candidate copies
        (default: the live model's, else SupervisedClassifier's defaults).
    threshold: P(bot) at which a client counts as flagged.
    min_train_per_class / min_holdout_per_class: bots, and humans plus good
        bots, needed in each part; below, retrain raises NotEnoughLabels.
    key: HMAC key for model files (persist.py); None for SHA-256 only.
    """

    def __init__(
        self,
        models_dir: str | Path,
        registry: ModelRegistry,
        *,
        feature_names: Sequence[str] = FEATURE_NAMES,
        classifier: SupervisedClassifier | None = None,
        threshold: float = 0.5,
        holdout_fraction: float = 0.25,
        min_train_per_class: int = 20,
        min_holdout_per_class: int = 10,
        seed: int = 0,
        key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.registry = registry
        self.feature_names = tuple(feature_names)
        self.classifier = classifier
        self.threshold = threshold
        self.holdout_fraction = holdout_fraction
        self.min_train_per_class = min_train_per_class
        self.min_holdout_per_class = min_holdout_per_class
        self.seed = seed
        self.key = key
        self._clock = clock

    # ---- fitting ----

    def retrain(
        self, training: TrainingSet | LabelledData, live: SupervisedClassifier | None = None
    ) -> Candidate:
        """A new model fitted on all but the newest labels; raises NotEnoughLabels."""
        data = training.snapshot() if isinstance(training, TrainingSet) else training
        if data.feature_names != self.feature_names:
            raise ValueError(
                f"training data has features {list(data.feature_names)}, "
                f"this retrainer uses {list(self.feature_names)}"
            )
        train, holdout = data.split(self.holdout_fraction, self.seed)
        self._require(holdout, "holdout", self.min_holdout_per_class)
        # A label too rare to learn (three good bots) is left out rather than
        # fail the fit: calibration needs several of every class. It stays in
        # the holdout, where those clients still count as negatives.
        counts = train.counts()
        dropped = tuple(
            label
            for label in LABELS
            if label != BOT and 0 < counts[label] < self.min_train_per_class
        )
        if dropped:
            train = train.subset(np.flatnonzero(~np.isin(train.y, dropped)))
        self._require(train, "training", self.min_train_per_class)
        prototype = self.classifier if self.classifier is not None else live
        model: SupervisedClassifier = (
            clone(prototype)
            if prototype is not None
            else SupervisedClassifier(descriptions=FEATURE_DESCRIPTIONS)
        )
        weighted = _fit(model, train)
        return Candidate(model, holdout, train.counts(), dropped, weighted)

    def _require(self, data: LabelledData, part: str, needed: int) -> None:
        counts = data.counts()
        bots = counts[BOT]
        others = len(data) - bots
        if bots < needed or others < needed:
            raise NotEnoughLabels(part, counts, needed)

    # ---- judging ----

    def evaluate(
        self,
        candidate: Candidate,
        live: SupervisedClassifier | None,
        holdout: LabelledData | None = None,
    ) -> Comparison:
        """Both models on the same holdout (the candidate's own by default),
        with the promotion decision. The live model may have trained on some
        of these labels, which can only flatter it: the bias is against
        promotion, the safe direction."""
        data = candidate.holdout if holdout is None else holdout
        comparison = Comparison(
            candidate=self.metrics(candidate.model, data),
            live=self.metrics(live, data) if _fitted(live) else None,
            threshold=self.threshold,
            holdout=data.counts(),
            trained_on=dict(candidate.trained_on),
            evaluated_at=self._clock(),
        )
        promote, reason = self.judge(comparison)
        return replace(comparison, promote=promote, reason=reason)

    def metrics(self, model: Any, data: LabelledData) -> ModelMetrics:
        p = model.bot_probability(_aligned(data, model.feature_names_in_))
        is_bot = data.y == BOT
        flagged = p >= self.threshold
        bots = int(is_bot.sum())
        negatives = len(data) - bots
        false_positives = int(np.count_nonzero(flagged & ~is_bot))
        detected = int(np.count_nonzero(flagged & is_bot))
        auc = float(roc_auc_score(is_bot, p)) if bots and negatives else None
        brier = float(np.mean((p - is_bot) ** 2)) if len(data) else 0.0
        return ModelMetrics(
            version=str(model.version_),
            false_positive_rate=_rate(false_positives, negatives),
            detection_rate=_rate(detected, bots),
            false_positives=false_positives,
            negatives=negatives,
            detected=detected,
            bots=bots,
            auc=auc,
            brier=brier,
        )

    def judge(self, comparison: Comparison) -> tuple[bool, str]:
        """(promote?, why): only with enough holdout of each class, and only if
        the candidate has no more false positives AND catches no fewer bots,
        one of the two strictly better.

        With no live model, the live side is a detector that flags nothing
        (no false positives, no detection): a first model goes live on its own
        only if it flags no person in the holdout, else by hand. A model that
        speaks for the first time should be looked at by someone.
        """
        cand = comparison.candidate
        if min(cand.bots, cand.negatives) < self.min_holdout_per_class:
            return False, (
                f"holdout too small to judge: {cand.bots} bots and {cand.negatives} "
                f"others, {self.min_holdout_per_class} of each needed"
            )
        live = comparison.live
        live_fpr = live.false_positive_rate if live is not None else 0.0
        live_det = live.detection_rate if live is not None else 0.0
        name = "the live model" if live is not None else "no model (which flags nobody)"
        fpr = f"false positives {cand.false_positive_rate:.1%} vs {live_fpr:.1%}"
        det = f"detection {cand.detection_rate:.1%} vs {live_det:.1%}"
        if cand.false_positive_rate > live_fpr:
            return False, f"more false positives than {name}: {fpr}; {det}"
        if cand.detection_rate < live_det:
            return False, f"catches fewer bots than {name}: {det}; {fpr}"
        if cand.false_positive_rate == live_fpr and cand.detection_rate == live_det:
            return False, f"no better than {name}: {fpr}; {det}"
        return True, f"better than {name}: {fpr}; {det}"

    def should_promote(self, comparison: Comparison) -> bool:
        return self.judge(comparison)[0]

    # ---- recording and promoting ----

    def consider(self, candidate: Candidate, scorer: RiskScorer) -> Outcome:
        """Evaluates a candidate beside scorer.supervised, records it in the
        registry as a shadow version, and promotes it if it is better."""
        live = scorer.supervised if _fitted(scorer.supervised) else None
        now = self._clock()
        if live is not None and live.version_ == candidate.version:
            return Outcome("skipped", "the candidate is the live model", now, candidate.version)
        if self.registry.model(KIND, candidate.version) is not None:
            # model_version() digests the training data: same labels, same version.
            return Outcome("skipped", "this version was already evaluated", now, candidate.version)
        comparison = self.evaluate(candidate, live)
        record = comparison.as_dict()
        self._register(candidate.model, record, STATUS_SHADOW)
        if not comparison.promote:
            log.info("model %s stays in shadow: %s", candidate.version, comparison.reason)
            return Outcome("shadow", comparison.reason, now, candidate.version, record)
        self._make_live(candidate.model, scorer)
        log.info("model %s promoted: %s", candidate.version, comparison.reason)
        return Outcome("promoted", comparison.reason, now, candidate.version, record)

    def promote(
        self,
        candidate: Candidate,
        scorer: RiskScorer,
        comparison: Comparison | None = None,
    ) -> None:
        """Makes a candidate live whatever the comparison says (an operator's
        decision): saved and registered if it was not, the old live version
        retired, scorer.supervised replaced."""
        if self.registry.model(KIND, candidate.version) is None:
            record = None if comparison is None else comparison.as_dict()
            self._register(candidate.model, record, STATUS_SHADOW)
        self._make_live(candidate.model, scorer)

    def promote_version(
        self, version: str, scorer: RiskScorer, *, actor: str | None = None
    ) -> SupervisedClassifier:
        """Makes a registered version live by hand, from its file. The file is
        loaded by persist.load_model, which refuses (ModelLoadError) a file
        altered since it was saved, a different kind, or other feature names."""
        record = self.registry.model(KIND, version)
        if record is None:
            raise PromotionError(f"no {KIND} model version {version!r} in the registry")
        model = load_model(record.path, feature_names=self.feature_names, kind=KIND, key=self.key)
        if model.version_ != version:
            raise ModelLoadError(
                f"{record.path}: holds version {model.version_}, the registry says {version}"
            )
        self._make_live(model, scorer, actor)
        log.info("model %s promoted by hand%s", version, f" ({actor})" if actor else "")
        return model

    def _register(
        self, model: SupervisedClassifier, comparison: Mapping[str, Any] | None, status: str
    ) -> Path:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        path = self.models_dir / f"{model.version_}.model"
        save_model(model, path, key=self.key)
        self.registry.register_model(
            kind=KIND,
            version=str(model.version_),
            path=str(path),
            feature_names=list(model.feature_names_in_),
            status=status,
            comparison=comparison,
        )
        return path

    def _make_live(
        self, model: SupervisedClassifier, scorer: RiskScorer, actor: str | None = None
    ) -> None:
        # The registry first: if it fails, the scorer keeps its model and the
        # error says why (two writes here: a store can make them one
        # transaction). The swap is one attribute assignment, which the
        # engine's thread sees whole.
        previous = self.registry.live_model(KIND)
        if previous is not None and previous.version != model.version_:
            self.registry.set_model_status(KIND, previous.version, STATUS_RETIRED, actor)
        self.registry.set_model_status(KIND, str(model.version_), STATUS_LIVE, actor)
        scorer.supervised = model


def _fitted(model: object) -> bool:
    return model is not None and getattr(model, "version_", None) is not None


def _fit(model: SupervisedClassifier, data: LabelledData) -> bool:
    """Fits on data; returns whether the example weights were used.

    SupervisedClassifier.fit takes no sample_weight yet; when it does, the
    weights (feedback above verdicts) reach it without a change here.
    """
    fit: Callable[..., Any] = model.fit
    if "sample_weight" in inspect.signature(fit).parameters:
        fit(data.X, data.y, feature_names=data.feature_names, sample_weight=data.weights)
        return True
    fit(data.X, data.y, feature_names=data.feature_names)
    return False


# ---- the background loop ----


@dataclass(slots=True)
class LoopStats:
    runs: int = 0
    promoted: int = 0
    shadow: int = 0
    skipped: int = 0
    errors: int = 0
    last: Outcome | None = None
    last_error: str | None = None


class LearningLoop:
    """Retrains every interval_s, or at once on request_retrain(), in a daemon
    thread; run_once() is the same round, called directly (tests, the CLI).

    A round with no new labels since the last one is skipped unless asked
    for. A round never raises: NotEnoughLabels is a skip, anything else is
    logged and counted as an error and the next round tries again, because a
    failed retrain must never take the agent down with it. Rounds and manual
    promotions are serialised by one lock.
    """

    def __init__(
        self,
        training: TrainingSet,
        retrainer: Retrainer,
        scorer: RiskScorer,
        *,
        interval_s: float = 3_600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.training = training
        self.retrainer = retrainer
        self.scorer = scorer
        self.interval_s = interval_s
        self._clock = clock
        self.stats = LoopStats()
        self._lock = threading.Lock()  # one round or promotion at a time
        self._done = threading.Condition()  # notified after every round
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._requested = False
        self._trained_revision: int | None = None
        self._thread: threading.Thread | None = None

    def run_once(self, *, force: bool = False) -> Outcome:
        """One round: retrain, evaluate, maybe promote. Never raises."""
        with self._lock:
            force = force or self._take_request()
            revision = self.training.revision
            if not force and revision == self._trained_revision:
                outcome = Outcome("skipped", "no new labels since the last round", self._clock())
            else:
                outcome = self._round()
                if outcome.status != "error":
                    self._trained_revision = revision
            self._record(outcome)
            return outcome

    def _round(self) -> Outcome:
        try:
            live = self.scorer.supervised if _fitted(self.scorer.supervised) else None
            candidate = self.retrainer.retrain(self.training, live)
            return self.retrainer.consider(candidate, self.scorer)
        except NotEnoughLabels as exc:
            return Outcome("skipped", str(exc), self._clock())
        except Exception as exc:
            log.exception("retraining failed")
            return Outcome("error", f"{type(exc).__name__}: {exc}", self._clock())

    def _record(self, outcome: Outcome) -> None:
        with self._done:
            stats = self.stats
            stats.runs += 1
            stats.last = outcome
            if outcome.status == "promoted":
                stats.promoted += 1
            elif outcome.status == "shadow":
                stats.shadow += 1
            elif outcome.status == "skipped":
                stats.skipped += 1
            else:
                stats.errors += 1
                stats.last_error = outcome.reason
            self._done.notify_all()

    def promote_version(self, version: str, *, actor: str | None = None) -> SupervisedClassifier:
        """Retrainer.promote_version, never in the middle of a round."""
        with self._lock:
            return self.retrainer.promote_version(version, self.scorer, actor=actor)

    # ---- the thread ----

    def request_retrain(self) -> None:
        """Retrain now (in the thread), even if no label changed."""
        with self._done:
            self._requested = True
        self._wake.set()

    def _take_request(self) -> bool:
        with self._done:
            requested, self._requested = self._requested, False
            return requested

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        with self._done:  # stop() set the event; only a pending request may stay
            if not self._requested:
                self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="botwall-learning", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval_s)
            if self._stopping.is_set():
                return
            self._wake.clear()
            self.run_once()

    def stop(self, timeout: float | None = None) -> bool:
        """Stops the thread after the round in progress; returns whether it ended."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for_runs(self, runs: int, timeout: float) -> bool:
        """Blocks until stats.runs >= runs or timeout; returns whether it got there."""
        with self._done:
            return self._done.wait_for(lambda: self.stats.runs >= runs, timeout)


# ---- drift ----

PSI_STABLE: Final = 0.1
PSI_MAJOR: Final = 0.25


def psi_level(value: float) -> str:
    """The usual reading of a PSI: below 0.1 stable, 0.1 to 0.25 a moderate
    shift worth watching, above 0.25 a major one (retrain, or find out why)."""
    if value < PSI_STABLE:
        return "stable"
    if value <= PSI_MAJOR:
        return "moderate"
    return "major"


class DriftMonitor:
    """How far recent traffic's features have moved from a reference, as the
    population stability index (PSI) per feature.

    fit(reference) cuts each feature at its reference quantiles into up to
    `bins` bins (fewer when values repeat: a share that is 0 for most clients
    has one bin for 0), plus one bin for "not observed" (NaN), since a feature
    that stops being seen is drift too. Bins are closed on the right, so a
    point mass sits in the bin its quantile edge closes.

    update() adds recent vectors with exponential decay: each has weight
    exp(-k / window) after k later ones, so "recent" means about the last
    `window` vectors. PSI = sum over bins of (q - p) ln(q / p), p the
    reference share and q the recent one, both smoothed as (share + epsilon) /
    (1 + epsilon * bins) so an empty bin costs a large but finite amount.

    Reading: below 0.1 stable, 0.1-0.25 moderate, above 0.25 major (psi_level).
    Sampling noise alone gives about (bins - 1) / n for n recent vectors, so
    psi() says nothing until min_samples have been seen.
    """

    def __init__(
        self,
        feature_names: Sequence[str] = FEATURE_NAMES,
        *,
        bins: int = 10,
        window: float = 5_000.0,
        epsilon: float = 1e-4,
        min_samples: float = 500.0,
    ) -> None:
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.feature_names = tuple(feature_names)
        self.bins = bins
        self.window = window
        self.epsilon = epsilon
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self.reset()

    def fit(self, reference: object) -> DriftMonitor:
        """Reference distributions from a matrix whose columns are feature_names."""
        X = _as_rows(reference, len(self.feature_names))
        if len(X) == 0:
            raise ValueError("the drift reference needs at least one vector")
        quantiles = np.linspace(0.0, 1.0, self.bins + 1)[1:-1]
        edges: list[np.ndarray] = []
        for j in range(X.shape[1]):
            finite = X[:, j][np.isfinite(X[:, j])]
            edges.append(np.unique(np.quantile(finite, quantiles)) if finite.size else np.zeros(0))
        self.edges_ = edges
        # Counts in columns [0, len(edges)] for the value bins (at most
        # `bins` of them), and column `bins` for "not observed".
        self.reference_ = self._counts(X, np.ones(len(X)))
        self.reference_samples_ = len(X)
        self.reset()
        return self

    def reset(self) -> None:
        """Forgets recent traffic (after the reference is refitted)."""
        with self._lock:
            self._current = np.zeros((len(self.feature_names), self.bins + 1))
            self._scale = 1.0  # the weight the next vector adds (lazy decay)

    def update(self, vector: np.ndarray | Mapping[str, float]) -> None:
        """One recent vector (feature_names order) or feature dict."""
        if isinstance(vector, Mapping):
            vector = row_from(vector, self.feature_names)
        self.update_many(np.asarray(vector, dtype=np.float64)[None])

    def update_many(self, matrix: object) -> None:
        """Recent vectors, oldest first. Before fit() they are ignored: there
        is nothing yet to compare them with."""
        X = _as_rows(matrix, len(self.feature_names))
        if len(X) == 0 or not self.fitted:
            return
        growth = math.exp(1.0 / self.window)
        with self._lock:
            # Decay is kept lazy: instead of shrinking every count at each
            # vector, each new vector weighs `growth` times the one before, and
            # shares are ratios, so only the rare rescale touches all counts.
            if self._scale * growth ** len(X) > 1e100:
                self._current /= self._scale
                self._scale = 1.0
            weights = self._scale * growth ** np.arange(len(X))
            self._current += self._counts(X, weights)
            self._scale *= growth ** len(X)

    def recent_samples(self) -> float:
        """The decayed number of recent vectors (at most about `window`)."""
        with self._lock:
            return float(self._current[0].sum() / self._scale * math.exp(1.0 / self.window))

    @property
    def fitted(self) -> bool:
        return hasattr(self, "edges_")

    def psi(self) -> dict[str, float]:
        """PSI per feature; empty before fit() and until min_samples recent
        vectors were seen."""
        if not self.fitted or self.recent_samples() < self.min_samples:
            return {}
        with self._lock:
            current = self._current.copy()
        out: dict[str, float] = {}
        for j, name in enumerate(self.feature_names):
            used = np.r_[np.arange(len(self.edges_[j]) + 1), self.bins]
            p = self._smoothed(self.reference_[j, used])
            q = self._smoothed(current[j, used])
            out[name] = float(np.sum((q - p) * np.log(q / p)))
        return out

    def drifted(self, threshold: float = 0.2) -> list[str]:
        """Features with PSI at or above threshold, most drifted first."""
        values = self.psi()
        return sorted((n for n, v in values.items() if v >= threshold), key=lambda n: -values[n])

    def report(self, threshold: float = 0.2) -> dict[str, Any]:
        """PSI, its reading and the drifted features, for the API."""
        values = self.psi()
        return {
            "psi": values,
            "levels": {name: psi_level(v) for name, v in values.items()},
            "drifted": sorted(
                (n for n, v in values.items() if v >= threshold), key=lambda n: -values[n]
            ),
            "threshold": threshold,
            "fitted": self.fitted,
            "reference_samples": getattr(self, "reference_samples_", 0),
            "recent_samples": self.recent_samples(),
        }

    def _smoothed(self, counts: np.ndarray) -> np.ndarray:
        total = counts.sum()
        share = counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))
        return (share + self.epsilon) / (1.0 + self.epsilon * len(counts))

    def _counts(self, X: np.ndarray, weights: np.ndarray) -> np.ndarray:
        counts = np.zeros((X.shape[1], self.bins + 1))
        for j in range(X.shape[1]):
            column = X[:, j]
            missing = ~np.isfinite(column)
            index = np.searchsorted(self.edges_[j], column, side="left")
            index[missing] = self.bins
            counts[j] = np.bincount(index, weights=weights, minlength=self.bins + 1)
        return counts


def _as_rows(matrix: object, width: int) -> np.ndarray:
    X = np.asarray(matrix, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != width:
        raise ValueError(f"expected vectors of {width} features, got shape {X.shape}")
    return X


__all__ = [
    "KIND",
    "PSI_MAJOR",
    "PSI_STABLE",
    "SOURCE_FEEDBACK",
    "SOURCE_VERDICT",
    "STATUS_LIVE",
    "STATUS_RETIRED",
    "STATUS_SHADOW",
    "Candidate",
    "Comparison",
    "DriftMonitor",
    "LabelSource",
    "LabelledData",
    "LearningError",
    "LearningLoop",
    "LoopStats",
    "ModelMetrics",
    "ModelRecord",
    "ModelRegistry",
    "NotEnoughLabels",
    "Outcome",
    "PromotionError",
    "Retrainer",
    "TrainingSet",
    "confident_label",
    "psi_level",
]
