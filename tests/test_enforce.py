"""Enforcer: decisions to verdict-map calls, JA4 verdicts as flow blocks at the hello."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer, parse_ja4_target
from controlplane.observations import ClientFingerprint, Connection, ConnectionStage
from sensor.abi import VerdictKind
from sensor.events import Flow
from sensor.verdicts import VerdictEntry

JA4 = "t13d3112h1_e8f1e7e78f70_d41ae481755e"
SERVER = ipaddress.ip_address("10.201.0.1")


class RecordingMaps:
    """Stands in for sensor.verdicts.VerdictMaps: records the calls made."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pinned: list[Any] = []  # what list() returns: entries a previous agent left

    def list(self) -> list[Any]:
        return self.pinned

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def decision(action: Action, kind: TargetKind, target: str, **extra: Any) -> Decision:
    return Decision(action=action, target_kind=kind, target=target, ttl_s=60.0,
                    reason="test reason", rule="test", score=95.0, **extra)  # fmt: skip


def hello(client: str, port: int, ja4: str | None = JA4, key: int | None = None) -> Connection:
    return Connection(
        hello_key=key,
        ts=999.9995,
        client=ipaddress.ip_address(client),
        client_port=port,
        server_port=443,
        stage=ConnectionStage.HELLO,
        fingerprint=ClientFingerprint(ja4=ja4),
        server=SERVER,
    )


@pytest.fixture
def setup() -> tuple[Enforcer, RecordingMaps, Clock]:
    maps, clock = RecordingMaps(), Clock()
    return Enforcer(maps, clock_s=clock), maps, clock  # type: ignore[arg-type]


def test_address_actions_reach_the_maps(setup: tuple[Enforcer, RecordingMaps, Clock]) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK, TargetKind.ADDRESS, "10.0.0.9"))
    enforcer.apply(decision(Action.TARPIT, TargetKind.ADDRESS, "10.0.0.8", tarpit_syns=3))
    throttle = decision(
        Action.THROTTLE,
        TargetKind.ADDRESS,
        "10.0.0.7",
        throttle_connections_per_s=2.0,
        throttle_packets_per_s=200.0,
    )
    enforcer.apply(throttle)
    enforcer.apply(decision(Action.BLOCK, TargetKind.CIDR, "10.9.0.0/16"))
    assert [c[0] for c in maps.calls] == ["block", "tarpit", "throttle", "block"]
    assert maps.calls[0][1] == ("10.0.0.9", 60.0, "test: test reason")
    assert maps.calls[1][2] == {"syns_to_drop": 3}
    assert maps.calls[2][2] == {
        "connections_per_s": 2.0, "connection_burst": 4,
        "packets_per_s": 200.0, "packet_burst": 400,
    }  # fmt: skip
    assert maps.calls[3][1][0] == "10.9.0.0/16"


def test_shadow_and_monitor_write_nothing(setup: tuple[Enforcer, RecordingMaps, Clock]) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK, TargetKind.ADDRESS, "10.0.0.9", shadow=True))
    enforcer.apply(decision(Action.MONITOR, TargetKind.ADDRESS, "10.0.0.9"))
    assert maps.calls == []
    assert len(enforcer.applied) == 2  # both recorded for the audit trail


def test_ja4_verdict_blocks_each_new_matching_flow(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    assert maps.calls == []  # nothing the kernel can hold until a hello shows the JA4
    made = enforcer.on_connection(hello("10.201.1.7", 40001))
    assert made is not None and made.target == "10.201.1.7:40001->10.201.0.1:443"
    assert maps.calls == [
        ("block_flow", (Flow(ipaddress.ip_address("10.201.1.7"), 40001, SERVER, 443), 120.0,
                        f"JA4 {JA4} is blocked: test reason"), {}),
    ]  # fmt: skip
    assert enforcer.on_connection(hello("10.201.1.8", 40002, ja4="t13d0000_other")) is None
    assert enforcer.fingerprint_latency.samples == [pytest.approx(0.0005)]


def test_scoped_ja4_verdict_only_hits_its_source(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, _, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, f"{JA4}@10.201.1.0/24"))
    assert enforcer.on_connection(hello("10.201.1.7", 40001)) is not None
    assert enforcer.on_connection(hello("10.201.2.7", 40001)) is None


def test_ja4_verdict_expires(setup: tuple[Enforcer, RecordingMaps, Clock]) -> None:
    enforcer, _, clock = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    clock.now += 61
    assert enforcer.on_connection(hello("10.201.1.7", 40001)) is None
    assert enforcer.blocked_ja4s() == {}


def test_revoke_undoes_ja4_and_address(setup: tuple[Enforcer, RecordingMaps, Clock]) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    enforcer.revoke(JA4)
    assert enforcer.on_connection(hello("10.201.1.7", 40001)) is None
    enforcer.revoke("10.0.0.9")
    assert maps.calls[-1] == ("unblock", ("10.0.0.9",), {})


def test_parse_ja4_target() -> None:
    assert parse_ja4_target(JA4) == (JA4, None)
    assert parse_ja4_target(f"{JA4}@fd00:b0::/64") == (JA4, ipaddress.ip_network("fd00:b0::/64"))


# ---- hello keys: the kernel's copy of a JA4 verdict ----

KEY, OTHER_JA4 = 0xC0FFEE, "t13d1516h2_8daaf6152771_e5627efa2ab1"


def _flow(client: str, port: int) -> Flow:
    return Flow(ipaddress.ip_address(client), port, SERVER, 443)


def _calls(maps: RecordingMaps, *names: str) -> list[tuple[Any, ...]]:
    return [c for c in maps.calls if c[0] in names]


def test_keys_seen_with_a_blocked_ja4_reach_the_kernel(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, clock = setup
    assert enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY)) is None
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    assert _calls(maps, "block_hello") == [
        ("block_hello", (KEY, 60.0, f"JA4 {JA4}: test reason"), {})
    ]
    assert enforcer.kernel_hello_keys() == {KEY: JA4}
    # A key first seen after the verdict goes in at its first hello.
    enforcer.on_connection(hello("10.201.1.8", 40002, key=KEY + 1))
    assert _calls(maps, "block_hello")[-1][1][:2] == (KEY + 1, 60.0)
    # Keys end with the verdict.
    clock.now += 61
    assert enforcer.kernel_hello_keys() == {}


def test_scoped_verdicts_write_no_key(setup: tuple[Enforcer, RecordingMaps, Clock]) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, f"{JA4}@10.201.1.0/24"))
    assert enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY)) is not None
    assert _calls(maps, "block_hello") == []


def test_a_key_shared_by_two_stacks_leaves_the_kernel(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY))
    assert enforcer.kernel_hello_keys() == {KEY: JA4}
    maps.calls.clear()
    # Another stack with the same cipher list: the kernel dropped its hello.
    assert enforcer.on_connection(hello("10.201.2.9", 40009, ja4=OTHER_JA4, key=KEY)) is None
    assert maps.calls == [
        ("unblock_hello", (KEY,), {}),
        ("unblock_flow", (_flow("10.201.2.9", 40009),), {}),
    ]
    assert enforcer.kernel_hello_keys() == {}
    # The blocked stack is still blocked, flow by flow, and the key stays out.
    maps.calls.clear()
    assert enforcer.on_connection(hello("10.201.1.7", 40003, key=KEY)) is not None
    assert [c[0] for c in maps.calls] == ["block_flow"]


def test_spared_clients_are_exempt_and_let_through(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, clock = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY))
    maps.calls.clear()
    agent = ipaddress.ip_address("10.201.3.3")
    assert enforcer.on_connection(hello("10.201.3.3", 40005, key=KEY), spared=True) is None
    assert maps.calls == [
        ("exempt_hello", (agent, 3600.0, "spared from JA4 verdicts by policy"), {}),
        ("unblock_flow", (_flow("10.201.3.3", 40005),), {}),
    ]
    assert enforcer.kernel_hello_keys() == {KEY: JA4}  # the bots' key stays
    # Renewed at half life, not on every request.
    maps.calls.clear()
    enforcer.exempt(agent)
    clock.now += 1801
    enforcer.exempt(agent)
    assert [c[0] for c in maps.calls] == ["exempt_hello"]


def test_keys_left_pinned_are_adopted_then_corrected() -> None:
    maps, clock = RecordingMaps(), Clock()
    maps.pinned = [VerdictEntry(VerdictKind.BLOCK_HELLO, f"hello:{KEY:016x}", "old", 30.0, {})]
    enforcer = Enforcer(maps, clock_s=clock)  # type: ignore[arg-type]
    assert enforcer.kernel_hello_keys() == {KEY: None}
    # After the restart the JA4 is no longer blocked: the first hello with the
    # key takes it back and unblocks the flow the kernel dropped.
    assert enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY)) is None
    assert maps.calls == [
        ("unblock_hello", (KEY,), {}),
        ("unblock_flow", (_flow("10.201.1.7", 40001),), {}),
    ]


def test_revoking_the_ja4_takes_its_keys_back(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY))
    enforcer.revoke(JA4)
    # The keys go, and nothing else: a JA4 is no address.
    assert [c[0] for c in maps.calls[-1:]] == ["unblock_hello"]
    assert enforcer.kernel_hello_keys() == {}


# ---- JA4 and CIDR decisions the kernel holds per address ----


def _ip(text: str) -> Any:
    return ipaddress.ip_address(text)


def test_a_cidr_throttle_is_written_once_per_address_as_it_shows_up(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, clock = setup
    throttle = decision(
        Action.THROTTLE, TargetKind.CIDR, "10.9.0.0/24", throttle_connections_per_s=1.0
    )
    enforcer.apply(throttle)
    assert maps.calls == []  # no map holds a CIDR throttle
    [made] = enforcer.on_source(_ip("10.9.0.5"))
    assert (made.action, made.target_kind, made.target) == (
        Action.THROTTLE, TargetKind.ADDRESS, "10.9.0.5",
    )  # fmt: skip
    assert maps.calls == [
        ("throttle", ("10.9.0.5", 60.0, "test: test reason (as 10.9.0.0/24)"),
         {"connections_per_s": 1.0, "connection_burst": 2, "packets_per_s": 0.0,
          "packet_burst": 1}),
    ]  # fmt: skip
    # Its next connections leave its buckets alone; other sources get nothing.
    clock.now += 10
    assert enforcer.on_source(_ip("10.9.0.5")) == []
    assert enforcer.on_source(_ip("10.9.1.5")) == []
    assert enforcer.on_source(_ip("2001:db8::5"), JA4) == []
    # Another address, later: what is left of the decision's TTL.
    [later] = enforcer.on_source(_ip("10.9.0.6"))
    assert later.ttl_s == pytest.approx(50.0)
    clock.now += 51
    assert enforcer.on_source(_ip("10.9.0.7")) == []
    assert enforcer.by_source() == {}


def test_a_ja4_tarpit_is_written_at_the_hello_not_the_syn(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.TARPIT, TargetKind.JA4, f"{JA4}@10.201.1.0/24", tarpit_syns=2))
    assert enforcer.on_source(_ip("10.201.1.7")) == []  # a SYN shows no JA4
    assert enforcer.on_source(_ip("10.201.1.7"), "t13d0000_other") == []
    assert enforcer.on_source(_ip("10.201.2.7"), JA4) == []  # outside the scope
    [made] = enforcer.on_source(_ip("10.201.1.7"), JA4)
    assert made.target == "10.201.1.7"
    assert [(c[0], c[1][0], c[2]) for c in maps.calls] == [
        ("tarpit", "10.201.1.7", {"syns_to_drop": 2})
    ]


def test_a_ja4_allow_spares_its_clients_from_a_ja4_block(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.BLOCK_FLOW, TargetKind.JA4, JA4))
    enforcer.apply(decision(Action.ALLOW, TargetKind.JA4, f"{JA4}@10.201.3.0/24"))
    assert enforcer.on_connection(hello("10.201.3.3", 40005, key=KEY)) is None
    assert enforcer.on_connection(hello("10.201.1.7", 40001, key=KEY)) is not None
    [allowed] = enforcer.on_source(_ip("10.201.3.3"), JA4)
    assert allowed.action is Action.ALLOW
    assert [c[0] for c in maps.calls] == ["exempt_hello", "block_hello", "block_flow", "allow"]


def test_revoking_a_by_source_decision_takes_its_address_verdicts_back(
    setup: tuple[Enforcer, RecordingMaps, Clock],
) -> None:
    enforcer, maps, _ = setup
    enforcer.apply(decision(Action.TARPIT, TargetKind.CIDR, "10.9.0.0/24", tarpit_syns=1))
    enforcer.apply(decision(Action.ALLOW, TargetKind.JA4, JA4))
    enforcer.on_source(_ip("10.9.0.5"), JA4)
    enforcer.on_source(_ip("10.9.0.6"))
    maps.calls.clear()
    assert enforcer.revoke("10.9.0.0/24") == [_ip("10.9.0.5"), _ip("10.9.0.6")]
    assert maps.calls == [
        ("unblock", ("10.9.0.5",), {}),
        ("unblock", ("10.9.0.6",), {}),
        ("unblock", ("10.9.0.0/24",), {}),
    ]
    maps.calls.clear()
    assert enforcer.revoke_by_source(JA4) == [_ip("10.9.0.5")]
    assert maps.calls == [("disallow", ("10.9.0.5",), {})]
    assert enforcer.by_source() == {}
    assert enforcer.on_source(_ip("10.9.0.5"), JA4) == []
