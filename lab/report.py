"""The lab's evaluation report: what botwall did to every client session, set against its targets.

The report reads two things the lab saves: the clients' RequestRecords (the
ground truth: who each client really was, and what it saw) and the agent's
decisions as GET /v1/decisions returns them (ask with include_expired=true,
include_revoked=true and a limit above the run's count, or the early ones are
missing). Everything is counted per client session.

When a session was mitigated
----------------------------
A session's *mitigating moment* is the earlier of

(a) the start (`ts`) of its first request the client saw mitigated
    (`RequestRecord.mitigated`: no answer, or an answer DELAYED_S later than
    the server spent on it, where the client read nginx's own time), and
(b) the earliest enforced decision with a mitigating action (throttle, tarpit,
    block, block_flow) on a target covering a source address the session used
    (the address itself, or a CIDR holding it), taken before the session's last
    request from that address ended and not lapsed (expired or revoked) before
    the session first used it. Its moment is the decision's time, or the
    session's first use of the address if the decision predates it: a session
    born under a verdict is mitigated at its start (0 s, 0 requests). For a
    scenario whose records come from the server's log (hydra, wrk: what was
    dropped is missing), ScenarioInfo.unrecorded_until stands in for the end of
    the session's last request.

JA4 and flow decisions never count under (b): they act on connections, and
what they did shows up client-side under (a). Shadow decisions are not
enforced and count nowhere. A decision's time is its `created_epoch` (wall
clock, as the records' `ts`), else its `ts`; never `decided_ts`, which is the
sensor's monotonic clock. It lapses at `expires_at` (else `ts` + `ttl_s`, else
never) or at `revoked_at`, whichever is first.

*Time until mitigation* is the mitigating moment minus the session's start (its
first request's `ts`). *Requests until mitigation* is the number of the
session's requests that started before the mitigating moment, plus one when the
moment is (a): the first mitigated request counts itself. A bot blocked at its
3rd request has 3; a session born under a block has 0. When (a) and (b) fall on
the same moment, (b) wins (fewer requests). *2xx before mitigation* counts the
2xx answers among the requests that started before the moment.

For humans, good bots and AI agents the same moment says the session was
*touched*: it met a drop, a delay or a block.

Targets
-------
1. bad-bot sessions mitigated >= 98% (all bad-bot scenarios pooled);
2. "loud" scenarios: every session mitigated, none after more than 5 requests;
3. "distributed" and "stealthy" scenarios: each campaign contained within
   60 s of its start: no request of it got through after (see _containment);
4. human sessions touched <= 0.5%;
5. good bots and AI agents served within policy (see _within_policy).
A target with no sessions to measure fails: the run has not shown it.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import html
import io
import ipaddress
import json
import math
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.records import LABELS, RequestRecord, parse_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.table import Table

SCHEMA_VERSION = 1
BUCKET_S = 5.0  # the timeline's resolution
MAX_BUCKETS = 100_000  # about six days: more means a clock or a record is wrong
WINDOW_S = 60.0  # a rate limit's window: requests per minute, from the session's start

ACTIONS: tuple[str, ...] = ("allow", "monitor", "throttle", "tarpit", "block", "block_flow")
MITIGATING_ACTIONS = frozenset({"throttle", "tarpit", "block", "block_flow"})
KINDS: tuple[str, ...] = ("loud", "distributed", "stealthy", "normal")
POLICY_LABELS: tuple[str, ...] = ("good_bot", "ai_agent")  # served within a policy, not blocked

# The targets botwall is held to.
BAD_MITIGATED_MIN = 0.98  # share of bad-bot sessions mitigated
LOUD_REQUESTS_MAX = 5  # requests a loud bot may make, the mitigated one included
CONTAINED_S_MAX = 60.0  # seconds from a distributed or stealthy campaign's start
HUMAN_TOUCHED_MAX = 0.005  # share of human sessions touched

_TARGET_KINDS = {"addr": "addr", "address": "addr", "cidr": "cidr", "ja4": "ja4", "flow": "flow"}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- inputs ----


@dataclass(frozen=True)
class ScenarioInfo:
    """What the lab knows of a scenario beyond its records."""

    name: str
    label: str  # one of LABELS; must agree with the scenario's records
    kind: str = "normal"  # one of KINDS: which target applies to a bad bot
    description: str = ""
    started: float | None = None  # epoch; None: its first session's start
    rate_limit_rpm: int | None = None  # a good client's policy: requests per minute served
    # Epoch until which its clients kept sending requests the records miss:
    # records taken from the server's log (hydra, wrk) hold only what got
    # through, so the decision that stopped the rest came after the last one.
    # Each of its sessions then counts as lasting until this moment.
    unrecorded_until: float | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"scenario {self.name!r}: label {self.label!r} is not one of {LABELS}")
        if self.kind not in KINDS:
            raise ValueError(f"scenario {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.rate_limit_rpm is not None and (
            isinstance(self.rate_limit_rpm, bool)
            or not isinstance(self.rate_limit_rpm, int)
            or self.rate_limit_rpm < 1
        ):
            raise ValueError(
                f"scenario {self.name!r}: rate_limit_rpm must be a positive integer, "
                f"got {self.rate_limit_rpm!r}"
            )


@dataclass(frozen=True, slots=True)
class _Verdict:
    """One enforced decision, as the report needs it."""

    id: str
    action: str
    kind: str  # addr | cidr | ja4 | flow
    target: str
    decided: float  # epoch seconds
    lapses: float  # epoch seconds; inf when it never does
    network: IPNetwork | None  # addr and cidr targets


def _number(decision: Mapping[str, Any], key: str, where: str) -> float | None:
    value = decision.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _guess_kind(target: str) -> str:
    """A target's kind from its form, as the agent's own _target_kind reads it."""
    if "->" in target:
        return "flow"
    if "_" in target:
        return "ja4"
    return "cidr" if "/" in target else "addr"


def _verdict(decision: Any, index: int) -> _Verdict | None:
    """The decision at `index` of the API's list; None for a shadow one.
    ValueError, naming the decision, for one that is not a decision."""
    where = f"decision {index}"
    if not isinstance(decision, Mapping):
        raise ValueError(f"{where} is not an object")
    action, target = decision.get("action"), decision.get("target")
    if not isinstance(action, str) or not isinstance(target, str) or not target:
        raise ValueError(f"{where} needs a string action and target")
    if decision.get("shadow"):
        return None
    decided = _number(decision, "created_epoch", where)
    if decided is None:
        decided = _number(decision, "ts", where)
    if decided is None:
        raise ValueError(f"{where} has no time (created_epoch or ts)")
    lapses = _number(decision, "expires_at", where)
    if lapses is None:
        ttl = _number(decision, "ttl_s", where)
        lapses = math.inf if ttl is None else decided + ttl
    revoked = _number(decision, "revoked_at", where)
    if revoked is not None:
        lapses = min(lapses, revoked)
    raw_kind = decision.get("target_kind")
    if raw_kind is None:
        kind = _guess_kind(target)
    elif isinstance(raw_kind, str) and raw_kind in _TARGET_KINDS:
        kind = _TARGET_KINDS[raw_kind]
    else:
        raise ValueError(f"{where}: target_kind {raw_kind!r} is not one of {sorted(_TARGET_KINDS)}")
    network = None
    if kind in ("addr", "cidr"):
        try:
            network = ipaddress.ip_network(target, strict=False)
        except ValueError:
            raise ValueError(f"{where}: target {target!r} is not an address or a CIDR") from None
    return _Verdict(str(decision.get("id", index)), action, kind, target, decided, lapses, network)


class _Coverage:
    """The mitigating address and CIDR verdicts, found by the address they cover."""

    def __init__(self, verdicts: Iterable[_Verdict]) -> None:
        self._by_address: dict[IPAddress, list[_Verdict]] = defaultdict(list)
        self._networks: list[_Verdict] = []
        for v in verdicts:
            if v.action not in MITIGATING_ACTIONS or v.network is None:
                continue
            if v.network.num_addresses == 1:
                self._by_address[v.network.network_address].append(v)
            else:
                self._networks.append(v)

    def covering(self, source: str) -> list[_Verdict]:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return []
        found = list(self._by_address.get(address, ()))
        found += [v for v in self._networks if v.network is not None and address in v.network]
        return found


def addresses_under_verdicts(
    decisions: Iterable[Mapping[str, Any]], addresses: Iterable[str]
) -> set[str]:
    """Those of `addresses` that an enforced (not shadow) mitigating verdict on
    an address or a CIDR covered at some time, whatever the time."""
    verdicts = [v for i, d in enumerate(decisions) if (v := _verdict(d, i)) is not None]
    coverage = _Coverage(verdicts)
    return {a for a in addresses if coverage.covering(a)}


# ---- results ----


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Distribution:
    """p50, p90 (linear interpolation between ranks) and max of some values."""

    count: int
    p50: float
    p90: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution | None:
        ordered = sorted(values)
        if not ordered:
            return None
        return cls(len(ordered), _quantile(ordered, 0.5), _quantile(ordered, 0.9), ordered[-1])


@dataclass(frozen=True)
class SessionOutcome:
    """One client session and what botwall did to it (see the module docstring)."""

    session: str
    scenario: str
    label: str
    sources: tuple[str, ...]
    start: float  # its first request's ts
    end: float  # when its last request ended (ts + elapsed)
    requests: int
    ok: int  # 2xx answers
    mitigated_at: float | None  # the mitigating moment, epoch; None: never mitigated
    mitigated_by: str | None  # "client" (a) or "decision" (b)
    decision_id: str | None  # the decision, for (b)
    seconds_to_mitigation: float | None
    requests_to_mitigation: int | None
    ok_before_mitigation: int | None  # None when never mitigated: see `ok`
    peak_rpm: int  # most requests in one minute window from its start
    within_policy: bool | None  # good bots and AI agents only (target 5)

    @property
    def mitigated(self) -> bool:
        return self.mitigated_at is not None


@dataclass(frozen=True)
class BadBotScenario:
    """A bad-bot scenario's sessions: how many were mitigated, how fast, and what leaked."""

    name: str
    label: str
    kind: str
    description: str
    started: float | None  # ScenarioInfo.started, else its first session's start
    sessions: int
    requests: int
    mitigated: int
    mitigated_share: float | None  # None when it had no sessions
    mitigated_by_client: int
    mitigated_by_decision: int
    seconds_to_mitigation: Distribution | None  # from each session's start
    requests_to_mitigation: Distribution | None
    ok_before_mitigation_total: int  # over the mitigated sessions
    ok_before_mitigation_max: int  # the most one mitigated session got
    unmitigated: int
    unmitigated_ok_total: int  # 2xx the never-mitigated sessions got
    unmitigated_ok_max: int
    contained_s: float | None  # see _containment; None when none was mitigated


@dataclass(frozen=True)
class GoodClientScenario:
    """A human, good-bot or AI-agent scenario: how many sessions botwall touched."""

    name: str
    label: str
    kind: str
    description: str
    started: float | None
    sessions: int
    requests: int
    touched: int  # sessions that met a drop, a delay or a block
    touched_share: float | None
    ok: int
    ok_share: float | None  # 2xx share of its requests
    rate_limit_rpm: int | None
    peak_rpm: int  # the most requests one session made in one minute window
    within_policy: int | None  # sessions served within policy (good bots, AI agents)


@dataclass(frozen=True)
class TargetCheck:
    """One target: what was measured against what it had to be."""

    name: str  # stable id
    description: str
    measured: float | None  # None: nothing to measure, which fails
    threshold: float
    comparison: str  # "<=" or ">="
    unit: str  # "share", "requests", "s"
    passed: bool
    detail: str


@dataclass(frozen=True)
class TimelineBucket:
    """BUCKET_S seconds of the run, from `t` seconds after its start."""

    t: float
    answered: dict[str, int]  # label -> requests answered without a drop or delay
    mitigated: dict[str, int]  # label -> requests dropped or delayed
    decisions: dict[str, int]  # action -> enforced decisions taken


@dataclass(frozen=True)
class Overall:
    bad_bot_sessions: int
    bad_bot_mitigated: int
    bad_bot_mitigated_share: float | None
    human_sessions: int
    human_touched: int
    human_touched_share: float | None
    policy_sessions: int  # good bots and AI agents
    policy_sessions_within: int
    decisions: int  # enforced decisions, all times
    shadow_decisions: int
    decisions_by_action: dict[str, int]
    passed: bool  # every target passed


@dataclass(frozen=True)
class Report:
    schema_version: int
    started: float
    ended: float
    bucket_s: float
    overall: Overall
    targets: tuple[TargetCheck, ...]
    bad_bots: tuple[BadBotScenario, ...]
    good_clients: tuple[GoodClientScenario, ...]
    timeline: tuple[TimelineBucket, ...]
    sessions: tuple[SessionOutcome, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-native (lists, str keys, no inf or NaN), in field order."""
        plain = _plain(asdict(self))
        assert isinstance(plain, dict)
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- evaluation ----


def _is_ok(record: RequestRecord) -> bool:
    return record.status is not None and 200 <= record.status < 300


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _peak_rpm(records: Sequence[RequestRecord], start: float) -> int:
    windows = Counter(int((r.ts - start) // WINDOW_S) for r in records)
    return max(windows.values(), default=0)


def _within_policy(
    records: Sequence[RequestRecord], start: float, touched: bool, rate_limit_rpm: int | None
) -> bool:
    """Served within policy. Without a rate limit: never touched. With one of N
    per minute: in each minute window from the session's start, its first N
    requests were all answered without a drop or delay; what came beyond them
    may have been throttled, and a throttle decision on it is expected."""
    if rate_limit_rpm is None:
        return not touched
    seen: Counter[int] = Counter()
    for r in records:
        window = int((r.ts - start) // WINDOW_S)
        seen[window] += 1
        if seen[window] <= rate_limit_rpm and r.mitigated:
            return False
    return True


def _session_outcome(
    session: str, records: Sequence[RequestRecord], coverage: _Coverage, info: ScenarioInfo | None
) -> SessionOutcome:
    """`records` sorted by ts, all of one session."""
    start = records[0].ts
    unrecorded = info.unrecorded_until if info is not None else None
    # (moment, requests until, by, decision id): the earliest wins, then the fewest requests.
    candidates: list[tuple[float, int, str, str | None]] = []
    first = next((i for i, r in enumerate(records) if r.mitigated), None)
    if first is not None:
        candidates.append((records[first].ts, first + 1, "client", None))
    by_source: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_source[r.source].append(r)
    verdict: tuple[float, str] | None = None  # the earliest covering decision: (moment, id)
    for source, used in by_source.items():
        first_use, last_end = used[0].ts, max(r.ts + r.elapsed for r in used)
        if unrecorded is not None:
            last_end = max(last_end, unrecorded)
        for v in coverage.covering(source):
            if v.decided < last_end and v.lapses > first_use:
                verdict = min(verdict or (math.inf, ""), (max(v.decided, first_use), v.id))
    if verdict is not None:
        before = bisect.bisect_left([r.ts for r in records], verdict[0])
        candidates.append((verdict[0], before, "decision", verdict[1]))
    label = records[0].label
    mitigated_at = by = decision_id = None
    seconds = until = ok_before = None
    if candidates:
        mitigated_at, until, by, decision_id = min(candidates, key=lambda c: (c[0], c[1]))
        seconds = mitigated_at - start
        ok_before = sum(1 for r in records if r.ts < mitigated_at and _is_ok(r))
    within = None
    if label in POLICY_LABELS:
        limit = info.rate_limit_rpm if info is not None else None
        within = _within_policy(records, start, mitigated_at is not None, limit)
    return SessionOutcome(
        session=session,
        scenario=records[0].scenario,
        label=label,
        sources=tuple(by_source),
        start=start,
        end=max(
            [r.ts + r.elapsed for r in records] + ([unrecorded] if unrecorded is not None else [])
        ),
        requests=len(records),
        ok=sum(1 for r in records if _is_ok(r)),
        mitigated_at=mitigated_at,
        mitigated_by=by,
        decision_id=decision_id,
        seconds_to_mitigation=seconds,
        requests_to_mitigation=until,
        ok_before_mitigation=ok_before,
        peak_rpm=_peak_rpm(records, start),
        within_policy=within,
    )


def _containment(sessions: Sequence[SessionOutcome], started: float) -> float | None:
    """Seconds from the campaign's start until it was contained: from then on,
    none of its requests got through. That is the latest of: each mitigated
    session's mitigating moment, if it made at least one request before it
    (a session stopped at its first request counts 0 s: it was contained
    before it began, however late it came), and each unmitigated session's
    end (its requests all got through, up to its last). Minus the campaign's
    start. A session that came and went before botwall had the evidence is
    counted by target 1; here it only says how long the campaign ran free.
    None when there are no sessions."""
    latest: float | None = None
    for s in sessions:
        if s.mitigated_at is None or s.requests_to_mitigation is None:
            late = max(0.0, s.end - started)
        else:
            got_through = s.requests_to_mitigation - (1 if s.mitigated_by == "client" else 0)
            late = max(0.0, s.mitigated_at - started) if got_through > 0 else 0.0
        latest = late if latest is None else max(latest, late)
    return latest


def _bad_scenario(
    name: str, label: str, info: ScenarioInfo | None, sessions: Sequence[SessionOutcome]
) -> BadBotScenario:
    caught = [s for s in sessions if s.mitigated]
    missed = [s for s in sessions if not s.mitigated]
    started = _scenario_start(info, sessions)
    leaked = [s.ok_before_mitigation or 0 for s in caught]
    return BadBotScenario(
        name=name,
        label=label,
        kind=info.kind if info else "normal",
        description=info.description if info else "",
        started=started,
        sessions=len(sessions),
        requests=sum(s.requests for s in sessions),
        mitigated=len(caught),
        mitigated_share=_share(len(caught), len(sessions)),
        mitigated_by_client=sum(1 for s in caught if s.mitigated_by == "client"),
        mitigated_by_decision=sum(1 for s in caught if s.mitigated_by == "decision"),
        seconds_to_mitigation=Distribution.of(
            s.seconds_to_mitigation for s in caught if s.seconds_to_mitigation is not None
        ),
        requests_to_mitigation=Distribution.of(
            s.requests_to_mitigation for s in caught if s.requests_to_mitigation is not None
        ),
        ok_before_mitigation_total=sum(leaked),
        ok_before_mitigation_max=max(leaked, default=0),
        unmitigated=len(missed),
        unmitigated_ok_total=sum(s.ok for s in missed),
        unmitigated_ok_max=max((s.ok for s in missed), default=0),
        contained_s=None if started is None else _containment(sessions, started),
    )


def _good_scenario(
    name: str, label: str, info: ScenarioInfo | None, sessions: Sequence[SessionOutcome]
) -> GoodClientScenario:
    requests = sum(s.requests for s in sessions)
    ok = sum(s.ok for s in sessions)
    touched = sum(1 for s in sessions if s.mitigated)
    return GoodClientScenario(
        name=name,
        label=label,
        kind=info.kind if info else "normal",
        description=info.description if info else "",
        started=_scenario_start(info, sessions),
        sessions=len(sessions),
        requests=requests,
        touched=touched,
        touched_share=_share(touched, len(sessions)),
        ok=ok,
        ok_share=_share(ok, requests),
        rate_limit_rpm=info.rate_limit_rpm if info else None,
        peak_rpm=max((s.peak_rpm for s in sessions), default=0),
        within_policy=sum(1 for s in sessions if s.within_policy)
        if label in POLICY_LABELS
        else None,
    )


def _scenario_start(info: ScenarioInfo | None, sessions: Sequence[SessionOutcome]) -> float | None:
    if info is not None and info.started is not None:
        return info.started
    return min((s.start for s in sessions), default=None)


def _check(
    name: str,
    description: str,
    measured: float | None,
    threshold: float,
    comparison: str,
    unit: str,
    detail: str,
    *,
    also: bool = True,
) -> TargetCheck:
    if measured is None:
        passed = False
    elif comparison == "<=":
        passed = measured <= threshold
    else:
        passed = measured >= threshold
    return TargetCheck(
        name, description, measured, threshold, comparison, unit, passed and also, detail
    )


def _targets(
    sessions: Sequence[SessionOutcome], bad: Sequence[BadBotScenario]
) -> tuple[TargetCheck, ...]:
    """The five targets. One with nothing to measure fails: a lab run that
    lost a kind of client has not shown the target is met."""
    of_scenario: dict[str, list[SessionOutcome]] = defaultdict(list)
    for s in sessions:
        of_scenario[s.scenario].append(s)

    bots = [s for s in sessions if s.label == "bad_bot"]
    caught = sum(1 for s in bots if s.mitigated)
    bots_check = _check(
        "bad_bots_mitigated",
        f"bad-bot sessions mitigated >= {BAD_MITIGATED_MIN:.0%}",
        _share(caught, len(bots)),
        BAD_MITIGATED_MIN,
        ">=",
        "share",
        f"{caught} of {len(bots)} sessions" if bots else "not measured: no bad-bot sessions",
    )

    loud = [s for b in bad if b.kind == "loud" for s in of_scenario[b.name]]
    loud_missed = sum(1 for s in loud if not s.mitigated)
    loud_until = [s.requests_to_mitigation for s in loud if s.requests_to_mitigation is not None]
    loud_detail = (
        f"{len(loud)} sessions, {loud_missed} never mitigated"
        if loud
        else "not measured: no loud scenario"
    )
    loud_check = _check(
        "loud_within_requests",
        f"loud bots mitigated within {LOUD_REQUESTS_MAX} requests, every session",
        max(loud_until, default=None),
        LOUD_REQUESTS_MAX,
        "<=",
        "requests",
        loud_detail,
        also=loud_missed == 0,
    )

    spread = [b for b in bad if b.kind in ("distributed", "stealthy")]
    spread_missed = sum(b.unmitigated for b in spread)
    contained = [b.contained_s for b in spread if b.contained_s is not None]
    worst = max(spread, key=lambda b: b.contained_s or 0.0, default=None)
    if not spread:
        spread_detail = "not measured: no distributed or stealthy scenario"
    else:
        spread_detail = f"{len(spread)} scenarios, {spread_missed} sessions never mitigated"
        if worst is not None and contained:
            spread_detail += f"; slowest {worst.name}"
    spread_check = _check(
        "spread_within_seconds",
        f"distributed and stealthy campaigns contained within {CONTAINED_S_MAX:.0f} s of their"
        " start",
        max(contained, default=None),
        CONTAINED_S_MAX,
        "<=",
        "s",
        spread_detail,
        also=len(contained) == len(spread),
    )

    humans = [s for s in sessions if s.label == "human"]
    touched = sum(1 for s in humans if s.mitigated)
    human_check = _check(
        "humans_touched",
        f"human sessions touched <= {HUMAN_TOUCHED_MAX:.1%}",
        _share(touched, len(humans)),
        HUMAN_TOUCHED_MAX,
        "<=",
        "share",
        f"{touched} of {len(humans)} sessions" if humans else "not measured: no human sessions",
    )

    served = [s for s in sessions if s.label in POLICY_LABELS]
    within = sum(1 for s in served if s.within_policy)
    served_check = _check(
        "good_bots_within_policy",
        "good-bot and AI-agent sessions all served within their policy",
        _share(within, len(served)),
        1.0,
        ">=",
        "share",
        f"{len(served) - within} of {len(served)} sessions out of policy"
        if served
        else "not measured: no good-bot or AI-agent sessions",
    )
    return bots_check, loud_check, spread_check, human_check, served_check


def _timeline(
    records: Sequence[RequestRecord], verdicts: Sequence[_Verdict], started: float, ended: float
) -> tuple[TimelineBucket, ...]:
    """Buckets from `started` to `ended`, stretched to hold every request;
    decisions outside that span are not drawn (Overall counts them)."""
    first = min((r.ts for r in records), default=started)
    last = max((r.ts for r in records), default=ended)
    low = math.floor((min(first, started) - started) / BUCKET_S)
    high = math.floor((max(last, ended) - started) / BUCKET_S)
    actions = list(ACTIONS) + sorted({v.action for v in verdicts} - set(ACTIONS))
    size = high - low + 1
    if size > MAX_BUCKETS:
        raise ValueError(
            f"the requests span {size * BUCKET_S:.0f} s around the run: a record's ts is wrong,"
            " or started is"
        )
    answered = [dict.fromkeys(LABELS, 0) for _ in range(size)]
    mitigated = [dict.fromkeys(LABELS, 0) for _ in range(size)]
    decided = [dict.fromkeys(actions, 0) for _ in range(size)]
    for r in records:
        i = math.floor((r.ts - started) / BUCKET_S) - low
        (mitigated if r.mitigated else answered)[i][r.label] += 1
    for v in verdicts:
        i = math.floor((v.decided - started) / BUCKET_S) - low
        if 0 <= i < size:
            decided[i][v.action] += 1
    return tuple(
        TimelineBucket((low + i) * BUCKET_S, answered[i], mitigated[i], decided[i])
        for i in range(size)
    )


def evaluate(
    records: Iterable[RequestRecord],
    decisions: Iterable[Mapping[str, Any]],
    *,
    scenarios: Mapping[str, ScenarioInfo] | None = None,
    started: float,
    ended: float,
) -> Report:
    """The report of one lab run, from its records and the agent's decisions
    (dicts as GET /v1/decisions returns them). `started` and `ended` (epoch)
    frame the timeline. ValueError on inconsistent input: a session with two
    scenarios or labels, a scenario whose records disagree with its
    ScenarioInfo's label, a decision that is not one."""
    if not (math.isfinite(started) and math.isfinite(ended)) or ended < started:
        raise ValueError(f"the run must end after it starts (started {started}, ended {ended})")
    infos = dict(scenarios or {})
    for name, info in infos.items():
        if info.name != name:
            raise ValueError(f"scenario {name!r} is described as {info.name!r}")
    parsed = [_verdict(d, i) for i, d in enumerate(decisions)]
    verdicts = [v for v in parsed if v is not None]
    coverage = _Coverage(verdicts)

    everything = list(records)
    by_session: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in everything:
        by_session[r.session].append(r)
    outcomes: list[SessionOutcome] = []
    label_of: dict[str, str] = {}
    for session, own in by_session.items():
        own.sort(key=lambda r: r.ts)
        kinds = {(r.scenario, r.label) for r in own}
        if len(kinds) > 1:
            raise ValueError(f"session {session!r} has records of {sorted(kinds)}")
        scenario, label = own[0].scenario, own[0].label
        if label_of.setdefault(scenario, label) != label:
            raise ValueError(
                f"scenario {scenario!r} has records labelled {label_of[scenario]!r} and {label!r}"
            )
        outcomes.append(_session_outcome(session, own, coverage, infos.get(scenario)))
    outcomes.sort(key=lambda s: (s.scenario, s.start, s.session))
    for name, info in infos.items():
        if label_of.setdefault(name, info.label) != info.label:
            raise ValueError(
                f"scenario {name!r}: its records say {label_of[name]!r}, its info {info.label!r}"
            )

    of_scenario: dict[str, list[SessionOutcome]] = defaultdict(list)
    for s in outcomes:
        of_scenario[s.scenario].append(s)
    order = sorted(label_of, key=lambda n: (LABELS.index(label_of[n]), n))
    bad = tuple(
        _bad_scenario(n, label_of[n], infos.get(n), of_scenario[n])
        for n in order
        if label_of[n] == "bad_bot"
    )
    good = tuple(
        _good_scenario(n, label_of[n], infos.get(n), of_scenario[n])
        for n in order
        if label_of[n] != "bad_bot"
    )
    targets = _targets(outcomes, bad)

    bots = [s for s in outcomes if s.label == "bad_bot"]
    humans = [s for s in outcomes if s.label == "human"]
    served = [s for s in outcomes if s.label in POLICY_LABELS]
    by_action = Counter(v.action for v in verdicts)
    overall = Overall(
        bad_bot_sessions=len(bots),
        bad_bot_mitigated=sum(1 for s in bots if s.mitigated),
        bad_bot_mitigated_share=_share(sum(1 for s in bots if s.mitigated), len(bots)),
        human_sessions=len(humans),
        human_touched=sum(1 for s in humans if s.mitigated),
        human_touched_share=_share(sum(1 for s in humans if s.mitigated), len(humans)),
        policy_sessions=len(served),
        policy_sessions_within=sum(1 for s in served if s.within_policy),
        decisions=len(verdicts),
        shadow_decisions=len(parsed) - len(verdicts),
        decisions_by_action={a: by_action.get(a, 0) for a in ACTIONS}
        | {a: n for a, n in sorted(by_action.items()) if a not in ACTIONS},
        passed=all(t.passed for t in targets),
    )
    return Report(
        schema_version=SCHEMA_VERSION,
        started=started,
        ended=ended,
        bucket_s=BUCKET_S,
        overall=overall,
        targets=targets,
        bad_bots=bad,
        good_clients=good,
        timeline=_timeline(everything, verdicts, started, ended),
        sessions=tuple(outcomes),
    )


# ---- words and numbers ----


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _measured(check: TargetCheck) -> str:
    if check.unit == "share":
        return _pct(check.measured)
    return _secs(check.measured) if check.unit == "s" else _count(check.measured)


def _threshold(check: TargetCheck) -> str:
    if check.unit == "share":
        return f"{check.comparison} {check.threshold:.1%}"
    unit = " s" if check.unit == "s" else ""
    return f"{check.comparison} {check.threshold:g}{unit}"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def _dist(d: Distribution | None, field: str, seconds: bool) -> str:
    if d is None:
        return "-"
    value: float = getattr(d, field)
    return _secs(value) if seconds else _count(value)


# ---- the terminal ----


def summary_table(report: Report) -> Table:
    """One row per scenario: how many sessions were mitigated (bad bots) or
    touched (everyone else), how fast, and what got through first."""
    from rich.table import Table

    table = Table(
        title="botwall lab: scenarios",
        title_justify="left",
        caption="mitigated: for humans, good bots and AI agents, sessions touched;"
        " t and req: time and requests until mitigation",
        caption_justify="left",
    )
    table.add_column("scenario", no_wrap=True)
    table.add_column("label", no_wrap=True)
    for heading in ("sessions", "mitigated", "t p50", "t max", "req p50", "req max"):
        table.add_column(heading, justify="right", no_wrap=True)
    table.add_column("2xx before", justify="right")
    for b in report.bad_bots:
        table.add_row(
            b.name,
            b.label if b.kind == "normal" else f"{b.label} ({b.kind})",
            str(b.sessions),
            f"{b.mitigated} {_pct(b.mitigated_share)}",
            _dist(b.seconds_to_mitigation, "p50", True),
            _dist(b.seconds_to_mitigation, "max", True),
            _dist(b.requests_to_mitigation, "p50", False),
            _dist(b.requests_to_mitigation, "max", False),
            str(b.ok_before_mitigation_total),
            style="red" if b.unmitigated else None,
        )
    for g in report.good_clients:
        table.add_row(
            g.name,
            g.label,
            str(g.sessions),
            f"{g.touched} {_pct(g.touched_share)}",
            "",
            "",
            "",
            "",
            "",
            style="red" if g.touched else None,
        )
    return table


def targets_table(report: Report) -> Table:
    from rich.table import Table

    table = Table(title="botwall lab: targets", title_justify="left")
    for heading in ("target", "measured", "needed", "", "detail"):
        table.add_column(heading)
    for t in report.targets:
        verdict = "[bold green]PASS[/]" if t.passed else "[bold red]FAIL[/]"
        table.add_row(t.description, _measured(t), _threshold(t), verdict, t.detail)
    return table


def print_summary(report: Report, console: Console | None = None) -> None:
    from rich.console import Console

    out = console if console is not None else Console()
    out.print(summary_table(report))
    out.print(targets_table(report))


# ---- the page ----


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_ACTION_COLOURS = {
    "allow": "#2ca02c",
    "monitor": "#7f7f7f",
    "throttle": "#ff7f0e",
    "tarpit": "#bcbd22",
    "block": "#d62728",
    "block_flow": "#8c564b",
}


def _requests_plot(report: Report) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    present = [
        label
        for label in LABELS
        if any(b.answered[label] or b.mitigated[label] for b in report.timeline)
    ]
    rows = max(len(present), 1)
    figure = Figure(figsize=(10, 1.9 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    x = [b.t for b in report.timeline]
    if not present:
        axes[0].text(0.5, 0.5, "no requests", ha="center", va="center")
    for ax, label in zip(axes, present, strict=False):
        answered = [b.answered[label] for b in report.timeline]
        mitigated = [b.mitigated[label] for b in report.timeline]
        ax.bar(x, answered, width=report.bucket_s, align="edge", color="#4c9a2a", label="answered")
        ax.bar(
            x,
            mitigated,
            width=report.bucket_s,
            align="edge",
            bottom=answered,
            color="#d62728",
            label="dropped or delayed",
        )
        ax.set_ylabel(f"{label}\nrequests / {report.bucket_s:g} s")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if present:
        axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("seconds since the run started")
    return _png(figure)


def _mitigation_plot(report: Report) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), layout="constrained")
    ax = figure.subplots()
    scenarios = report.bad_bots
    times = {
        b.name: [
            s.seconds_to_mitigation
            for s in report.sessions
            if s.scenario == b.name and s.seconds_to_mitigation is not None
        ]
        for b in scenarios
    }
    filled = [(i + 1, times[b.name]) for i, b in enumerate(scenarios) if times[b.name]]
    if filled:
        ax.boxplot(
            [t for _, t in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False
        )
    jitter = random.Random(0)  # the same page for the same report
    for i, b in enumerate(scenarios):
        ys = times[b.name]
        xs = [i + 1 + jitter.uniform(-0.15, 0.15) for _ in ys]
        ax.scatter(xs, ys, s=10, alpha=0.5, color="#d62728", zorder=3)
        if b.unmitigated:
            ax.annotate(
                f"{b.unmitigated} never",
                (i + 1, 0),
                xytext=(0, -2),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize="small",
            )
    if scenarios:
        ax.set_xticks(
            range(1, len(scenarios) + 1), [b.name for b in scenarios], rotation=20, ha="right"
        )
        ax.set_xlim(0.5, len(scenarios) + 0.5)
    else:
        ax.text(0.5, 0.5, "no bad-bot scenario", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("seconds from session start to mitigation")
    ax.grid(axis="y", alpha=0.3)
    return _png(figure)


def _decisions_plot(report: Report) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 3.2), layout="constrained")
    ax = figure.subplots()
    x = [b.t for b in report.timeline]
    actions = list(report.timeline[0].decisions) if report.timeline else []
    bottom = [0] * len(x)
    drawn = False
    for action in actions:
        counts = [b.decisions[action] for b in report.timeline]
        if not any(counts):
            continue
        ax.bar(
            x,
            counts,
            width=report.bucket_s,
            align="edge",
            bottom=bottom,
            label=action,
            color=_ACTION_COLOURS.get(action, "#17becf"),
        )
        bottom = [a + c for a, c in zip(bottom, counts, strict=True)]
        drawn = True
    if drawn:
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(
            0.5,
            0.5,
            "no decisions during the run",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel(f"decisions / {report.bucket_s:g} s")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(figure)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
th { background: #f3f3f3; }
.pass { color: #1a7f37; font-weight: bold; }
.fail { color: #c62828; font-weight: bold; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _row(cells: Iterable[object], *, header: bool = False, cls: str = "") -> str:
    tag = "th" if header else "td"
    attr = f' class="{html.escape(cls)}"' if cls else ""
    return "<tr>" + "".join(f"<{tag}{attr}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _html(report: Report, plots: Mapping[str, str]) -> str:
    o = report.overall
    verdict = "PASS" if o.passed else "FAIL"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>botwall lab report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>botwall lab report</h1>",
        f"<p>Run {html.escape(_when(report.started))} to {html.escape(_when(report.ended))}"
        f" ({report.ended - report.started:.0f} s). Overall: "
        f'<span class="{verdict.lower()}">{verdict}</span>.</p>',
        f"<p>Bad-bot sessions mitigated: {html.escape(_pct(o.bad_bot_mitigated_share))}"
        f" ({o.bad_bot_mitigated} of {o.bad_bot_sessions}). Human sessions touched: "
        f"{html.escape(_pct(o.human_touched_share))} ({o.human_touched} of {o.human_sessions})."
        f" Decisions: {o.decisions} enforced, {o.shadow_decisions} shadow.</p>",
        "<h2>Targets</h2>",
        '<table id="targets">',
        _row(("target", "measured", "needed", "result", "detail"), header=True),
    ]
    for t in report.targets:
        result = "PASS" if t.passed else "FAIL"
        parts.append(
            "<tr>"
            f"<td>{html.escape(t.description)}</td><td>{html.escape(_measured(t))}</td>"
            f"<td>{html.escape(_threshold(t))}</td>"
            f'<td class="{result.lower()}">{result}</td>'
            f'<td class="text">{html.escape(t.detail)}</td></tr>'
        )
    parts += [
        "</table>",
        "<h2>Bad bots</h2>",
        '<table id="bad-bots">',
        _row(
            (
                "scenario",
                "kind",
                "sessions",
                "mitigated",
                "share",
                "by client",
                "by decision",
                "t p50",
                "t p90",
                "t max",
                "req p50",
                "req p90",
                "req max",
                "2xx before",
                "2xx before (max)",
                "never mitigated",
                "their 2xx",
                "contained after",
            ),
            header=True,
        ),
    ]
    for b in report.bad_bots:
        secs, reqs = b.seconds_to_mitigation, b.requests_to_mitigation
        parts.append(
            _row(
                (
                    b.name,
                    b.kind,
                    b.sessions,
                    b.mitigated,
                    _pct(b.mitigated_share),
                    b.mitigated_by_client,
                    b.mitigated_by_decision,
                    _dist(secs, "p50", True),
                    _dist(secs, "p90", True),
                    _dist(secs, "max", True),
                    _dist(reqs, "p50", False),
                    _dist(reqs, "p90", False),
                    _dist(reqs, "max", False),
                    b.ok_before_mitigation_total,
                    b.ok_before_mitigation_max,
                    b.unmitigated,
                    b.unmitigated_ok_total,
                    _secs(b.contained_s),
                )
            )
        )
    parts += [
        "</table>",
        "<h2>Humans, good bots, AI agents</h2>",
        '<table id="good-clients">',
        _row(
            (
                "scenario",
                "label",
                "sessions",
                "touched",
                "share",
                "requests",
                "2xx share",
                "rate limit / min",
                "peak / min",
                "within policy",
            ),
            header=True,
        ),
    ]
    for g in report.good_clients:
        parts.append(
            _row(
                (
                    g.name,
                    g.label,
                    g.sessions,
                    g.touched,
                    _pct(g.touched_share),
                    g.requests,
                    _pct(g.ok_share),
                    _count(g.rate_limit_rpm),
                    g.peak_rpm,
                    _count(g.within_policy),
                )
            )
        )
    parts.append("</table>")
    descriptions = [(b.name, b.description) for b in report.bad_bots if b.description]
    descriptions += [(g.name, g.description) for g in report.good_clients if g.description]
    if descriptions:
        parts.append("<dl>")
        for name, text in descriptions:
            parts.append(f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>")
        parts.append("</dl>")
    for title, png in plots.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
    parts += [
        "<p>Every session, its mitigating moment and the decision behind it are in"
        " report.json.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(report: Report, directory: str | Path) -> tuple[Path, Path]:
    """report.json (all of it) and report.html (targets, tables, plots inline) in
    `directory`, made if missing; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    plots = {
        "Requests over time, by label": _requests_plot(report),
        "Time to mitigation, by bad-bot scenario": _mitigation_plot(report),
        "Decisions over time, by action": _decisions_plot(report),
    }
    html_path.write_text(_html(report, plots))
    return json_path, html_path


# ---- saved runs ----


def load_records(path: str | Path) -> list[RequestRecord]:
    """The records of a JSON-lines file. OSError or ValueError, naming the file."""
    with open(path, encoding="utf-8") as lines:
        try:
            return list(parse_records(lines))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def load_decisions(path: str | Path) -> list[dict[str, Any]]:
    """The decisions of a JSON file: the API's list, or an object holding it
    under "decisions". Each is checked as evaluate() would."""
    data = _load_json(path)
    if isinstance(data, dict) and "decisions" in data:
        data = data["decisions"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a list of decisions")
    try:
        for index, decision in enumerate(data):
            _verdict(decision, index)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return data


def load_scenarios(path: str | Path) -> dict[str, ScenarioInfo]:
    """ScenarioInfo from JSON: an object of name -> fields, or a list of
    objects each with its name."""
    data = _load_json(path)
    if isinstance(data, dict):
        items = [
            {"name": name, **fields} if isinstance(fields, dict) else fields
            for name, fields in data.items()
        ]
    elif isinstance(data, list):
        items = data
    else:
        raise ValueError(f"{path}: not an object or a list of scenarios")
    infos: dict[str, ScenarioInfo] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: scenario {index} is not an object")
        try:
            info = ScenarioInfo(**item)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: scenario {index}: {exc}") from None
        infos[info.name] = info
    return infos


def _load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.report",
        description="Rebuild a lab report from the records and decisions a run saved.",
    )
    parser.add_argument("records", help="the clients' records, JSON lines")
    parser.add_argument("decisions", help="the agent's decisions: GET /v1/decisions, as JSON")
    parser.add_argument("--out", required=True, help="directory for report.json and report.html")
    parser.add_argument("--scenarios", help="ScenarioInfo as JSON: name -> fields")
    parser.add_argument("--started", type=float, help="epoch; default: the first request")
    parser.add_argument("--ended", type=float, help="epoch; default: the last request's end")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.records)
        decisions = load_decisions(args.decisions)
        scenarios = load_scenarios(args.scenarios) if args.scenarios else None
        if not records:
            raise ValueError(f"{args.records}: no records")
        started = args.started if args.started is not None else min(r.ts for r in records)
        ended = args.ended if args.ended is not None else max(r.ts + r.elapsed for r in records)
        report = evaluate(records, decisions, scenarios=scenarios, started=started, ended=ended)
        paths = write_report(report, args.out)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"
        else:
            message = str(exc)
        print(f"lab.report: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    print_summary(report)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
