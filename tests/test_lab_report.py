"""The lab report: each rule of mitigation, the targets, the files and the command line."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lab.records import DELAYED_S, RequestRecord
from lab.report import (
    Distribution,
    Report,
    ScenarioInfo,
    SessionOutcome,
    evaluate,
    main,
    print_summary,
    write_report,
)

T0 = 1_700_000_000.0


def rec(
    scenario: str,
    label: str,
    session: str,
    source: str,
    at: float,
    status: int | None = 200,
    elapsed: float = 0.01,
    error: str | None = None,
) -> RequestRecord:
    """One request `at` seconds after T0; no status means a timeout."""
    if status is None and error is None:
        error = "timeout"
    return RequestRecord(
        scenario, label, session, source, "GET", "/products/1", status, error, T0 + at, elapsed
    )


def requests(
    scenario: str, label: str, session: str, source: str, times: Iterable[float], **kw: Any
) -> list[RequestRecord]:
    return [rec(scenario, label, session, source, t, **kw) for t in times]


def decision(
    target: str,
    at: float,
    action: str = "block",
    kind: str | None = None,
    ttl: float = 3600.0,
    **extra: Any,
) -> dict[str, Any]:
    """A decision as GET /v1/decisions returns it, taken `at` seconds after T0."""
    if kind is None:
        kind = "cidr" if "/" in target else "ja4" if "_" in target else "addr"
    return {
        "id": f"{action}-{target}-{at}",
        "action": action,
        "target_kind": kind,
        "target": target,
        "ttl_s": ttl,
        "reason": "test",
        "shadow": False,
        "decided_ts": 12345.0,  # the sensor's monotonic clock: never read
        "created_epoch": T0 + at,
        "expires_at": T0 + at + ttl,
        "revoked_at": None,
        **extra,
    }


def run(
    records: Iterable[RequestRecord],
    decisions: Iterable[Mapping[str, Any]] = (),
    scenarios: Iterable[ScenarioInfo] = (),
) -> Report:
    records = list(records)
    return evaluate(
        records,
        decisions,
        scenarios={s.name: s for s in scenarios},
        started=T0,
        ended=max(r.ts + r.elapsed for r in records),
    )


def session(report: Report, name: str) -> SessionOutcome:
    return next(s for s in report.sessions if s.session == name)


def target(report: Report, name: str) -> tuple[float | None, bool]:
    check = next(t for t in report.targets if t.name == name)
    return check.measured, check.passed


# ---- when a session was mitigated ----


def test_loud_bot_blocked_at_its_third_request_counts_three_requests() -> None:
    records = [
        rec("scrape", "bad_bot", "s1", "10.0.0.5", 0.0),
        rec("scrape", "bad_bot", "s1", "10.0.0.5", 0.5),
        rec("scrape", "bad_bot", "s1", "10.0.0.5", 1.0, status=None, elapsed=2.0),
        rec("scrape", "bad_bot", "s1", "10.0.0.5", 3.0, status=None, elapsed=2.0),
    ]
    s = session(run(records), "s1")
    assert s.mitigated_by == "client"
    assert s.mitigated_at == T0 + 1.0
    assert s.seconds_to_mitigation == pytest.approx(1.0)
    assert s.requests_to_mitigation == 3  # the mitigated request counts itself
    assert s.ok_before_mitigation == 2


def test_cidr_decision_mid_session_mitigates_at_its_time() -> None:
    records = requests("stuff", "bad_bot", "d1", "10.201.1.7", range(0, 21, 2))
    report = run(records, [decision("10.201.1.0/24", 9.0)])
    s = session(report, "d1")
    assert s.mitigated_by == "decision"
    assert s.decision_id == "block-10.201.1.0/24-9.0"
    assert s.seconds_to_mitigation == pytest.approx(9.0)
    assert s.requests_to_mitigation == 5  # 0, 2, 4, 6, 8
    assert s.ok_before_mitigation == 5


def test_decision_earlier_than_the_clients_first_mitigated_request_wins() -> None:
    records = requests("stuff", "bad_bot", "d1", "10.201.1.7", range(0, 10, 2))
    records += requests("stuff", "bad_bot", "d1", "10.201.1.7", [10, 12], status=None)
    s = session(run(records, [decision("10.201.1.7", 5.0)]), "d1")
    assert (s.mitigated_by, s.requests_to_mitigation) == ("decision", 3)


def test_decision_after_the_session_ended_does_not_count() -> None:
    records = requests("scrape", "bad_bot", "late", "10.0.0.9", [0, 1, 2, 3])
    report = run(records, [decision("10.0.0.9", 10.0), decision("10.0.0.0/8", 3.5)])
    s = session(report, "late")
    assert not s.mitigated
    assert s.requests_to_mitigation is None
    assert report.bad_bots[0].unmitigated == 1
    assert report.bad_bots[0].unmitigated_ok_total == 4


def test_server_logged_session_counts_a_decision_until_unrecorded_until() -> None:
    # hydra keeps no records: the server logged what got through, not what was dropped
    records = requests("hydra", "bad_bot", "hydra-1", "10.0.0.3", [0, 1, 2, 3])
    decisions = [decision("10.0.0.3", 3.5)]
    assert not session(run(records, decisions), "hydra-1").mitigated
    info = ScenarioInfo("hydra", "bad_bot", "loud", unrecorded_until=T0 + 60)
    s = session(run(records, decisions, [info]), "hydra-1")
    assert (s.mitigated_by, s.requests_to_mitigation, s.end) == ("decision", 4, T0 + 60)


def test_decision_during_the_last_request_counts() -> None:
    records = requests("scrape", "bad_bot", "s", "10.0.0.9", [0, 1, 2], elapsed=0.5)
    s = session(run(records, [decision("10.0.0.9", 2.3)]), "s")
    assert s.mitigated_by == "decision"
    assert s.requests_to_mitigation == 3


def test_decision_before_the_session_mitigates_it_at_its_start() -> None:
    records = requests("scrape", "bad_bot", "born", "10.0.0.7", [5, 6, 7], status=None)
    s = session(run(records, [decision("10.0.0.7", 1.0)]), "born")
    assert s.mitigated_by == "decision"
    assert s.seconds_to_mitigation == 0.0
    assert s.requests_to_mitigation == 0
    assert s.ok_before_mitigation == 0


def test_lapsed_revoked_shadow_and_harmless_decisions_do_not_count() -> None:
    records = requests("scrape", "bad_bot", "s", "10.0.0.7", [100, 101, 102])
    decisions = [
        decision("10.0.0.7", 0.0, ttl=50.0),  # expired before the session
        decision("10.0.0.7", 1.0, revoked_at=T0 + 20),  # revoked before it
        decision("10.0.0.7", 2.0, shadow=True),  # never enforced
        decision("10.0.0.7", 100.5, action="monitor"),
        decision("10.0.0.7", 100.5, action="allow"),
        decision("10.0.0.8", 100.5),  # an address it never used
        decision("10.1.0.0/16", 100.5),
        decision("t13d1516h2_8daaf6152771_02713d6af862", 100.5, kind="ja4"),
    ]
    report = run(records, decisions)
    assert not session(report, "s").mitigated
    assert report.overall.shadow_decisions == 1
    assert report.overall.decisions == len(decisions) - 1


def test_tarpit_and_throttle_decisions_mitigate() -> None:
    records = requests("scrape", "bad_bot", "a", "10.0.0.1", [0, 1, 2, 3])
    records += requests("scrape", "bad_bot", "b", "10.0.0.2", [0, 1, 2, 3])
    report = run(
        records, [decision("10.0.0.1", 1.5, "tarpit"), decision("10.0.0.2", 2.5, "throttle")]
    )
    assert session(report, "a").requests_to_mitigation == 2
    assert session(report, "b").requests_to_mitigation == 3


def test_ts_stands_in_for_created_epoch() -> None:
    records = requests("scrape", "bad_bot", "s", "10.0.0.1", [0, 1, 2, 3])
    bare = {"id": "x", "target": "10.0.0.1", "action": "block", "ts": T0 + 1.5}
    s = session(run(records, [bare]), "s")
    assert (s.mitigated_by, s.requests_to_mitigation) == ("decision", 2)


def test_human_touched_by_a_timeout() -> None:
    records = requests("browse", "human", "h1", "10.0.1.1", [0, 3, 6])
    records.append(rec("browse", "human", "h1", "10.0.1.1", 9.0, status=None, elapsed=2.0))
    records += requests("browse", "human", "h2", "10.0.1.2", [0, 3, 6])
    report = run(records)
    assert session(report, "h1").mitigated
    assert not session(report, "h2").mitigated
    g = report.good_clients[0]
    assert (g.sessions, g.touched, g.touched_share) == (2, 1, 0.5)
    assert g.requests == 7
    assert g.ok_share == pytest.approx(6 / 7)
    assert target(report, "humans_touched") == (0.5, False)


def test_tarpit_delay_counts_as_touched() -> None:
    records = [
        rec("browse", "human", "h1", "10.0.1.1", 0.0),
        rec("browse", "human", "h1", "10.0.1.1", 3.0, status=200, elapsed=DELAYED_S + 0.1),
    ]
    s = session(run(records), "h1")
    assert s.mitigated_by == "client"
    assert s.requests_to_mitigation == 2
    assert s.ok_before_mitigation == 1  # the delayed 200 was not before the moment


def test_a_slow_server_is_not_a_delay_but_time_outside_it_is() -> None:
    # Under emulation the server itself can take a second: what counts as a
    # delay is the time the client waited beyond what the server spent.
    slow = DELAYED_S + 0.5
    records = [
        rec("browse", "human", "h1", "10.0.1.1", 0.0),
        replace(rec("browse", "human", "h1", "10.0.1.1", 3.0, elapsed=slow), server_s=slow - 0.05),
        rec("browse", "human", "h2", "10.0.1.2", 0.0),
        replace(rec("browse", "human", "h2", "10.0.1.2", 3.0, elapsed=slow), server_s=0.3),
    ]
    report = run(records)
    assert not session(report, "h1").mitigated
    assert session(report, "h2").mitigated_by == "client"


def test_session_with_two_scenarios_is_refused() -> None:
    records = [rec("a", "bad_bot", "s", "10.0.0.1", 0), rec("b", "bad_bot", "s", "10.0.0.1", 1)]
    with pytest.raises(ValueError, match="session 's'"):
        run(records)


def test_scenario_info_must_agree_with_the_records() -> None:
    records = [rec("a", "bad_bot", "s", "10.0.0.1", 0)]
    with pytest.raises(ValueError, match="scenario 'a'"):
        run(records, scenarios=[ScenarioInfo("a", "human")])


def test_malformed_decision_is_named() -> None:
    records = [rec("a", "bad_bot", "s", "10.0.0.1", 0)]
    with pytest.raises(ValueError, match="decision 1"):
        run(records, [decision("10.0.0.1", 0), decision("not-an-address", 0, kind="addr")])


def test_distribution() -> None:
    d = Distribution.of([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert d is not None
    assert (d.count, d.p50, d.p90, d.max) == (10, 5.5, pytest.approx(9.1), 10)
    assert Distribution.of([]) is None


# ---- the targets ----

SCENARIOS = [
    ScenarioInfo("scrape_loud", "bad_bot", "loud", "a catalog walk at 20/s"),
    ScenarioInfo("stuff_spread", "bad_bot", "distributed", "credential stuffing from a /24"),
    ScenarioInfo("stuff_slow", "bad_bot", "stealthy", "one try a minute", started=T0),
    ScenarioInfo("browse", "human", "normal", "shoppers"),
    ScenarioInfo("crawler", "good_bot"),
    ScenarioInfo("assistant", "ai_agent", rate_limit_rpm=10),
]


def lab_run(
    *,
    loud_blocked_at: int = 3,
    spread_decided: float = 30.0,
    humans_touched: int = 0,
    crawler_touched: bool = False,
    assistant_refused_within_limit: bool = False,
) -> list[RequestRecord]:
    """Records of a small lab run, and its decisions, shaped by the arguments."""
    records: list[RequestRecord] = []
    for n in range(4):  # each loud bot answered until its blocked_at-th request
        src = f"10.10.0.{n + 1}"
        for i in range(10):
            status = None if i + 1 >= loud_blocked_at else 200
            records.append(
                rec("scrape_loud", "bad_bot", f"loud{n}", src, n * 10 + i * 0.05, status)
            )
    for n in range(5):  # the spread bots: caught by the CIDR decision
        records += requests(
            "stuff_spread", "bad_bot", f"spread{n}", f"10.201.1.{n + 10}", range(n, 120, 6)
        )
    # a stealthy bot that trickles in long after its address range was blocked
    records += requests("stuff_slow", "bad_bot", "slow0", "10.201.1.99", [200, 260, 320])
    for n in range(200):
        status = None if n < humans_touched else 200
        records += requests(
            "browse", "human", f"h{n}", f"10.0.{n // 250}.{n % 250 + 1}", [n, n + 5]
        )
        records.append(
            rec("browse", "human", f"h{n}", f"10.0.{n // 250}.{n % 250 + 1}", n + 9, status)
        )
    records += requests("crawler", "good_bot", "c0", "10.30.0.1", range(0, 60, 5))
    if crawler_touched:
        records.append(rec("crawler", "good_bot", "c0", "10.30.0.1", 61, None))
    for i in range(15):  # 15 requests in its first minute: 10 allowed
        refused = i >= 10 or (assistant_refused_within_limit and i == 4)
        records.append(
            rec("assistant", "ai_agent", "a0", "10.40.0.1", i * 2, None if refused else 200)
        )
    return records


def lab_decisions(spread_decided: float = 30.0) -> list[dict[str, Any]]:
    return [
        decision("10.201.1.0/24", spread_decided),
        decision("10.40.0.1", 20.0, "throttle"),  # the AI agent's policy, as expected
        decision("10.30.0.1", 0.0, "allow"),
    ]


def lab_report(**kw: Any) -> Report:
    spread = kw.get("spread_decided", 30.0)
    return run(lab_run(**kw), lab_decisions(spread), SCENARIOS)


def test_a_good_run_passes_every_target() -> None:
    report = lab_report()
    failed = [(t.name, t.measured, t.detail) for t in report.targets if not t.passed]
    assert failed == []
    assert report.overall.passed
    assert target(report, "bad_bots_mitigated") == (1.0, True)
    assert target(report, "loud_within_requests") == (3, True)
    assert target(report, "spread_within_seconds") == (30.0, True)
    assert target(report, "humans_touched") == (0.0, True)
    assert target(report, "good_bots_within_policy") == (1.0, True)
    slow = next(b for b in report.bad_bots if b.name == "stuff_slow")
    assert slow.requests_to_mitigation == Distribution(1, 0, 0, 0)  # born under the block
    assert slow.contained_s == 0.0
    spread = next(b for b in report.bad_bots if b.name == "stuff_spread")
    assert spread.mitigated_by_decision == 5
    assistant = next(g for g in report.good_clients if g.name == "assistant")
    assert (assistant.touched, assistant.within_policy, assistant.peak_rpm) == (1, 1, 15)


def test_loud_bot_past_five_requests_fails() -> None:
    assert target(lab_report(loud_blocked_at=7), "loud_within_requests") == (7, False)


def test_loud_bot_never_mitigated_fails_even_within_five() -> None:
    records = lab_run() + requests("scrape_loud", "bad_bot", "loud9", "10.10.9.9", [0, 1])
    report = run(records, lab_decisions(), SCENARIOS)
    measured, passed = target(report, "loud_within_requests")
    assert (measured, passed) == (3, False)


def test_spread_campaign_contained_late_fails() -> None:
    report = lab_report(spread_decided=90.0)
    assert target(report, "spread_within_seconds") == (90.0, False)


def test_spread_scenario_start_comes_from_its_info() -> None:
    scenarios = [
        *SCENARIOS[:1],
        ScenarioInfo("stuff_spread", "bad_bot", "distributed", started=T0 - 40),
        *SCENARIOS[2:],
    ]
    report = run(lab_run(), lab_decisions(), scenarios)
    assert target(report, "spread_within_seconds") == (70.0, False)


def test_bad_bots_mitigated_below_98_percent_fails() -> None:
    records = lab_run() + requests("stuff_spread", "bad_bot", "free", "10.99.0.1", [0, 1, 2])
    report = run(records, lab_decisions(), SCENARIOS)
    measured, passed = target(report, "bad_bots_mitigated")
    assert measured == pytest.approx(10 / 11)
    assert not passed
    # Its three requests at 0-2 s got through, but that is early: contained in time.
    assert target(report, "spread_within_seconds")[1]


def test_human_touched_share_threshold() -> None:
    assert target(lab_report(humans_touched=1), "humans_touched") == (0.005, True)
    assert target(lab_report(humans_touched=2), "humans_touched") == (0.01, False)


def test_good_bot_touched_fails_policy() -> None:
    measured, passed = target(lab_report(crawler_touched=True), "good_bots_within_policy")
    assert (measured, passed) == (0.5, False)


def test_rate_limited_agent_refused_within_its_limit_fails_policy() -> None:
    report = lab_report(assistant_refused_within_limit=True)
    assert target(report, "good_bots_within_policy") == (0.5, False)


def test_nothing_to_measure_fails() -> None:
    report = run(requests("browse", "human", "h", "10.0.0.1", [0, 1]))
    assert target(report, "humans_touched") == (0.0, True)
    for name in ("bad_bots_mitigated", "loud_within_requests", "spread_within_seconds"):
        measured, passed = target(report, name)
        assert (measured, passed) == (None, False)
    assert not report.overall.passed


def test_timeline_counts_requests_and_decisions_per_bucket() -> None:
    records = [
        rec("browse", "human", "h", "10.0.0.1", 1.0),
        rec("browse", "human", "h", "10.0.0.1", 6.0, status=None, elapsed=1.0),
        rec("scrape", "bad_bot", "b", "10.0.0.2", 7.0),
    ]
    report = evaluate(records, [decision("10.0.0.2", 8.0)], started=T0, ended=T0 + 12)
    assert [b.t for b in report.timeline] == [0.0, 5.0, 10.0]
    first, second, _ = report.timeline
    assert first.answered["human"] == 1
    assert (second.mitigated["human"], second.answered["bad_bot"]) == (1, 1)
    assert second.decisions["block"] == 1
    assert report.overall.decisions_by_action["block"] == 1


# ---- the files and the terminal ----


def test_write_report_round_trips_and_embeds_plots(tmp_path: Path) -> None:
    scenarios = [
        *SCENARIOS[:-1],
        ScenarioInfo(
            "assistant", "ai_agent", "normal", "<script>alert(1)</script>", rate_limit_rpm=10
        ),
    ]
    report = run(lab_run(), lab_decisions(), scenarios)
    json_path, html_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report.to_dict()
    page = html_path.read_text()
    assert '<table id="bad-bots">' in page
    assert '<table id="good-clients">' in page
    assert "stuff_spread" in page
    assert "PASS" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    images = page.split('<img alt="')[1:]
    assert len(images) == 3
    for image in images:
        encoded = image.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
        assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page


def test_write_report_without_any_session(tmp_path: Path) -> None:
    report = evaluate([], [], started=T0, ended=T0 + 1)
    json_path, html_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["overall"]["passed"] is False
    assert html_path.read_text().count("data:image/png;base64,") == 3


def test_print_summary_shows_scenarios_and_verdicts() -> None:
    console = Console(record=True, width=200)
    print_summary(lab_report(loud_blocked_at=7), console)
    text = console.export_text()
    assert "scrape_loud" in text and "assistant" in text
    assert "PASS" in text and "FAIL" in text


# ---- the command line ----


def save(path: Path, records: Iterable[RequestRecord]) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def test_cli_rebuilds_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = save(tmp_path / "records.jsonl", lab_run())
    decisions = tmp_path / "decisions.json"
    decisions.write_text(json.dumps(lab_decisions()))
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(
        json.dumps(
            {
                s.name: {"label": s.label, "kind": s.kind, "rate_limit_rpm": s.rate_limit_rpm}
                for s in SCENARIOS
            }
        )
    )
    out = tmp_path / "report"
    code = main(
        [
            str(records),
            str(decisions),
            "--out",
            str(out),
            "--scenarios",
            str(scenarios),
            "--started",
            str(T0),
        ]
    )
    assert code == 0
    assert "stuff_spread" in capsys.readouterr().out
    saved = json.loads((out / "report.json").read_text())
    assert saved["overall"]["passed"] is True
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(
    ("records_text", "decisions_text", "expected"),
    [
        ('{"scenario": "a"}\n', "[]", "line 1 is not a request record"),
        ("not json\n", "[]", "line 1 is not a request record"),
        (None, "[]", "No such file"),
        ("", "[{", "not JSON"),
        ("", '{"id": 1}', "not a list of decisions"),
        ("", '[{"action": "block", "target": "10.0.0.1"}]', "decision 0 has no time"),
        ("", "[]", "no records"),
    ],
)
def test_cli_refuses_a_missing_or_malformed_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    records_text: str | None,
    decisions_text: str,
    expected: str,
) -> None:
    records = tmp_path / "records.jsonl"
    if records_text is not None:
        records.write_text(records_text)
    decisions = tmp_path / "decisions.json"
    decisions.write_text(decisions_text)
    code = main([str(records), str(decisions), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("lab.report: error: ")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_exits_2_on_a_malformed_file(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("{broken\n")
    done = subprocess.run(
        [sys.executable, "-m", "lab.report", str(records), str(records), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("lab.report: error: ")
    assert done.stderr.count("\n") == 1


def test_a_session_free_after_60_s_means_the_campaign_was_not_contained() -> None:
    # Requests of an unmitigated session at 0, 30 and 70 s (each 10 ms long):
    # its campaign ran free until 70 s after its start.
    records = lab_run() + requests("stuff_spread", "bad_bot", "late", "10.99.0.2", [0, 30, 70])
    measured, passed = target(run(records, lab_decisions(), SCENARIOS), "spread_within_seconds")
    assert measured == pytest.approx(70.01, abs=0.05)
    assert not passed
