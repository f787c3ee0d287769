"""The admin API over real HTTP: a real uvicorn server on 127.0.0.1, real requests.

The control plane behind it is the agent's own (controlplane.agent.ControlPlane)
over a real Store in tmp_path, with an Enforcer without kernel maps: every
route is exercised end to end except the map writes, which test_agent_live
covers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.agent import ApiServer, ControlPlane
from controlplane.api.main import create_app
from controlplane.store import DB_NAME, Store
from tests.test_learning import clients as labelled_clients

TOKEN = "t" * 40
CLIENT = "198.51.100.7"


@dataclass
class Api:
    base: str
    plane: ControlPlane
    db: Path
    http: httpx.Client  # authenticated
    anon: httpx.Client


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    store = Store(tmp_path / DB_NAME)
    plane = ControlPlane(store)
    plane.restore()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = ApiServer(create_app(plane, TOKEN), "127.0.0.1", 0, sock=sock)
    server.start()
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    anon = httpx.Client(base_url=base, timeout=10)
    try:
        yield Api(base, plane, tmp_path / DB_NAME, http, anon)
    finally:
        http.close()
        anon.close()
        server.stop()
        sock.close()
        plane.close()


# ---- auth ----

PROTECTED = [
    ("GET", "/v1/stats"),
    ("GET", "/v1/clients"),
    ("GET", f"/v1/clients/{CLIENT}"),
    ("GET", "/v1/clusters"),
    ("GET", "/v1/decisions"),
    ("POST", "/v1/decisions"),
    ("DELETE", "/v1/decisions/x"),
    ("GET", "/v1/policy"),
    ("PUT", "/v1/policy"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/events"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models/retrain"),
    ("GET", "/v1/models/drift"),
    ("POST", "/v1/models/v1/promote"),
    ("GET", "/metrics"),
    ("POST", "/v1/detach"),
]


def test_healthz_needs_no_token(api: Api) -> None:
    r = api.anon.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["enforcing"] is False


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_route_wants_the_token(api: Api, method: str, path: str) -> None:
    assert api.anon.request(method, path).status_code == 401
    wrong = {"Authorization": f"Bearer {'x' * 40}"}
    assert api.anon.request(method, path, headers=wrong).status_code == 401
    r = api.anon.request(method, path, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_with_the_token(api: Api) -> None:
    assert api.http.get("/v1/stats").status_code == 200


# ---- reads ----


def test_stats(api: Api) -> None:
    body = api.http.get("/v1/stats").json()
    assert {"engine", "kernel", "events_lost", "decision_latency", "live_decisions"} <= set(body)
    assert body["engine"]["events"] == 0
    assert body["events_lost"] == 0


def test_clients_and_clusters_start_empty(api: Api) -> None:
    assert api.http.get("/v1/clients", params={"sort": "risk", "limit": 5}).json() == []
    assert api.http.get("/v1/clusters").json() == []
    assert api.http.get(f"/v1/clients/{CLIENT}").status_code == 404
    r = api.http.get("/v1/clients/not-an-ip")
    assert r.status_code == 422 and "not-an-ip" in r.json()["message"]
    r = api.http.get("/v1/clients", params={"sort": "shoe-size"})
    assert r.status_code == 422 and "shoe-size" in r.json()["message"]


def test_client_after_app_event_and_decision(api: Api) -> None:
    r = api.http.post("/v1/events", json={"client": CLIENT, "port": 40000, "kind": "login_failure"})
    assert r.status_code == 202
    api.http.post("/v1/decisions", json={"action": "block", "target": CLIENT, "ttl_s": 60})
    body = api.http.get(f"/v1/clients/{CLIENT}").json()
    assert body["addr"] == CLIENT
    assert body["last_seen"] is not None
    assert [d["action"] for d in body["decisions"]] == ["block"]


def test_clients_lists_risky_clients_by_risk(api: Api) -> None:
    from controlplane.decisions import Risk

    with api.plane.lock:
        for addr, score in (("192.0.2.1", 30.0), ("192.0.2.2", 90.0)):
            api.plane.engine.risks["addr", addr] = Risk(("addr", addr), score, ())
        api.plane.engine.risks["ja4", "t13d1516h2_8daaf6152771_02713d6af862"] = Risk(
            ("ja4", "t13d1516h2_8daaf6152771_02713d6af862"), 70.0, ()
        )
    rows = api.http.get("/v1/clients", params={"sort": "risk", "limit": 10}).json()
    assert [r["addr"] for r in rows] == ["192.0.2.2", "192.0.2.1"]
    assert len(api.http.get("/v1/clients", params={"limit": 1}).json()) == 1
    assert [c["kind"] for c in api.http.get("/v1/clusters").json()] == ["ja4"]


# ---- decisions ----


def test_decision_roundtrip_is_persisted(api: Api) -> None:
    r = api.http.post(
        "/v1/decisions",
        json={"action": "block", "target": CLIENT, "ttl_s": 600, "reason": "test: scraper"},
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["source"] == "manual" and made["actor"] == "api:admin"
    listed = api.http.get("/v1/decisions").json()
    assert [d["id"] for d in listed] == [made["id"]]
    # In the file, not only in memory: a second connection sees it.
    with Store(api.db) as other:
        assert other.get_decision(made["id"]).decision.target == CLIENT
    r = api.http.delete(f"/v1/decisions/{made['id']}")
    assert r.status_code == 200
    assert r.json()["revoked_by"] == "api:admin"
    assert api.http.get("/v1/decisions").json() == []
    assert len(api.http.get("/v1/decisions", params={"include_revoked": True}).json()) == 1
    with Store(api.db) as other:
        assert other.get_decision(made["id"]).revoked_at is not None
        actions = [a.action for a in other.audit_log(subject=f"decision:{made['id']}")]
        assert actions == ["decision.revoke", "decision.create"]
    assert api.http.delete(f"/v1/decisions/{made['id']}x").status_code == 404


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"action": "allow", "target": "203.0.113.0/24"}, "cidr"),
        ({"action": "throttle", "target": "2001:db8::1", "ttl_s": 30}, "addr"),
        ({"action": "tarpit", "target": CLIENT, "tarpit_syns": 2}, "addr"),
        ({"action": "block", "target": "t13d1516h2_8daaf6152771_02713d6af862"}, "ja4"),
        ({"action": "allow", "target": "t13d1516h2_8daaf6152771_02713d6af862"}, "ja4"),
        ({"action": "throttle", "target": "t13d1516h2_8daaf6152771_02713d6af862"}, "ja4"),
        ({"action": "tarpit", "target": "t13d1516h2_8daaf6152771_02713d6af862"}, "ja4"),
        ({"action": "throttle", "target": "203.0.113.0/24"}, "cidr"),
        ({"action": "tarpit", "target": "2001:db8::/64", "tarpit_syns": 2}, "cidr"),
    ],
)
def test_decision_kinds(api: Api, body: dict[str, object], kind: str) -> None:
    r = api.http.post("/v1/decisions", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["target_kind"] == kind


def test_ja4_block_is_held_by_the_enforcer_until_revoked(api: Api) -> None:
    ja4 = "t13d1516h2_8daaf6152771_02713d6af862"
    made = api.http.post("/v1/decisions", json={"action": "block", "target": ja4}).json()
    assert ja4 in api.plane.enforcer.blocked_ja4s()
    api.http.delete(f"/v1/decisions/{made['id']}")
    assert ja4 not in api.plane.enforcer.blocked_ja4s()


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"action": "block", "target": "10.0.0.256"}, "10.0.0.256"),
        ({"action": "block", "target": "10.0.0.0/33"}, "10.0.0.0/33"),
        ({"action": "block", "target": "not_a_ja4"}, "not"),
        ({"action": "block", "target": CLIENT, "ttl_s": 0}, "ttl_s"),
        ({"action": "block", "target": CLIENT, "ttl_s": -5}, "-5"),
        ({"action": "block", "target": CLIENT, "ttl_s": 1e12}, "1000000000000"),
        ({"action": "explode", "target": CLIENT}, "explode"),
        ({"action": "allow", "target": "192.0.2.1:5000->192.0.2.2:443"}, "->192.0.2.2"),
        ({"action": "block", "target": CLIENT, "reason": "two\nlines"}, "reason"),
        ({"action": "block"}, "target"),
    ],
)
def test_bad_decisions_are_422_naming_the_value(
    api: Api, body: dict[str, object], named: str
) -> None:
    r = api.http.post("/v1/decisions", json=body)
    assert r.status_code == 422, r.text
    assert named in r.json()["message"]
    assert api.http.get("/v1/decisions").json() == []


# ---- policy ----


def test_policy_get_put_and_bad_put(api: Api) -> None:
    r = api.http.get("/v1/policy")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/toml")
    original = r.text
    assert original.strip()

    changed = original + "\n# operator's note\n"
    r = api.http.put("/v1/policy", content=changed, headers={"Content-Type": "application/toml"})
    assert r.status_code == 200, r.text
    assert api.http.get("/v1/policy").text == changed

    bad = "shadow = 'perhaps'\n[[rules]\n"
    r = api.http.put("/v1/policy", content=bad, headers={"Content-Type": "application/toml"})
    assert r.status_code == 422
    assert "TOML" in r.json()["message"]
    r = api.http.put(
        "/v1/policy", content="no_such_key = 1\n", headers={"Content-Type": "application/toml"}
    )
    assert r.status_code == 422
    assert "no_such_key" in r.json()["message"]
    assert api.http.get("/v1/policy").text == changed  # the old one stays
    with Store(api.db) as other:
        assert other.current_policy() == changed


# ---- feedback and events ----


def test_feedback_human_flips_a_block_at_once(api: Api) -> None:
    made = api.http.post("/v1/decisions", json={"action": "block", "target": CLIENT}).json()
    r = api.http.post("/v1/feedback", json={"subject": CLIENT, "label": "human", "note": "me"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revoked"] == [made["id"]]
    live = api.http.get("/v1/decisions").json()
    assert [(d["action"], d["target"], d["source"]) for d in live] == [
        ("allow", CLIENT, "feedback")
    ]
    with Store(api.db) as other:
        assert [(lb.subject, lb.label) for lb in other.labels()] == [(CLIENT, "human")]


def test_feedback_bot_is_recorded_and_trains(api: Api) -> None:
    api.http.post("/v1/events", json={"client": CLIENT, "port": 1234, "kind": "login_failure"})
    r = api.http.post("/v1/feedback", json={"subject": CLIENT, "label": "bot"})
    assert r.status_code == 200
    assert r.json()["revoked"] == [] and r.json()["allow_decision"] is None
    assert api.plane.training.label_of(("addr", CLIENT)) == "bot"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"subject": CLIENT, "label": "alien"}, "alien"),
        ({"subject": "300.1.1.1", "label": "bot"}, "300.1.1.1"),
        ({"subject_kind": "cidr", "subject": "10.0.0.0/99", "label": "bot"}, "10.0.0.0/99"),
        ({"subject_kind": "planet", "subject": CLIENT, "label": "bot"}, "planet"),
    ],
)
def test_bad_feedback_is_422(api: Api, body: dict[str, object], named: str) -> None:
    r = api.http.post("/v1/feedback", json=body)
    assert r.status_code == 422
    assert named in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"client": CLIENT, "port": 1, "kind": "dance"}, "dance"),
        ({"client": "nope", "port": 1, "kind": "checkout"}, "nope"),
        ({"client": CLIENT, "port": 70000, "kind": "checkout"}, "70000"),
    ],
)
def test_bad_events_are_422(api: Api, body: dict[str, object], named: str) -> None:
    r = api.http.post("/v1/events", json=body)
    assert r.status_code == 422
    assert named in r.json()["message"]


@pytest.mark.parametrize(
    "kind", ["login_success", "login_failure", "otp_sent", "checkout", "add_to_cart"]
)
def test_every_event_kind(api: Api, kind: str) -> None:
    r = api.http.post("/v1/events", json={"client": "2001:db8::5", "port": 5, "kind": kind})
    assert r.status_code == 202


# ---- models ----


def test_models_retrain_and_promote(api: Api) -> None:
    assert api.http.get("/v1/models").json() == []
    skipped = api.http.post("/v1/models/retrain").json()
    assert skipped["status"] == "skipped"  # no labels yet

    for i, (features, label) in enumerate(labelled_clients(0, humans=60, bots=60)):
        api.plane.training.add_feedback(features, label, key=i)
    outcome = api.http.post("/v1/models/retrain").json()
    assert outcome["status"] == "promoted", outcome
    version = outcome["version"]
    models = api.http.get("/v1/models").json()
    assert [(m["version"], m["status"]) for m in models] == [(version, "live")]

    r = api.http.post(f"/v1/models/{version}/promote")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "live"
    assert api.http.post("/v1/models/nope/promote").status_code == 404

    # A restarted agent gets its live model and its labels back from the store.
    api.http.post("/v1/events", json={"client": CLIENT, "port": 9, "kind": "checkout"})
    api.http.post("/v1/feedback", json={"subject": CLIENT, "label": "bot"})
    restarted = ControlPlane(Store(api.db))
    try:
        assert restarted.scorer.supervised is not None
        assert restarted.scorer.supervised.version_ == version
        assert restarted.training.label_of(("addr", CLIENT)) == "bot"
    finally:
        restarted.close()


# ---- metrics ----


def test_metrics(api: Api) -> None:
    r = api.http.get("/metrics")
    assert r.status_code == 200
    text = r.text
    for name in (
        'botwall_packets_dropped_total{reason="block"}',
        'botwall_packets_throttled_total{reason="connections"}',
        'botwall_packets_delayed_total{reason="tarpit"}',
        "botwall_decision_latency_seconds_bucket",
        "botwall_events_lost_total",
    ):
        assert name in text, name


def test_drift_route_and_metric(api: Api) -> None:
    import numpy as np

    from controlplane.features import FEATURE_NAMES
    from controlplane.learning import DriftMonitor

    empty = api.http.get("/v1/models/drift").json()
    assert (empty["fitted"], empty["psi"]) == (False, {})
    # A reference, then recent clients that all moved on one feature.
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, len(FEATURE_NAMES)))
    recent = rng.normal(size=(200, len(FEATURE_NAMES)))
    recent[:, FEATURE_NAMES.index("login_share")] += 3.0
    api.plane.drift = DriftMonitor(min_samples=100.0).fit(reference)
    api.plane.drift.update_many(recent)
    body = api.http.get("/v1/models/drift").json()
    assert body["drifted"] == ["login_share"]
    assert body["levels"]["login_share"] == "major"
    metrics = api.http.get("/metrics").text
    line = next(
        x for x in metrics.splitlines() if 'botwall_feature_psi{feature="login_share"}' in x
    )
    assert float(line.split()[-1]) == pytest.approx(body["psi"]["login_share"])


def test_detach_without_an_agent_is_409(api: Api) -> None:
    r = api.http.post("/v1/detach")
    assert r.status_code == 409
    assert "without a sensor" in r.json()["message"]


def test_openapi_docs(api: Api) -> None:
    assert api.anon.get("/docs").status_code == 200
    paths = api.anon.get("/openapi.json").json()["paths"]
    assert {"/v1/decisions", "/v1/decisions/{decision_id}", "/v1/policy", "/metrics"} <= set(paths)


# ---- no input makes it fail ----


def test_no_request_ends_in_a_server_error(api: Api) -> None:
    """Schemathesis generates valid and invalid requests for every operation
    from the OpenAPI schema; none may end in a 5xx."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    # The policy is a TOML text body: sent as any text is.
    schemathesis.serializer.alias("application/toml", "text/plain")
    schema = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    failures: list[str] = []
    with requests.Session() as session:

        @settings(
            max_examples=300,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(cases)
        def check(case: Any) -> None:
            response = case.call(
                base_url=api.base,
                session=session,
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            )
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} "
                    f"{response.text[:300]}"
                )

        check()
    assert not failures, failures


# ---- settings and the token ----


def test_settings_refuse_a_public_api_without_a_token() -> None:
    from controlplane.settings import load_settings
    from sensor.errors import ConfigError

    with pytest.raises(ConfigError, match=r"0\.0\.0\.0.*admin_token"):
        load_settings(api_host="0.0.0.0")
    with pytest.raises(ConfigError, match="at least 32"):
        load_settings(admin_token="short")
    assert load_settings(api_host="0.0.0.0", admin_token=TOKEN).api_host == "0.0.0.0"
    assert load_settings(api_host="::1").api_host == "::1"


def test_settings_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.settings import load_settings
    from sensor.errors import ConfigError

    config = tmp_path / "botwall.toml"
    config.write_text('ifaces = ["eth9"]\napi_port = 9555\nhttp_ports = [8080]\n')
    settings = load_settings(config)
    assert (settings.ifaces, settings.api_port, settings.tls_ports) == (["eth9"], 9555, [443])
    monkeypatch.setenv("BOTWALL_API_PORT", "9666")
    assert load_settings(config).api_port == 9666  # environment over file
    assert load_settings(config, api_port=9777).api_port == 9777  # command line over both
    monkeypatch.delenv("BOTWALL_API_PORT")
    config.write_text("api_port = 70000\n")
    with pytest.raises(ConfigError, match="api_port"):
        load_settings(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_admin_token_is_made_once_mode_0600(tmp_path: Path) -> None:
    from controlplane.agent import admin_token
    from controlplane.settings import load_settings

    settings = load_settings(state_dir=tmp_path / "state")
    token = admin_token(settings)
    path = tmp_path / "state" / "admin.token"
    assert len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert admin_token(settings) == token
    assert admin_token(load_settings(admin_token=TOKEN)) == TOKEN
