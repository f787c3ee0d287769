"""Enforcer: decisions to verdict-map calls, JA4 verdicts as flow blocks at the hello."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer, parse_ja4_target
from controlplane.observations import ClientFingerprint, Connection, ConnectionStage
from sensor.events import Flow

JA4 = "t13d3112h1_e8f1e7e78f70_d41ae481755e"
SERVER = ipaddress.ip_address("10.201.0.1")


class RecordingMaps:
    """Stands in for sensor.verdicts.VerdictMaps: records the calls made."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

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


def hello(client: str, port: int, ja4: str | None = JA4) -> Connection:
    return Connection(
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
