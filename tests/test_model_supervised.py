"""SupervisedClassifier: calibrated P(bot) from labels, explained by occlusion."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.models.supervised import SupervisedClassifier, _snap_to_levels
from tests.synthetic_traffic import (
    CLIENT_FEATURES,
    DESCRIPTIONS,
    Traffic,
    client_features,
    feature_matrix,
    trained,
)

NAMES = list(CLIENT_FEATURES)


@pytest.fixture(scope="module")
def model() -> SupervisedClassifier:
    return trained().supervised


def test_labels_and_classes(model: SupervisedClassifier) -> None:
    assert model.classes_ == ["bot", "good_bot", "human"]
    assert model.class_counts_ == {"bot": 180, "good_bot": 30, "human": 1200}
    assert model.feature_names_in_ == NAMES
    # Few crawler labels: isotonic would overfit them, so sigmoid.
    assert model.calibration_ == "sigmoid"


def test_bots_score_high_people_and_crawlers_low(model: SupervisedClassifier) -> None:
    traffic = Traffic(51)
    people = model.bot_probability(feature_matrix(traffic.humans(300)))
    assert np.quantile(people, 0.99) < 0.2
    crawler = model.bot_probability(feature_matrix([traffic.crawler("66.249.66.200")]))
    assert crawler[0] < 0.2
    bots = [*traffic.credential_stuffing(10), traffic.sms_pumper(), traffic.stealthy_scraper()]
    assert model.bot_probability(feature_matrix(bots)).min() > 0.8
    proba = model.predict_proba(feature_matrix(bots))
    assert np.allclose(proba.sum(axis=1), 1.0)


def test_explanation_names_what_raised_the_probability(model: SupervisedClassifier) -> None:
    bot = Traffic(52).sms_pumper()
    (reason,) = model.explain(client_features(bot))
    assert reason.code == "supervised_bot" and reason.model == "supervised"
    assert reason.points > 80
    assert "mostly for" in reason.text and "(humans " in reason.text
    p, contribution = model.contributions(client_features(bot))
    assert p == pytest.approx(model.score(client_features(bot)))
    assert contribution.max() > 0.05
    top_feature = NAMES[int(np.argmax(contribution))]
    assert DESCRIPTIONS[top_feature] in reason.text


def test_a_person_gets_no_reason(model: SupervisedClassifier) -> None:
    person = Traffic(53).humans(5)[0]
    assert model.explain(client_features(person)) == []
    assert model.findings(client_features(person), probability=0.01) == []


def test_isotonic_with_enough_of_every_label() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1500, 3))
    y = np.where(X[:, 0] + 0.5 * rng.normal(size=1500) > 0.5, "bot", "human")
    model = SupervisedClassifier(max_iter=30).fit(X, y, feature_names=["a", "b", "c"])
    assert model.calibration_ == "isotonic"
    p = model.bot_probability(X)
    # Calibrated on unweighted folds: the mean probability is the base rate,
    # although the trees saw balanced class weights.
    assert p.mean() == pytest.approx((y == "bot").mean(), abs=0.03)


def test_rare_bot_labels_are_still_learned() -> None:
    traffic = Traffic(54)
    clients = traffic.humans(1000) + [traffic.inventory_hoarder() for _ in range(8)]
    model = SupervisedClassifier(max_iter=50).fit(
        feature_matrix(clients), [c.label for c in clients], feature_names=NAMES
    )
    unseen = [traffic.inventory_hoarder() for _ in range(5)]
    assert model.bot_probability(feature_matrix(unseen)).min() > 0.5


def _ambiguous(rng: np.random.Generator, people: int, bots: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous, partly missing features (far more distinct values than the
    boosters have bins); bots do more of "a", but many people do as much."""
    X = rng.lognormal(size=(people + bots, 3))
    X[people:, 0] *= 4.0
    X[rng.random(X.shape) < 0.05] = np.nan
    return X, np.array(["human"] * people + ["bot"] * bots)


def test_rare_class_is_weighted_up_then_calibrated_back() -> None:
    rng = np.random.default_rng(7)
    X, y = _ambiguous(rng, 2000, 50)
    model = SupervisedClassifier(max_iter=50).fit(X, y, feature_names=["a", "b", "c"])
    unseen, truth = _ambiguous(rng, 8000, 200)
    bots = truth == "bot"
    base_rate = bots.mean()
    # The trees saw balanced classes: on ambiguous clients they lean to the
    # rare one, far above its share (unweighted trees stay near the base rate).
    trees = model.model_.calibrated_classifiers_[0].estimator
    leaning = trees.predict_proba(unseen)[:, list(trees.classes_).index("bot")]
    assert leaning.mean() > 3 * base_rate
    # Calibration brings that back to the base rate, still ranking bots higher.
    p = model.bot_probability(unseen)
    assert p.mean() == pytest.approx(base_rate, abs=0.015)
    assert p[bots].mean() > 1.5 * p[~bots].mean()


def test_raw_features_score_as_the_binned_ones_trained_on() -> None:
    rng = np.random.default_rng(8)
    X, y = _ambiguous(rng, 1000, 40)
    snapped = _snap_to_levels(X, 255)
    assert all(len(np.unique(c[~np.isnan(c)])) <= 255 for c in snapped.T)
    assert np.array_equal(np.isnan(snapped), np.isnan(X))
    model = SupervisedClassifier(max_iter=20).fit(X, y, feature_names=["a", "b", "c"])
    # Scoring needs no binning step of its own: the booster cuts raw values
    # where it cut the snapped ones.
    assert np.array_equal(model.predict_proba(X), model.model_.predict_proba(snapped))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["human"] * 10, "'bot' examples"),
        (["bot"] * 9 + ["human"], "at least 2 examples"),
        (["bot"] * 5 + ["robot"] * 5, "unknown labels"),
        (["bot"] * 5, "'bot' examples"),
    ],
)
def test_bad_labels_are_refused(labels: list[str], message: str) -> None:
    X = np.zeros((len(labels), 2))
    with pytest.raises(ValueError, match=message):
        SupervisedClassifier().fit(X, labels, feature_names=["a", "b"])
