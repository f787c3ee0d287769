"""The lab's roles on real machines: the Vagrant lab's guests run these.

    python -m lab.vm api --address 10.201.0.10 --workdir DIR --learning 30
        the shop (nginx terminating TLS, the FastAPI app behind it) and the
        botwall agent attached to the interface holding --address (or
        `--iface`; native XDP where the driver has it) and to loopback, its
        admin API on every address; runs until SIGTERM.

    python -m lab.vm clients --server 10.201.0.10 --first 10.201.1.0 \\
            --scenario human_app --scenario crawler --duration 90 --out DIR
        the clients of lab.run's catalog, each on its own addresses (added to
        the interface the route to --server leaves by, or `--iface`, in
        catalog order from `--first`, as the namespace lab allocates them),
        each writing its ground truth to DIR/NAME.jsonl.

The host drives both (lab.vagrant); nothing here knows about Vagrant.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from pyroute2 import IPRoute

from lab.api.server import ShopServer
from lab.netns import LabError
from lab.run import API_PORT, BY_NAME, REPO_ROOT, TLS_PORT, write_agent_config
from sensor.loader import remove_pins

AGENT_READY_S = 1200.0  # BCC compiles the programs at start: minutes in an emulated guest
PIN_DIR = "/sys/fs/bpf/botwall-vm"


class ThisHost:
    """The machine itself, where ShopServer expects a lab topology: the
    "server namespace" is the host's own, commands run as they are."""

    server_ns = "(this host)"

    def __init__(self, address: str) -> None:
        self.server_v4 = address
        self.server_v6 = "::1"  # the certificate names one; the VM lab is IPv4

    def run(
        self, ns: str, argv: Sequence[str], *, timeout: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        del ns
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(list(argv), timeout=timeout, check=False, **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        del ns
        return subprocess.Popen(list(argv), **kwargs)


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_api(iface: str, address: str, workdir: Path, learning_s: float) -> int:
    """Agent first (it must see the shop's first connection), then the shop."""
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(32))
    os.chmod(token_file, 0o600)
    token = token_file.read_text().strip()
    config = write_agent_config(
        workdir / "agent.toml",
        ifaces=[iface, "lo"],
        pin_dir=PIN_DIR,
        state_dir=workdir / "state",
        token=token,
        learning_s=learning_s,
        api_host="0.0.0.0",  # the host asks it over the private network
    )
    _stop_on_sigterm()
    remove_pins(PIN_DIR)  # verdicts of an earlier run of this VM do not carry over
    agent_log = (workdir / "agent.log").open("wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "controlplane.agent", "--config", str(config)],
        cwd=REPO_ROOT, stdout=agent_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    shop: ShopServer | None = None
    try:
        _wait_healthy(agent, workdir / "agent.log")
        shop = ShopServer(
            ThisHost(address),  # type: ignore[arg-type]
            tls_port=TLS_PORT,
            workdir=workdir / "shop",
            events_url=f"http://127.0.0.1:{API_PORT}",
            events_token_file=token_file,
            ready_timeout=300.0,
        ).start()
        (workdir / "ready.json").write_text(
            json.dumps({"agent": f"http://{address}:{API_PORT}", "shop": f"https://{address}"})
        )
        print(f"lab.vm: shop and agent up on {address}", flush=True)
        while agent.poll() is None:
            time.sleep(1.0)
        print(f"lab.vm: the agent exited with {agent.returncode}", file=sys.stderr)
        return 1
    except SystemExit:
        return 0
    finally:
        if shop is not None:
            shop.stop()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)  # a clean stop: detach, close the store
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
        agent_log.close()
        remove_pins(PIN_DIR)


def _wait_healthy(agent: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + AGENT_READY_S
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            raise LabError(f"the agent exited ({agent.returncode}):\n" + "\n".join(tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{API_PORT}/healthz", timeout=5).status_code == 200:
                return
        time.sleep(2.0)
    raise LabError(f"the agent did not answer in {AGENT_READY_S:.0f} s")


def client_addresses(first: str, names: Sequence[str]) -> dict[str, list[str]]:
    """Each scenario's IPv4 addresses, consecutive from `first` in catalog order."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
    next_address = ipaddress.IPv4Address(first)
    out: dict[str, list[str]] = {}
    for scenario in (s for s in BY_NAME.values() if s.name in names):
        if scenario.runner != "bots":
            raise ValueError(f"{scenario.name} runs {scenario.runner}, not lab.bots: not in VMs")
        out[scenario.name] = [str(next_address + i) for i in range(scenario.v4)]
        next_address += scenario.v4
    return out


def interface_with(address: str) -> str:
    """The interface holding `address`: the private network's, whatever the
    box names it (eth1 in ours, enp0s8 in many VirtualBox boxes)."""
    with IPRoute() as ipr:
        for entry in ipr.get_addr(address=address):
            return str(ipr.get_links(entry["index"])[0].get_attr("IFLA_IFNAME"))
    raise LabError(f"no interface holds {address}")


def interface_towards(server: str) -> str:
    """The interface the route to `server` leaves by."""
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=server)
        if not routes or routes[0].get_attr("RTA_OIF") is None:
            raise LabError(f"no route to {server}")
        return str(ipr.get_links(routes[0].get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME"))


def add_addresses(iface: str, addresses: Sequence[str]) -> None:
    """Host routes (/32) on `iface`: the private network's own route reaches the server."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=iface)
        if not index:
            raise LabError(f"no interface {iface}")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index[0], family=2)}
        for address in addresses:
            if address not in have:
                ipr.addr("add", index=index[0], address=address, prefixlen=32)


def run_clients(
    server: str,
    iface: str | None,
    first: str,
    names: Sequence[str],
    duration_s: float,
    out: Path,
    think_scale: float,
    seed: int,
) -> int:
    sources = client_addresses(first, names)
    add_addresses(iface or interface_towards(server),
                  [a for addresses in sources.values() for a in addresses])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _stop_on_sigterm()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, addresses in sources.items():
            argv = [
                sys.executable, "-m", "lab.bots", name, "--server", server,
                "--port", str(TLS_PORT), "--sources", ",".join(addresses),
                "--duration", f"{duration_s:.1f}", "--think-scale", str(think_scale),
                "--seed", str(seed),
            ]  # fmt: skip
            with (
                (out / f"{name}.jsonl").open("wb") as records,
                (out / f"{name}.err").open("wb") as err,
            ):
                processes.append(subprocess.Popen(argv, cwd=REPO_ROOT, stdout=records, stderr=err))
        failed = 0
        for proc in processes:
            failed += proc.wait() != 0
        return 1 if failed else 0
    except SystemExit:
        return 0
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.vm", description=__doc__.splitlines()[0])
    roles = p.add_subparsers(dest="role", required=True)
    api = roles.add_parser("api", help="the shop and the agent")
    api.add_argument(
        "--iface",
        help="the interface clients reach the shop on (default: the one holding --address)",
    )
    api.add_argument("--address", required=True, help="the shop's IPv4 address")
    api.add_argument("--workdir", type=Path, required=True)
    api.add_argument("--learning", type=float, default=30.0, help="seconds of learning")
    clients = roles.add_parser("clients", help="clients of the lab's catalog")
    clients.add_argument("--server", required=True, help="the shop's IPv4 address")
    clients.add_argument(
        "--iface",
        help="where the client addresses go (default: the one the route to --server leaves by)",
    )
    clients.add_argument("--first", required=True, help="the first client address")
    clients.add_argument("--scenario", action="append", required=True, dest="scenarios")
    clients.add_argument("--duration", type=float, required=True)
    clients.add_argument("--out", type=Path, required=True, help="the records' directory")
    clients.add_argument("--think-scale", type=float, default=0.5)
    clients.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    try:
        if args.role == "api":
            iface = args.iface or interface_with(args.address)
            return serve_api(iface, args.address, args.workdir, args.learning)
        return run_clients(
            args.server, args.iface, args.first, args.scenarios, args.duration, args.out,
            args.think_scale, args.seed,
        )  # fmt: skip
    except (LabError, ValueError) as exc:
        print(f"lab.vm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
