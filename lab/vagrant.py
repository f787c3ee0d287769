"""The lab across three Vagrant VMs (vagrant/): run from the host by `make test-vagrant`.

    python -m lab.vagrant [--duration 120] [--learning 30] [--report vagrant-report] [--keep]

brings the VMs up (vagrant/Vagrantfile, which provisions them with `make
install`), starts the shop and the agent on `api` (lab.vm api), the honest
clients on `clients`, and after the learning period the bad bots on
`attacker` (lab.vm clients), then asks the api VM's admin API for its
decisions and checks them against the clients' ground truth:

- every bad-bot scenario: at least BAD_COVERED_MIN of the attacker
  addresses that sent requests are under a verdict the agent enforced;
- humans: no human address is under any enforced verdict.

The report (lab.report's, plus the decisions and the agent's log) goes to
--report. The VMs are destroyed at the end unless --keep. Exit status 0 when
both checks pass, 3 when one fails, 1 when the lab itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from lab.netns import LabError
from lab.records import RequestRecord, parse_records
from lab.report import ScenarioInfo, addresses_under_verdicts, evaluate, print_summary, write_report
from lab.run import API_PORT, BY_NAME, LEARNING_GRACE_S, REPO_ROOT, agent_learned

VAGRANT_DIR = REPO_ROOT / "vagrant"
GUEST_REPO = "/opt/botwall"
GUEST_WORKDIR = "/var/lib/botwall-lab"
PYTHON = f"{GUEST_REPO}/.venv/bin/python"
BAD_COVERED_MIN = 0.9
API_READY_S = 1500.0  # BCC compiling in an emulated guest, then nginx and uvicorn


@dataclass(frozen=True)
class Machine:
    name: str
    ip: str
    first_address: str | None = None
    scenarios: tuple[str, ...] = ()


def load_machines(path: Path = VAGRANT_DIR / "machines.json") -> dict[str, Machine]:
    """The machines, from the file the Vagrantfile reads too. Their interfaces
    are found in the guests (lab.vm): boxes name them differently."""
    spec = json.loads(path.read_text())
    machines = {
        name: Machine(name, m["ip"], m.get("first_address"), tuple(m.get("scenarios", ())))
        for name, m in spec["machines"].items()
    }
    return machines


class VagrantLab:
    def __init__(self, report_dir: Path, duration_s: float, learning_s: float) -> None:
        self.report_dir = report_dir
        self.duration_s, self.learning_s = duration_s, learning_s
        self.machines = load_machines()
        self.api_vm = self.machines["api"]
        self.ssh_config = VAGRANT_DIR / ".vagrant" / "ssh_config"
        self.token = ""
        self.launched: dict[str, float] = {}

    # ---- vagrant and ssh ----

    def vagrant(self, *args: str, timeout: float) -> None:
        started = time.monotonic()
        print(f"lab.vagrant: vagrant {' '.join(args)}", flush=True)
        done = subprocess.run(["vagrant", *args], cwd=VAGRANT_DIR, timeout=timeout, check=False)
        if done.returncode != 0:
            raise LabError(f"vagrant {' '.join(args)} failed ({done.returncode})")
        print(f"lab.vagrant: vagrant {args[0]} took {time.monotonic() - started:.0f} s", flush=True)

    def ssh(self, machine: str, command: str, *, timeout: float = 120.0, check: bool = True) -> str:
        done = subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", machine, command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise LabError(
                f"{machine}: {command!r} failed ({done.returncode}): {done.stderr[-2000:]}"
            )
        return done.stdout

    def up(self) -> None:
        # A kept VM is up already: `up` alone would neither copy the
        # project in again nor provision it.
        self.vagrant("up", "--no-provision", timeout=2400)
        self.vagrant("rsync", timeout=600)
        self.vagrant("provision", timeout=1200)
        config = subprocess.run(
            ["vagrant", "ssh-config"], cwd=VAGRANT_DIR, capture_output=True, text=True,
            timeout=120, check=True,
        ).stdout  # fmt: skip
        self.ssh_config.write_text(config)
        # The guests' clocks start from an emulated RTC: the records of one VM
        # and the decisions of another are compared in time, so all take the host's.
        for name in self.machines:
            self.ssh(name, f"sudo date -s @{time.time():.3f} >/dev/null")

    def destroy(self) -> None:
        self.vagrant("destroy", "--force", timeout=600)

    # ---- the run ----

    def start_api(self) -> None:
        vm = self.api_vm
        command = (
            f"sudo systemd-run --unit=botwall-lab-api --working-directory={GUEST_REPO} "
            f"{PYTHON} -m lab.vm api --address {vm.ip} "
            f"--workdir {GUEST_WORKDIR} --learning {self.learning_s:.0f}"
        )
        self.ssh(
            vm.name, f"{_fresh_unit('botwall-lab-api')}; sudo rm -rf {GUEST_WORKDIR} && {command}"
        )
        started = time.monotonic()
        while time.monotonic() - started < API_READY_S:
            state = self.ssh(vm.name, "systemctl is-active botwall-lab-api", check=False).strip()
            if state not in ("active", "activating"):
                log = self.ssh(
                    vm.name, "sudo journalctl -u botwall-lab-api | tail -n 40", check=False
                )
                raise LabError(f"lab.vm api stopped ({state}):\n{log}")
            ready = self.ssh(
                vm.name, f"sudo test -f {GUEST_WORKDIR}/ready.json && echo yes", check=False
            )
            if ready.strip() == "yes":
                break
            time.sleep(10)
        else:
            raise LabError(f"the api VM was not ready in {API_READY_S:.0f} s")
        print(
            f"lab.vagrant: shop and agent ready in {time.monotonic() - started:.0f} s", flush=True
        )
        self.token = self.ssh(vm.name, f"sudo cat {GUEST_WORKDIR}/admin.token").strip()
        if self.admin("GET", "/healthz").get("status") != "ok":
            raise LabError("the agent's admin API is not healthy")

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        """The api VM's admin API, over the private network, as an operator would call it."""
        with httpx.Client(base_url=f"http://{self.api_vm.ip}:{API_PORT}", timeout=30.0) as client:
            response = client.request(
                method, path, headers={"Authorization": f"Bearer {self.token}"}, **kwargs
            )
            response.raise_for_status()
            return response.json()

    def start_clients(self, machine: Machine, duration_s: float) -> None:
        assert machine.first_address is not None
        argv = [
            "sudo", "systemd-run", "--unit=botwall-lab-clients",
            f"--working-directory={GUEST_REPO}", PYTHON, "-m", "lab.vm", "clients",
            "--server", self.api_vm.ip, "--first", machine.first_address,
            "--duration", f"{duration_s:.0f}", "--out", f"{GUEST_WORKDIR}/records",
        ]  # fmt: skip
        for name in machine.scenarios:
            argv += ["--scenario", name]
        self.ssh(
            machine.name,
            f"{_fresh_unit('botwall-lab-clients')}; sudo rm -rf {GUEST_WORKDIR} && "
            + shlex.join(argv),
        )
        for name in machine.scenarios:
            self.launched[name] = time.time()

    def wait_clients(self, machines: Sequence[Machine], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for m in machines:
            while time.monotonic() < deadline:
                state = self.ssh(m.name, "systemctl is-active botwall-lab-clients", check=False)
                if state.strip() not in ("active", "activating"):
                    break
                time.sleep(5)
            else:
                raise LabError(f"the clients on {m.name} did not finish in time")

    def records(self, machine: Machine) -> list[RequestRecord]:
        text = self.ssh(machine.name, f"cat {GUEST_WORKDIR}/records/*.jsonl", timeout=300)
        return list(parse_records(text.splitlines()))

    def run(self) -> bool:
        self.start_api()
        honest, attacker = self.machines["clients"], self.machines["attacker"]
        started = time.time()
        self.start_clients(honest, self.duration_s)
        time.sleep(self.learning_s)
        # The agent learns for learning_s from its first client: the bots
        # join once it says it is done, or they would be learned as normal.
        deadline = time.monotonic() + LEARNING_GRACE_S
        while time.monotonic() < deadline and not agent_learned(self.admin("GET", "/v1/stats")):
            time.sleep(2)
        self.start_clients(attacker, self.duration_s - (time.time() - started))
        self.wait_clients([honest, attacker], timeout_s=self.duration_s + 300)
        ended = time.time()
        records = sorted(self.records(honest) + self.records(attacker), key=lambda r: r.ts)
        decisions = self.admin(
            "GET", "/v1/decisions",
            params={"limit": 10000, "include_expired": True, "include_revoked": True},
        )  # fmt: skip
        return self.report(records, decisions, started, ended)

    # ---- the checks and the report ----

    def report(
        self,
        records: list[RequestRecord],
        decisions: list[dict[str, Any]],
        started: float,
        ended: float,
    ) -> bool:
        out = self.report_dir
        out.mkdir(parents=True, exist_ok=True)
        with (out / "records.jsonl").open("w") as f:
            f.writelines(r.to_json() + "\n" for r in records)
        (out / "decisions.json").write_text(json.dumps(decisions, indent=1))
        names = {r.scenario for r in records}
        infos = {
            n: ScenarioInfo(
                name=n, label=BY_NAME[n].label, kind=BY_NAME[n].kind,
                description=BY_NAME[n].description, started=self.launched.get(n),
                rate_limit_rpm=BY_NAME[n].rate_limit_rpm,
            )
            for n in sorted(names)
        }  # fmt: skip
        (out / "scenarios.json").write_text(
            json.dumps({n: asdict(i) for n, i in infos.items()}, indent=1)
        )
        report = evaluate(records, decisions, scenarios=infos, started=started, ended=ended)
        write_report(report, out)
        print_summary(report)
        with contextlib.suppress(LabError, OSError):
            (out / "agent.log").write_text(
                self.ssh(self.api_vm.name, f"sudo cat {GUEST_WORKDIR}/agent.log", timeout=120)
            )
        checks = admin_checks(records, decisions)
        (out / "vagrant-checks.json").write_text(json.dumps(checks, indent=1))
        for line in checks["lines"]:
            print(f"lab.vagrant: {line}")
        return bool(checks["passed"])

    def stop_units(self) -> None:
        for m in self.machines.values():
            unit = "botwall-lab-api" if m is self.api_vm else "botwall-lab-clients"
            with contextlib.suppress(LabError, subprocess.TimeoutExpired):
                self.ssh(m.name, f"sudo systemctl stop {unit}", timeout=120, check=False)


def _fresh_unit(unit: str) -> str:
    """A shell command that clears what an earlier run left of `unit` in a kept VM."""
    return f"sudo systemctl stop {unit} 2>/dev/null; sudo systemctl reset-failed {unit} 2>/dev/null"


def admin_checks(
    records: Sequence[RequestRecord], decisions: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The test's verdict, from the agent's decisions (its admin API) and the ground truth."""
    sources: dict[str, set[str]] = defaultdict(set)
    labels: dict[str, str] = {}
    for r in records:
        sources[r.scenario].add(r.source)
        labels[r.scenario] = r.label
    all_sources = {a for addresses in sources.values() for a in addresses}
    covered = addresses_under_verdicts(decisions, all_sources)
    lines, passed = [], True
    attacks = sorted(n for n, label in labels.items() if label == "bad_bot")
    if not attacks:
        passed = False
        lines.append("FAIL no bad-bot scenario sent a request")
    for name in attacks:
        hit = len(sources[name] & covered)
        share = hit / len(sources[name])
        ok = share >= BAD_COVERED_MIN
        passed &= ok
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {name}: {hit} of {len(sources[name])} attacker addresses"
            f" under an enforced verdict ({share:.1%}, at least {BAD_COVERED_MIN:.0%})"
        )
    human = {a for n, label in labels.items() if label == "human" for a in sources[n]}
    touched = sorted(human & covered)
    ok = bool(human) and not touched
    passed &= ok
    lines.append(
        f"{'PASS' if ok else 'FAIL'} humans: {len(touched)} of {len(human)} human addresses"
        f" under a verdict{(': ' + ', '.join(touched[:10])) if touched else ''}"
    )
    for name in sorted(n for n, label in labels.items() if label in ("good_bot", "ai_agent")):
        hit = sorted(sources[name] & covered)
        lines.append(f"note {name}: {len(hit)} of {len(sources[name])} addresses under a verdict")
    return {"passed": passed, "lines": lines}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.vagrant", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--learning", type=float, default=30.0)
    p.add_argument("--report", type=Path, default=Path("vagrant-report"))
    p.add_argument("--keep", action="store_true", help="leave the VMs running afterwards")
    args = p.parse_args(argv)
    if args.learning >= args.duration:
        p.error("--learning must be shorter than --duration")
    lab = VagrantLab(args.report, args.duration, args.learning)
    try:
        lab.up()
        passed = lab.run()
    except (LabError, subprocess.SubprocessError, httpx.HTTPError, OSError) as exc:
        print(f"lab.vagrant: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            if lab.ssh_config.exists():
                lab.stop_units()  # the agent detaches and closes its store cleanly
            with contextlib.suppress(LabError, subprocess.SubprocessError):
                lab.destroy()
    print(f"lab.vagrant: report in {args.report}/report.html", flush=True)
    return 0 if passed else 3


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
