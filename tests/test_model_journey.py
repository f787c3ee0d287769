"""JourneyModel: transition probabilities and the journeys people do not take."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlplane.models.journey import END, START, JourneyModel, enumeration_share, step
from tests.synthetic_traffic import Traffic, trained


@pytest.fixture(scope="module")
def model() -> JourneyModel:
    return trained().journey


def codes(model: JourneyModel, session: list[str], **kw: object) -> list[str]:
    return [r.code for r in model.explain(session, **kw)]  # type: ignore[arg-type]


@pytest.mark.parametrize("smoothing", ["kneser_ney", "laplace"])
def test_transition_probabilities_sum_to_one(smoothing: str) -> None:
    sessions = [c.steps for c in trained().baseline_humans[:500]]
    model = JourneyModel(smoothing=smoothing).fit(sessions)
    outcomes = [*model.vocabulary_, "GET /never/seen"]  # the last one stands for UNKNOWN
    for context in (START, "GET /", "POST /login", "GET /never/seen"):
        total = sum(model.probability(model._state(context), w) for w in outcomes)
        assert total == pytest.approx(1.0), (smoothing, context)
    assert model.probability(START, "GET /") > model.probability(START, "POST /orders")
    assert model.probability("GET /cart", "GET /no/such/route") > 0


def test_people_take_likely_journeys(model: JourneyModel) -> None:
    people = Traffic(31).humans(300)
    scores = np.array([model.score(c.steps, paths=c.paths) for c in people])
    assert np.quantile(scores, 0.99) < 0.3
    typical = [model.mean_log_likelihood(c.steps) for c in people]
    assert model.ll_typical_ == pytest.approx(np.median([t for t in typical if t]), abs=0.2)
    assert model.mean_log_likelihood(["GET /"]) is None  # too short to judge


def test_checkout_without_cart(model: JourneyModel) -> None:
    assert codes(model, ["GET /", "GET /checkout", "POST /orders"]) == ["checkout_without_cart"]
    assert "checkout_without_cart" not in codes(
        model,
        [
            "GET /products/{id}",
            "POST /cart/items",
            "GET /cart",
            "GET /checkout",
            "POST /orders",
        ],
    )


def test_catalog_walked_in_identifier_order(model: JourneyModel) -> None:
    paths = [f"/products/{i}" for i in range(2000, 2030)]
    session = [step("GET", "/products/{id}")] * len(paths)
    (reason,) = model.explain(session, paths=paths)
    assert reason.code == "catalog_enumeration"
    assert "2000..2029" in reason.text and "+1" in reason.text
    shuffled = list(np.random.default_rng(0).permutation(paths))
    assert "catalog_enumeration" not in codes(model, session, paths=shuffled)
    # A share of sequential steps computed elsewhere (the feature store) works too.
    assert codes(model, session[:3], enumeration=0.95) == ["catalog_enumeration"]
    assert enumeration_share([5, 6, 6, 7, 9]) == (2 / 3, 1)


def test_login_without_the_page_before_it(model: JourneyModel) -> None:
    assert model.usual_predecessors_["POST /login"][0] == "GET /login"
    stuffing = ["POST /login"] * 5
    assert "login_without_preamble" in codes(model, stuffing)
    person = ["GET /", "GET /login", "POST /login", "POST /login", "GET /account"]
    assert "login_without_preamble" not in codes(model, person)
    pumping = ["POST /otp/send"] * 20
    assert codes(model, pumping)[0] == "otp_without_preamble"


def test_cart_hoarding(model: JourneyModel) -> None:
    session = ["GET /inventory/{id}", "POST /cart/items"] * 30
    found = model.explain(session)
    assert found[0].code == "cart_hoarding"
    assert "30 cart additions" in found[0].text
    # The specific rule supersedes the generic findings that describe it.
    assert "journey_improbable" not in [r.code for r in found]


def test_unseen_transitions_and_improbable_journeys(model: JourneyModel) -> None:
    session = [
        "GET /account",
        "DELETE /cart/items/{id}",
        "GET /reviews/export",
        "GET /account",
        "GET /reviews/export",
        "DELETE /cart/items/{id}",
    ]
    found = {r.code: r for r in model.explain(session)}
    assert "unseen_transition" in found
    assert "never occur" in found["unseen_transition"].text
    assert "journey_improbable" in found
    assert model.mean_log_likelihood(session) < model.ll_typical_ - 1
    assert END in model.vocabulary_


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="smoothing"):
        JourneyModel(smoothing="witten_bell").fit([["GET /"]] * 20)
    with pytest.raises(ValueError, match="at least 10"):
        JourneyModel().fit([["GET /"]] * 3)
    assert math.isfinite(JourneyModel().fit([["GET /", "GET /cart"]] * 12).ll_typical_)


def test_findings_are_remembered_per_fitted_state_and_handed_out_as_copies() -> None:
    """A session stops growing at the engine's 32 steps and is judged again at
    each rescoring: its findings are kept, for the model as fitted."""
    odd = ["GET /", "GET /checkout", "POST /orders"]
    people = [c.steps for c in trained().baseline_humans[:300]]
    model = JourneyModel().fit(people)
    first = model.findings(odd)
    assert [f.reason.code for f in first] == ["checkout_without_cart"]
    points = first[0].reason.points
    first.clear()  # the caller's list is its own
    assert [f.reason.points for f in model.findings(odd)] == [points]
    # Refitted on sessions that check out without a cart as often as not, the
    # same session is judged anew: it is far less unusual for this host.
    model.fit(people + [odd] * len(people))
    again = [f for f in model.findings(odd) if f.reason.code == "checkout_without_cart"]
    assert again and again[0].reason.points < points / 1.5
