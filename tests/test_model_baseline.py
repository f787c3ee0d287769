"""BaselineAnomaly: what is unusual on this host, and which features make it so."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import NotFittedError

from controlplane.models import fit_rarity, rarity, rarity_anomaly
from controlplane.models.baseline import BaselineAnomaly, flat_anomaly, flatten_forest
from tests.synthetic_traffic import (
    CLIENT_FEATURES,
    DESCRIPTIONS,
    Traffic,
    client_features,
    client_group,
    feature_matrix,
    trained,
)

NAMES = list(CLIENT_FEATURES)


@pytest.mark.parametrize("max_features", [1.0, 0.5])
def test_flattened_forest_equals_score_samples(max_features: float) -> None:
    rng = np.random.default_rng(0)
    X = rng.lognormal(size=(1000, 8))
    X[:, 3] = np.round(X[:, 3])  # ties, as counts have
    forest = IsolationForest(n_estimators=50, max_features=max_features, random_state=0).fit(X)
    probe = np.vstack([X[:100], rng.lognormal(size=(200, 8)) * rng.choice([1, 20], (200, 8))])
    assert np.allclose(flat_anomaly(flatten_forest(forest), probe), -forest.score_samples(probe))


def test_rarity_is_empirical_inside_and_extrapolated_beyond() -> None:
    values = np.arange(1000.0)
    fitted = fit_rarity(values)
    assert rarity(0.0, fitted) == pytest.approx(0.0, abs=1e-9)
    assert rarity(900.0, fitted) == pytest.approx(-np.log10(101 / 1001))
    assert rarity(5000.0, fitted) > rarity(999.0, fitted) + 5
    assert rarity_anomaly(3.0, alarm_rate=1e-3) == pytest.approx(0.5)
    assert rarity_anomaly(2.0, alarm_rate=1e-3) < 0.1 < 0.9 < rarity_anomaly(4.0, alarm_rate=1e-3)


def test_people_are_not_anomalous_and_bots_are() -> None:
    model = trained().baseline
    traffic = Traffic(21)
    people = traffic.humans(300)
    scores = model.score_samples(feature_matrix(people), [client_group(c) for c in people])
    assert np.quantile(scores, 0.99) < 0.2
    for bot in (traffic.stealthy_scraper(), traffic.inventory_hoarder(), traffic.sms_pumper()):
        assert model.score(client_features(bot), client_group(bot)) > 0.6, bot.kind


def test_explain_names_the_deviating_features_in_words() -> None:
    model = trained().baseline
    bot = Traffic(22).inventory_hoarder()
    (reason,) = model.explain(client_features(bot), client_group(bot))
    assert reason.code == "baseline_anomaly" and reason.model == "baseline"
    assert DESCRIPTIONS["req_rate_600s"] in reason.text
    assert "usually" in reason.text
    (finding,) = model.findings(client_features(bot), client_group(bot))
    assert "req_rate_600s" in finding.features
    _name, _value, z = model.deviations(client_features(bot), client_group(bot))[0]
    assert abs(z) >= model.z_threshold


def test_missing_features_count_as_typical() -> None:
    model = trained().baseline
    assert model.score({}) < 0.05
    assert model.explain({}) == []


def test_groups_fall_back_to_the_global_forest() -> None:
    model = trained().baseline
    assert "*" in model.forests_
    assert model._group("no such group") == "*"
    assert model._group(None) == "*"


def test_a_group_of_every_vector_is_the_global_forest_not_a_second_one() -> None:
    rng = np.random.default_rng(1)
    X = rng.lognormal(size=(600, len(NAMES)))
    alone = BaselineAnomaly(min_samples=200, min_group_samples=500, random_state=0)
    alone.fit(X, feature_names=NAMES, groups=["browse"] * 600)
    assert set(alone.forests_) == {"*"}
    mixed = BaselineAnomaly(min_samples=200, min_group_samples=500, random_state=0)
    mixed.fit(X, feature_names=NAMES, groups=["browse"] * 550 + ["auth"] * 50)
    assert set(mixed.forests_) == {"*", "browse"}  # auth has too few of its own
    probe = rng.lognormal(size=(20, len(NAMES))) * 5
    assert np.array_equal(
        alone.score_samples(probe, ["browse"] * 20), alone.score_samples(probe, None)
    )


def test_partial_fit_learns_then_refits_on_schedule() -> None:
    humans = Traffic(23).humans(700)
    X = feature_matrix(humans)
    model = BaselineAnomaly(min_samples=200, refit_every=250, reservoir_size=400)
    model.partial_fit(X[:150], feature_names=NAMES)
    with pytest.raises(NotFittedError):
        model.score(client_features(humans[0]))
    model.partial_fit(X[150:300])
    first = model.n_samples_fit_
    assert first == 300
    model.partial_fit(X[300:500])  # 200 since the fit: not yet
    assert model.n_samples_fit_ == first
    model.partial_fit(X[500:])  # 400 since the fit: refit, reservoir full
    assert model.n_samples_fit_ == 400 == len(model.reservoir_)
    assert model.seen_ == 700
    with pytest.raises(ValueError, match="feature names changed"):
        model.partial_fit(X[:5], feature_names=list(reversed(NAMES)))


def test_reservoir_is_bounded_recent_and_deterministic() -> None:
    rng = np.random.default_rng(5)
    old, new = rng.normal(0, 1, (2000, 3)), rng.normal(100, 1, (2000, 3))

    def run() -> BaselineAnomaly:
        model = BaselineAnomaly(min_samples=100, reservoir_size=500, refit_every=10**9)
        for chunk in np.array_split(np.vstack([old, new]), 40):
            model.partial_fit(chunk, feature_names=["a", "b", "c"])
        return model

    a, b = run(), run()
    assert len(a.reservoir_) == 500
    assert np.array_equal(a.reservoir_, b.reservoir_)
    # 2000 arrivals after the old data: each old vector survives with
    # probability (1 - 1/500)^2000, about 2%.
    assert (a.reservoir_[:, 0] > 50).mean() > 0.95


def test_fit_needs_enough_vectors() -> None:
    with pytest.raises(ValueError, match="at least 200"):
        BaselineAnomaly().fit(np.zeros((10, 2)), feature_names=["a", "b"])
    with pytest.raises(ValueError, match="columns"):
        BaselineAnomaly().fit(np.zeros((300, 2)), feature_names=["a"])
