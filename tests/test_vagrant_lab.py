"""The Vagrant lab's pieces that run without VMs: its plan and its checks.

The VMs themselves are `make test-vagrant` (vagrant/test-vagrant.sh), which
CI runs after `make test`."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.records import RequestRecord
from lab.run import BY_NAME, CRAWLER_RANGE
from lab.vagrant import BAD_COVERED_MIN, VAGRANT_DIR, admin_checks, load_machines
from lab.vm import client_addresses

T0 = 1_800_000_000.0


def rec(scenario: str, source: str) -> RequestRecord:
    label = BY_NAME[scenario].label
    return RequestRecord(
        scenario, label, f"{scenario}-{source}", source, "GET", "/products/1", 200, None, T0, 0.01
    )


def block(target: str, **extra: object) -> dict[str, object]:
    return {"action": "block", "target": target, "created_epoch": T0, "ttl_s": 600.0, **extra}


def test_the_plan_runs_only_lab_bots_scenarios_from_distinct_addresses() -> None:
    machines = load_machines()
    assert set(machines) == {"api", "clients", "attacker"}
    network = json.loads((VAGRANT_DIR / "machines.json").read_text())["network"]
    subnet = ipaddress.ip_network(f"{network['address']}/{network['netmask']}")
    used: set[str] = set()
    for m in machines.values():
        assert ipaddress.ip_address(m.ip) in subnet
        used.add(m.ip)
    for m in (machines["clients"], machines["attacker"]):
        assert m.first_address is not None
        plan = client_addresses(m.first_address, m.scenarios)
        assert list(plan) == [s for s in BY_NAME if s in m.scenarios]
        for addresses in plan.values():
            for a in addresses:
                assert ipaddress.ip_address(a) in subnet
                assert a not in used, f"{a} twice in the plan"
                used.add(a)
    labels = {BY_NAME[n].label for n in machines["attacker"].scenarios}
    assert labels == {"bad_bot"}
    assert "bad_bot" not in {BY_NAME[n].label for n in machines["clients"].scenarios}
    # The policy's verified crawler range is where the plan puts the crawler.
    crawler = client_addresses(machines["clients"].first_address or "", ["crawler"])["crawler"]
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network(CRAWLER_RANGE) for a in crawler)


def test_client_addresses_refuses_scenarios_the_vms_cannot_run() -> None:
    with pytest.raises(ValueError, match="hydra"):
        client_addresses("10.201.1.0", ["stuffing_loud"])
    with pytest.raises(ValueError, match="unknown scenario"):
        client_addresses("10.201.1.0", ["nope"])


def test_checks_pass_when_attackers_are_covered_and_humans_are_not() -> None:
    records = [rec("scraping_sequential", "10.201.8.0")]
    records += [rec("stuffing_distributed", f"10.201.8.{n}") for n in range(1, 11)]
    records += [rec("human_app", "10.201.1.1"), rec("human_app", "10.201.1.2")]
    decisions = [block("10.201.8.0"), block("10.201.8.0/28")]
    checks = admin_checks(records, decisions)
    assert checks["passed"], checks["lines"]


def test_checks_fail_on_a_human_under_a_verdict_or_an_attacker_missed() -> None:
    records = [rec("scraping_sequential", "10.201.8.0"), rec("human_app", "10.201.1.1")]
    human_hit = admin_checks(records, [block("10.201.8.0"), block("10.201.1.1")])
    assert not human_hit["passed"]
    assert any(line.startswith("FAIL humans: 1 of 1") for line in human_hit["lines"])

    stuffers = [rec("stuffing_distributed", f"10.201.8.{n}") for n in range(1, 11)]
    covered = int(BAD_COVERED_MIN * 10) - 1  # one short of the threshold
    decisions = [block(f"10.201.8.{n}") for n in range(1, covered + 1)]
    missed = admin_checks([*stuffers, rec("human_app", "10.201.1.1")], decisions)
    assert not missed["passed"]
    assert any(line.startswith("FAIL stuffing_distributed") for line in missed["lines"])


def test_shadow_and_monitor_verdicts_cover_nobody() -> None:
    records = [rec("scraping_sequential", "10.201.8.0"), rec("human_app", "10.201.1.1")]
    decisions = [block("10.201.8.0", shadow=True), block("10.201.8.0", action="monitor")]
    checks = admin_checks(records, decisions)
    assert not checks["passed"]
    assert any("0 of 1 attacker" in line for line in checks["lines"])


def test_checks_fail_when_no_attacker_sent_anything() -> None:
    checks = admin_checks([rec("human_app", "10.201.1.1")], [])
    assert not checks["passed"]


def test_the_scripts_parse_and_the_box_name_follows_its_inputs(tmp_path: Path) -> None:
    for script in ("build-box.sh", "test-vagrant.sh", "install-host.sh", "kvm-works.sh"):
        subprocess.run(["bash", "-n", str(VAGRANT_DIR / script)], check=True)
    subprocess.run(["bash", "-n", str(VAGRANT_DIR / "box" / "guest-setup.sh")], check=True)
    name = subprocess.run(
        ["bash", str(VAGRANT_DIR / "build-box.sh"), "--name"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert name.startswith("botwall-bookworm-") and len(name) == len("botwall-bookworm-") + 12


@pytest.mark.netns
def test_the_guests_find_their_lab_interface_whatever_the_box_names_it() -> None:
    # A VirtualBox box may call it enp0s8 where ours says eth1: lab.vm finds
    # the interface by the address it holds and by the route to the server.
    ns = f"bwvm{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for command in (
            "ip link add enp0s8 type veth peer name enp0s8p",
            "ip link add other0 type veth peer name other0p",
            "ip link set enp0s8 up", "ip link set enp0s8p up",
            "ip link set other0 up", "ip link set other0p up",
            "ip addr add 10.201.0.10/16 dev enp0s8", "ip addr add 192.0.2.1/24 dev other0",
        ):  # fmt: skip
            subprocess.run(["ip", "-n", ns, *command.split()[1:]], check=True)
        probe = (
            "from lab.vm import interface_with, interface_towards, LabError\n"
            "print(interface_with('10.201.0.10'), interface_towards('10.201.0.30'),"
            " interface_towards('192.0.2.9'))\n"
            "try:\n    interface_with('10.9.9.9')\nexcept LabError as e:\n    print(e)\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", probe],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert out == ["enp0s8 enp0s8 other0", "no interface holds 10.9.9.9"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
