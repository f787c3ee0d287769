"""The scikit-learn estimator contract, checked for every botwall model alike."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from controlplane.models import noisy_or
from controlplane.models.baseline import BaselineAnomaly
from controlplane.models.campaign import CampaignDetector
from controlplane.models.consistency import ConsistencyModel
from controlplane.models.journey import JourneyModel
from controlplane.models.supervised import SupervisedClassifier
from tests.synthetic_traffic import (
    CLIENT_FEATURES,
    GOOGLEBOT_RANGES,
    UA_CHROME_WINDOWS,
    Traffic,
    feature_matrix,
)

NAMES = list(CLIENT_FEATURES)
VERSION = re.compile(r"^[a-z]+-\d{8}T\d{4}-[0-9a-f]{4}$")


def _humans() -> list:
    return Traffic(11).humans(300)


def _fit_baseline(model: BaselineAnomaly) -> BaselineAnomaly:
    return model.fit(feature_matrix(_humans()), feature_names=NAMES)


def _fit_journey(model: JourneyModel) -> JourneyModel:
    return model.fit([c.steps for c in _humans()])


def _fit_supervised(model: SupervisedClassifier) -> SupervisedClassifier:
    traffic = Traffic(12)
    clients = traffic.humans(200) + [traffic.sms_pumper() for _ in range(20)]
    return model.fit(feature_matrix(clients), [c.label for c in clients], feature_names=NAMES)


# (model with non-default parameters, fit it, score it unfitted)
CASES: list[tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]] = [
    (
        ConsistencyModel(crawler_ranges=GOOGLEBOT_RANGES, ua_os_points=40.0),
        lambda m: m.fit(),
        lambda m: m.score(user_agent=UA_CHROME_WINDOWS),
    ),
    (
        BaselineAnomaly(n_estimators=50, min_samples=100, descriptions={"a": "b"}),
        _fit_baseline,
        lambda m: m.score({"req_rate_60s": 1.0}),
    ),
    (
        JourneyModel(smoothing="laplace", alpha=0.5),
        _fit_journey,
        lambda m: m.score(["GET /"]),
    ),
    (
        SupervisedClassifier(max_iter=30, calibration_folds=2),
        _fit_supervised,
        lambda m: m.score({"req_rate_60s": 1.0}),
    ),
    (
        CampaignDetector(min_addrs=10),
        lambda m: m.fit(),
        lambda m: m.score({"distinct_addrs": 50.0}),
    ),
]
IDS = [type(case[0]).__name__ for case in CASES]


@pytest.mark.parametrize(("model", "fit", "score"), CASES, ids=IDS)
def test_init_only_stores_parameters(model: Any, fit: Any, score: Any) -> None:
    params = model.get_params()
    assert not [k for k in vars(model) if k.endswith("_")]
    assert set(vars(model)) == set(params)
    copy = clone(model)  # sklearn checks every parameter round-trips unchanged
    assert copy.get_params() == params


@pytest.mark.parametrize(("model", "fit", "score"), CASES, ids=IDS)
def test_unfitted_model_refuses_to_score(model: Any, fit: Any, score: Any) -> None:
    with pytest.raises(NotFittedError):
        score(clone(model))


@pytest.mark.parametrize(("model", "fit", "score"), CASES, ids=IDS)
def test_fit_returns_self_and_learned_state_ends_in_underscore(
    model: Any, fit: Any, score: Any
) -> None:
    fresh = clone(model)
    assert fit(fresh) is fresh
    learned = set(vars(fresh)) - set(fresh.get_params())
    assert learned
    assert all(name.endswith("_") for name in learned), learned
    assert VERSION.match(fresh.version_), fresh.version_
    assert fresh.version_.startswith(f"{fresh.kind}-")
    assert 0.0 <= score(fresh) <= 1.0
    # A clone of a fitted model is a new, unfitted one with the same parameters.
    again = clone(fresh)
    with pytest.raises(NotFittedError):
        score(again)


def test_noisy_or() -> None:
    assert noisy_or([]) == 0.0
    assert noisy_or([0.5, 0.5]) == pytest.approx(0.75)
    assert noisy_or([1.0, 0.2]) == 1.0
    assert np.isclose(noisy_or([0.9]), 0.9)
