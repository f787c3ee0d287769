"""`botwall lab`: a real API under real bot attacks, with the agent live.

One run, start to end:

1. a server and a client namespace (lab.netns), 1,100 IPv4 client addresses
   and 64 from an IPv6 /64 on the client side;
2. the shop (lab.api: FastAPI under uvicorn behind nginx terminating TLS) in
   the server namespace;
3. the botwall agent (`python -m controlplane.agent`, the same program as
   `botwall run`) in the server namespace, attached to the server's veth (the
   public TLS port: SYN and ClientHello fingerprints) and to its loopback (the
   plaintext hop from nginx to the API: request heads with X-Forwarded-For and
   X-Forwarded-Port, and the API's status codes); the shop reports logins,
   OTPs and checkouts to the agent's /v1/events;
4. the honest clients first (humans in Chromium tabs and in the shop's app,
   the crawler, the AI agent) while the agent learns this host's traffic,
   then the bad bots join them;
5. every client's requests recorded as ground truth (lab.records), the
   agent's decisions read from its admin API, and the evaluation report
   (lab.report) written as report.json and report.html.

Teardown stops every process, detaches the programs (the veth goes with the
namespaces), and deletes the lab's pinned maps: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lab.api.server import ShopServer
from lab.browser import route_sources
from lab.netns import Topology, call_in
from lab.records import RequestRecord, parse_records
from lab.report import Report, ScenarioInfo, evaluate, print_summary, write_report
from sensor.loader import remove_pins

log = logging.getLogger("botwall.lab")

REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_POLICY = Path(__file__).with_name("policy.toml")
TLS_PORT = 443
UPSTREAM_PORT = 8000  # the API behind nginx, on the server's loopback
API_PORT = 9440
CLIENT_V4 = 1100  # the issue asks for at least 1,000 IPv4 client addresses
CLIENT_V6 = 64
CRAWLER_RANGE = "10.201.1.0/29"  # lab/policy.toml's googlebot range: the first 8 addresses
AGENT_READY_S = 180.0  # BCC compiles the programs when the agent starts
LEARNING_GRACE_S = 30.0  # at most this long past learning_s for the agent to say it is done


@dataclass(frozen=True)
class Scenario:
    """One kind of client in the lab, with its ground truth."""

    name: str
    label: str  # human, good_bot, ai_agent, bad_bot
    kind: str  # loud, distributed, stealthy, normal (lab.report's targets)
    runner: str  # bots (lab.bots), browser (lab.browser), hydra, wrk, curl
    v4: int  # client addresses it uses
    description: str
    v6: int = 0
    rate_limit_rpm: int | None = None  # the policy's limit for a good client
    duration_s: float | None = None  # shorter than the attack phase (the tools)

    @property
    def attack(self) -> bool:
        return self.label == "bad_bot"


CATALOG: tuple[Scenario, ...] = (
    # The crawler comes first: its addresses are the first of the pool, CRAWLER_RANGE.
    Scenario("crawler", "good_bot", "normal", "bots", 1,
             "Googlebot from its published range, the catalog in order, 1 page/1.5 s",
             rate_limit_rpm=20 * 60),
    Scenario("human_browser", "human", "normal", "browser", 12,
             "shoppers in Chromium tabs: home, search, products, login, cart, checkout"),
    Scenario("human_app", "human", "normal", "bots", 24,
             "the shop's mobile app (its own TLS), human visits and pauses", v6=8),
    Scenario("ai_agent", "ai_agent", "normal", "bots", 2,
             "ShopAgent/1.0, declared, buying fast for its users", rate_limit_rpm=5 * 60),
    Scenario("stuffing_loud", "bad_bot", "loud", "hydra", 1,
             "hydra: POST /login with a password list, 4 connections at once", duration_s=30),
    Scenario("flood", "bad_bot", "loud", "wrk", 1,
             "wrk: GET /products as fast as it can", duration_s=10),
    Scenario("stuffing_distributed", "bad_bot", "distributed", "bots", 500,
             "one login attempt a minute or so from each of 500 addresses"),
    Scenario("ato", "bad_bot", "distributed", "bots", 20,
             "account takeover after a stuffing hit: login, account, cart, checkout"),
    Scenario("scraping_sequential", "bad_bot", "loud", "bots", 1,
             "the catalog in id order, 4 requests/s"),
    Scenario("scraping_stealthy", "bad_bot", "stealthy", "bots", 40,
             "the catalog in random order, human-like pauses, rotating addresses"),
    Scenario("hoarding", "bad_bot", "normal", "bots", 8,
             "scarce items added to carts again and again, never checked out"),
    Scenario("sms_pumping", "bad_bot", "distributed", "bots", 30,
             "/otp/send to premium-rate numbers from 30 addresses"),
    Scenario("sophisticated", "bad_bot", "stealthy", "bots", 40,
             "Chrome's User-Agent and headers over Python TLS, a new address every few requests",
             v6=16),
    # Last, so that adding it moved no other scenario's addresses.
    Scenario("scraping_curl", "bad_bot", "loud", "curl", 1,
             "curl: the catalog in id order on one connection, 2 requests/s"),
)  # fmt: skip
BY_NAME = {s.name: s for s in CATALOG}
HONEST = tuple(s.name for s in CATALOG if not s.attack)
# Tools that keep no per-request records: the server's log stands in for them.
TOOL_RUNNERS = ("hydra", "wrk", "curl")
CURL_RATE_PER_S = 2


@dataclass
class LabOptions:
    duration_s: float = 120.0
    learning_s: float = 30.0  # honest clients alone while the agent learns
    scenarios: tuple[str, ...] = ()  # bad-bot scenarios; empty: all of them
    report_dir: Path = Path("lab-report")
    think_scale: float = 0.5  # compresses human think times for a short run
    seed: int = 7
    live: bool = True  # the rich live view (off: a progress line now and then)
    keep_workdir: bool = False

    def chosen(self) -> list[Scenario]:
        unknown = [n for n in self.scenarios if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
        wanted = set(self.scenarios) | set(HONEST) if self.scenarios else set(BY_NAME)
        return [s for s in CATALOG if s.name in wanted]


class LabError(RuntimeError):
    pass


def agent_learned(stats: dict[str, Any]) -> bool:
    """Whether the agent's /v1/stats says its learning period is over."""
    learning = (stats.get("engine") or {}).get("learning") or {}
    return learning.get("state") == "done"


def write_agent_config(
    path: Path,
    *,
    ifaces: Sequence[str],
    pin_dir: str,
    state_dir: Path,
    token: str,
    learning_s: float,
    api_host: str = "127.0.0.1",
) -> Path:
    """The lab agent's configuration: the shop's TLS port on `ifaces`, its
    plaintext upstream on loopback, the lab's policy. Shared by this lab and
    the Vagrant lab (lab.vm)."""
    path.write_text(
        "\n".join(
            [
                f"ifaces = {json.dumps(list(ifaces))}",
                f"tls_ports = [{TLS_PORT}]",
                f"http_ports = [{UPSTREAM_PORT}]",
                f"pin_dir = {json.dumps(pin_dir)}",
                f"state_dir = {json.dumps(str(state_dir))}",
                f"api_host = {json.dumps(api_host)}",
                f"api_port = {API_PORT}",
                f"admin_token = {json.dumps(token)}",
                f"policy_file = {json.dumps(str(LAB_POLICY))}",
                f"learning_s = {learning_s}",
                # A run of minutes cannot show the baseline model steady
                # state (its windows are 10 minutes): journeys only.
                'learn_models = ["journey"]',
            ]
        )
        + "\n"
    )
    return path


class Lab:
    """The whole lab; a context manager that always tears down."""

    def __init__(self, options: LabOptions) -> None:
        self.options = options
        self.scenarios = options.chosen()
        self.workdir = Path(tempfile.mkdtemp(prefix="botwall-lab-"))
        self.pin_dir = f"/sys/fs/bpf/botwall-lab-{secrets.token_hex(3)}"
        self.token = secrets.token_urlsafe(32)
        self.topo = Topology(prefix="bwl")
        self.shop: ShopServer | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        self.sources: dict[str, list[str]] = {}
        self.aliases: dict[str, list[str]] = {}
        self.started = self.attack_started = 0.0
        self.launched: dict[str, float] = {}  # scenario -> when its clients started
        self.finished: dict[str, float] = {}  # scenario -> when its process was seen gone

    # ---- set-up ----

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _build(self) -> None:
        self.topo.start()
        v4, v6 = self.topo.add_client_addresses(CLIENT_V4, CLIENT_V6)
        for scenario in CATALOG:  # the same addresses whatever is chosen
            self.sources[scenario.name] = v4[: scenario.v4] + v6[: scenario.v6]
            del v4[: scenario.v4], v6[: scenario.v6]
        tool_sources = [
            self.sources[s.name][0]
            for s in self.scenarios
            if s.runner in ("browser", "hydra", "wrk")
        ] + (self.sources["human_browser"][1:] if "human_browser" in self._names() else [])
        # Chromium, hydra and wrk cannot pick a source address: each gets a
        # server alias of its own that the client reaches from that source.
        aliases = dict(zip(tool_sources, route_sources(self.topo, tool_sources), strict=True))
        for s in self.scenarios:
            if s.runner in ("browser", "hydra", "wrk"):
                self.aliases[s.name] = [aliases[a] for a in self.sources[s.name]]
        self._start_agent()
        self.shop = ShopServer(
            self.topo,
            tls_port=TLS_PORT,
            upstream_port=UPSTREAM_PORT,
            workdir=self.workdir / "shop",
            events_url=f"http://127.0.0.1:{API_PORT}",
            events_token_file=self.workdir / "admin.token",
        ).start()

    def _names(self) -> set[str]:
        return {s.name for s in self.scenarios}

    def _start_agent(self) -> None:
        (self.workdir / "admin.token").write_text(self.token)
        os.chmod(self.workdir / "admin.token", 0o600)
        config = write_agent_config(
            self.workdir / "agent.toml",
            ifaces=[self.topo.server_if, "lo"],
            pin_dir=self.pin_dir,
            state_dir=self.workdir / "state",
            token=self.token,
            learning_s=self.options.learning_s,
        )
        # nsenter enters only the network namespace: the agent keeps the
        # host's /sys/fs/bpf for its pins (`ip netns exec` remounts /sys).
        argv = [
            "nsenter", f"--net=/run/netns/{self.topo.server_ns}",
            sys.executable, "-m", "controlplane.agent", "--config", str(config),
        ]  # fmt: skip
        with (self.workdir / "agent.log").open("wb") as agent_log:
            self.agent = subprocess.Popen(
                argv, cwd=REPO_ROOT, stdout=agent_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + AGENT_READY_S
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise LabError(f"the agent exited ({self.agent.returncode}):\n{self.agent_tail()}")
            with contextlib.suppress(httpx.HTTPError, LabError):
                if self.api("GET", "/healthz", auth=False).get("status") == "ok":
                    return
            time.sleep(0.5)
        raise LabError(f"the agent did not answer in {AGENT_READY_S:.0f} s:\n{self.agent_tail()}")

    def agent_tail(self, lines: int = 30) -> str:
        path = self.workdir / "agent.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def api(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        """A call to the agent's admin API, which listens inside the server namespace."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}

        def call() -> Any:
            with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=10.0) as client:
                response = client.request(method, path, headers=headers, **kwargs)
                response.raise_for_status()
                return response.json()

        return call_in(self.topo.server_ns, call, timeout=15.0)

    # ---- the run ----

    def run(self, on_tick: Callable[[Lab], None] | None = None) -> Report:
        opts = self.options
        self.started = time.time()
        self.attack_started = self.started + opts.learning_s
        end = self.started + opts.duration_s
        for s in self.scenarios:
            if not s.attack:
                self._launch(s, end - time.time())
        while time.time() < self.attack_started:
            self._tick(on_tick, 1.0)
        # The agent's period starts with its first client, a little after
        # ours: the bots join once it has learned, or they would be learned.
        while time.time() < self.attack_started + LEARNING_GRACE_S and not self._learned():
            self._tick(on_tick, 0.5)
        self.attack_started = time.time()
        for s in self.scenarios:
            if s.attack:
                length = end - time.time()
                self._launch(s, min(length, s.duration_s or length))
        while time.time() < end:
            self._tick(on_tick, 1.0)
        self._wait_clients(grace_s=15.0)
        ended = time.time()
        return self._evaluate(ended)

    def _learned(self) -> bool:
        with contextlib.suppress(LabError, httpx.HTTPError, RuntimeError):
            return agent_learned(self.api("GET", "/v1/stats"))
        return False

    def _tick(self, on_tick: Callable[[Lab], None] | None, seconds: float) -> None:
        if self.agent is not None and self.agent.poll() is not None:
            raise LabError(f"the agent died during the run:\n{self.agent_tail()}")
        for name, proc in self.processes.items():
            if name not in self.finished and proc.poll() is not None:
                self.finished[name] = time.time()
        if on_tick is not None:
            on_tick(self)
        time.sleep(seconds)

    def _launch(self, s: Scenario, duration_s: float) -> None:
        topo = self.topo
        ca = str(self.shop.cert.ca_path) if self.shop and self.shop.cert else None
        if s.runner == "bots":
            argv = [
                sys.executable, "-m", "lab.bots", s.name, "--server", topo.server_v4,
                "--server-v6", topo.server_v6, "--port", str(TLS_PORT),
                "--sources", ",".join(self.sources[s.name]), "--duration", f"{duration_s:.1f}",
                "--think-scale", str(self.options.think_scale), "--seed", str(self.options.seed),
            ]  # fmt: skip
            if ca:
                argv += ["--ca-file", ca]
        elif s.runner == "browser":
            argv = [
                sys.executable, "-m", "lab.browser",
                "--sources", ",".join(self.sources[s.name]),
                "--server-aliases", ",".join(self.aliases[s.name]),
                "--deadline-s", f"{duration_s:.1f}", "--think-scale", str(self.options.think_scale),
                "--seed", str(self.options.seed), "--visits-per-tab", "100",
            ]  # fmt: skip
        elif s.runner == "hydra":
            argv = hydra_argv(self.aliases[s.name][0], self.workdir, duration_s)
        elif s.runner == "wrk":
            argv = ["wrk", "-t1", "-c4", f"-d{int(duration_s)}s", "--timeout", "2s",
                    f"https://{self.aliases[s.name][0]}:{TLS_PORT}/products?page=1"]  # fmt: skip
        elif s.runner == "curl":
            argv = curl_walk_argv(
                self.sources[s.name][0], topo.server_v4, ca, duration_s, CURL_RATE_PER_S
            )
        else:
            raise LabError(f"scenario {s.name} has an unknown runner {s.runner!r}")
        # The tools keep no per-request records (records() reads the
        # server's log for them) and hydra writes a restore file in its cwd.
        tool = s.runner in TOOL_RUNNERS
        out_path = self.workdir / (f"{s.name}.log" if tool else f"{s.name}.jsonl")
        # The child gets its own copies of the descriptors: ours close at once.
        with out_path.open("w") as out, (self.workdir / f"{s.name}.err").open("w") as err:
            self.processes[s.name] = topo.popen(
                topo.client_ns, argv, cwd=self.workdir if tool else REPO_ROOT,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.launched[s.name] = time.time()

    def _wait_clients(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for name, proc in self.processes.items():
            if proc.poll() is None:
                proc.terminate()
            self.finished.setdefault(name, time.time())

    # ---- ground truth and the report ----

    def records(self) -> list[RequestRecord]:
        """Every client's records; for hydra, wrk and curl, which keep none, the
        requests the server logged from their addresses (a dropped request
        never reaches the log, so a verdict shows as the decision that covers it)."""
        records: list[RequestRecord] = []
        for s in self.scenarios:
            path = self.workdir / f"{s.name}.jsonl"
            if s.runner in ("bots", "browser") and path.exists():
                with path.open() as lines:
                    records.extend(parse_records(lines))
        tools = {self.sources[s.name][0]: s for s in self.scenarios if s.runner in TOOL_RUNNERS}
        if tools and self.shop is not None:
            for entry in self.shop.requests():
                tool = tools.get(entry["remote_addr"])
                if tool is None:
                    continue
                records.append(
                    RequestRecord(
                        scenario=tool.name, label=tool.label, session=f"{tool.name}-1",
                        source=entry["remote_addr"], method=entry["request_method"],
                        path=entry["request_uri"], status=entry["status"], error=None,
                        ts=entry["msec"] - entry["request_time"],
                        elapsed=entry["request_time"], stack=tool.runner,
                    )
                )  # fmt: skip
        records.sort(key=lambda r: r.ts)
        return records

    def decisions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api(
            "GET",
            "/v1/decisions",
            params={"limit": 10000, "include_expired": True, "include_revoked": True},
        )
        return found

    def _evaluate(self, ended: float) -> Report:
        records, decisions = self.records(), self.decisions()
        out = self.options.report_dir
        out.mkdir(parents=True, exist_ok=True)
        with (out / "records.jsonl").open("w") as f:
            for r in records:
                f.write(r.to_json() + "\n")
        (out / "decisions.json").write_text(json.dumps(decisions, indent=1))
        infos = {
            s.name: ScenarioInfo(
                name=s.name, label=s.label, kind=s.kind, description=s.description,
                started=self.launched.get(s.name), rate_limit_rpm=s.rate_limit_rpm,
                # hydra and wrk: their dropped requests are in no log; they
                # kept trying until their process ended.
                unrecorded_until=self.finished.get(s.name) if s.runner in TOOL_RUNNERS
                else None,
            )
            for s in self.scenarios
        }  # fmt: skip
        (out / "scenarios.json").write_text(
            json.dumps({n: dataclasses.asdict(i) for n, i in infos.items()}, indent=1)
        )
        report = evaluate(records, decisions, scenarios=infos, started=self.started, ended=ended)
        write_report(report, out)
        with contextlib.suppress(LabError, httpx.HTTPError):
            (out / "agent-stats.json").write_text(
                json.dumps(self.api("GET", "/v1/stats"), indent=1)
            )
        shutil.copy(self.workdir / "agent.log", out / "agent.log")
        return report

    # ---- teardown ----

    def close(self) -> None:
        """Stops everything this lab started; safe to call twice."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        if self.shop is not None:
            self.shop.stop()
            self.shop = None
        if self.agent is not None:
            if self.agent.poll() is None:
                self.agent.send_signal(signal.SIGTERM)  # a clean stop: detach, close the store
                try:
                    self.agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.agent.pid, signal.SIGKILL)
                    self.agent.wait()
            self.agent = None
        self.topo.close(raise_errors=False)  # the veth, its XDP program and tc filters go with it
        remove_pins(self.pin_dir)  # the verdicts outlive a stopped agent by design: not here
        if not self.options.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def hydra_argv(server: str, workdir: Path, duration_s: float) -> list[str]:
    """hydra against /login: 30 users x 40 passwords from a small leak, 4 tasks.

    hydra stops on its own when the lists run out; the lab's deadline ends it
    otherwise. F= is the shop's failure text, so a 401 counts as a miss."""
    users = workdir / "hydra-users.txt"
    passwords = workdir / "hydra-passwords.txt"
    users.write_text("".join(f"user{n}@mail.test\n" for n in range(30)))
    passwords.write_text(
        "".join(f"{w}\n" for w in ("123456", "password", "qwerty", "letmein", "dragon"))
        + "".join(f"Summer{n}!\n" for n in range(35))
    )
    del duration_s  # hydra has no run-time limit; the lab terminates it
    return [
        "hydra", "-L", str(users), "-P", str(passwords), "-t", "4", "-s", str(TLS_PORT),
        "-S", "-I", server,
        "https-post-form", "/login:user=^USER^&password=^PASS^:F=bad credentials",
    ]  # fmt: skip


def curl_walk_argv(
    source: str, server: str, ca: str | None, duration_s: float, rate_per_s: int
) -> list[str]:
    """curl walking /products/1, /products/2, ... in order: its URL glob reuses
    one connection, --rate paces the requests, and --interface sends them
    from the scenario's own address. A transfer a verdict stalls gives up
    after 5 s and curl goes on to the next id, as a scraper would."""
    last_id = max(int(duration_s * rate_per_s), 1)
    tls = ["--cacert", ca] if ca else ["--insecure"]
    return [
        "curl", "--silent", "--show-error", "--output", "/dev/null", "--interface", source,
        *tls, "--rate", f"{rate_per_s}/s", "--max-time", "5",
        f"https://{server}:{TLS_PORT}/products/[1-{last_id}]",
    ]  # fmt: skip


# ---- the terminal view ----


class LiveView:
    """What `botwall lab` shows while it runs: the clients' side and the agent's."""

    def __init__(self, lab: Lab, console: Any) -> None:
        self.lab, self.console = lab, console
        self.offsets: dict[str, int] = {}
        self.counts: Counter[tuple[str, str]] = Counter()  # (label, answered|mitigated)
        self.last_print = 0.0

    def _read_new(self) -> None:
        for path in self.lab.workdir.glob("*.jsonl"):
            with path.open() as f:
                f.seek(self.offsets.get(path.name, 0))
                chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                self.offsets[path.name] = self.offsets.get(path.name, 0) + len(complete)
            for line in complete.splitlines():
                with contextlib.suppress(ValueError):
                    for r in parse_records([line]):
                        self.counts[(r.label, "mitigated" if r.mitigated else "answered")] += 1

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        self._read_new()
        lab = self.lab
        now = time.time()
        phase = "learning (honest clients only)" if now < lab.attack_started else "under attack"
        traffic = Table(title=f"lab {now - lab.started:5.0f} s: {phase}", expand=False)
        for column in ("clients", "answered", "dropped/delayed"):
            traffic.add_column(column, justify="right" if column != "clients" else "left")
        for label in ("human", "good_bot", "ai_agent", "bad_bot"):
            traffic.add_row(
                label, str(self.counts[(label, "answered")]), str(self.counts[(label, "mitigated")])
            )
        parts: list[Any] = [traffic]
        try:
            stats = lab.api("GET", "/v1/stats")
            clients = lab.api("GET", "/v1/clients", params={"sort": "risk", "limit": 8})
            decisions = lab.api("GET", "/v1/decisions", params={"limit": 8})
        except (LabError, httpx.HTTPError, RuntimeError) as exc:
            parts.append(f"agent: {exc}")
            return Group(*parts)
        parts.append(_stats_line(stats))
        top = Table(title="riskiest clients", expand=False)
        for column in ("address", "risk", "ja4", "reasons"):
            top.add_column(column)
        for c in clients:
            risk = c.get("risk") or {}
            reasons = "; ".join(str(r) for r in (risk.get("reasons") or [])[:2])
            top.add_row(
                str(c.get("address")), f"{risk.get('score', 0):.0f}",
                str((c.get("fingerprints") or {}).get("ja4") or "-"), reasons[:70],
            )  # fmt: skip
        parts.append(top)
        recent = Table(title="latest verdicts", expand=False)
        for column in ("action", "target", "reason"):
            recent.add_column(column)
        for d in decisions:
            recent.add_row(d["action"], d["target"], str(d.get("reason", ""))[:70])
        parts.append(recent)
        return Group(*parts)

    def progress_line(self) -> str:
        self._read_new()
        lab = self.lab
        cells = " ".join(
            f"{label}={self.counts[(label, 'answered')]}/{self.counts[(label, 'mitigated')]}"
            for label in ("human", "good_bot", "ai_agent", "bad_bot")
        )
        return f"lab {time.time() - lab.started:4.0f} s  answered/mitigated: {cells}"


def _stats_line(stats: dict[str, Any]) -> str:
    engine = stats.get("engine") or {}
    kernel = stats.get("kernel") or {}
    keys = ("events", "decisions", "clients")
    shown = ", ".join(f"{k} {engine[k]}" for k in keys if k in engine)
    dropped = {k: v for k, v in kernel.items() if "drop" in k or "tarpit" in k or "throttl" in k}
    return f"agent: {shown}; kernel: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))


def run_lab(options: LabOptions, *, console: Any = None) -> Report:
    """Builds the lab, runs it with the view, writes the report, tears down."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    with Lab(options) as lab:
        view = LiveView(lab, console)
        if options.live and console.is_terminal:
            with Live(console=console, refresh_per_second=1, transient=False) as live:
                report = lab.run(on_tick=lambda _lab: live.update(view.render()))
        else:

            def every_ten_seconds(_lab: Lab) -> None:
                if time.time() - view.last_print >= 10:
                    view.last_print = time.time()
                    console.print(view.progress_line())

            report = lab.run(on_tick=every_ten_seconds)
    print_summary(report, console=console)
    console.print(f"report: {options.report_dir / 'report.html'} and report.json")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lab.run", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--learning", type=float, default=30.0)
    p.add_argument(
        "--scenario", action="append", default=[], help="a bad-bot scenario (repeatable)"
    )
    p.add_argument("--report", type=Path, default=Path("lab-report"))
    p.add_argument("--no-live", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lab: %(message)s")
    options = LabOptions(
        duration_s=args.duration, learning_s=args.learning, scenarios=tuple(args.scenario),
        report_dir=args.report, live=not args.no_live,
    )  # fmt: skip
    report = run_lab(options)
    return 0 if all(t.passed for t in report.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
