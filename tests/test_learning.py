"""Learning: the training set, retraining, shadow comparison, promotion (automatic
and by hand), the background loop, and feature drift."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controlplane.features import FEATURE_NAMES
from controlplane.learning import (
    KIND,
    STATUS_LIVE,
    STATUS_RETIRED,
    STATUS_SHADOW,
    Comparison,
    DriftMonitor,
    LabelledData,
    LearningLoop,
    ModelMetrics,
    NotEnoughLabels,
    PromotionError,
    Retrainer,
    TrainingSet,
    confident_label,
    psi_level,
)
from controlplane.models.persist import ModelLoadError, load_model
from controlplane.models.supervised import SupervisedClassifier
from controlplane.scoring import RiskScorer

NAMES = list(FEATURE_NAMES)
# Few trees: the tests need models that separate easy synthetic classes, fast.
FAST = {"max_iter": 30}

# ---- synthetic clients ----


def client(rng: np.random.Generator, label: str) -> dict[str, float]:
    """A feature dict: noise everywhere, bots fast and regular, good bots
    between. Values are on a 0.1 grid: fewer than 255 distinct values per
    feature lets the boosted trees bin exactly, which keeps each fit well
    under a second (continuous values cost seconds per fit, see the report)."""
    values = dict(zip(NAMES, np.round(rng.normal(size=len(NAMES)), 1).tolist(), strict=True))
    if label == "bot":
        values["req_rate_60s"] += 4.0
        values["gap_cv"] -= 3.0
    elif label == "good_bot":
        values["req_rate_60s"] += 2.0
        values["cookie_share"] -= 3.0
    values["age_s"] = 7_200.0
    return values


def clients(seed: int, humans: int, bots: int, good_bots: int = 0) -> list[tuple[dict, str]]:
    rng = np.random.default_rng(seed)
    labels = ["human"] * humans + ["bot"] * bots + ["good_bot"] * good_bots
    rng.shuffle(labels)
    return [(client(rng, label), label) for label in labels]


def labelled_set(
    examples: Sequence[tuple[Mapping[str, float], str]], start_ts: float = 0.0
) -> TrainingSet:
    training = TrainingSet()
    fill(training, examples, start_ts)
    return training


def fill(
    training: TrainingSet,
    examples: Sequence[tuple[Mapping[str, float], str]],
    start_ts: float = 0.0,
) -> None:
    for i, (features, label) in enumerate(examples):
        training.add_feedback(features, label, ts=start_ts + i)


def fit(examples: Sequence[tuple[Mapping[str, float], str]]) -> SupervisedClassifier:
    X = np.array([[f[n] for n in NAMES] for f, _ in examples])
    y = [label for _, label in examples]
    return SupervisedClassifier(**FAST).fit(X, y, feature_names=NAMES)


def careless_training() -> TrainingSet:
    """Last month a careless labeller marked shoppers with busy carts as bots;
    the recent labels (the holdout) are right. A model trained on it flags
    people the live model does not."""
    careless = [
        (f, "bot" if label == "human" and f["cart_share"] > 0.3 else label)
        for f, label in clients(8, humans=300, bots=60)
    ]
    training = labelled_set(careless)
    fill(training, clients(9, humans=200, bots=100), start_ts=10_000.0)
    return training


@pytest.fixture(scope="module")
def good_live() -> SupervisedClassifier:
    return fit(clients(1, humans=300, bots=100))


@pytest.fixture(scope="module")
def bad_live() -> SupervisedClassifier:
    """Learned from a labeller who called a bot anyone who searches a lot:
    it flags people and misses the real bots alike."""
    examples = clients(2, humans=400, bots=0)
    relabelled = [(f, "bot" if f["search_share"] > 0.5 else "human") for f, _ in examples]
    return fit(relabelled)


# ---- fakes for the store ----


@dataclass
class Record:
    kind: str
    version: str
    path: str
    status: str
    feature_names: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None


class FakeRegistry:
    """The store's model registry, in memory."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], Record] = {}
        self.actors: list[tuple[str, str, str | None]] = []  # (version, status, actor)

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
        if (kind, version) in self.records:
            raise ValueError(f"{kind} {version} is already registered")
        # Through JSON and back, as a JSON column in SQLite would store it.
        stored = None if comparison is None else json.loads(json.dumps(comparison))
        self.records[kind, version] = Record(
            kind, version, path, status, list(feature_names), stored
        )

    def set_model_status(
        self, kind: str, version: str, status: str, actor: str | None = None
    ) -> None:
        self.records[kind, version].status = status
        self.actors.append((version, status, actor))

    def live_model(self, kind: str) -> Record | None:
        live = [r for r in self.records.values() if r.kind == kind and r.status == STATUS_LIVE]
        assert len(live) <= 1, f"two live {kind} models: {live}"
        return live[0] if live else None

    def model(self, kind: str, version: str) -> Record | None:
        return self.records.get((kind, version))

    def status(self, version: str) -> str:
        return self.records[KIND, version].status


def retrainer_for(tmp_path: Path, registry: FakeRegistry, **kwargs: Any) -> Retrainer:
    return Retrainer(
        tmp_path / "models",
        registry,
        classifier=SupervisedClassifier(**FAST),
        clock=lambda: 1_000.0,
        **kwargs,
    )


def with_live(model: SupervisedClassifier) -> tuple[RiskScorer, FakeRegistry]:
    registry = FakeRegistry()
    registry.register_model(
        kind=KIND,
        version=model.version_,
        path="/nonexistent/live.model",
        feature_names=NAMES,
        status=STATUS_LIVE,
        comparison=None,
    )
    return RiskScorer(supervised=model), registry


# ---- the training set ----


def test_feedback_flips_the_training_set_at_once() -> None:
    training = TrainingSet()
    features = client(np.random.default_rng(3), "human")
    assert training.add_confident(features, "bot", 0.95, key="198.51.100.7")
    assert training.label_of("198.51.100.7") == "bot"
    assert training.source_of("198.51.100.7") == "verdict"
    before = training.revision

    # The operator says it was a person: the bot label is gone before any retrain.
    training.add_feedback(features, "human", key="198.51.100.7")
    assert training.label_of("198.51.100.7") == "human"
    assert training.source_of("198.51.100.7") == "feedback"
    assert training.class_counts() == {"bot": 0, "human": 1, "good_bot": 0}
    assert training.revision > before
    X, y, weights = training.matrix()
    assert list(y) == ["human"] and weights.tolist() == [1.0]
    assert X.shape == (1, len(NAMES))
    assert X[0, NAMES.index("gap_cv")] == features["gap_cv"]

    # Later verdicts do not overrule the operator.
    assert not training.add_confident(features, "bot", 0.99, key="198.51.100.7")
    assert training.label_of("198.51.100.7") == "human"
    assert training.forget("198.51.100.7")
    assert len(training) == 0 and training.label_of("198.51.100.7") is None


def test_confident_verdicts_are_filtered_and_weigh_less() -> None:
    assert confident_label(95.0) == ("bot", 0.95)
    assert confident_label(5.0) == ("human", 0.95)
    assert confident_label(50.0) is None
    assert confident_label(math.nan) is None

    training = TrainingSet(human_sample_rate=1.0)
    rng = np.random.default_rng(4)
    bot, person = client(rng, "bot"), client(rng, "human")
    assert not training.add_confident(bot, "bot", 0.6)  # unsure: not a label
    assert training.add_confident(bot, "bot", 0.95, key="a")
    assert not training.add_confident({**person, "age_s": 30.0}, "human", 0.97, key="b")
    assert not training.add_confident({**person, "age_s": math.nan}, "human", 0.97, key="b")
    assert training.add_confident(person, "human", 0.97, key="c")
    assert training.add_confident(client(rng, "good_bot"), "good_bot", 1.0, key="d")
    _, y, weights = training.matrix()
    assert sorted(zip(y.tolist(), weights.tolist(), strict=True)) == [
        ("bot", 0.5),
        ("good_bot", 0.5),
        ("human", 0.5),
    ]
    with pytest.raises(ValueError, match="unknown label 'robot'"):
        training.add_feedback(person, "robot")

    # People are plentiful: only a sample of them is kept.
    sampled = TrainingSet(human_sample_rate=0.1, seed=1)
    kept = sum(sampled.add_confident(person, "human", 0.97, key=i) for i in range(1_000))
    assert 60 <= kept <= 140


def test_caps_bound_each_label_and_source() -> None:
    training = TrainingSet(max_verdicts_per_label=50, max_feedback_per_label=10)
    rng = np.random.default_rng(5)
    for i in range(50):
        training.add_confident(client(rng, "bot"), "bot", 0.95, ts=float(i))
    # A burst of one attack as large as the cap keeps part of what came before.
    for i in range(50, 100):
        training.add_confident(client(rng, "bot"), "bot", 0.95, ts=float(i))
    for i in range(20):
        training.add_feedback(client(rng, "human"), "human", ts=float(i))
    assert training.counts_by_source() == {
        "feedback": {"bot": 0, "human": 10, "good_bot": 0},
        "verdict": {"bot": 50, "human": 0, "good_bot": 0},
    }
    data = training.snapshot()
    verdict_ts = data.ts[data.sources == "verdict"]
    assert 5 <= np.count_nonzero(verdict_ts < 50) <= 35
    # Feedback keeps the newest.
    assert sorted(data.ts[data.sources == "feedback"].tolist()) == [float(i) for i in range(10, 20)]


def test_holdout_is_the_newest_of_each_label() -> None:
    training = labelled_set(clients(6, humans=80, bots=40, good_bots=8))
    train, holdout = training.holdout(0.25, seed=0)
    assert holdout.counts() == {"bot": 10, "human": 20, "good_bot": 2}
    assert len(train) + len(holdout) == len(training)
    for label in ("bot", "human", "good_bot"):
        assert train.ts[train.y == label].max() < holdout.ts[holdout.y == label].min()
    _, again_holdout = training.holdout(0.25, seed=0)
    assert np.array_equal(again_holdout.ts, holdout.ts)

    # Equal timestamps: a seeded shuffle decides, the same way each time.
    same_time = LabelledData(
        feature_names=("a",),
        X=np.arange(8.0)[:, None],
        y=np.array(["bot"] * 8, dtype=object),
        weights=np.ones(8),
        sources=np.array(["feedback"] * 8, dtype=object),
        ts=np.zeros(8),
    )
    first = same_time.split(0.5, seed=7)[1].X.ravel().tolist()
    assert first == same_time.split(0.5, seed=7)[1].X.ravel().tolist()
    assert len(first) == 4


# ---- retraining and promotion ----


def test_better_candidate_is_promoted(tmp_path: Path, bad_live: SupervisedClassifier) -> None:
    scorer, registry = with_live(bad_live)
    retrainer = retrainer_for(tmp_path, registry)
    # Three crawler labels: too few to learn, left out of training, still judged.
    training = labelled_set(clients(7, humans=300, bots=100, good_bots=3))

    candidate = retrainer.retrain(training, scorer.supervised)
    assert candidate.dropped == ("good_bot",)
    assert candidate.trained_on == {"bot": 75, "human": 225, "good_bot": 0}
    assert not candidate.weighted  # SupervisedClassifier.fit takes no weights yet
    outcome = retrainer.consider(candidate, scorer)

    assert outcome.status == "promoted", outcome.reason
    assert scorer.supervised is candidate.model
    assert registry.status(candidate.version) == STATUS_LIVE
    assert registry.status(bad_live.version_) == STATUS_RETIRED
    stored = registry.records[KIND, candidate.version].comparison
    assert stored is not None and stored == outcome.comparison
    assert stored["promote"] is True and stored["reason"].startswith("better than the live model")
    cand, live = stored["candidate"], stored["live"]
    assert cand["false_positive_rate"] < live["false_positive_rate"]
    assert cand["detection_rate"] > live["detection_rate"]
    assert stored["holdout"] == {"bot": 25, "human": 75, "good_bot": 1}
    assert cand["negatives"] == 76 and cand["bots"] == 25
    assert cand["auc"] > live["auc"] and cand["brier"] < live["brier"]
    # The file on record is the model that went live.
    path = registry.records[KIND, candidate.version].path
    assert load_model(path, feature_names=NAMES, kind=KIND).version_ == candidate.version


def test_candidate_with_more_false_positives_stays_in_shadow(
    tmp_path: Path, good_live: SupervisedClassifier
) -> None:
    scorer, registry = with_live(good_live)
    retrainer = retrainer_for(tmp_path, registry)
    outcome = retrainer.consider(retrainer.retrain(careless_training(), good_live), scorer)

    assert outcome.status == "shadow"
    assert outcome.reason.startswith("more false positives than the live model"), outcome.reason
    assert scorer.supervised is good_live
    assert registry.status(good_live.version_) == STATUS_LIVE
    assert outcome.version is not None and registry.status(outcome.version) == STATUS_SHADOW
    stored = registry.records[KIND, outcome.version].comparison
    assert stored is not None and stored["promote"] is False
    assert stored["candidate"]["false_positive_rate"] > stored["live"]["false_positive_rate"]
    assert Path(registry.records[KIND, outcome.version].path).exists()

    # An operator may still promote it by hand, from its file.
    loaded = retrainer.promote_version(outcome.version, scorer)
    assert scorer.supervised is loaded and loaded.version_ == outcome.version
    assert registry.status(outcome.version) == STATUS_LIVE
    assert registry.status(good_live.version_) == STATUS_RETIRED
    with pytest.raises(PromotionError, match="no supervised model version 'nope'"):
        retrainer.promote_version("nope", scorer)


def test_not_enough_labels_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    registry = FakeRegistry()
    retrainer = retrainer_for(tmp_path, registry)
    few_bots = labelled_set(clients(10, humans=200, bots=5))
    with pytest.raises(NotEnoughLabels) as caught:
        retrainer.retrain(few_bots)
    assert caught.value.part == "holdout"
    assert caught.value.counts == {"bot": 1, "human": 50, "good_bot": 0}
    assert "needs 10 bot and 10 human or good_bot examples, it has bot 1" in str(caught.value)
    with pytest.raises(NotEnoughLabels, match="the holdout part"):
        retrainer.retrain(TrainingSet())

    scorer = RiskScorer()
    loop = LearningLoop(few_bots, retrainer, scorer)
    outcome = loop.run_once()
    assert outcome.status == "skipped" and "not enough labels" in outcome.reason
    assert loop.stats.errors == 0 and loop.stats.skipped == 1
    assert scorer.supervised is None and registry.records == {}


def test_tampered_or_mismatched_file_is_refused(
    tmp_path: Path, good_live: SupervisedClassifier
) -> None:
    scorer, registry = with_live(good_live)
    retrainer = retrainer_for(tmp_path, registry)
    candidate = retrainer.retrain(careless_training(), good_live)
    assert retrainer.consider(candidate, scorer).status == "shadow"
    path = Path(registry.records[KIND, candidate.version].path)

    # Another retrainer, on other columns, must not load it.
    other = Retrainer(tmp_path / "models", registry, feature_names=NAMES[::-1])
    with pytest.raises(ModelLoadError, match="feature names do not match"):
        other.promote_version(candidate.version, scorer)

    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the skops payload
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        retrainer.promote_version(candidate.version, scorer)
    assert scorer.supervised is good_live
    assert registry.status(good_live.version_) == STATUS_LIVE
    assert registry.status(candidate.version) == STATUS_SHADOW


def test_model_files_signed_with_a_key_need_it(
    tmp_path: Path, good_live: SupervisedClassifier
) -> None:
    scorer, registry = with_live(good_live)
    signer = retrainer_for(tmp_path, registry, key=b"agent secret")
    candidate = signer.retrain(labelled_set(clients(12, humans=200, bots=80)), good_live)
    signer.promote(candidate, scorer)  # by hand, whatever the comparison
    assert scorer.supervised is candidate.model
    assert registry.status(candidate.version) == STATUS_LIVE
    wrong_key = retrainer_for(tmp_path, registry, key=b"another secret")
    with pytest.raises(ModelLoadError, match="HMAC"):
        wrong_key.promote_version(candidate.version, scorer)


@pytest.mark.parametrize(
    ("cand", "live", "promote", "why"),
    [
        ((0.01, 0.90), (0.02, 0.80), True, "better than the live model"),
        ((0.02, 0.90), (0.02, 0.80), True, "better than the live model"),
        ((0.01, 0.80), (0.02, 0.80), True, "better than the live model"),
        ((0.02, 0.80), (0.02, 0.80), False, "no better than the live model"),
        ((0.03, 0.99), (0.02, 0.80), False, "more false positives than the live model"),
        ((0.00, 0.70), (0.02, 0.80), False, "catches fewer bots than the live model"),
        ((0.00, 0.90), None, True, "better than no model"),
        ((0.01, 0.90), None, False, "more false positives than no model"),
    ],
)
def test_promotion_rule(
    tmp_path: Path,
    cand: tuple[float, float],
    live: tuple[float, float] | None,
    promote: bool,
    why: str,
) -> None:
    retrainer = retrainer_for(tmp_path, FakeRegistry())

    def metrics(version: str, fpr: float, detection: float) -> ModelMetrics:
        return ModelMetrics(
            version=version,
            false_positive_rate=fpr,
            detection_rate=detection,
            false_positives=round(fpr * 100),
            negatives=100,
            detected=round(detection * 50),
            bots=50,
            auc=None,
            brier=0.1,
        )

    comparison = Comparison(
        candidate=metrics("new", *cand),
        live=None if live is None else metrics("old", *live),
        threshold=0.5,
        holdout={"bot": 50, "human": 100, "good_bot": 0},
        trained_on={},
        evaluated_at=0.0,
    )
    ok, reason = retrainer.judge(comparison)
    assert ok is promote and retrainer.should_promote(comparison) is promote
    assert reason.startswith(why), reason


def test_small_holdout_never_promotes(tmp_path: Path) -> None:
    retrainer = retrainer_for(tmp_path, FakeRegistry())
    tiny = ModelMetrics("new", 0.0, 1.0, 0, 5, 5, 5, 1.0, 0.0)
    comparison = Comparison(tiny, None, 0.5, {"bot": 5, "human": 5, "good_bot": 0}, {}, 0.0)
    ok, reason = retrainer.judge(comparison)
    assert not ok and reason.startswith("holdout too small to judge")


def test_example_weights_reach_a_classifier_that_takes_them(tmp_path: Path) -> None:
    class Weighted(SupervisedClassifier):
        def fit(  # type: ignore[override]
            self,
            X: object,
            y: Sequence[str],
            *,
            feature_names: Sequence[str],
            sample_weight: np.ndarray | None = None,
        ) -> Weighted:
            self.seen_weights_ = sample_weight
            super().fit(X, y, feature_names=feature_names)
            return self

    training = labelled_set(clients(13, humans=100, bots=40))
    rng = np.random.default_rng(14)
    for i in range(40):
        training.add_confident(client(rng, "bot"), "bot", 0.95, ts=-1.0 - i)
    retrainer = Retrainer(tmp_path, FakeRegistry(), classifier=Weighted(**FAST))
    candidate = retrainer.retrain(training)
    assert candidate.weighted
    seen = candidate.model.seen_weights_  # type: ignore[attr-defined]
    assert sorted(set(seen.tolist())) == [0.5, 1.0]
    assert np.count_nonzero(seen == 0.5) == 40  # the verdicts are the oldest bots: all trained on


# ---- the loop ----


def test_run_once_retrains_only_when_labels_moved(
    tmp_path: Path, bad_live: SupervisedClassifier
) -> None:
    scorer, registry = with_live(bad_live)
    training = labelled_set(clients(15, humans=200, bots=80))
    loop = LearningLoop(training, retrainer_for(tmp_path, registry), scorer, clock=lambda: 5.0)

    first = loop.run_once()
    assert first.status == "promoted", first.reason
    assert scorer.supervised is not bad_live
    second = loop.run_once()
    assert second.status == "skipped" and second.reason == "no new labels since the last round"
    assert loop.stats.runs == 2 and loop.stats.promoted == 1 and loop.stats.skipped == 1
    assert loop.stats.last is second


def test_a_failing_round_is_counted_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    retrainer = retrainer_for(tmp_path, FakeRegistry())

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(retrainer, "retrain", broken)
    loop = LearningLoop(labelled_set(clients(16, humans=50, bots=50)), retrainer, RiskScorer())
    outcome = loop.run_once()
    assert outcome.status == "error" and outcome.reason == "RuntimeError: disk on fire"
    assert loop.stats.errors == 1 and loop.stats.last_error == outcome.reason
    assert "retraining failed" in caplog.text
    # An error does not count as trained: the next round tries again.
    assert loop.run_once().status == "error"


def test_thread_runs_on_schedule_and_on_request_and_stops(tmp_path: Path) -> None:
    # Too few labels: each round is a quick skip, which is all the thread needs.
    training = labelled_set(clients(17, humans=20, bots=2))
    retrainer = retrainer_for(tmp_path, FakeRegistry())
    loop = LearningLoop(training, retrainer, RiskScorer(), interval_s=3_600.0)
    loop.start()
    try:
        assert loop.running
        loop.request_retrain()
        assert loop.wait_for_runs(1, timeout=20.0)
        assert "not enough labels" in (loop.stats.last.reason if loop.stats.last else "")
        loop.request_retrain()
        assert loop.wait_for_runs(2, timeout=20.0)
    finally:
        assert loop.stop(timeout=20.0)
    assert not loop.running
    assert not any(t.name == "botwall-learning" for t in threading.enumerate())

    fast = LearningLoop(training, retrainer, RiskScorer(), interval_s=0.01)
    fast.start()
    try:
        assert fast.wait_for_runs(3, timeout=20.0)
    finally:
        assert fast.stop(timeout=20.0)
    assert fast.stats.errors == 0


# ---- drift ----


@pytest.fixture
def reference() -> np.ndarray:
    rng = np.random.default_rng(20)
    X = rng.normal(size=(5_000, 4))
    X[:, 3] = np.where(rng.random(5_000) < 0.9, 0.0, rng.random(5_000))  # mostly zero
    return X


def recent(seed: int, n: int = 5_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    X[:, 3] = np.where(rng.random(n) < 0.9, 0.0, rng.random(n))
    return X


def test_psi_is_near_zero_for_the_same_distribution(reference: np.ndarray) -> None:
    monitor = DriftMonitor(["a", "b", "c", "zeros"], window=1e9).fit(reference)
    assert monitor.psi() == {}  # nothing recent yet
    monitor.update_many(recent(21))
    psi = monitor.psi()
    assert set(psi) == {"a", "b", "c", "zeros"}
    assert max(psi.values()) < 0.02, psi
    assert monitor.drifted() == []
    assert monitor.recent_samples() == pytest.approx(5_000, rel=1e-4)


def test_psi_flags_a_shifted_feature_and_only_it(reference: np.ndarray) -> None:
    monitor = DriftMonitor(["a", "b", "c", "zeros"], window=1e9).fit(reference)
    shifted = recent(22)
    shifted[:, 1] += 1.0  # one standard deviation
    shifted[:, 2] = np.nan  # and a feature that stopped being observed
    monitor.update_many(shifted)
    psi = monitor.psi()
    assert psi["b"] > 0.25 and psi["c"] > 0.25
    assert psi["a"] < 0.1 and psi["zeros"] < 0.1
    assert set(monitor.drifted(threshold=0.2)) == {"b", "c"}
    report = monitor.report()
    assert report["levels"]["b"] == "major" and report["levels"]["a"] == "stable"
    assert json.loads(json.dumps(report)) == report


def test_drift_follows_recent_traffic(reference: np.ndarray) -> None:
    monitor = DriftMonitor(["a", "b", "c", "zeros"], window=500.0, min_samples=100).fit(reference)
    shifted = recent(23, 3_000)
    shifted[:, 0] += 2.0
    monitor.update_many(shifted)
    assert monitor.drifted() == ["a"]
    # The shift is over: within a few windows the old vectors have faded.
    for row in recent(24, 3_000):
        monitor.update(row)
    assert monitor.drifted() == []
    assert monitor.recent_samples() == pytest.approx(500.0, rel=0.01)
    monitor.update(dict(zip(["a", "b", "c", "zeros"], [0.0, 0.0, 0.0, 0.0], strict=True)))


def test_psi_levels() -> None:
    assert psi_level(0.05) == "stable"
    assert psi_level(0.2) == "moderate"
    assert psi_level(0.3) == "major"
