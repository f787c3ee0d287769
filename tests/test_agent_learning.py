"""What the running control plane learns from: confident verdicts into the
training set, feature drift against the learning period, snapshots of risky
clients in the store, labels on a cluster or a CIDR through their addresses, and
who promoted a model.

One ControlPlane (real SQLite store, no kernel) takes the synthetic mixed
stream: humans alone through the learning period, then a loud scraper
(10.201.1.10) and a polite stuffer on 50 addresses (10.201.2.x) join them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.agent import ControlPlane
from controlplane.features import FEATURE_NAMES
from controlplane.learning import SOURCE_VERDICT, DriftMonitor
from controlplane.store import DB_NAME, Store
from lab.synthetic import LEARNING_S, mixed_traffic
from tests.test_learning import clients as labelled_clients

SCRAPER = "10.201.1.10"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    store = Store(tmp_path_factory.mktemp("plane") / DB_NAME)
    plane = ControlPlane(store, learning_s=LEARNING_S)
    # Few clients in this stream: judge drift on fewer recent vectors than
    # the default, which is made for a busy host.
    plane.drift = DriftMonitor(min_samples=100.0)
    for event in mixed_traffic():
        plane.engine.process(event)
    plane.engine.tick()
    try:
        yield plane
    finally:
        plane.close()


def test_confident_verdicts_join_the_training_set(plane: ControlPlane) -> None:
    assert plane.training.label_of(("addr", SCRAPER)) == "bot"
    assert plane.training.source_of(("addr", SCRAPER)) == SOURCE_VERDICT
    by_source = plane.training.counts_by_source()[SOURCE_VERDICT]
    assert by_source.get("bot", 0) >= 10  # the scraper and most stuffer addresses
    # No human of the stream is learned as a bot.
    humans = [a for a in plane.engine.clients() if a.startswith("10.201.3.")]
    assert humans and all(plane.training.label_of(("addr", h)) != "bot" for h in humans)


def test_an_operator_label_stands_over_a_confident_verdict(plane: ControlPlane) -> None:
    stuffer = "10.201.2.7"
    plane.feedback("addr", stuffer, "human", "test")
    assert plane.training.label_of(("addr", stuffer)) == "human"
    assert not plane.training.add_confident(
        plane.engine.features.features(("addr", stuffer), plane.engine._now),
        "bot",
        0.99,
        key=("addr", stuffer),
    )
    assert plane.training.label_of(("addr", stuffer)) == "human"


def test_drift_is_measured_against_the_learning_period(plane: ControlPlane) -> None:
    report = plane.drift_report()
    assert report["fitted"] and report["reference_samples"] > 0
    assert set(report["psi"]) == set(FEATURE_NAMES)
    # The bots that came after the learning period moved the login and
    # failure mix away from what the humans showed.
    assert report["levels"]["login_share"] in ("moderate", "major"), report["psi"]["login_share"]
    assert "login_share" in report["drifted"]


def test_risky_clients_are_snapshotted_once_per_change(plane: ControlPlane) -> None:
    stored = plane.save_snapshots()
    assert stored >= 1
    snapshot = plane.store.latest_snapshot(SCRAPER)
    assert snapshot is not None
    assert snapshot.risk_score == plane.engine.risks[("addr", SCRAPER)].score
    assert snapshot.features["req_rate_10s"] > 0
    assert snapshot.fingerprints["user_agent"]
    assert plane.save_snapshots() == 0  # nothing changed since


def test_a_cluster_label_teaches_through_its_addresses(plane: ControlPlane) -> None:
    seen = plane.engine.fingerprints("10.201.2.20")
    assert seen is not None and seen["tcp"]
    members = plane.engine.features.members(("tcp", seen["tcp"]))
    assert len(members) >= 10
    plane.feedback("cluster", f"tcp:{seen['tcp']}", "good_bot", "test")
    labelled = [m for m in members if plane.training.label_of(("addr", m)) == "good_bot"]
    assert sorted(labelled) == sorted(members)


def test_a_cidr_label_teaches_through_its_addresses(plane: ControlPlane) -> None:
    outside = {a: plane.training.label_of(("addr", a)) for a in plane.engine.clients()}
    plane.feedback("cidr", "10.201.3.0/28", "human", "test")
    inside = [a for a in outside if a.startswith("10.201.3.") and int(a.rsplit(".", 1)[1]) < 16]
    assert inside
    assert all(plane.training.label_of(("addr", a)) == "human" for a in inside)
    for addr in set(outside) - set(inside):
        assert plane.training.label_of(("addr", addr)) == outside[addr], addr


def test_a_hand_promotion_names_its_actor(tmp_path: Path) -> None:
    plane = ControlPlane(Store(tmp_path / DB_NAME))
    try:
        for i, (features, label) in enumerate(labelled_clients(0, humans=60, bots=60)):
            plane.training.add_feedback(features, label, key=i)
        first = plane.retrain()
        assert first["status"] == "promoted", first
        assert plane.store.get_model(first["version"]).status_changed_by == "learning"
        plane.promote(first["version"], "api:alice")
        assert plane.store.get_model(first["version"]).status_changed_by == "api:alice"
    finally:
        plane.close()
