"""SIGKILL of the real agent while admin writes are in flight loses nothing it acknowledged.

`botwall run` is started as in tests/test_agent_live.py: attached (native
XDP) to the server side of a namespace topology, its store in a temp state
dir, its admin API (uvicorn) on loopback. Writer threads, each with its own
HTTP connection and its own disjoint targets, stream writes through the API:
blocks, throttles and tarpits of distinct IPv4/IPv6 addresses and CIDRs with
long or 2 s TTLs, labels (a "human" label on a blocked address revokes the
block and allows the address), and revocations of earlier decisions. After a
pseudo-random but seeded number of 2xx answers the agent gets SIGKILL, with
writes still in flight. Then:

- the store, opened while the agent is dead, is sound and holds every
  decision, revocation and label the API acknowledged, exactly as answered;
- the pinned kernel maps, which outlive the process, still hold every
  acknowledged live verdict and none of the acknowledged revocations;
- the agent restarts on the same state dir and pin dir; through its API
  every acknowledged decision is there as answered, and the kernel's verdict
  maps hold exactly the store's live decisions (plus the policy's allow
  list): every live stored verdict is in the kernel with the TTL it has
  left, no kernel entry lacks a live stored decision (the short-TTL ones,
  expired while the agent was down, are gone);
- a real connection from the blocked client address times out, one from an
  unblocked address completes; SIGTERM stops the agent cleanly and the
  store still holds everything.

BOTWALL_CRASH_SEED=<int> picks another kill point and write mix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.policy import Policy
from controlplane.store import DB_NAME, ENFORCER_KINDS, KernelKey, Store, kernel_key
from lab import clients
from lab.netns import Topology
from lab.tls_server import TlsServer
from sensor.loader import remove_pins
from sensor.verdicts import VerdictEntry, VerdictMaps
from tests.kernel import require_root
from tests.test_agent_live import TLS_PORT, _free_port, _start_agent, _wait_healthy
from tests.test_sensor_live import _pin_dir, _xdp_attached
from tests.test_store_crash import sensor_maps

# Three BCC compiles (two agent starts, the test's own load of the maps).
pytestmark = [pytest.mark.kernel, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

SEED = int(os.environ.get("BOTWALL_CRASH_SEED", "20250917"))
WRITERS = 3
KILL_AFTER_ACKS = (40, 160)  # the kill comes after this many 2xx answers (seeded)
SHORT_TTL_S = 2.0  # these decisions expire while the agent is down
MAX_OPS_PER_WRITER = 5000  # a bound only: the kill comes long before
ACTOR = "api:admin"
TTL_SLACK_S = 3.0


# ---- what the writers do ----


@dataclass
class Op:
    """One API call and what became of it."""

    writer: int
    kind: str  # "decision" | "label" | "revoke"
    method: str
    path: str
    body: dict[str, Any] | None
    revokes: str | None = None  # the decision id a "revoke" ends
    covers: list[str] = field(default_factory=list)  # live ids a "human" label may revoke
    status: int | None = None  # the HTTP status; None: no answer
    answer: Any = None
    error: str | None = None  # the transport error, when no answer came
    sent: bool = False  # False only when the connection was refused: never reached the agent

    @property
    def acked(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def in_flight(self) -> bool:
        """Sent, never answered: it may or may not have been committed."""
        return self.status is None and self.sent


class Acks:
    """Counts 2xx answers across writers; sets `reached` at the kill point."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.reached = threading.Event()
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.kill_at:
                self.reached.set()


class Writer(threading.Thread):
    """Writes until its connection breaks. Targets are this writer's alone, so
    the writers never act on one another's decisions."""

    def __init__(self, n: int, base: str, token: str, acks: Acks, stop: threading.Event) -> None:
        super().__init__(name=f"crash-writer-{n}", daemon=True)
        self.n = n
        self.base = base
        self.token = token
        self.acks = acks
        self.stop = stop
        self.rng = random.Random(f"{SEED}-{n}")
        self.ops: list[Op] = []
        self.unexpected: list[str] = []
        self._next_target = 0
        self.live: dict[str, tuple[str, str]] = {}  # acknowledged, unrevoked id -> (action, target)

    def _fresh(self) -> int:
        self._next_target += 1
        return self._next_target

    def _address(self, v6: bool) -> str:
        i = self._fresh()
        if v6:
            return str(ipaddress.IPv6Address(f"fd00:bad:{self.n}::") + i)
        return str(ipaddress.IPv4Address(f"10.{110 + self.n}.0.0") + i)

    def _cidr(self, v6: bool) -> str:
        i = self._fresh()
        if v6:
            return str(ipaddress.IPv6Network(f"fd00:bad:{10 + self.n}:{i:x}::/64"))
        if self.rng.random() < 0.5:
            return f"10.{120 + self.n}.{i >> 4 & 255}.{(i & 15) << 4}/28"
        return f"10.{130 + self.n}.{i & 255}.0/24"

    def _ttl(self) -> float:
        return SHORT_TTL_S if self.rng.random() < 0.1 else float(self.rng.randint(300, 3600))

    def next_op(self) -> Op:
        r = self.rng.random()
        if r < 0.10 and self.live:
            victim = self.rng.choice(sorted(self.live))
            return Op(self.n, "revoke", "DELETE", f"/v1/decisions/{victim}", None, revokes=victim)
        if r < 0.25:
            return self._label_op()
        v6 = self.rng.random() < 0.25
        body: dict[str, Any] = {"ttl_s": self._ttl()}
        r = self.rng.random()
        if r < 0.6:
            body |= {"action": "block", "target": self._address(v6)}
        elif r < 0.85:
            body |= {"action": "block", "target": self._cidr(v6)}
        elif r < 0.93:
            body |= {
                "action": "throttle",
                "target": self._address(v6),
                "throttle_connections_per_s": float(self.rng.randint(1, 20)),
                "throttle_packets_per_s": float(self.rng.randint(50, 500)),
            }
        else:
            body |= {
                "action": "tarpit",
                "target": self._address(v6),
                "tarpit_syns": self.rng.randint(1, 3),
            }
        body["reason"] = f"crash test w{self.n} op {len(self.ops)}"
        return Op(self.n, "decision", "POST", "/v1/decisions", body)

    def _label_op(self) -> Op:
        note = f"crash test label w{self.n} op {len(self.ops)}"
        blocked = sorted(i for i, (a, t) in self.live.items() if a == "block" and "/" not in t)
        if self.rng.random() < 0.15:
            body = {"subject_kind": "cidr", "subject": self._cidr(False), "label": "bot"}
        elif blocked and self.rng.random() < 0.5:
            victim = self.rng.choice(blocked)
            label = self.rng.choice(["bot", "human", "good_bot"])
            body = {"subject_kind": "addr", "subject": self.live[victim][1], "label": label}
        else:
            label = self.rng.choice(["bot", "human", "good_bot"])
            body = {"subject_kind": "addr", "subject": self._address(self.rng.random() < 0.25)}
            body["label"] = label
        body["note"] = note
        covers = []
        if body["label"] != "bot":
            covers = [i for i, (_, t) in self.live.items() if t == body["subject"]]
        return Op(self.n, "label", "POST", "/v1/feedback", body, covers=covers)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=15.0) as api:
            while not self.stop.is_set() and len(self.ops) < MAX_OPS_PER_WRITER:
                op = self.next_op()
                self.ops.append(op)
                try:
                    r = api.request(op.method, op.path, json=op.body)
                except httpx.ConnectError as exc:  # refused: the agent is gone
                    op.error = repr(exc)
                    return
                except httpx.TransportError as exc:  # sent, no answer: the kill
                    op.sent, op.error = True, repr(exc)
                    return
                op.sent, op.status = True, r.status_code
                if not op.acked:
                    answer = f"{r.status_code} {r.text}"
                    self.unexpected.append(f"{op.method} {op.path} {op.body}: {answer}")
                    self.acks.reached.set()  # no point going on: let the test fail now
                    return
                op.answer = r.json()
                self._learn(op)
                self.acks.add()

    def _learn(self, op: Op) -> None:
        if op.kind == "decision":
            self.live[op.answer["id"]] = (op.answer["action"], op.answer["target"])
        elif op.kind == "revoke":
            assert op.revokes is not None
            self.live.pop(op.revokes, None)
        else:
            for revoked in op.answer["revoked"]:
                self.live.pop(revoked, None)
            if op.answer["allow_decision"]:
                self.live[op.answer["allow_decision"]] = ("allow", op.answer["subject"])


# ---- what the acknowledged writes promise ----


@dataclass
class Expect:
    """One decision the API acknowledged making."""

    id: str
    action: str
    target: str
    created: dict[str, Any] | None  # the 201 body (None for a feedback allow: not returned)
    state: str = "live"  # "live" | "revoked" | "maybe" (an unanswered write touched it)
    revoked: dict[str, Any] | None = None  # the DELETE's 200 body
    revoked_by_label: bool = False

    @property
    def key(self) -> KernelKey | None:
        return kernel_key(_decision(self.action, self.target))


@dataclass
class Promised:
    decisions: dict[str, Expect] = field(default_factory=dict)
    labels: dict[int, dict[str, Any]] = field(default_factory=dict)  # label id -> the body sent
    # Kernel keys an unanswered write may have created or removed.
    uncertain_keys: set[KernelKey] = field(default_factory=set)
    in_flight: list[Op] = field(default_factory=list)
    not_sent: int = 0


def _decision(action: str, target: str) -> Decision:
    """Enough of a Decision for store.kernel_key."""
    kind = TargetKind.CIDR if "/" in target else TargetKind.ADDRESS
    return Decision(Action(action), kind, target, 1.0, "-", "-", 0.0)


def _maybe_key(action: str, target: str) -> KernelKey | None:
    """The kernel key a write on a (canonical) target would touch."""
    return kernel_key(_decision(action, target))


def promised(writers: list[Writer]) -> Promised:
    p = Promised()
    for w in writers:
        for op in w.ops:
            if op.acked:
                if op.kind == "decision":
                    a = op.answer
                    p.decisions[a["id"]] = Expect(a["id"], a["action"], a["target"], a)
                elif op.kind == "revoke":
                    assert op.revokes is not None
                    e = p.decisions[op.revokes]
                    e.state, e.revoked = "revoked", op.answer
                else:
                    a = op.answer
                    assert op.body is not None
                    assert sorted(a["revoked"]) == sorted(op.covers), (op.body, a)
                    p.labels[a["label_id"]] = op.body | {"subject": a["subject"]}
                    for rid in a["revoked"]:
                        p.decisions[rid].state = "revoked"
                        p.decisions[rid].revoked_by_label = True
                    if a["allow_decision"]:
                        aid = a["allow_decision"]
                        p.decisions[aid] = Expect(aid, "allow", a["subject"], None)
            elif op.in_flight:
                p.in_flight.append(op)
                if op.kind == "decision":
                    assert op.body is not None
                    key = _maybe_key(op.body["action"], op.body["target"])
                    if key is not None:
                        p.uncertain_keys.add(key)
                elif op.kind == "revoke":
                    assert op.revokes is not None
                    p.decisions[op.revokes].state = "maybe"
                else:
                    assert op.body is not None
                    for rid in op.covers:
                        p.decisions[rid].state = "maybe"
                    if op.body["label"] != "bot" and op.body["subject_kind"] == "addr":
                        key = _maybe_key("allow", op.body["subject"])
                        assert key is not None
                        p.uncertain_keys.add(key)
            elif op.status is None:
                p.not_sent += 1
    for e in p.decisions.values():
        if e.state == "maybe" and e.key is not None:
            p.uncertain_keys.add(e.key)
    return p


# ---- checks ----


def check_decisions(p: Promised, records: dict[str, dict[str, Any]], where: str) -> None:
    """records: id -> DecisionRecord.as_dict(), every decision there is."""
    for e in p.decisions.values():
        assert e.id in records, f"{where}: acknowledged decision {e.id} ({e.target}) is lost"
        got = records[e.id]
        assert (got["action"], got["target"], got["actor"]) == (e.action, e.target, ACTOR), got
        if e.created is not None:
            unchanged = {k: v for k, v in got.items() if not k.startswith("revoke")}
            sent = {k: v for k, v in e.created.items() if not k.startswith("revoke")}
            assert unchanged == sent, f"{where}: decision {e.id} differs from the 201 answer"
        else:
            assert got["source"] == "feedback", got
        if e.state == "live":
            assert got["revoked_at"] is None, f"{where}: decision {e.id} revoked by nobody: {got}"
        elif e.state == "revoked":
            assert got["revoked_at"] is not None, f"{where}: acknowledged revoke of {e.id} lost"
            if e.revoked is not None:
                assert got == e.revoked, f"{where}: revoked {e.id} differs from the 200 answer"
            if e.revoked_by_label:
                assert got["revoke_reason"].startswith("feedback: labelled"), got


def check_store(db: Path, p: Promised) -> None:
    """The store on disk, with no agent running: sound, and every promise kept."""
    with Store(db) as store:
        assert store.integrity_check() == "ok"
        records = {
            r.id: r.as_dict()
            for r in store.list_decisions(limit=100_000, include_expired=True, include_revoked=True)
        }
        check_decisions(p, records, "store")
        audit = [(a.action, a.subject) for a in store.audit_log(limit=10**9)]
        for e in p.decisions.values():
            assert ("decision.create", f"decision:{e.id}") in audit, e.id
            if e.state == "revoked":
                assert ("decision.revoke", f"decision:{e.id}") in audit, e.id
        labels = {label.id: label for label in store.labels()}
        for label_id, body in p.labels.items():
            assert label_id in labels, f"acknowledged label {label_id} ({body}) is lost"
            got = labels[label_id]
            assert (got.subject_kind, got.subject, got.label, got.actor, got.note) == (
                body["subject_kind"],
                body["subject"],
                body["label"],
                ACTOR,
                body["note"],
            )
            assert ("label.add", f"{got.subject_kind}:{got.subject}") in audit, label_id


def kernel_entries(verdicts: VerdictMaps) -> dict[KernelKey, VerdictEntry]:
    """Every verdict-map entry a decision can stand behind, expired ones too."""
    listed: dict[KernelKey, VerdictEntry] = {}
    for e in verdicts.list():
        if e.kind not in ENFORCER_KINDS:
            assert (e.kind, e.target) not in listed, e
            listed[(e.kind, e.target)] = e
    return listed


def check_kernel_while_dead(verdicts: VerdictMaps, p: Promised) -> None:
    """What the killed agent left in the pinned maps: every acknowledged live
    verdict, and none of the acknowledged revocations."""
    listed = kernel_entries(verdicts)
    live_keys = {e.key for e in p.decisions.values() if e.state != "revoked" and e.key is not None}
    for e in p.decisions.values():
        if e.key is None or e.key in p.uncertain_keys:
            continue
        if e.state == "live":
            assert e.key in listed, f"acknowledged {e.action} on {e.target} is not in the kernel"
            if e.created is not None and e.created["ttl_s"] > SHORT_TTL_S:
                remaining = e.created["expires_at"] - time.time()
                assert listed[e.key].expires_in_s == pytest.approx(remaining, abs=TTL_SLACK_S)
        elif e.state == "revoked" and e.key not in live_keys:
            assert e.key not in listed, f"acknowledged revoke of {e.target} is still in the kernel"


def check_kernel_matches_store(
    verdicts: VerdictMaps, live: list[dict[str, Any]], policy_text: str
) -> None:
    """The kernel holds exactly the store's live decisions and the policy's allow list."""
    now = time.time()
    wanted: dict[KernelKey, float] = {}
    for record in live:
        if record["shadow"] or record["expires_at"] <= now:
            continue
        key = kernel_key(_decision(record["action"], record["target"]))
        if key is not None:
            wanted[key] = max(wanted.get(key, 0.0), record["expires_at"] - now)
    allow_list = {kernel_key(d) for d in Policy.validate_text(policy_text).allow_decisions()}
    listed = kernel_entries(verdicts)
    assert allow_list <= set(listed), "the policy's allow list is not in the kernel"
    missing = set(wanted) - set(listed)
    assert not missing, f"live stored decisions missing from the kernel: {sorted(missing)}"
    extra = set(listed) - set(wanted) - allow_list
    assert not extra, f"kernel entries no live stored decision stands behind: {sorted(extra)}"
    for key, remaining in wanted.items():
        assert not listed[key].expired, key
        assert listed[key].expires_in_s == pytest.approx(remaining, abs=TTL_SLACK_S), key


def report_in_flight(db: Path, verdicts: VerdictMaps, p: Promised) -> None:
    """Prints what became of each unanswered write (none of it is promised)."""
    listed = kernel_entries(verdicts)
    with Store(db) as store:
        for op in p.in_flight:
            assert op.body is not None or op.revokes is not None
            if op.kind == "decision":
                assert op.body is not None
                target = op.body["target"]
                found = store.list_decisions(target=target, include_revoked=True)
                key = _maybe_key(op.body["action"], target)
                print(
                    f"in flight: POST {op.body['action']} {target}: stored={bool(found)}, "
                    f"in the kernel={key in listed}"
                )
            elif op.kind == "label":
                assert op.body is not None
                subject = op.body["subject"]
                stored = any(x.subject == subject for x in store.labels())
                decisions = [
                    (r.decision.action.value, r.revoked_at is not None)
                    for r in store.list_decisions(target=subject, include_revoked=True)
                ]
                print(
                    f"in flight: label {op.body['label']} {subject}: stored={stored}, "
                    f"decisions on it (action, revoked)={decisions}"
                )
            else:
                assert op.revokes is not None
                record = store.get_decision(op.revokes)
                key = kernel_key(record.decision)
                print(
                    f"in flight: DELETE {record.decision.target}: "
                    f"revoked={record.revoked_at is not None}, in the kernel={key in listed}"
                )


# ---- the agent ----


def _get_all(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/v1/decisions", params={"limit": 10_000, **params})
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()
    assert len(records) < 10_000, "more decisions than one page: raise the limit"
    return records


def test_sigkill_mid_write_loses_no_acknowledged_decision_or_label(tmp_path: Path) -> None:
    require_root()
    rng = random.Random(SEED)
    kill_at = rng.randint(*KILL_AFTER_ACKS)
    print(f"seed {SEED}: SIGKILL after {kill_at} acknowledged writes")
    pin_dir = _pin_dir()
    state = tmp_path / "state"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    agents: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    writers: list[Writer] = []
    try:
        with contextlib.ExitStack() as stack:
            topo = stack.enter_context(Topology())
            stack.enter_context(TlsServer(topo, TLS_PORT))
            agents.append(_start_agent(topo, state, port, pin_dir))
            _wait_healthy(agents[0], base)
            assert _xdp_attached(topo)
            token = (state / "admin.token").read_text().strip()
            headers = {"Authorization": f"Bearer {token}"}

            # The real client's address, blocked first: after the crash its
            # connections must still time out.
            with httpx.Client(base_url=base, headers=headers, timeout=10) as api:
                made = api.post(
                    "/v1/decisions",
                    json={"action": "block", "target": topo.client_v4, "ttl_s": 3600,
                          "reason": "crash test: the real client"},
                )  # fmt: skip
                assert made.status_code == 201, made.text
            client_block = Expect(made.json()["id"], "block", topo.client_v4, made.json())
            assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome == (
                "timeout"
            )

            acks = Acks(kill_at)
            writers = [Writer(n, base, token, acks, stop) for n in range(WRITERS)]
            started = time.monotonic()
            for w in writers:
                w.start()
            assert acks.reached.wait(timeout=120), f"only {acks.count} writes acknowledged"
            agents[0].send_signal(signal.SIGKILL)
            killed_at = time.time()
            assert agents[0].wait(timeout=10) == -signal.SIGKILL
            agents[0].communicate(timeout=10)
            for w in writers:
                w.join(timeout=30)
                assert not w.is_alive(), f"{w.name} still writing after the kill"
            assert not [u for w in writers for u in w.unexpected], [
                u for w in writers for u in w.unexpected
            ]

            p = promised(writers)
            p.decisions[client_block.id] = client_block
            sent = sum(len(w.ops) for w in writers)
            acked = sum(op.acked for w in writers for op in w.ops)
            print(
                f"{acked} writes acknowledged in {time.monotonic() - started:.2f} s "
                f"({len(p.decisions)} decisions, {len(p.labels)} labels, "
                f"{sum(e.state == 'revoked' for e in p.decisions.values())} revoked); "
                f"{len(p.in_flight)} in flight at the kill, {p.not_sent} refused, {sent} tried"
            )
            assert acked >= kill_at and p.labels
            assert any(e.state == "revoked" for e in p.decisions.values())

            # The agent is dead: its store, and the pinned maps it left.
            db = state / DB_NAME
            check_store(db, p)
            assert _xdp_attached(topo)  # netlink attachments outlive the process
            # The test's own (unattached) load of the sensor reaches the same pinned maps.
            verdicts = stack.enter_context(sensor_maps(pin_dir))
            report_in_flight(db, verdicts, p)
            check_kernel_while_dead(verdicts, p)
            assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome == (
                "timeout"
            )

            # Restart once every short TTL has run out: reconcile must take them out.
            time.sleep(max(0.0, killed_at + SHORT_TTL_S + 1.0 - time.time()))
            restart = time.monotonic()
            agents.append(_start_agent(topo, state, port, pin_dir))
            _wait_healthy(agents[1], base)
            print(f"restarted in {time.monotonic() - restart:.1f} s")
            assert _xdp_attached(topo)
            assert (state / "admin.token").read_text().strip() == token
            with httpx.Client(base_url=base, headers=headers, timeout=10) as api:
                every = _get_all(api, include_expired=True, include_revoked=True)
                check_decisions(p, {r["id"]: r for r in every}, "API after restart")
                live = _get_all(api)
                live_ids = {r["id"] for r in live}
                for e in p.decisions.values():
                    if e.state == "live" and (
                        e.created is None or e.created["ttl_s"] > SHORT_TTL_S
                    ):
                        assert e.id in live_ids, f"{e.id} ({e.target}) not live after restart"
                    elif e.state == "revoked":
                        assert e.id not in live_ids, f"revoked {e.id} is live after restart"
                policy = api.get("/v1/policy")
                assert policy.status_code == 200, policy.text
                check_kernel_matches_store(verdicts, live, policy.text)

                assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome == (
                    "timeout"
                )
                assert clients.tcp_connect(topo, topo.server_v6, TLS_PORT, timeout=3.0).ok

            agents[1].send_signal(signal.SIGTERM)
            _, err = agents[1].communicate(timeout=30)
            assert agents[1].returncode == 0, err[-2000:]
            check_store(db, p)
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=10)
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.communicate(timeout=10)  # reaps it and closes its pipes
        remove_pins(pin_dir)
