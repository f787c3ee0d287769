"""The `botwall` commands: API-backed ones against a real HTTP server, local ones on captures.

The stub agent is a real http.server on 127.0.0.1 speaking the admin API
contract; every test asserts the exact requests the CLI sent (method, path
with query, JSON or text body, bearer token) as well as what it printed.
`replay` runs the real engine on real captures; `detach` is checked without
touching the kernel (the root check, and the calls into sensor.loader).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from controlplane.cli import app
from tests.test_engine_replay import write_capture

TOKEN = "s3cret-token"
SHARED_TLS = Path(__file__).resolve().parents[2] / "shared/fixtures/tls"


@dataclass
class Seen:
    method: str
    path: str  # with the query string
    auth: str | None
    content_type: str | None
    body: bytes


@dataclass
class StubAgent:
    """Replies by (method, path-with-query): (status, JSON-able or str body)."""

    url: str = ""
    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def json_body(self, i: int) -> Any:
        return json.loads(self.seen[i].body)


def _handler(agent: StubAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            agent.seen.append(
                Seen(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Content-Type"),
                    body,
                )
            )
            if self.path != "/healthz" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, reply = 401, {"detail": "missing or wrong bearer token"}
            else:
                status, reply = agent.routes.get(
                    (self.command, self.path), (404, {"detail": f"no route {self.path}"})
                )
            if isinstance(reply, str):
                data, ctype = reply.encode(), "application/toml"
            else:
                data, ctype = json.dumps(reply).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *_: Any) -> None:  # keep pytest's output clean
            pass

    return Handler


@pytest.fixture
def agent() -> Iterator[StubAgent]:
    stub = StubAgent()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()
    thread.join()


def botwall(*args: str, url: str | None = None, token: str | None = TOKEN, **env: str) -> Result:
    # A wide terminal so rich tables keep each value on one line.
    base = {"BOTWALL_API": url, "BOTWALL_TOKEN": token, "BOTWALL_STATE_DIR": None, "COLUMNS": "250"}
    return CliRunner().invoke(app, list(args), env={**base, **env})


def assert_clean_exit(result: Result, code: int) -> None:
    """Exited with code, through typer.Exit: no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit | None)
    assert "Traceback" not in result.output


# ---- API-backed commands ----


def test_status(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/stats")] = (200, {"events": 1234, "observer": {"syn": 56}})
    result = botwall("status", url=agent.url)
    assert_clean_exit(result, 0)
    assert [(s.method, s.path, s.auth) for s in agent.seen] == [
        ("GET", "/v1/stats", f"Bearer {TOKEN}")
    ]
    assert f"botwall agent at {agent.url}" in result.stdout
    assert "events" in result.stdout and "1234" in result.stdout
    assert "observer.syn" in result.stdout and "56" in result.stdout

    as_json = botwall("status", "--json", url=agent.url)
    assert json.loads(as_json.stdout) == {"events": 1234, "observer": {"syn": 56}}


def test_clients_table(agent: StubAgent) -> None:
    rows = [
        {
            "address": "10.0.0.7",
            "score": 91.5,
            "ja4": "t13d1715h2_5b57614c22b0_3d5424432f57",
            "tcp": "4:64:1460:mss*44:7:M,S,T,N,W:df",
            "requests": 412,
            "reasons": [{"code": "ua_os_mismatch", "text": "claims Windows, SYN is Linux"}],
        }
    ]
    agent.routes[("GET", "/v1/clients?sort=risk&limit=5")] = (200, {"clients": rows})
    result = botwall("clients", "--limit", "5", url=agent.url)
    assert_clean_exit(result, 0)
    assert [(s.method, s.path) for s in agent.seen] == [("GET", "/v1/clients?sort=risk&limit=5")]
    line = next(x for x in result.stdout.splitlines() if "10.0.0.7" in x)
    for value in ("91.5", "t13d1715h2_5b57614c22b0_3d5424432f57", "412", "claims Windows"):
        assert value in line


def test_show_client(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/clients/10.0.0.7")] = (
        200,
        {
            "address": "10.0.0.7",
            "score": 91.5,
            "reasons": [{"text": "claims Windows, SYN is Linux", "points": 40.0}],
            "decisions": [{"id": 7, "action": "block", "target": "10.0.0.7", "ttl_s": 3600}],
        },
    )
    result = botwall("show", "10.0.0.7", url=agent.url)
    assert_clean_exit(result, 0)
    assert agent.seen[0].path == "/v1/clients/10.0.0.7"
    assert " 40.0  claims Windows, SYN is Linux" in result.stdout
    assert "[7] block 10.0.0.7 ttl 3600 s" in result.stdout


def test_show_refuses_a_non_address_without_asking(agent: StubAgent) -> None:
    result = botwall("show", "10.0.0.300", url=agent.url)
    assert_clean_exit(result, 2)
    assert result.stderr == "botwall: not an IP address: '10.0.0.300'\n"
    assert agent.seen == []


def test_block_posts_a_decision(agent: StubAgent) -> None:
    agent.routes[("POST", "/v1/decisions")] = (201, {"id": "d-42", "action": "block"})
    result = botwall("block", "10.0.0.9", "--ttl", "60", "--reason", "scraper", url=agent.url)
    assert_clean_exit(result, 0)
    (seen,) = agent.seen
    assert (seen.method, seen.path, seen.auth) == ("POST", "/v1/decisions", f"Bearer {TOKEN}")
    assert seen.content_type == "application/json"
    assert json.loads(seen.body) == {
        "action": "block",
        "target": "10.0.0.9",
        "ttl_s": 60.0,
        "reason": "scraper",
    }
    assert result.stdout == "block 10.0.0.9 for 60 s (decision d-42)\n"


def test_block_a_ja4_and_allow_a_cidr_and_a_ja4(agent: StubAgent) -> None:
    agent.routes[("POST", "/v1/decisions")] = (201, {"id": 1})
    ja4 = "t13d1715h2_5b57614c22b0_3d5424432f57"
    assert_clean_exit(botwall("block", ja4, url=agent.url), 0)
    assert_clean_exit(botwall("allow", "192.0.2.0/24", url=agent.url), 0)
    assert_clean_exit(botwall("allow", ja4, url=agent.url), 0)
    assert agent.json_body(2) == {
        "action": "allow",
        "target": ja4,
        "ttl_s": 86400.0,
        "reason": "manual: botwall allow",
    }
    assert agent.json_body(0) == {
        "action": "block",
        "target": ja4,
        "ttl_s": 3600.0,
        "reason": "manual: botwall block",
    }
    assert agent.json_body(1) == {
        "action": "allow",
        "target": "192.0.2.0/24",
        "ttl_s": 86400.0,
        "reason": "manual: botwall allow",
    }


def test_bad_targets_are_refused_here(agent: StubAgent) -> None:
    bad = botwall("block", "not-a-target", url=agent.url)
    assert_clean_exit(bad, 2)
    assert bad.stderr == "botwall: not an address, CIDR or JA4: 'not-a-target'\n"
    assert agent.seen == []


def test_unblock_deletes_the_live_restrictions_on_the_target(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/decisions")] = (
        200,
        [
            {"id": 1, "action": "block", "target": "10.0.0.9", "ttl_s": 60},
            {"id": 2, "action": "tarpit", "target": "::ffff:10.0.0.9", "ttl_s": 600},
            {"id": 3, "action": "allow", "target": "10.0.0.9", "ttl_s": 60},  # not a block
            {"id": 4, "action": "block", "target": "10.0.0.10", "ttl_s": 60},  # other client
            {"id": 5, "action": "block", "target": "10.0.0.9", "active": False},  # expired
        ],
    )
    for ident in (1, 2):
        agent.routes[("DELETE", f"/v1/decisions/{ident}")] = (200, {"deleted": ident})
    result = botwall("unblock", "10.0.0.9", url=agent.url)
    assert_clean_exit(result, 0)
    assert [(s.method, s.path, s.auth) for s in agent.seen] == [
        ("GET", "/v1/decisions", f"Bearer {TOKEN}"),
        ("DELETE", "/v1/decisions/1", f"Bearer {TOKEN}"),
        ("DELETE", "/v1/decisions/2", f"Bearer {TOKEN}"),
    ]
    assert result.stdout.splitlines() == [
        "removed [1] block 10.0.0.9 ttl 60 s",
        "removed [2] tarpit ::ffff:10.0.0.9 ttl 600 s",
    ]


def test_unblock_with_nothing_to_lift(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/decisions")] = (200, {"decisions": []})
    result = botwall("unblock", "10.1.0.0/16", url=agent.url)
    assert_clean_exit(result, 0)
    assert result.stdout == "no live block, throttle or tarpit on 10.1.0.0/16\n"
    assert [s.method for s in agent.seen] == ["GET"]


POLICY = "[defaults]\nshadow = false\n"


def test_policy_show_and_set(agent: StubAgent, tmp_path: Path) -> None:
    agent.routes[("GET", "/v1/policy")] = (200, POLICY)
    shown = botwall("policy", "show", url=agent.url)
    assert_clean_exit(shown, 0)
    assert shown.stdout == POLICY

    agent.routes[("PUT", "/v1/policy")] = (200, {"ok": True})
    file = tmp_path / "policy.toml"
    file.write_text(POLICY + "# edited\n")
    result = botwall("policy", "set", str(file), url=agent.url)
    assert_clean_exit(result, 0)
    put = agent.seen[1]
    assert (put.method, put.path, put.auth) == ("PUT", "/v1/policy", f"Bearer {TOKEN}")
    assert put.body == (POLICY + "# edited\n").encode()
    assert put.content_type == "application/toml"
    assert result.stdout == f"policy replaced from {file}\n"


def test_a_bad_policy_shows_the_agents_reason(agent: StubAgent, tmp_path: Path) -> None:
    agent.routes[("PUT", "/v1/policy")] = (
        422,
        {"detail": "rules[2].action: 'obliterate' is not one of block, allow, throttle, tarpit"},
    )
    file = tmp_path / "bad.toml"
    file.write_text("[[rules]]\naction = 'obliterate'\n")
    result = botwall("policy", "set", str(file), url=agent.url)
    assert_clean_exit(result, 2)
    assert result.stderr == (
        "botwall: rules[2].action: 'obliterate' is not one of block, allow, throttle, tarpit\n"
    )


def test_policy_set_missing_file(agent: StubAgent, tmp_path: Path) -> None:
    result = botwall("policy", "set", str(tmp_path / "nope.toml"), url=agent.url)
    assert_clean_exit(result, 2)
    assert "cannot read" in result.stderr and "nope.toml" in result.stderr
    assert agent.seen == []


def test_fastapi_validation_errors_are_one_line(agent: StubAgent) -> None:
    # FastAPI's own 422 body for a bad field: a list of errors with locations.
    agent.routes[("POST", "/v1/decisions")] = (
        422,
        {"detail": [{"loc": ["body", "ttl_s"], "msg": "ttl_s 99999999 is over the maximum"}]},
    )
    result = botwall("block", "10.0.0.9", "--ttl", "99999999", url=agent.url)
    assert_clean_exit(result, 2)
    assert result.stderr == "botwall: ttl_s: ttl_s 99999999 is over the maximum\n"


def test_models(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/models")] = (
        200,
        {"models": [{"version": "sup-3", "model": "supervised", "state": "shadow"}]},
    )
    agent.routes[("POST", "/v1/models/retrain")] = (200, {"version": "sup-4", "rows": 900})
    agent.routes[("POST", "/v1/models/sup-4/promote")] = (200, {"version": "sup-4"})
    listed = botwall("models", "list", url=agent.url)
    assert_clean_exit(listed, 0)
    line = next(x for x in listed.stdout.splitlines() if "sup-3" in x)
    assert "supervised" in line and "shadow" in line
    retrained = botwall("models", "retrain", url=agent.url)
    assert_clean_exit(retrained, 0)
    assert retrained.stdout.startswith("retrained: version sup-4\n")
    promoted = botwall("models", "promote", "sup-4", url=agent.url)
    assert_clean_exit(promoted, 0)
    assert promoted.stdout == "promoted sup-4\n"
    assert [(s.method, s.path, s.body) for s in agent.seen] == [
        ("GET", "/v1/models", b""),
        ("POST", "/v1/models/retrain", b""),
        ("POST", "/v1/models/sup-4/promote", b""),
    ]


# ---- how the CLI finds the agent, and what it says when that fails ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_agent_not_running() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = botwall("status", url=url)
    assert_clean_exit(result, 2)
    assert result.stderr == (
        f"botwall: botwall agent is not running at {url} (start it with botwall run)\n"
    )


def test_the_default_url_is_the_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.client import discover

    monkeypatch.delenv("BOTWALL_API", raising=False)
    assert discover().url == "http://127.0.0.1:9440"


def test_refused_token(agent: StubAgent) -> None:
    result = botwall("status", url=agent.url, token="wrong")
    assert_clean_exit(result, 2)
    assert result.stderr == "botwall: the admin token was refused (token from BOTWALL_TOKEN)\n"
    assert agent.seen[0].auth == "Bearer wrong"


def test_token_from_the_state_dir(agent: StubAgent, tmp_path: Path) -> None:
    agent.routes[("GET", "/v1/stats")] = (200, {"events": 1})
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    result = botwall("status", "--state-dir", str(tmp_path), url=agent.url, token=None)
    assert_clean_exit(result, 0)
    assert agent.seen[0].auth == f"Bearer {TOKEN}"


def test_no_token_anywhere(agent: StubAgent, tmp_path: Path) -> None:
    result = botwall("status", "--state-dir", str(tmp_path), url=agent.url, token=None)
    assert_clean_exit(result, 2)
    assert agent.seen[0].auth is None
    assert "needs a token and none was found" in result.stderr
    assert str(tmp_path / "admin.token") in result.stderr


def test_token_flag_wins(agent: StubAgent) -> None:
    agent.routes[("GET", "/v1/stats")] = (200, {"events": 1})
    result = botwall("status", "--api", agent.url, "--token", TOKEN, url=None, token="wrong")
    assert_clean_exit(result, 0)
    assert agent.seen[0].auth == f"Bearer {TOKEN}"


# ---- replay: the real engine over real captures ----


def test_replay_tls12() -> None:
    result = botwall("replay", str(SHARED_TLS / "tls12.pcap"), "--json")
    assert_clean_exit(result, 0)
    report = json.loads(result.stdout)
    assert report["packets"] == 1
    assert report["decisions"] == []
    # One ClientHello and nothing else: a JA4, no SYN, no request, nothing risky.
    assert report["clients"] == [
        {
            "address": "192.168.133.129",
            "ja4": ["t13d1715h2_5b57614c22b0_3d5424432f57"],
            "tcp_signature": [],
            "os_guess": [],
            "connections": 0,
            "requests": 0,
            "risk": 0.0,
            "reasons": [],
            "decisions": [],
        }
    ]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "shop.pcap"
    write_capture(path)
    return path


LINUX_SYN = "4:64:1460:mss*44:7:M,S,T,N,W:df"


def test_replay_http_capture(shop: Path) -> None:
    result = botwall("replay", str(shop), "--http-port", "8080", "--json")
    assert_clean_exit(result, 0)
    report = json.loads(result.stdout)
    clients = {c["address"]: c for c in report["clients"]}
    assert len(clients) == 36

    human = clients["10.201.3.1"]
    assert (human["connections"], human["requests"]) == (4, 20)
    assert (human["tcp_signature"], human["os_guess"], human["ja4"]) == ([LINUX_SYN], ["Linux"], [])
    assert human["risk"] is not None and human["risk"] < 25
    assert human["decisions"] == []

    stuffer = clients["10.201.2.1"]
    assert (stuffer["connections"], stuffer["requests"]) == (4, 4)
    assert stuffer["risk"] >= 60
    assert {r["code"] for r in stuffer["reasons"]} >= {"ua_os_mismatch"}
    assert any(d["action"] == "block" and d["target"] == "10.201.2.1" for d in stuffer["decisions"])

    # Riskiest first; every human after every blocked stuffer.
    risks = [c["risk"] for c in report["clients"]]
    assert risks == sorted(risks, reverse=True)


def test_replay_table(shop: Path) -> None:
    result = botwall("replay", str(shop), "--http-port", "8080")
    assert_clean_exit(result, 0)
    human = next(x for x in result.stdout.splitlines() if "10.201.3.1 " in x)
    assert LINUX_SYN in human and "(Linux)" in human and " 20 " in human
    stuffer = next(x for x in result.stdout.splitlines() if "10.201.2.1 " in x)
    assert "User-Agent claims Windows" in result.stdout
    assert "monitor" in stuffer or "throttle" in stuffer or "block" in stuffer
    assert result.stdout.rstrip().endswith("decisions")


def test_replay_missing_capture(tmp_path: Path) -> None:
    result = botwall("replay", str(tmp_path / "none.pcap"))
    assert_clean_exit(result, 2)
    assert result.stderr.startswith("botwall: ") and "none.pcap" in result.stderr


# ---- detach: a running agent through its API, else here as root (sensor.loader) ----

NO_AGENT = "http://127.0.0.1:1"  # nothing listens there: detach works locally


def test_detach_asks_a_running_agent_first(agent: StubAgent) -> None:
    agent.routes[("POST", "/v1/detach?keep_verdicts=false")] = (
        409, {"message": "nothing to detach here"},
    )  # fmt: skip
    result = botwall("detach", url=agent.url)
    assert_clean_exit(result, 2)
    assert result.stderr == "botwall: nothing to detach here\n"
    assert [(s.method, s.path) for s in agent.seen] == [
        ("GET", "/healthz"),
        ("POST", "/v1/detach?keep_verdicts=false"),
    ]


def test_detach_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    result = botwall("detach", "--iface", "eth0", url=NO_AGENT)
    assert_clean_exit(result, 2)
    assert result.stderr == (
        "botwall: botwall detach needs root (CAP_NET_ADMIN, CAP_BPF): run it with sudo\n"
    )


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Records the calls into sensor.loader instead of touching the kernel."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr("os.geteuid", lambda: 0)

    def detach_interface(ifname: str, netns: str | None = None, remove_clsact: bool = True) -> bool:
        calls.append(("detach", ifname, netns, remove_clsact))
        return ifname == "eth0"

    monkeypatch.setattr("sensor.loader.detach_interface", detach_interface)
    monkeypatch.setattr("sensor.loader.remove_pins", lambda d: calls.append(("remove_pins", d)))
    return calls


def test_detach_interfaces_and_pins(fake_loader: list[tuple[Any, ...]], tmp_path: Path) -> None:
    result = botwall(
        "detach", "--iface", "eth0", "--iface", "eth1", "--netns", "lab", "--pin-dir",
        str(tmp_path), url=NO_AGENT,
    )  # fmt: skip
    assert_clean_exit(result, 0)
    assert fake_loader == [
        ("detach", "eth0", "lab", True),
        ("detach", "eth1", "lab", True),
        ("remove_pins", str(tmp_path)),
    ]
    assert result.stdout.splitlines() == [
        "detached botwall from eth0",
        "eth1: botwall was not attached",
        f"removed the pinned verdict maps in {tmp_path}",
    ]


def test_detach_keeps_verdicts(fake_loader: list[tuple[Any, ...]]) -> None:
    result = botwall("detach", "--iface", "eth0", "--keep-verdicts", url=NO_AGENT)
    assert_clean_exit(result, 0)
    assert fake_loader == [("detach", "eth0", None, True)]


def test_the_agents_error_message_wins(agent: StubAgent) -> None:
    # The agent's error body: a one-line message, and the raw errors beside it.
    message = "body.ttl_s: Value error, ttl_s must be > 0 (got -5.0)"
    agent.routes[("POST", "/v1/decisions")] = (422, {"message": message, "detail": [{"x": 1}]})
    result = botwall("block", "10.0.0.9", "--ttl", "5", url=agent.url)
    assert_clean_exit(result, 2)
    assert result.stderr == f"botwall: {message}\n"


def test_show_a_nested_risk(agent: StubAgent) -> None:
    # The agent's shape: {"addr", "risk": {"score", "reasons"}, "features", "decisions"}.
    agent.routes[("GET", "/v1/clients/10.0.0.8")] = (
        200,
        {
            "addr": "10.0.0.8",
            "risk": {"score": 77.0, "reasons": [{"text": "member of a campaign", "points": 60}]},
            "features": {"req_rate_60s": 2.5},
            "decisions": [],
        },
    )
    result = botwall("show", "10.0.0.8", url=agent.url)
    assert_clean_exit(result, 0)
    assert " 60.0  member of a campaign" in result.stdout
    assert "risk.score" in result.stdout and "77.0" in result.stdout
    assert "features.req_rate_60s" in result.stdout
