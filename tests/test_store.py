"""The store: every API, its validation, its transactions, and reconciling the kernel maps."""

from __future__ import annotations

import ipaddress
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.store import (
    DB_NAME,
    SCHEMA_VERSION,
    DecisionNotFound,
    ModelNotFound,
    Store,
    StoreError,
    kernel_key,
    reconcile,
)
from sensor.abi import VerdictKind
from sensor.events import Flow
from sensor.verdicts import VerdictEntry
from tests.kernel import loaded_sensor

JA4 = "t13d1516h2_8daaf6152771_e5627efa2ab1"
T0 = 1_700_000_000.0


class Clock:
    """Wall time the test sets."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    with Store(tmp_path / "state" / DB_NAME, clock=clock) as opened:
        yield opened


def decision(
    action: Action = Action.BLOCK,
    kind: TargetKind = TargetKind.ADDRESS,
    target: str = "192.0.2.10",
    ttl: float = 60.0,
    **extra: Any,
) -> Decision:
    fields: dict[str, Any] = {
        "reason": "scraper: 40 pages a second",
        "rule": "block_high",
        "score": 91.5,
        "model_versions": {"baseline": "b-1", "journey": "j-3"},
    } | extra
    return Decision(action=action, target_kind=kind, target=target, ttl_s=ttl, **fields)


def raw(store: Store) -> sqlite3.Connection:
    """A second connection to the same file, as another process would have."""
    return sqlite3.connect(store.path, isolation_level=None)


def row_counts(store: Store) -> dict[str, int]:
    conn = raw(store)
    try:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("decisions", "audit", "labels", "snapshots", "models", "policies")
        }
    finally:
        conn.close()


# ---- opening ----


def test_opens_in_wal_with_full_sync_and_private_files(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "deep" / "state"
    with Store(state / DB_NAME, clock=clock) as store:
        store.record_decision(decision(), source="engine", actor="engine")
        assert store.pragmas() == {
            "journal_mode": "wal",
            "synchronous": "FULL",
            "foreign_keys": True,
        }
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert store.integrity_check() == "ok"


def test_an_engine_write_without_the_fsync_leaves_full_sync_for_the_next(
    tmp_path: Path, clock: Clock
) -> None:
    with Store(tmp_path / DB_NAME, clock=clock) as store:
        (record,) = store.record_decisions(
            [decision()], source="engine", actor="engine", wait_for_disk=False
        )
        assert store.pragmas()["synchronous"] == "FULL"
        assert store.get_decision(record.id).decision == record.decision


def test_loose_file_modes_are_tightened(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / DB_NAME
    with Store(path, clock=clock):
        pass
    path.chmod(0o644)
    with Store(path, clock=clock):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_schema_is_migrated_once_and_data_survives_reopening(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / DB_NAME
    with Store(path, clock=clock) as store:
        assert store.schema_version() == SCHEMA_VERSION == 1
        made = store.record_decision(decision(), source="engine", actor="engine")
    with Store(path, clock=clock) as store:
        assert store.schema_version() == 1
        assert store.get_decision(made.id) == made
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        conn.close()


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / DB_NAME
    with Store(path, clock=clock):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_version VALUES (2, 'later')")
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 2 is newer .*\(schema version 1\)"):
        Store(path, clock=clock)


def test_a_foreign_database_or_file_is_refused(tmp_path: Path, clock: Clock) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.close()
    with pytest.raises(StoreError, match=r"not a botwall store \(tables \['things'\]"):
        Store(other, clock=clock)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not SQLite at all, not even close" * 100)
    with pytest.raises(StoreError, match="not a botwall store: file is not a database"):
        Store(garbage, clock=clock)


def test_a_closed_store_says_so(tmp_path: Path, clock: Clock) -> None:
    store = Store(tmp_path / DB_NAME, clock=clock)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError, match="the store is closed"):
        store.live_decisions()
    with pytest.raises(StoreError, match="the store is closed"):
        store.record_decision(decision(), source="engine", actor="engine")


# ---- decisions ----


def test_a_decision_round_trips_with_its_audit_row(store: Store, clock: Clock) -> None:
    made = decision(
        Action.THROTTLE,
        throttle_connections_per_s=2.0,
        throttle_packets_per_s=150.0,
        ts=812.25,
    )
    record = store.record_decision(made, source="engine", actor="engine")
    assert record.decision == made
    assert (record.source, record.actor) == ("engine", "engine")
    assert record.created_epoch == T0
    assert record.created_at == "2023-11-14T22:13:20.000000+00:00"
    assert record.expires_at == T0 + 60.0
    assert (record.revoked_at, record.revoked_by, record.revoke_reason) == (None, None, None)
    assert store.get_decision(record.id) == record
    assert record.remaining_s(T0 + 15) == 45.0
    assert record.with_remaining_ttl(T0 + 15).ttl_s == 45.0
    flat = record.as_dict()
    assert flat["action"] == "throttle" and flat["target"] == "192.0.2.10"
    assert flat["model_versions"] == {"baseline": "b-1", "journey": "j-3"}
    assert flat["decided_ts"] == 812.25

    [audit] = store.audit_log()
    assert (audit.actor, audit.action, audit.subject) == (
        "engine",
        "decision.create",
        f"decision:{record.id}",
    )
    assert audit.ts == T0
    assert audit.details == {
        "action": "throttle",
        "target_kind": "addr",
        "target": "192.0.2.10",
        "ttl_s": 60.0,
        "reason": "scraper: 40 pages a second",
        "rule": "block_high",
        "score": 91.5,
        "model_versions": {"baseline": "b-1", "journey": "j-3"},
        "shadow": False,
        "source": "engine",
    }


def test_a_batch_of_decisions_is_one_transaction(store: Store) -> None:
    made = [decision(target=f"192.0.2.{i}") for i in range(3)]
    records = store.record_decisions(made, source="engine", actor="engine")
    assert [r.decision for r in records] == made
    assert [r.id for r in store.live_decisions()] == [r.id for r in records]
    assert [a.subject for a in store.audit_log()] == [f"decision:{r.id}" for r in records][::-1]
    # One bad decision: none of the batch is written.
    with pytest.raises(ValueError, match="not an IP address: 'nope'"):
        store.record_decisions([decision(), decision(target="nope")], source="engine", actor="e")
    assert row_counts(store)["decisions"] == 3


@pytest.mark.parametrize(
    ("kind", "action", "given", "stored"),
    [
        (TargetKind.ADDRESS, Action.BLOCK, " ::ffff:192.0.2.7 ", "192.0.2.7"),
        (TargetKind.ADDRESS, Action.TARPIT, "2001:DB8:0:0::1", "2001:db8::1"),
        (TargetKind.CIDR, Action.BLOCK, "198.51.100.77/24", "198.51.100.0/24"),
        (TargetKind.CIDR, Action.ALLOW, "2001:db8:1::5/48", "2001:db8:1::/48"),
        (
            TargetKind.FLOW,
            Action.BLOCK_FLOW,
            "[2001:DB8::9]:40000->[2001:db8::1]:443",
            "[2001:db8::9]:40000->[2001:db8::1]:443",
        ),
        (
            TargetKind.FLOW,
            Action.BLOCK_FLOW,
            "10.0.0.1:5->10.0.0.2:443",
            "10.0.0.1:5->10.0.0.2:443",
        ),
        (TargetKind.JA4, Action.BLOCK_FLOW, JA4, JA4),
        (TargetKind.JA4, Action.BLOCK, f"{JA4}@10.1.2.3/16", f"{JA4}@10.1.0.0/16"),
        (TargetKind.JA4, Action.MONITOR, f"{JA4}@::ffff:10.1.2.3", f"{JA4}@10.1.2.3"),
    ],
)
def test_targets_are_stored_in_the_form_the_kernel_lists(
    store: Store, kind: TargetKind, action: Action, given: str, stored: str
) -> None:
    record = store.record_decision(decision(action, kind, given), source="manual", actor="cli")
    assert record.decision.target == stored
    assert store.get_decision(record.id).decision.target == stored


@pytest.mark.parametrize(
    ("made", "source", "actor", "message"),
    [
        (
            decision(target="192.0.2.300"),
            "engine",
            "engine",
            r"not an IP address: '192\.0\.2\.300'",
        ),
        (decision(kind=TargetKind.CIDR, target="10.0.0.0/33"), "engine", "engine", "not a CIDR"),
        (decision(kind=TargetKind.JA4, target="t13d_nope"), "engine", "engine", "not a JA4"),
        (
            decision(kind=TargetKind.JA4, target=f"{JA4}@nowhere"),
            "engine",
            "engine",
            "not an IP address: 'nowhere'",
        ),
        (
            decision(Action.BLOCK_FLOW, TargetKind.FLOW, "10.0.0.1->10.0.0.2:443"),
            "engine",
            "engine",
            "not a flow",
        ),
        (
            decision(Action.THROTTLE, TargetKind.FLOW, "10.0.0.1:5->10.0.0.2:443"),
            "manual",
            "cli",
            r"a throttle decision cannot target a flow .*, only an address or a CIDR or a JA4",
        ),
        (
            decision(Action.ALLOW, TargetKind.FLOW, "10.0.0.1:5->10.0.0.2:443"),
            "manual",
            "cli",
            r"an? allow decision cannot target a flow",
        ),
        (
            decision(Action.BLOCK_FLOW),
            "engine",
            "engine",
            "block_flow decision cannot target an address .*, only a JA4 or a flow",
        ),
        (decision(ttl=0), "engine", "engine", "ttl_s must be > 0"),
        (decision(ttl=-5), "engine", "engine", "ttl_s must be > 0"),
        (decision(ttl=float("inf")), "engine", "engine", "ttl_s must be a finite number"),
        (decision(ttl=1e12), "engine", "engine", "ttl_s must be > 0 and <= 315360000"),
        (decision(score=100.5), "engine", "engine", "score must be 0-100, got 100.5"),
        (decision(score=float("nan")), "engine", "engine", "score must be a finite number"),
        (decision(reason="  "), "engine", "engine", "reason must not be empty"),
        (decision(reason="two\nlines"), "engine", "engine", "reason must be one line"),
        (decision(Action.THROTTLE), "engine", "engine", "a throttle needs"),
        (decision(Action.TARPIT, tarpit_syns=7), "engine", "engine", "tarpit_syns must be 0-6"),
        (decision(model_versions={"baseline": 3}), "engine", "engine", "model_versions must map"),
        (
            decision(),
            "robot",
            "engine",
            "source must be one of engine, manual, feedback; got 'robot'",
        ),
        (decision(), "manual", "", "actor must not be empty"),
    ],
)
def test_bad_decisions_are_refused_before_anything_is_written(
    store: Store, made: Decision, source: str, actor: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.record_decision(made, source=source, actor=actor)
    assert row_counts(store)["decisions"] == 0
    assert row_counts(store)["audit"] == 0


def test_live_decisions_exclude_expired_revoked_and_shadow(store: Store, clock: Clock) -> None:
    short = store.record_decision(decision(ttl=10), source="engine", actor="engine")
    long = store.record_decision(
        decision(target="192.0.2.11", ttl=100), source="engine", actor="engine"
    )
    store.record_decision(
        decision(target="192.0.2.12", shadow=True), source="engine", actor="engine"
    )
    revoked = store.record_decision(decision(target="192.0.2.13"), source="manual", actor="cli")
    store.revoke_decision(revoked.id, "api:tok-1", "false positive")

    assert [r.id for r in store.live_decisions()] == [short.id, long.id]
    assert [r.id for r in store.live_decisions(now=T0 + 10)] == [long.id]  # expiry is exclusive
    clock.now = T0 + 99.5
    assert [r.id for r in store.live_decisions()] == [long.id]
    assert store.live_decisions(now=T0 + 100) == []
    assert long.is_live(T0 + 99.5) and not long.is_live(T0 + 100)


def test_list_decisions_pages_filters_and_hides_what_ended(store: Store, clock: Clock) -> None:
    made = []
    for i in range(5):
        clock.now = T0 + i
        made.append(
            store.record_decision(
                decision(target=f"192.0.2.{i % 2}", ttl=10 + i), source="engine", actor="engine"
            )
        )
    ids = [r.id for r in made]
    clock.now = T0 + 10.5  # made[0] (expires T0+10) has expired
    store.revoke_decision(ids[3], "cli", "operator said so")

    assert [r.id for r in store.list_decisions()] == [ids[4], ids[2], ids[1]]
    assert [r.id for r in store.list_decisions(limit=2)] == [ids[4], ids[2]]
    assert [r.id for r in store.list_decisions(limit=2, offset=2)] == [ids[1]]
    assert [r.id for r in store.list_decisions(include_expired=True)] == [
        ids[4],
        ids[2],
        ids[1],
        ids[0],
    ]
    assert [r.id for r in store.list_decisions(include_revoked=True)] == [
        ids[4],
        ids[3],
        ids[2],
        ids[1],
    ]
    everything = store.list_decisions(include_expired=True, include_revoked=True)
    assert [r.id for r in everything] == ids[::-1]
    assert [r.id for r in store.list_decisions(target="::ffff:192.0.2.0")] == [ids[4], ids[2]]
    assert store.list_decisions(target="198.51.100.1") == []
    with pytest.raises(ValueError, match="limit must be a positive integer, got 0"):
        store.list_decisions(limit=0)
    with pytest.raises(ValueError, match="offset must be an integer >= 0, got -1"):
        store.list_decisions(offset=-1)


def test_revoke_is_a_soft_delete_with_its_audit_row(store: Store, clock: Clock) -> None:
    record = store.record_decision(decision(), source="manual", actor="api:tok-7")
    clock.now = T0 + 5
    revoked = store.revoke_decision(record.id, "api:tok-9", "customer's office")
    assert (revoked.revoked_at, revoked.revoked_by, revoked.revoke_reason) == (
        T0 + 5,
        "api:tok-9",
        "customer's office",
    )
    assert revoked.decision == record.decision
    assert store.get_decision(record.id) == revoked
    assert [
        (a.action, a.actor, a.details) for a in store.audit_log(subject=f"decision:{record.id}")
    ] == [
        ("decision.revoke", "api:tok-9", {"target": "192.0.2.10", "reason": "customer's office"}),
        ("decision.create", "api:tok-7", store.audit_log()[-1].details),
    ]
    # Again: nothing changes, no second audit row.
    clock.now = T0 + 9
    assert store.revoke_decision(record.id, "cli", "again") == revoked
    assert len(store.audit_log()) == 2


def test_unknown_decision_ids_raise_decision_not_found(store: Store) -> None:
    with pytest.raises(DecisionNotFound, match="no decision with id 'nope'") as caught:
        store.get_decision("nope")
    assert isinstance(caught.value, KeyError)
    assert str(caught.value) == "no decision with id 'nope'"
    with pytest.raises(DecisionNotFound):
        store.revoke_decision("nope", "cli", "x")
    assert row_counts(store)["audit"] == 0


# ---- one transaction: the change and its audit row ----


def test_a_failure_between_the_row_and_its_audit_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kept = store.record_decision(decision(target="192.0.2.1"), source="engine", actor="engine")
    (tmp_path / "state" / "m.skops").write_bytes(b"model")
    store.register_model("baseline", "b-1", tmp_path / "state" / "m.skops", {})
    before = row_counts(store)

    def crash(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("the disk went away between two statements")

    monkeypatch.setattr(store, "_write_audit", crash)
    attempts = [
        lambda: store.record_decision(decision(), source="engine", actor="engine"),
        lambda: store.revoke_decision(kept.id, "cli", "x"),
        lambda: store.add_label("addr", "192.0.2.5", "bot", "cli"),
        lambda: store.set_model_status("b-1", "live", "cli"),
        lambda: store.save_policy("[policy]\n", "cli"),
    ]
    for attempt in attempts:
        with pytest.raises(RuntimeError, match="the disk went away"):
            attempt()
    assert row_counts(store) == before
    assert store.get_decision(kept.id).revoked_at is None
    assert store.get_model("b-1").status == "candidate"
    monkeypatch.undo()
    # The connection is left usable, outside any transaction.
    assert store.record_decision(decision(), source="engine", actor="engine").decision.target == (
        "192.0.2.10"
    )


def test_a_database_error_in_the_audit_insert_rolls_the_decision_back(store: Store) -> None:
    other = raw(store)
    try:
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'audit refused by test'); END"
        )
        with pytest.raises(StoreError, match="write failed: audit refused by test"):
            store.record_decision(decision(), source="engine", actor="engine")
        assert row_counts(store)["decisions"] == 0
        other.execute("DROP TRIGGER refuse")
    finally:
        other.close()
    store.record_decision(decision(), source="engine", actor="engine")
    assert row_counts(store)["decisions"] == 1


def test_the_audit_log_is_append_only_in_the_database(store: Store) -> None:
    store.audit("cli", "sensor.attach", "iface:eth0", {"mode": "native"})
    other = raw(store)
    try:
        for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="the audit log is append-only"):
                other.execute(statement)
    finally:
        other.close()
    assert [a.actor for a in store.audit_log()] == ["cli"]


def test_audit_and_audit_log(store: Store, clock: Clock) -> None:
    first = store.audit("cli", "sensor.attach", "iface:eth0", {"mode": "native"})
    clock.now = T0 + 1
    store.audit("api:tok-1", "token.issue", "token:tok-2")
    clock.now = T0 + 2
    store.audit("cli", "sensor.detach", "iface:eth0")
    assert (first.seq, first.ts, first.at) == (1, T0, "2023-11-14T22:13:20.000000+00:00")
    assert [a.action for a in store.audit_log()] == [
        "sensor.detach",
        "token.issue",
        "sensor.attach",
    ]
    assert [a.action for a in store.audit_log(limit=1)] == ["sensor.detach"]
    assert [(a.action, a.details) for a in store.audit_log(subject="iface:eth0")] == [
        ("sensor.detach", {}),
        ("sensor.attach", {"mode": "native"}),
    ]
    with pytest.raises(ValueError, match="audit details cannot be stored as JSON"):
        store.audit("cli", "x", "y", {"when": object()})
    with pytest.raises(ValueError, match="audit subject must not be empty"):
        store.audit("cli", "x", "")


# ---- labels ----


def test_labels_are_canonical_ordered_and_audited(store: Store, clock: Clock) -> None:
    a = store.add_label(
        "addr",
        "::ffff:203.0.113.9",
        "bot",
        "api:tok-1",
        note="ticket 42",
        features={"req_rate": 12.5, "paths": 3},
    )
    clock.now = T0 + 10
    b = store.add_label("cidr", "203.0.113.77/24", "human", "cli")
    clock.now = T0 + 20
    c = store.add_label("ja4", JA4, "good_bot", "cli")
    d = store.add_label("cluster", "ja4+prefix:t13d/24", "bot", "cli")
    assert (a.subject, a.label, a.note, a.features) == (
        "203.0.113.9",
        "bot",
        "ticket 42",
        {"req_rate": 12.5, "paths": 3.0},
    )
    assert (b.subject, c.subject, d.subject) == ("203.0.113.0/24", JA4, "ja4+prefix:t13d/24")
    assert store.labels() == [a, b, c, d]
    assert store.labels(since=T0 + 10) == [b, c, d]
    assert store.labels(since=T0 + 10, limit=2) == [b, c]
    assert [(x.action, x.subject, x.details) for x in store.audit_log(limit=4)][::-1] == [
        ("label.add", "addr:203.0.113.9", {"label_id": a.id, "label": "bot", "note": "ticket 42"}),
        ("label.add", "cidr:203.0.113.0/24", {"label_id": b.id, "label": "human", "note": None}),
        ("label.add", f"ja4:{JA4}", {"label_id": c.id, "label": "good_bot", "note": None}),
        (
            "label.add",
            "cluster:ja4+prefix:t13d/24",
            {"label_id": d.id, "label": "bot", "note": None},
        ),
    ]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ("addr", "203.0.113.9", "robot", "cli"),
            {},
            "label must be one of bot, human, good_bot; got 'robot'",
        ),
        (("host", "203.0.113.9", "bot", "cli"), {}, "subject kind must be one of .*; got 'host'"),
        (("addr", "203.0.113.999", "bot", "cli"), {}, r"not an IP address: '203\.0\.113\.999'"),
        (("cidr", "203.0.113.0/40", "bot", "cli"), {}, r"not a CIDR: '203\.0\.113\.0/40'"),
        (("ja4", "nope", "bot", "cli"), {}, "not a JA4 fingerprint: 'nope'"),
        (("cluster", "", "bot", "cli"), {}, "cluster key must not be empty"),
        (
            ("addr", "203.0.113.9", "bot", "cli"),
            {"features": {"rate": float("nan")}},
            "feature rate must be a finite number, got nan",
        ),
        (
            ("addr", "203.0.113.9", "bot", "cli"),
            {"features": {"rate": "fast"}},
            "feature rate must be a finite number, got 'fast'",
        ),
    ],
)
def test_bad_labels_name_the_bad_value(
    store: Store, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.add_label(*args, **kwargs)
    assert row_counts(store)["labels"] == row_counts(store)["audit"] == 0


# ---- client snapshots ----


def test_snapshots_latest_and_pruning(store: Store, clock: Clock) -> None:
    reasons = [{"code": "ua_tls_mismatch", "points": 40.0}]
    old = store.save_snapshot("198.51.100.4", 20.0, [], {"rate": 1.0}, {"ja4": JA4}, ts=T0 - 7200)
    newer = store.save_snapshot("::ffff:198.51.100.4", 75.5, reasons, {"rate": 9.0}, {"ja4": JA4})
    store.save_snapshot("198.51.100.5", 5.0, [], {}, {}, ts=T0 - 3000)
    assert newer.ts == T0 and newer.addr == "198.51.100.4"
    assert store.latest_snapshot("198.51.100.4") == newer
    assert newer.reasons == reasons and newer.features == {"rate": 9.0}
    assert store.latest_snapshot("198.51.100.99") is None

    assert store.prune_snapshots(older_than_s=3600) == 1  # only `old`
    assert store.latest_snapshot("198.51.100.4") == newer
    assert row_counts(store)["snapshots"] == 2
    assert store.prune_snapshots(older_than_s=3600, now=T0 + 3600) == 1  # the .5 one
    assert store.prune_snapshots(older_than_s=0, now=T0 + 1) == 1
    assert row_counts(store)["snapshots"] == 0
    assert old.id == 1

    batch = store.save_snapshots(
        [("192.0.2.1", 1.0, [], {"a": 1.0}, {}, None), ("192.0.2.2", 2.0, [], {"a": 2.0}, {}, T0)]
    )
    assert [(s.addr, s.risk_score) for s in batch] == [("192.0.2.1", 1.0), ("192.0.2.2", 2.0)]
    with pytest.raises(ValueError, match="feature a must be a finite number, got inf"):
        store.save_snapshot("192.0.2.3", 1.0, [], {"a": float("inf")}, {})
    with pytest.raises(ValueError, match="not an IP address"):
        store.save_snapshot("not-an-address", 1.0, [], {}, {})
    with pytest.raises(ValueError, match="older_than_s must be >= 0"):
        store.prune_snapshots(-1)
    assert row_counts(store)["snapshots"] == 2


# ---- the model registry ----


def model_file(store: Store, name: str) -> Path:
    path = store.state_dir / "models" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"a model")
    return path


def test_model_registry_promotion_and_comparison(store: Store, clock: Clock) -> None:
    first = store.register_model("baseline", "b-1", model_file(store, "b1"), {"auc": 0.91}, "live")
    assert first.path == (store.state_dir / "models" / "b1").resolve()
    assert (first.status, first.registered_by, first.comparison) == ("live", "engine", None)
    assert first.metrics == {"auc": 0.91}
    clock.now = T0 + 60
    model_file(store, "b2")
    # A path relative to the state dir is taken as such.
    second = store.register_model("baseline", "b-2", Path("models/b2"), {"auc": 0.95}, actor="cli")
    assert (second.status, second.registered_by, second.registered_at) == (
        "candidate",
        "cli",
        T0 + 60,
    )
    assert second.path == (store.state_dir / "models" / "b2").resolve()
    journey = store.register_model(
        "journey", "j-1", model_file(store, "j1"), {}, "live", comparison={"agreement": 1.0}
    )
    assert journey.comparison == {"agreement": 1.0}
    comparison = {"agreement": 0.97, "would_block": 12, "live_blocks": 15}
    clock.now = T0 + 120
    shadowed = store.set_model_status("b-2", "candidate", "engine", comparison)
    assert shadowed.comparison == comparison and shadowed.status == "candidate"
    clock.now = T0 + 180
    promoted = store.set_model_status("b-2", "live", "api:tok-3")
    assert (promoted.status, promoted.status_changed_at, promoted.status_changed_by) == (
        "live",
        T0 + 180,
        "api:tok-3",
    )
    assert promoted.comparison == comparison  # kept when none is given
    assert store.live_model("baseline") == promoted
    assert store.get_model("b-1").status == "retired"
    assert store.live_model("journey") is not None and store.live_model("campaign") is None
    assert [m.version for m in store.models()] == ["b-1", "b-2", "j-1"]
    assert [(m.version, m.status) for m in store.models("baseline")] == [
        ("b-1", "retired"),
        ("b-2", "live"),
    ]
    promotion = store.audit_log(limit=2)
    assert [(a.action, a.subject, a.details["from"], a.details["to"]) for a in promotion] == [
        ("model.status", "model:b-2", "candidate", "live"),
        ("model.status", "model:b-1", "live", "retired"),
    ]
    assert promotion[0].details["replaced"] == "b-1"
    # Rolling back to the retired model retires b-2 the same way.
    store.set_model_status("b-1", "live", "cli")
    assert [(m.version, m.status) for m in store.models("baseline")] == [
        ("b-1", "live"),
        ("b-2", "retired"),
    ]


def test_model_registry_refusals(store: Store, tmp_path: Path) -> None:
    store.register_model("baseline", "b-1", model_file(store, "b1"), {})
    outside = tmp_path / "elsewhere.skops"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError, match="is not under the state dir"):
        store.register_model("baseline", "b-2", outside, {})
    with pytest.raises(ValueError, match="is not under the state dir"):
        store.register_model("baseline", "b-2", store.state_dir / ".." / "elsewhere.skops", {})
    with pytest.raises(ValueError, match="does not exist"):
        store.register_model("baseline", "b-2", store.state_dir / "missing", {})
    with pytest.raises(ValueError, match="model version 'b-1' is already registered"):
        store.register_model("baseline", "b-1", model_file(store, "b1"), {})
    with pytest.raises(ValueError, match=r"model status must be one of .*; got 'shiny'"):
        store.register_model("baseline", "b-3", model_file(store, "b3"), {}, "shiny")
    with pytest.raises(ValueError, match="model kind must be a lower-case name, got 'Base line'"):
        store.register_model("Base line", "b-3", model_file(store, "b3"), {})
    with pytest.raises(ValueError, match="metrics cannot be stored as JSON"):
        store.register_model("baseline", "b-3", model_file(store, "b3"), {"auc": float("nan")})
    with pytest.raises(ModelNotFound, match="no model with version 'b-9'"):
        store.set_model_status("b-9", "live", "cli")
    store.set_model_status("b-1", "retired", "cli")
    with pytest.raises(ValueError, match="model b-1 is retired: it cannot become a candidate"):
        store.set_model_status("b-1", "candidate", "cli")
    assert [m.version for m in store.models()] == ["b-1"]


# ---- policy ----


def test_policy_history(store: Store, clock: Clock) -> None:
    assert store.current_policy() is None
    first = store.save_policy("[thresholds]\nblock = 90\n", "cli")
    clock.now = T0 + 1
    second = store.save_policy("[thresholds]\nblock = 85\n", "api:tok-1")
    assert (first, second) == (1, 2)
    assert store.current_policy() == "[thresholds]\nblock = 85\n"
    history = store.policy_history()
    assert [(p.id, p.actor, p.ts) for p in history] == [(2, "api:tok-1", T0 + 1), (1, "cli", T0)]
    assert [(a.action, a.details["policy_id"]) for a in store.audit_log(subject="policy")] == [
        ("policy.save", 2),
        ("policy.save", 1),
    ]
    with pytest.raises(ValueError, match="a policy text must not be empty"):
        store.save_policy("  \n", "cli")


# ---- threads ----


def test_threads_share_one_store(tmp_path: Path) -> None:
    with Store(tmp_path / DB_NAME) as store:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(25):
                    made = store.record_decision(
                        decision(target=f"10.{n}.0.{i}"), source="engine", actor="engine"
                    )
                    store.get_decision(made.id)
                    store.list_decisions(limit=5)
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert row_counts(store)["decisions"] == row_counts(store)["audit"] == 200
        assert store.integrity_check() == "ok"


# ---- reconciliation ----


def listed_as(kind: VerdictKind, target: str | Flow) -> str:
    """The text VerdictMaps.list() shows for an entry's key."""
    if isinstance(target, Flow):
        return str(target)
    if kind in (VerdictKind.ALLOW_CIDR, VerdictKind.BLOCK_CIDR):
        return str(ipaddress.ip_network(target, strict=False))
    return str(ipaddress.ip_address(target))


class RecordingVerdictMaps:
    """Stands in for sensor.verdicts.VerdictMaps: the same keys and the same
    removal rules (unblock takes an address's block, throttle and tarpit at
    once), with expiries on the test's clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: dict[tuple[VerdictKind, str], tuple[float, str, dict[str, float]]] = {}
        self.calls: list[str] = []

    def _put(
        self, kind: VerdictKind, target: str | Flow, ttl: float, reason: str, **detail: float
    ) -> None:
        self.calls.append(f"{kind.name} {target}")
        self.entries[(kind, listed_as(kind, target))] = (self.clock() + ttl, reason, detail)

    def _drop(self, kind: VerdictKind, target: str | Flow) -> int:
        self.calls.append(f"remove {kind.name} {target}")
        return int(self.entries.pop((kind, listed_as(kind, target)), None) is not None)

    def allow(self, target: str, ttl: float, reason: str) -> None:
        kind = VerdictKind.ALLOW_CIDR if "/" in target else VerdictKind.ALLOW
        self._put(kind, target, ttl, reason)

    def block(self, target: str, ttl: float, reason: str) -> None:
        kind = VerdictKind.BLOCK_CIDR if "/" in target else VerdictKind.BLOCK
        self._put(kind, target, ttl, reason)

    def block_flow(self, flow: Flow, ttl: float, reason: str) -> None:
        self._put(VerdictKind.BLOCK_FLOW, flow, ttl, reason)

    def throttle(self, target: str, ttl: float, reason: str, **rates: float) -> None:
        self._put(VerdictKind.THROTTLE, target, ttl, reason, **rates)

    def tarpit(self, target: str, ttl: float, reason: str, *, syns_to_drop: int) -> None:
        self._put(VerdictKind.TARPIT, target, ttl, reason, syns_to_drop=syns_to_drop)

    def unblock(self, target: str) -> int:
        if "/" in target:
            return self._drop(VerdictKind.BLOCK_CIDR, target)
        kinds = (VerdictKind.BLOCK, VerdictKind.THROTTLE, VerdictKind.TARPIT)
        return sum(self._drop(kind, target) for kind in kinds)

    def disallow(self, target: str) -> int:
        return self._drop(VerdictKind.ALLOW_CIDR if "/" in target else VerdictKind.ALLOW, target)

    def unblock_flow(self, flow: Flow) -> int:
        return self._drop(VerdictKind.BLOCK_FLOW, flow)

    def list(self) -> list[VerdictEntry]:
        now = self.clock()
        return [
            VerdictEntry(kind, target, reason, expiry - now, dict(detail))
            for (kind, target), (expiry, reason, detail) in self.entries.items()
        ]


FLOW = "203.0.113.5:41000->198.51.100.1:443"


# name -> (decision, source, actor): live decisions of every kind, and some
# that must not reach the kernel.
SEEDS: dict[str, tuple[Decision, str, str]] = {
    "block": (decision(ttl=300), "engine", "engine"),
    "cidr": (decision(kind=TargetKind.CIDR, target="198.51.100.0/24", ttl=600), "manual", "cli"),
    "allow": (decision(Action.ALLOW, target="192.0.2.20", ttl=900), "manual", "api:tok-1"),
    "throttle": (
        decision(
            Action.THROTTLE,
            target="192.0.2.30",
            ttl=120,
            throttle_connections_per_s=2.0,
            throttle_packets_per_s=100.0,
        ),
        "engine",
        "engine",
    ),
    "tarpit": (
        decision(Action.TARPIT, target="192.0.2.40", ttl=200, tarpit_syns=3),
        "engine",
        "engine",
    ),
    "flow": (decision(Action.BLOCK_FLOW, TargetKind.FLOW, FLOW, ttl=100), "engine", "engine"),
    "ja4": (
        decision(Action.BLOCK_FLOW, TargetKind.JA4, f"{JA4}@192.0.2.0/24", ttl=400),
        "engine",
        "engine",
    ),
    "monitor": (decision(Action.MONITOR, target="192.0.2.50"), "engine", "engine"),
    "shadow": (decision(target="192.0.2.60", shadow=True), "engine", "engine"),
    "revoked": (decision(target="192.0.2.70", ttl=300), "engine", "engine"),
    "expired": (decision(target="192.0.2.80", ttl=5), "engine", "engine"),
    # A second, shorter block on the first one's address: the kernel entry
    # must last as long as the longer of the two.
    "block_short": (decision(ttl=30), "manual", "cli"),
}


def seed_store(store: Store) -> dict[str, str]:
    """Records SEEDS (and revokes "revoked"); returns their ids by name."""
    ids = {
        name: store.record_decision(made, source=source, actor=actor).id
        for name, (made, source, actor) in SEEDS.items()
    }
    store.revoke_decision(ids["revoked"], "api:tok-1", "false positive")
    return ids


def test_reconcile_makes_the_maps_hold_exactly_the_live_decisions(
    store: Store, clock: Clock
) -> None:
    seed_store(store)
    maps = RecordingVerdictMaps(clock)
    # Left by the previous run: an entry nobody decided, the revoked and the
    # expired decisions' entries, and a stale block next to a live throttle.
    maps.block("203.0.113.99", 500, "old run")
    maps.block("192.0.2.70", 500, "revoked while we were down")
    maps.block("192.0.2.80", 500, "expired while we were down")
    maps.block("192.0.2.30", 500, "stale block beside the live throttle")
    maps.throttle("192.0.2.30", 50, "the live throttle", connections_per_s=1.0)
    maps.allow("10.9.0.0/16", 500, "old allow")
    old_flow = Flow(ipaddress.ip_address("10.0.0.1"), 1, ipaddress.ip_address("10.0.0.2"), 443)
    maps.block_flow(old_flow, 500, "old flow")
    maps.block("192.0.2.10", 5, "the live block, ran out while we were down")

    clock.now = T0 + 20
    maps.calls.clear()
    report = reconcile(store, maps)  # type: ignore[arg-type]

    assert (report.written, report.removed, report.by_enforcer, report.skipped_expired) == (
        6,
        6,
        1,
        0,
    )
    assert report.not_enforced == 1
    assert {
        key: (round(exp - clock.now, 6), detail) for key, (exp, _, detail) in maps.entries.items()
    } == {
        (VerdictKind.BLOCK, "192.0.2.10"): (280.0, {}),
        (VerdictKind.BLOCK_CIDR, "198.51.100.0/24"): (580.0, {}),
        (VerdictKind.ALLOW, "192.0.2.20"): (880.0, {}),
        (VerdictKind.THROTTLE, "192.0.2.30"): (
            100.0,
            {
                "connections_per_s": 2.0,
                "connection_burst": 4,
                "packets_per_s": 100.0,
                "packet_burst": 200,
            },
        ),
        (VerdictKind.TARPIT, "192.0.2.40"): (180.0, {"syns_to_drop": 3}),
        (VerdictKind.BLOCK_FLOW, FLOW): (80.0, {}),
    }
    assert maps.entries[(VerdictKind.BLOCK, "192.0.2.10")][1] == (
        "block_high: scraper: 40 pages a second"
    )
    [ja4] = report.enforcer_decisions
    assert (ja4.target, ja4.ttl_s, ja4.action) == (f"{JA4}@192.0.2.0/24", 380.0, Action.BLOCK_FLOW)
    # Removals come before writes: the live throttle, which the stale block's
    # unblock took with it, is back.
    removals = [c for c in maps.calls if c.startswith("remove")]
    assert maps.calls[: len(removals)] == removals
    assert "remove THROTTLE 192.0.2.30" in removals
    assert len(maps.calls) == len(removals) + 6

    # Reconciling again changes nothing but the TTLs.
    clock.now = T0 + 25
    again = reconcile(store, maps)  # type: ignore[arg-type]
    assert (again.written, again.removed, again.by_enforcer) == (6, 0, 1)
    assert {k for k in maps.entries} == {
        kernel_key(r.decision) for r in store.live_decisions() if kernel_key(r.decision)
    }


def test_reconcile_skips_a_decision_that_runs_out_while_it_works(
    store: Store, clock: Clock
) -> None:
    store.record_decision(decision(ttl=10), source="engine", actor="engine")
    maps = RecordingVerdictMaps(clock)

    def listing_takes_a_while() -> list[VerdictEntry]:
        clock.now += 11  # a huge map, a slow machine
        return []

    maps.list = listing_takes_a_while  # type: ignore[method-assign]
    report = reconcile(store, maps)  # type: ignore[arg-type]
    assert (report.written, report.skipped_expired) == (0, 1)
    assert maps.entries == {}


def test_reconcile_leaves_in_place_what_the_policy_allows(store: Store, clock: Clock) -> None:
    # The policy's allow list is in no decision of the store; removing it and
    # writing it back after would leave a gap in which its addresses meet
    # whatever block covers them.
    maps = RecordingVerdictMaps(clock)
    maps.allow("10.9.0.0/16", 500, "policy allow list")
    maps.allow("10.8.0.0/16", 500, "an allow the policy no longer has")
    policy_allow = decision(Action.ALLOW, TargetKind.CIDR, "10.9.0.0/16")
    report = reconcile(store, maps, keep=[policy_allow])  # type: ignore[arg-type]
    assert report.removed == 1
    assert set(maps.entries) == {(VerdictKind.ALLOW_CIDR, "10.9.0.0/16")}
    assert not any("10.9.0.0/16" in call for call in maps.calls if call.startswith("remove"))


def test_kernel_key_per_action_and_target() -> None:
    assert kernel_key(decision(Action.ALLOW, TargetKind.CIDR, "10.0.0.0/8")) == (
        VerdictKind.ALLOW_CIDR,
        "10.0.0.0/8",
    )
    assert kernel_key(decision(Action.TARPIT)) == (VerdictKind.TARPIT, "192.0.2.10")
    assert kernel_key(decision(Action.BLOCK_FLOW, TargetKind.FLOW, FLOW)) == (
        VerdictKind.BLOCK_FLOW,
        FLOW,
    )
    assert kernel_key(decision(Action.BLOCK, TargetKind.JA4, JA4)) is None
    assert kernel_key(decision(Action.MONITOR)) is None


@pytest.mark.kernel
def test_reconcile_against_the_real_maps(tmp_path: Path) -> None:
    """Pinned maps of a real sensor after a 'restart': stale, revoked and
    expired entries go, live ones are there with the TTL they have left."""
    clock = Clock(time.time() - 50)  # decisions made 50 s ago
    with Store(tmp_path / DB_NAME, clock=clock) as store, loaded_sensor() as kernel:
        ids = seed_store(store)
        verdicts = kernel.verdicts
        verdicts.block("203.0.113.99", 500, "old run")
        verdicts.block("192.0.2.70", 500, "revoked while we were down")
        verdicts.block("192.0.2.80", 500, "expired while we were down")
        verdicts.block("192.0.2.30", 500, "stale block beside the live throttle")
        verdicts.allow("10.9.0.0/16", 500, "old allow")
        # Hello keys and exemptions stand for JA4 verdicts: the Enforcer keeps them.
        verdicts.block_hello(0xC0FFEE, 500, "JA4 t13d_x: blocked")
        verdicts.exempt_hello("192.0.2.200", 500, "spared")
        enforcer_owned = {(VerdictKind.BLOCK_HELLO, "hello:0000000000c0ffee"),
                          (VerdictKind.HELLO_EXEMPT, "192.0.2.200")}  # fmt: skip

        clock.now = time.time()
        report = reconcile(store, verdicts)
        now = time.time()
        assert (report.written, report.removed, report.by_enforcer) == (6, 5, 1)

        listed = {(e.kind, e.target): e for e in verdicts.list()}
        live = {r.id: r for r in store.live_decisions()}
        expected = {
            key: live[ids[name]].remaining_s(now)
            for name in ("block", "cidr", "allow", "throttle", "tarpit", "flow")
            if (key := kernel_key(live[ids[name]].decision)) is not None
        }
        assert len(expected) == 6
        assert set(listed) == set(expected) | enforcer_owned
        for key, remaining in expected.items():
            assert listed[key].expires_in_s == pytest.approx(remaining, abs=1.0), key
        assert listed[(VerdictKind.THROTTLE, "192.0.2.30")].detail == {
            "connections_per_s": 2.0,
            "packets_per_s": 100.0,
        }
        assert listed[(VerdictKind.TARPIT, "192.0.2.40")].detail == {"syns_to_drop": 3.0}
        assert listed[(VerdictKind.BLOCK, "192.0.2.10")].reason == (
            "block_high: scraper: 40 pages a second"
        )


def test_a_label_and_what_it_undoes_are_one_transaction(store: Store) -> None:
    blocked = store.record_decision(decision(), source="engine", actor="engine")
    label, revoked, allowed = store.add_label_with_effects(
        "addr", "192.0.2.10", "human", "api:alice",
        revoke=lambda subject: [blocked.id] if subject == "192.0.2.10" else [],
        allow=lambda subject: decision(Action.ALLOW, target=subject, ttl=900.0),
        revoke_reason="feedback: labelled human",
    )  # fmt: skip
    assert (label.subject, label.label) == ("192.0.2.10", "human")
    assert [r.id for r in revoked] == [blocked.id] and revoked[0].revoked_by == "api:alice"
    assert allowed is not None and allowed.source == "feedback"
    assert [r.decision.action for r in store.live_decisions()] == [Action.ALLOW]
    assert [a.action for a in store.audit_log()][:3] == [
        "decision.create", "decision.revoke", "label.add",
    ]  # fmt: skip

    # One part failing (a decision that does not exist) leaves none of it.
    with pytest.raises(DecisionNotFound):
        store.add_label_with_effects(
            "addr", "192.0.2.11", "human", "api:alice",
            revoke=lambda _subject: ["no-such-decision"],
            allow=lambda subject: decision(Action.ALLOW, target=subject, ttl=900.0),
        )  # fmt: skip
    assert [lb.subject for lb in store.labels()] == ["192.0.2.10"]
    assert [r.decision.target for r in store.live_decisions()] == ["192.0.2.10"]
