"""`botwall run` as a real process on a real veth, driven through its admin API.

The agent is started as a subprocess attached (native XDP) to the server side
of a namespace topology, with its state dir in tmp_path and its API on a free
loopback port. A manual block made over HTTP must stop the client's TCP
connects; revoking it must let them through; a JA4 block must stop the
client's next TLS handshake in the kernel, and its revocation let it through;
a tarpit on the client's CIDR must delay its connects by a retransmission;
SIGTERM must stop the agent cleanly (exit 0, XDP detached) with the decision
and its audit rows on disk.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from controlplane.store import DB_NAME, Store
from lab import clients
from lab.netns import Topology
from lab.tls_server import TlsServer
from sensor.loader import remove_pins
from tests.test_sensor_live import REPO, _pin_dir, _xdp_attached

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

TLS_PORT = 8443
START_TIMEOUT_S = 90.0  # BCC compiles the programs at start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(agent: subprocess.Popen[str], base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            _, err = agent.communicate()
            raise AssertionError(f"agent exited {agent.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("agent never answered /healthz")


def _curl(topo: Topology) -> clients.ClientResult:
    return clients.curl(
        topo, topo.server_v4, TLS_PORT, insecure=True, connect_timeout=3.0, max_time=4.0
    )


def _client_ja4(api: httpx.Client, addr: str, timeout_s: float = 10.0) -> str:
    """The JA4 the agent saw from addr, once its hello has been processed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = api.get(f"/v1/clients/{addr}")
        if r.status_code == 200 and (ja4 := r.json()["fingerprints"]["ja4"]):
            return str(ja4)
        time.sleep(0.2)
    raise AssertionError(f"the agent never reported a JA4 for {addr}")


def _start_agent(topo: Topology, state: Path, port: int, pin_dir: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "controlplane.agent",
        "--iface", topo.server_if, "--netns", topo.server_ns,
        "--xdp-mode", "native", "--tls-port", str(TLS_PORT),
        "--state-dir", str(state), "--api-port", str(port), "--pin-dir", pin_dir,
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_block_and_unblock_through_the_api(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they load eBPF programs and build namespaces")
    pin_dir = _pin_dir()
    state = tmp_path / "state"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    agent: subprocess.Popen[str] | None = None
    try:
        with Topology() as topo, TlsServer(topo, TLS_PORT):
            agent = _start_agent(topo, state, port, pin_dir)
            _wait_healthy(agent, base)
            assert _xdp_attached(topo)

            token_file = state / "admin.token"
            assert token_file.stat().st_mode & 0o777 == 0o600
            token = token_file.read_text().strip()
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10
            ) as api:
                assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok

                r = api.post(
                    "/v1/decisions",
                    json={
                        "action": "block",
                        "target": topo.client_v4,
                        "ttl_s": 120,
                        "reason": "test: manual block",
                    },
                )
                assert r.status_code == 201, r.text
                decision_id = r.json()["id"]
                outcome = clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5)
                assert outcome.outcome == "timeout"

                assert api.delete(f"/v1/decisions/{decision_id}").status_code == 200
                assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok

                stats = api.get("/v1/stats").json()
                assert stats["enforcing"] is True
                assert stats["kernel"]["drop_block"] >= 1

                # The same loop through the CLI, against this real agent: the
                # token is found in --state-dir, as an operator's would be.
                def cli(*args: str) -> subprocess.CompletedProcess[str]:
                    argv = [sys.executable, "-m", "controlplane.cli", *args]
                    common = ["--api", base, "--state-dir", str(state)]
                    done = subprocess.run(
                        argv + common, cwd=REPO, capture_output=True, text=True, timeout=60
                    )
                    assert done.returncode == 0, (args, done.stdout, done.stderr)
                    return done

                blocked = json.loads(
                    cli(
                        "block", topo.client_v4, "--ttl", "60", "--reason", "cli test", "--json"
                    ).stdout
                )
                assert blocked["target"] == topo.client_v4 and blocked["action"] == "block"
                assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=1.5).outcome == (
                    "timeout"
                )
                assert topo.client_v4 in cli("unblock", topo.client_v4).stdout
                assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok
                status = json.loads(cli("status", "--json").stdout)
                assert status["kernel"]["drop_block"] >= 2
                assert "[[rules]]" in cli("policy", "show").stdout  # the default policy's text

                # A JA4 verdict reaches the kernel as the stack's hello key: the
                # stack's next hello is dropped before the server answers it.
                assert _curl(topo).ok
                ja4 = _client_ja4(api, topo.client_v4)
                made = api.post(
                    "/v1/decisions",
                    json={"action": "block", "target": ja4, "ttl_s": 120, "reason": "test: JA4"},
                )
                assert made.status_code == 201, made.text
                assert _curl(topo).outcome == "timeout"
                stats = api.get("/v1/stats").json()
                assert stats["kernel"]["drop_block_hello"] >= 1
                assert list(stats["hello_keys"].values()) == [ja4]
                assert api.delete(f"/v1/decisions/{made.json()['id']}").status_code == 200
                assert api.get("/v1/stats").json()["hello_keys"] == {}
                assert _curl(topo).ok

                # A tarpit on a CIDR: the kernel keys tarpits by address, so
                # the agent writes one for each address it sees connect from
                # the CIDR (this client, already known: at once), and every
                # new connection costs a SYN retransmission (about 1 s).
                cidr = f"{topo.client_v4}/24"
                made = api.post(
                    "/v1/decisions", json={"action": "tarpit", "target": cidr, "ttl_s": 120}
                )
                assert made.status_code == 201, made.text
                delayed = clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=5.0)
                assert delayed.ok and delayed.elapsed >= 0.9, delayed
                assert api.get("/v1/stats").json()["kernel"]["drop_tarpit"] >= 1
                assert api.delete(f"/v1/decisions/{made.json()['id']}").status_code == 200
                quick = clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=5.0)
                assert quick.ok and quick.elapsed < 0.5, quick

            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err[-2000:]
            assert not _xdp_attached(topo)
            assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok

        with Store(state / DB_NAME) as store:
            record = store.get_decision(decision_id)
            assert record.decision.target == topo.client_v4
            assert record.revoked_at is not None
            audit = [a.action for a in store.audit_log(subject=f"decision:{decision_id}")]
            assert audit == ["decision.revoke", "decision.create"]
            attach = [a.action for a in store.audit_log() if a.action.startswith("sensor.")]
            assert attach == ["sensor.detach", "sensor.attach"]
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.communicate(timeout=10)
        remove_pins(pin_dir)


def test_detach_asks_the_running_agent(tmp_path: Path) -> None:
    """`botwall detach` with an agent running goes through its admin API: the
    agent takes its programs off, removes its pinned verdicts and stops."""
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root: they load eBPF programs and build namespaces")
    pin_dir = _pin_dir()
    state = tmp_path / "state"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    agent: subprocess.Popen[str] | None = None
    try:
        with Topology() as topo, TlsServer(topo, TLS_PORT):
            agent = _start_agent(topo, state, port, pin_dir)
            _wait_healthy(agent, base)
            token = (state / "admin.token").read_text().strip()
            blocked = httpx.post(
                f"{base}/v1/decisions",
                json={"action": "block", "target": topo.client_v4, "ttl_s": 600},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert blocked.status_code == 201, blocked.text
            assert os.path.isdir(pin_dir)

            done = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "detach",
                 "--api", base, "--state-dir", str(state)],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout == (
                f"the agent at {base} detached and stopped\nit removed its pinned verdict maps\n"
            )
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err[-2000:]
            assert not _xdp_attached(topo)
            assert not os.path.exists(pin_dir)
            # The block went with the maps: the client connects again.
            assert clients.tcp_connect(topo, topo.server_v4, TLS_PORT, timeout=2.0).ok

        with Store(state / DB_NAME) as store:
            [asked] = [a for a in store.audit_log() if a.action == "agent.detach"]
            assert asked.actor.startswith("api") and asked.details == {"keep_verdicts": False}
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.communicate(timeout=10)
        remove_pins(pin_dir)
