"""The agent's durable state: decisions with their audit trail, labels, client
snapshots, the model registry and policy history, in one SQLite file.

    StoreError (a BotwallError)      the database cannot be opened or written
    ├── DecisionNotFound (KeyError)  no decision with that id
    └── ModelNotFound (KeyError)     no model with that version

Bad input (an unknown label, an address that is not one, a NaN feature) is a
ValueError that names the bad value, raised before anything is written.

Durability: the file is in WAL mode with synchronous=FULL, every write is one
explicit transaction, and every change an operator may have to account for
(a decision made or revoked, a label, a model promotion, a policy) writes its
audit row inside that same transaction: either both are on disk or neither
is. A method that returned has committed; killing the agent with SIGKILL at
any later moment loses none of it (tests/test_store_crash.py).

One exception to the fsync: the engine's own decisions (record_decisions with
wait_for_disk=False) commit with synchronous=NORMAL. They still survive a
killed agent, but not a power cut; neither does the verdict they put in the
kernel, whose maps live in memory. The fsync sat on the path from a bot's
request to its verdict: 2.2 ms of a 3 ms decision in the lab, under load.

The kernel maps are a cache of the live decisions, never the other way round:
on start, `reconcile` rewrites every live decision into the maps with the TTL
it has left and removes every kernel entry no live decision stands behind.

Times in the store are wall-clock epoch seconds (time.time()), because they
must mean the same after a reboot; Decision.ts stays in the sensor's clock
and is kept as it came, for the audit trail only.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from controlplane.decisions import Action, Decision, TargetKind
from controlplane.enforce import Enforcer, is_by_source
from sensor.abi import VerdictKind
from sensor.errors import BotwallError
from sensor.events import Flow
from sensor.verdicts import VerdictMaps

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DB_NAME: Final = "botwall.db"  # the store's file inside the state dir
SCHEMA_VERSION: Final = 1

SOURCES: Final = ("engine", "manual", "feedback")
LABELS: Final = ("bot", "human", "good_bot")
SUBJECT_KINDS: Final = ("addr", "cidr", "ja4", "cluster")
MODEL_STATUSES: Final = ("candidate", "live", "retired")

# A TTL must stay a finite number of nanoseconds in the kernel's u64 expiry;
# ten years is far beyond any verdict anyone means and far below the limit.
MAX_TTL_S: Final = 10 * 365 * 86400.0
MAX_TEXT: Final = 1000  # reasons, notes, actors: one line, not a document
# Another process (the CLI next to a running agent) holds the write lock for
# one short transaction at most; wait for it instead of failing.
BUSY_TIMEOUT_S: Final = 10.0
# Every commit fsyncs the WAL, except those that ask not to wait for the disk.
_SYNCHRONOUS: Final = "FULL"

# JA4: a 10-character prefix (transport, version, SNI, counts, ALPN) and two
# 12-hex-digit hashes. A JA4 target may be scoped to a source: "<ja4>@<addr or CIDR>".
_JA4 = re.compile(r"[A-Za-z0-9]{10}_[0-9a-f]{12}_[0-9a-f]{12}")
_MODEL_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")

# Which targets each action can be enforced on. The kernel never sees a JA4:
# a JA4 block becomes hello keys and flow blocks, and an allow, throttle or
# tarpit on a JA4 (like a throttle or tarpit on a CIDR, whose buckets the
# kernel keys by address only) becomes address verdicts as addresses show
# themselves (enforce.is_by_source). A flow can only be blocked.
_TARGETS_OF: Final[dict[Action, frozenset[TargetKind]]] = {
    Action.ALLOW: frozenset({TargetKind.ADDRESS, TargetKind.CIDR, TargetKind.JA4}),
    Action.MONITOR: frozenset(TargetKind),
    Action.THROTTLE: frozenset({TargetKind.ADDRESS, TargetKind.CIDR, TargetKind.JA4}),
    Action.TARPIT: frozenset({TargetKind.ADDRESS, TargetKind.CIDR, TargetKind.JA4}),
    Action.BLOCK: frozenset({TargetKind.ADDRESS, TargetKind.CIDR, TargetKind.JA4}),
    Action.BLOCK_FLOW: frozenset({TargetKind.FLOW, TargetKind.JA4}),
}
_NOUNS: Final = {
    TargetKind.ADDRESS: "an address",
    TargetKind.CIDR: "a CIDR",
    TargetKind.JA4: "a JA4",
    TargetKind.FLOW: "a flow",
}


# ---- errors ----


class StoreError(BotwallError):
    """The database cannot be opened, migrated or written."""


class DecisionNotFound(StoreError, KeyError):
    """No decision has this id."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "decision not found"


class ModelNotFound(StoreError, KeyError):
    """No registered model has this version."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


# ---- records ----


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A stored decision: the Decision as it was made, and its life in the store."""

    id: str
    decision: Decision  # target in canonical form (see canonical_target)
    source: str  # "engine" | "manual" | "feedback"
    actor: str  # "engine", "api:<token-id>", "cli"
    created_at: str  # ISO 8601, UTC
    created_epoch: float
    expires_at: float  # created_epoch + ttl_s
    revoked_at: float | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None

    def remaining_s(self, now: float) -> float:
        return self.expires_at - now

    def is_live(self, now: float) -> bool:
        """Enforced right now: not revoked, not expired, not shadow."""
        return self.revoked_at is None and not self.decision.shadow and self.expires_at > now

    def with_remaining_ttl(self, now: float) -> Decision:
        """The decision as it must be (re)applied at `now`: same verdict, the TTL it has left."""
        return replace(self.decision, ttl_s=self.remaining_s(now))

    def as_dict(self) -> dict[str, Any]:
        """Flat and JSON-ready, for the API and the CLI."""
        d = self.decision
        return {
            "id": self.id,
            "action": d.action.value,
            "target_kind": d.target_kind.value,
            "target": d.target,
            "ttl_s": d.ttl_s,
            "reason": d.reason,
            "rule": d.rule,
            "score": d.score,
            "model_versions": dict(d.model_versions),
            "shadow": d.shadow,
            "throttle_connections_per_s": d.throttle_connections_per_s,
            "throttle_packets_per_s": d.throttle_packets_per_s,
            "tarpit_syns": d.tarpit_syns,
            "decided_ts": d.ts,
            "source": self.source,
            "actor": self.actor,
            "created_at": self.created_at,
            "created_epoch": self.created_epoch,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int  # append order
    ts: float
    at: str  # ISO 8601, UTC
    actor: str
    action: str  # "decision.create", "decision.revoke", "label.add", "model.status", ...
    subject: str  # "decision:<id>", "addr:10.0.0.1", "model:<version>", "policy"
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LabelRecord:
    id: int
    ts: float
    at: str
    subject_kind: str
    subject: str  # canonical: a normalised address or network, a JA4, a cluster key
    label: str
    actor: str
    note: str | None
    features: dict[str, float] | None  # what the client looked like when labelled


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """What the engine knew of one client at one moment."""

    id: int
    addr: str
    ts: float
    risk_score: float
    reasons: list[dict[str, Any]]
    features: dict[str, float]
    fingerprints: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelRecord:
    kind: str
    version: str
    path: Path  # absolute; stored relative to the state dir
    metrics: dict[str, Any]
    status: str  # "candidate" | "live" | "retired"
    comparison: dict[str, Any] | None  # the shadow comparison against the live model
    registered_at: float
    registered_by: str
    status_changed_at: float
    status_changed_by: str


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    id: int
    ts: float
    at: str
    actor: str
    sha256: str
    text: str


# ---- schema ----

# One entry per schema version: the statements that take a database from the
# version before to this one. Never edit a released entry; add the next.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE decisions (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            created_epoch REAL NOT NULL,
            expires_at REAL NOT NULL,
            decided_ts REAL NOT NULL,
            action TEXT NOT NULL CHECK (action IN
                ('allow', 'monitor', 'throttle', 'tarpit', 'block', 'block_flow')),
            target_kind TEXT NOT NULL CHECK (target_kind IN ('addr', 'cidr', 'ja4', 'flow')),
            target TEXT NOT NULL,
            ttl_s REAL NOT NULL CHECK (ttl_s > 0),
            reason TEXT NOT NULL,
            rule TEXT NOT NULL,
            score REAL NOT NULL,
            model_versions TEXT NOT NULL,
            shadow INTEGER NOT NULL CHECK (shadow IN (0, 1)),
            throttle_connections_per_s REAL NOT NULL,
            throttle_packets_per_s REAL NOT NULL,
            tarpit_syns INTEGER NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('engine', 'manual', 'feedback')),
            actor TEXT NOT NULL,
            revoked_at REAL,
            revoked_by TEXT,
            revoke_reason TEXT,
            CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
        )""",
        # What reconcile and the engine ask on every start: the live ones.
        """CREATE INDEX decisions_live ON decisions (expires_at)
            WHERE revoked_at IS NULL AND shadow = 0""",
        "CREATE INDEX decisions_target ON decisions (target, seq)",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            details TEXT NOT NULL
        )""",
        "CREATE INDEX audit_subject ON audit (subject, seq)",
        # Append-only is the database's rule, not only this module's habit.
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
        """CREATE TABLE labels (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            at TEXT NOT NULL,
            subject_kind TEXT NOT NULL CHECK (subject_kind IN ('addr', 'cidr', 'ja4', 'cluster')),
            subject TEXT NOT NULL,
            label TEXT NOT NULL CHECK (label IN ('bot', 'human', 'good_bot')),
            actor TEXT NOT NULL,
            note TEXT,
            features TEXT
        )""",
        "CREATE INDEX labels_ts ON labels (ts)",
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY,
            addr TEXT NOT NULL,
            ts REAL NOT NULL,
            risk_score REAL NOT NULL,
            reasons TEXT NOT NULL,
            features TEXT NOT NULL,
            fingerprints TEXT NOT NULL
        )""",
        "CREATE INDEX snapshots_addr ON snapshots (addr, ts)",
        "CREATE INDEX snapshots_ts ON snapshots (ts)",
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            version TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL,
            metrics TEXT NOT NULL,
            comparison TEXT,
            status TEXT NOT NULL CHECK (status IN ('candidate', 'live', 'retired')),
            registered_at REAL NOT NULL,
            registered_by TEXT NOT NULL,
            status_changed_at REAL NOT NULL,
            status_changed_by TEXT NOT NULL
        )""",
        # At most one live model of each kind, whatever a caller gets wrong.
        "CREATE UNIQUE INDEX models_one_live ON models (kind) WHERE status = 'live'",
        """CREATE TABLE policies (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            text TEXT NOT NULL
        )""",
    ),
}


# ---- the store ----


class Store:
    """The SQLite store. One connection, one lock: safe from any thread (the
    engine's, the API's threadpool), one writer at a time."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        """path: the database file (its directory is the state dir, created 0700).
        clock: wall-clock seconds; tests pass their own."""
        self.path = Path(path)
        self.state_dir = self.path.parent
        self.clock = clock
        self._lock = threading.RLock()
        _prepare_files(self.path)
        try:
            # isolation_level=None: the sqlite3 module opens no transaction
            # behind our back; every write says BEGIN IMMEDIATE itself.
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,  # the lock below serialises every use
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn: sqlite3.Connection | None = conn
        try:
            self._configure(conn)
            self._migrate()
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # In WAL mode, NORMAL already survives a killed process (a commit
            # is in the OS's page cache before COMMIT returns); FULL also
            # fsyncs the WAL on every commit, so a decision the API answered
            # 201 for survives a power cut too. One fsync per decision is
            # cheap next to how rarely decisions are made.
            conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")
            # No table has a foreign key yet; on now, so the first migration
            # that adds one is enforced from its first row.
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a botwall store: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"{self.path}: SQLite refused WAL mode (journal_mode={mode}); "
                "put the state dir on a local filesystem"
            )

    def _migrate(self) -> None:
        with self._transaction() as tx:
            found = _schema_version(tx, self.path)
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: database schema version {found} is newer than this "
                    f"botwall supports (schema version {SCHEMA_VERSION}); run a newer "
                    "botwall, or point it at another state dir"
                )
            if found == 0:
                tx.execute(
                    "CREATE TABLE schema_version ("
                    "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, _iso(self.clock())),
                )

    # ---- connection plumbing ----

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, wait_for_disk: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (any
        exception rolls back, then propagates). wait_for_disk=False commits
        without the fsync (see the module's docstring)."""
        with self._lock:
            conn = self._connection()
            try:
                if not wait_for_disk:
                    conn.execute("PRAGMA synchronous=NORMAL")
                # IMMEDIATE takes the write lock now, so a transaction never
                # fails half-way for a lock another process took meanwhile.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot start a transaction: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.path}: write failed: {exc}") from exc
                raise
            finally:
                if not wait_for_disk:
                    conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: read failed: {exc}") from exc

    def _write_audit(
        self,
        tx: sqlite3.Connection,
        ts: float,
        actor: str,
        action: str,
        subject: str,
        details: Mapping[str, Any],
    ) -> int:
        """The audit row of a change, inside the change's own transaction."""
        cursor = tx.execute(
            "INSERT INTO audit (ts, at, actor, action, subject, details) VALUES (?, ?, ?, ?, ?, ?)",
            (ts, _iso(ts), actor, action, subject, _json(dict(details), "audit details")),
        )
        return int(cursor.lastrowid or 0)

    # ---- health ----

    def schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) FROM schema_version")[0][0])

    def pragmas(self) -> dict[str, Any]:
        """The settings durability rests on, as this connection has them."""
        return {
            "journal_mode": str(self._query("PRAGMA journal_mode")[0][0]),
            "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                int(self._query("PRAGMA synchronous")[0][0]), "?"
            ),
            "foreign_keys": bool(self._query("PRAGMA foreign_keys")[0][0]),
        }

    def integrity_check(self) -> str:
        """'ok', or SQLite's description of what is damaged."""
        return "\n".join(str(row[0]) for row in self._query("PRAGMA integrity_check"))

    # ---- decisions ----

    def record_decision(self, decision: Decision, *, source: str, actor: str) -> DecisionRecord:
        """Stores a decision (target canonicalised) with its audit row; returns it with its id.

        Raises ValueError, before writing anything, for a decision that could
        not be enforced as stated (see _TARGETS_OF) or a bad source or actor."""
        return self.record_decisions([decision], source=source, actor=actor)[0]

    def record_decisions(
        self,
        decisions: Sequence[Decision],
        *,
        source: str,
        actor: str,
        wait_for_disk: bool = True,
    ) -> list[DecisionRecord]:
        """Many decisions in one transaction (one fsync for an engine tick's
        worth, none with wait_for_disk=False: see the module's docstring);
        all are checked before any is written."""
        checked = [_checked_decision(d) for d in decisions]
        _check_choice("source", source, SOURCES)
        actor = _checked_text("actor", actor)
        now = self.clock()
        records = [self._new_record(decision, source, actor, now) for decision in checked]
        with self._transaction(wait_for_disk) as tx:
            for record in records:
                self._insert_decision(tx, now, record)
        return records

    def _new_record(
        self, decision: Decision, source: str, actor: str, now: float
    ) -> DecisionRecord:
        return DecisionRecord(
            id=str(uuid.uuid4()),
            decision=decision,
            source=source,
            actor=actor,
            created_at=_iso(now),
            created_epoch=now,
            expires_at=now + decision.ttl_s,
        )

    def _insert_decision(self, tx: sqlite3.Connection, now: float, record: DecisionRecord) -> None:
        row = _decision_row(record)
        tx.execute(
            f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
        d = record.decision
        self._write_audit(
            tx,
            now,
            record.actor,
            "decision.create",
            f"decision:{record.id}",
            {
                "action": d.action.value,
                "target_kind": d.target_kind.value,
                "target": d.target,
                "ttl_s": d.ttl_s,
                "reason": d.reason,
                "rule": d.rule,
                "score": d.score,
                "model_versions": dict(d.model_versions),
                "shadow": d.shadow,
                "source": record.source,
            },
        )

    def get_decision(self, decision_id: str) -> DecisionRecord:
        rows = self._query("SELECT * FROM decisions WHERE id = ?", (str(decision_id),))
        if not rows:
            raise DecisionNotFound(f"no decision with id {decision_id!r}")
        return _decision_from_row(rows[0])

    def live_decisions(self, now: float | None = None) -> list[DecisionRecord]:
        """Decisions in force at `now`: not revoked, not expired, not shadow; oldest first."""
        now = self.clock() if now is None else now
        rows = self._query(
            "SELECT * FROM decisions WHERE revoked_at IS NULL AND shadow = 0 "
            "AND expires_at > ? ORDER BY seq",
            (now,),
        )
        return [_decision_from_row(row) for row in rows]

    def list_decisions(
        self,
        limit: int = 100,
        offset: int = 0,
        target: str | None = None,
        include_expired: bool = False,
        include_revoked: bool = False,
        now: float | None = None,
    ) -> list[DecisionRecord]:
        """Newest first. By default only the unexpired, unrevoked ones (shadow
        decisions included: they are records too)."""
        _check_page(limit, offset)
        now = self.clock() if now is None else now
        where, params = list[str](), list[Any]()
        if target is not None:
            where.append("target = ?")
            params.append(canonical_target_any(target))
        if not include_expired:
            where.append("expires_at > ?")
            params.append(now)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(
            f"SELECT * FROM decisions {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_decision_from_row(row) for row in rows]

    def revoke_decision(self, decision_id: str, actor: str, reason: str) -> DecisionRecord:
        """Ends a decision now (a soft delete: the record and its audit stay).
        Revoking a revoked decision changes nothing and returns it as it is."""
        actor = _checked_text("actor", actor)
        reason = _checked_text("reason", reason)
        now = self.clock()
        with self._transaction() as tx:
            return self._revoke(tx, now, decision_id, actor, reason)

    def _revoke(
        self, tx: sqlite3.Connection, now: float, decision_id: str, actor: str, reason: str
    ) -> DecisionRecord:
        row = tx.execute("SELECT * FROM decisions WHERE id = ?", (str(decision_id),)).fetchone()
        if row is None:
            raise DecisionNotFound(f"no decision with id {decision_id!r}")
        record = _decision_from_row(row)
        if record.revoked_at is not None:
            return record
        tx.execute(
            "UPDATE decisions SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ?",
            (now, actor, reason, record.id),
        )
        self._write_audit(
            tx,
            now,
            actor,
            "decision.revoke",
            f"decision:{record.id}",
            {"target": record.decision.target, "reason": reason},
        )
        return replace(record, revoked_at=now, revoked_by=actor, revoke_reason=reason)

    # ---- audit ----

    def audit(
        self, actor: str, action: str, subject: str, details: Mapping[str, Any] | None = None
    ) -> AuditRecord:
        """Appends one audit row of its own (for changes that live outside the
        store: an attach, a detach, a token issued)."""
        actor = _checked_text("actor", actor)
        action = _checked_text("audit action", action)
        subject = _checked_text("audit subject", subject)
        details = dict(details or {})
        now = self.clock()
        with self._transaction() as tx:
            seq = self._write_audit(tx, now, actor, action, subject, details)
        return AuditRecord(seq, now, _iso(now), actor, action, subject, details)

    def audit_log(self, limit: int = 100, subject: str | None = None) -> list[AuditRecord]:
        """Newest first."""
        _check_page(limit, 0)
        if subject is None:
            rows = self._query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._query(
                "SELECT * FROM audit WHERE subject = ? ORDER BY seq DESC LIMIT ?",
                (subject, limit),
            )
        return [
            AuditRecord(
                seq=row["seq"],
                ts=row["ts"],
                at=row["at"],
                actor=row["actor"],
                action=row["action"],
                subject=row["subject"],
                details=json.loads(row["details"]),
            )
            for row in rows
        ]

    # ---- labels ----

    def add_label(
        self,
        subject_kind: str,
        subject: str,
        label: str,
        actor: str,
        note: str | None = None,
        features: Mapping[str, float] | None = None,
    ) -> LabelRecord:
        _check_choice("subject kind", subject_kind, SUBJECT_KINDS)
        _check_choice("label", label, LABELS)
        subject = canonical_subject(subject_kind, subject)
        actor = _checked_text("actor", actor)
        if note is not None:
            note = _checked_text("note", note, allow_empty=True)
        checked = _checked_features(features) if features is not None else None
        now = self.clock()
        with self._transaction() as tx:
            return self._insert_label(tx, now, subject_kind, subject, label, actor, note, checked)

    def add_label_with_effects(
        self,
        subject_kind: str,
        subject: str,
        label: str,
        actor: str,
        note: str | None = None,
        features: Mapping[str, float] | None = None,
        *,
        revoke: Callable[[str], Sequence[str]] = lambda _subject: (),
        allow: Callable[[str], Decision | None] = lambda _subject: None,
        revoke_reason: str = "feedback",
    ) -> tuple[LabelRecord, list[DecisionRecord], DecisionRecord | None]:
        """A label and what it undoes, in one transaction: the decisions
        revoke(canonical subject) names are revoked and the decision
        allow(canonical subject) returns is recorded (source "feedback"). A
        crash leaves all of it or none. Returns (label, revoked, allow)."""
        _check_choice("subject kind", subject_kind, SUBJECT_KINDS)
        _check_choice("label", label, LABELS)
        subject = canonical_subject(subject_kind, subject)
        actor = _checked_text("actor", actor)
        revoke_reason = _checked_text("reason", revoke_reason)
        if note is not None:
            note = _checked_text("note", note, allow_empty=True)
        checked = _checked_features(features) if features is not None else None
        wanted = allow(subject)
        allowed = None if wanted is None else _checked_decision(wanted)
        ids = list(revoke(subject))
        now = self.clock()
        with self._transaction() as tx:
            record = self._insert_label(tx, now, subject_kind, subject, label, actor, note, checked)
            revoked = [self._revoke(tx, now, i, actor, revoke_reason) for i in ids]
            made = None
            if allowed is not None:
                made = self._new_record(allowed, "feedback", actor, now)
                self._insert_decision(tx, now, made)
        return record, revoked, made

    def _insert_label(
        self,
        tx: sqlite3.Connection,
        now: float,
        subject_kind: str,
        subject: str,
        label: str,
        actor: str,
        note: str | None,
        checked: dict[str, float] | None,
    ) -> LabelRecord:
        cursor = tx.execute(
            "INSERT INTO labels (ts, at, subject_kind, subject, label, actor, note, features)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now,
                _iso(now),
                subject_kind,
                subject,
                label,
                actor,
                note,
                None if checked is None else _json(checked, "features"),
            ),
        )
        label_id = int(cursor.lastrowid or 0)
        self._write_audit(
            tx,
            now,
            actor,
            "label.add",
            f"{subject_kind}:{subject}",
            {"label_id": label_id, "label": label, "note": note},
        )
        return LabelRecord(
            label_id, now, _iso(now), subject_kind, subject, label, actor, note, checked
        )

    def labels(self, since: float | None = None, limit: int | None = None) -> list[LabelRecord]:
        """Oldest first (the order a learner replays them in); since: epoch seconds."""
        sql, params = "SELECT * FROM labels", list[Any]()
        if since is not None:
            sql += " WHERE ts >= ?"
            params.append(_checked_number("since", since))
        sql += " ORDER BY id"
        if limit is not None:
            _check_page(limit, 0)
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._query(sql, params)
        return [
            LabelRecord(
                id=row["id"],
                ts=row["ts"],
                at=row["at"],
                subject_kind=row["subject_kind"],
                subject=row["subject"],
                label=row["label"],
                actor=row["actor"],
                note=row["note"],
                features=None if row["features"] is None else json.loads(row["features"]),
            )
            for row in rows
        ]

    # ---- client snapshots ----

    def save_snapshot(
        self,
        addr: str | IPAddress,
        risk_score: float,
        reasons: Sequence[Mapping[str, Any]],
        features: Mapping[str, float],
        fingerprints: Mapping[str, Any],
        ts: float | None = None,
    ) -> SnapshotRecord:
        """One client's state; ts: epoch seconds (now by default)."""
        return self.save_snapshots([(addr, risk_score, reasons, features, fingerprints, ts)])[0]

    def save_snapshots(
        self,
        snapshots: Sequence[
            tuple[
                str | IPAddress,
                float,
                Sequence[Mapping[str, Any]],
                Mapping[str, float],
                Mapping[str, Any],
                float | None,
            ]
        ],
    ) -> list[SnapshotRecord]:
        """Many snapshots in one transaction (one fsync for a whole engine tick).
        Each: (addr, risk_score, reasons, features, fingerprints, ts or None)."""
        now = self.clock()
        checked = []
        for addr, risk_score, reasons, features, fingerprints, ts in snapshots:
            address = str(canonical_address(addr))
            score = _checked_number("risk score", risk_score)
            reason_list = [dict(r) for r in reasons]
            feature_map = _checked_features(features)
            fingerprint_map = dict(fingerprints)
            when = now if ts is None else _checked_number("snapshot ts", ts)
            row = (
                address,
                when,
                score,
                _json(reason_list, "reasons"),
                _json(feature_map, "features"),
                _json(fingerprint_map, "fingerprints"),
            )
            checked.append((row, reason_list, feature_map, fingerprint_map))
        records = []
        with self._transaction() as tx:
            for row, reason_list, feature_map, fingerprint_map in checked:
                cursor = tx.execute(
                    "INSERT INTO snapshots (addr, ts, risk_score, reasons, features, fingerprints)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
                records.append(
                    SnapshotRecord(
                        int(cursor.lastrowid or 0),
                        row[0],
                        row[1],
                        row[2],
                        reason_list,
                        feature_map,
                        fingerprint_map,
                    )
                )
        return records

    def latest_snapshot(self, addr: str | IPAddress) -> SnapshotRecord | None:
        rows = self._query(
            "SELECT * FROM snapshots WHERE addr = ? ORDER BY ts DESC, id DESC LIMIT 1",
            (str(canonical_address(addr)),),
        )
        if not rows:
            return None
        row = rows[0]
        return SnapshotRecord(
            id=row["id"],
            addr=row["addr"],
            ts=row["ts"],
            risk_score=row["risk_score"],
            reasons=json.loads(row["reasons"]),
            features=json.loads(row["features"]),
            fingerprints=json.loads(row["fingerprints"]),
        )

    def prune_snapshots(self, older_than_s: float, now: float | None = None) -> int:
        """Deletes snapshots older than older_than_s; returns how many went."""
        older_than_s = _checked_number("older_than_s", older_than_s)
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
        cutoff = (self.clock() if now is None else now) - older_than_s
        with self._transaction() as tx:
            return tx.execute("DELETE FROM snapshots WHERE ts < ?", (cutoff,)).rowcount

    # ---- model registry ----

    def register_model(
        self,
        kind: str,
        version: str,
        path: str | os.PathLike[str],
        metrics: Mapping[str, Any],
        status: str = "candidate",
        *,
        actor: str = "engine",
        comparison: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Registers a saved model file (which must exist under the state dir),
        with its shadow comparison if it already has one. Registering it as
        live retires the kind's live model in the same transaction."""
        if not isinstance(kind, str) or not _MODEL_KIND.fullmatch(kind):
            raise ValueError(f"model kind must be a lower-case name, got {kind!r}")
        version = _checked_text("model version", version)
        _check_choice("model status", status, MODEL_STATUSES)
        actor = _checked_text("actor", actor)
        relative = self._relative_model_path(Path(path))
        metrics_json = _json(dict(metrics), "metrics")
        comparison_json = None if comparison is None else _json(dict(comparison), "comparison")
        now = self.clock()
        with self._transaction() as tx:
            if tx.execute("SELECT 1 FROM models WHERE version = ?", (version,)).fetchone():
                raise ValueError(f"model version {version!r} is already registered")
            replaced = self._retire_live(tx, kind, now, actor) if status == "live" else None
            tx.execute(
                "INSERT INTO models (kind, version, path, metrics, comparison, status, "
                "registered_at, registered_by, status_changed_at, status_changed_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    version,
                    str(relative),
                    metrics_json,
                    comparison_json,
                    status,
                    now,
                    actor,
                    now,
                    actor,
                ),
            )
            self._write_audit(
                tx,
                now,
                actor,
                "model.register",
                f"model:{version}",
                {"kind": kind, "status": status, "path": str(relative), "replaced": replaced},
            )
        return self.get_model(version)

    def _relative_model_path(self, path: Path) -> Path:
        state = self.state_dir.resolve()
        full = (path if path.is_absolute() else state / path).resolve()
        if not full.is_relative_to(state):
            raise ValueError(f"model file {path} is not under the state dir {state}")
        if not full.is_file():
            raise ValueError(f"model file {full} does not exist")
        return full.relative_to(state)

    def _retire_live(self, tx: sqlite3.Connection, kind: str, now: float, actor: str) -> str | None:
        """Retires the live model of a kind, if any; returns its version."""
        row = tx.execute(
            "SELECT version FROM models WHERE kind = ? AND status = 'live'", (kind,)
        ).fetchone()
        if row is None:
            return None
        tx.execute(
            "UPDATE models SET status = 'retired', status_changed_at = ?, status_changed_by = ? "
            "WHERE version = ?",
            (now, actor, row[0]),
        )
        self._write_audit(
            tx,
            now,
            actor,
            "model.status",
            f"model:{row[0]}",
            {"kind": kind, "from": "live", "to": "retired", "replaced_by_promotion": True},
        )
        return str(row[0])

    def set_model_status(
        self,
        version: str,
        status: str,
        actor: str,
        comparison: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Promotes (live: the kind's live model is retired in the same
        transaction), retires, or updates a candidate's shadow comparison.
        A model never goes back to candidate once it was live or retired."""
        _check_choice("model status", status, MODEL_STATUSES)
        actor = _checked_text("actor", actor)
        comparison_json = None if comparison is None else _json(dict(comparison), "comparison")
        now = self.clock()
        with self._transaction() as tx:
            row = tx.execute(
                "SELECT kind, status FROM models WHERE version = ?", (version,)
            ).fetchone()
            if row is None:
                raise ModelNotFound(f"no model with version {version!r}")
            kind, before = str(row[0]), str(row[1])
            if status == "candidate" and before != "candidate":
                raise ValueError(f"model {version} is {before}: it cannot become a candidate again")
            replaced = None
            if status == "live" and before != "live":
                replaced = self._retire_live(tx, kind, now, actor)
            tx.execute(
                "UPDATE models SET status = ?, status_changed_at = ?, status_changed_by = ?, "
                "comparison = COALESCE(?, comparison) WHERE version = ?",
                (status, now, actor, comparison_json, version),
            )
            self._write_audit(
                tx,
                now,
                actor,
                "model.status",
                f"model:{version}",
                {
                    "kind": kind,
                    "from": before,
                    "to": status,
                    "replaced": replaced,
                    "comparison": None if comparison is None else dict(comparison),
                },
            )
        return self.get_model(version)

    def get_model(self, version: str) -> ModelRecord:
        rows = self._query("SELECT * FROM models WHERE version = ?", (version,))
        if not rows:
            raise ModelNotFound(f"no model with version {version!r}")
        return self._model_from_row(rows[0])

    def models(self, kind: str | None = None) -> list[ModelRecord]:
        """Registration order, oldest first."""
        if kind is None:
            rows = self._query("SELECT * FROM models ORDER BY id")
        else:
            rows = self._query("SELECT * FROM models WHERE kind = ? ORDER BY id", (kind,))
        return [self._model_from_row(row) for row in rows]

    def live_model(self, kind: str) -> ModelRecord | None:
        rows = self._query("SELECT * FROM models WHERE kind = ? AND status = 'live'", (kind,))
        return self._model_from_row(rows[0]) if rows else None

    def _model_from_row(self, row: sqlite3.Row) -> ModelRecord:
        return ModelRecord(
            kind=row["kind"],
            version=row["version"],
            path=self.state_dir.resolve() / row["path"],
            metrics=json.loads(row["metrics"]),
            status=row["status"],
            comparison=None if row["comparison"] is None else json.loads(row["comparison"]),
            registered_at=row["registered_at"],
            registered_by=row["registered_by"],
            status_changed_at=row["status_changed_at"],
            status_changed_by=row["status_changed_by"],
        )

    # ---- policy history ----

    def save_policy(self, text: str, actor: str) -> int:
        """Stores a policy's text (validated by the caller) as the current one; returns its id."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a policy text must not be empty")
        actor = _checked_text("actor", actor)
        digest = hashlib.sha256(text.encode()).hexdigest()
        now = self.clock()
        with self._transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO policies (ts, at, actor, sha256, text) VALUES (?, ?, ?, ?, ?)",
                (now, _iso(now), actor, digest, text),
            )
            policy_id = int(cursor.lastrowid or 0)
            self._write_audit(
                tx, now, actor, "policy.save", "policy", {"policy_id": policy_id, "sha256": digest}
            )
        return policy_id

    def current_policy(self) -> str | None:
        rows = self._query("SELECT text FROM policies ORDER BY id DESC LIMIT 1")
        return str(rows[0][0]) if rows else None

    def policy_history(self, limit: int = 20) -> list[PolicyRecord]:
        """Newest first."""
        _check_page(limit, 0)
        rows = self._query("SELECT * FROM policies ORDER BY id DESC LIMIT ?", (limit,))
        return [
            PolicyRecord(row["id"], row["ts"], row["at"], row["actor"], row["sha256"], row["text"])
            for row in rows
        ]


# ---- Decision <-> row: the one place that knows both shapes ----


def _decision_row(record: DecisionRecord) -> dict[str, Any]:
    d = record.decision
    return {
        "id": record.id,
        "created_at": record.created_at,
        "created_epoch": record.created_epoch,
        "expires_at": record.expires_at,
        "decided_ts": d.ts,
        "action": d.action.value,
        "target_kind": d.target_kind.value,
        "target": d.target,
        "ttl_s": d.ttl_s,
        "reason": d.reason,
        "rule": d.rule,
        "score": d.score,
        "model_versions": _json(dict(d.model_versions), "model_versions"),
        "shadow": int(d.shadow),
        "throttle_connections_per_s": d.throttle_connections_per_s,
        "throttle_packets_per_s": d.throttle_packets_per_s,
        "tarpit_syns": d.tarpit_syns,
        "source": record.source,
        "actor": record.actor,
        "revoked_at": record.revoked_at,
        "revoked_by": record.revoked_by,
        "revoke_reason": record.revoke_reason,
    }


def _decision_from_row(row: sqlite3.Row) -> DecisionRecord:
    return DecisionRecord(
        id=row["id"],
        decision=Decision(
            action=Action(row["action"]),
            target_kind=TargetKind(row["target_kind"]),
            target=row["target"],
            ttl_s=row["ttl_s"],
            reason=row["reason"],
            rule=row["rule"],
            score=row["score"],
            model_versions=json.loads(row["model_versions"]),
            shadow=bool(row["shadow"]),
            throttle_connections_per_s=row["throttle_connections_per_s"],
            throttle_packets_per_s=row["throttle_packets_per_s"],
            tarpit_syns=row["tarpit_syns"],
            ts=row["decided_ts"],
        ),
        source=row["source"],
        actor=row["actor"],
        created_at=row["created_at"],
        created_epoch=row["created_epoch"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        revoked_by=row["revoked_by"],
        revoke_reason=row["revoke_reason"],
    )


def _checked_decision(d: Decision) -> Decision:
    """The decision with its enums coerced and its target canonical, or ValueError."""
    action = Action(d.action)
    kind = TargetKind(d.target_kind)
    if kind not in _TARGETS_OF[action]:
        allowed = " or ".join(_NOUNS[k] for k in TargetKind if k in _TARGETS_OF[action])
        raise ValueError(
            f"a {action.value} decision cannot target {_NOUNS[kind]} ({kind.value} "
            f"{d.target!r}), only {allowed}"
        )
    ttl = _checked_number("ttl_s", d.ttl_s)
    if not 0 < ttl <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be > 0 and <= {MAX_TTL_S:.0f} seconds, got {d.ttl_s!r}")
    score = _checked_number("score", d.score)
    if not 0 <= score <= 100:
        raise ValueError(f"score must be 0-100, got {d.score!r}")
    for name in ("throttle_connections_per_s", "throttle_packets_per_s"):
        if _checked_number(name, getattr(d, name)) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(d, name)!r}")
    if (
        action is Action.THROTTLE
        and not d.shadow
        and d.throttle_connections_per_s == 0
        and d.throttle_packets_per_s == 0
    ):
        raise ValueError("a throttle needs throttle_connections_per_s or throttle_packets_per_s")
    if not isinstance(d.tarpit_syns, int) or not 0 <= d.tarpit_syns <= 6:
        raise ValueError(f"tarpit_syns must be 0-6 (0: one), got {d.tarpit_syns!r}")
    versions = d.model_versions
    if not isinstance(versions, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in versions.items()
    ):
        raise ValueError(f"model_versions must map model names to versions, got {versions!r}")
    return replace(
        d,
        action=action,
        target_kind=kind,
        target=canonical_target(kind, d.target),
        ttl_s=ttl,
        score=score,
        reason=_checked_text("reason", d.reason),
        rule=_checked_text("rule", d.rule),
        model_versions=dict(versions),
        ts=_checked_number("ts", d.ts),
    )


# ---- canonical targets: the text VerdictMaps.list() shows for the same entry ----


def canonical_address(value: str | IPAddress) -> IPAddress:
    """An address; an IPv4-mapped IPv6 address becomes the IPv4 it maps (the
    kernel keys both alike and lists it as IPv4)."""
    try:
        addr = (
            value
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
            else ipaddress.ip_address(str(value).strip())
        )
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def canonical_network(value: str | IPNetwork) -> IPNetwork:
    """A network with its host bits cleared: "10.1.2.3/8" is 10.0.0.0/8, as the LPM trie keys it."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {value!r}") from None


def parse_flow(text: str) -> Flow:
    """ "src:port->dst:port" (IPv6 in brackets), the form str(Flow) writes."""
    try:
        left, right = str(text).split("->")
        src_host, _, src_port = left.strip().rpartition(":")
        dst_host, _, dst_port = right.strip().rpartition(":")
        sport, dport = int(src_port), int(dst_port)
    except ValueError:
        raise ValueError(f"not a flow (src:port->dst:port): {text!r}") from None
    if not (0 < sport < 65536 and 0 < dport < 65536):
        raise ValueError(f"not a flow (ports must be 1-65535): {text!r}")
    return Flow(
        canonical_address(src_host.strip("[]")),
        sport,
        canonical_address(dst_host.strip("[]")),
        dport,
    )


def canonical_ja4(text: str) -> str:
    """A JA4 target: the JA4 alone, or scoped "<ja4>@<address or CIDR>"."""
    ja4, at, scope = str(text).strip().partition("@")
    if not _JA4.fullmatch(ja4):
        raise ValueError(f"not a JA4 fingerprint: {ja4!r}")
    if not at:
        return ja4
    return f"{ja4}@{canonical_network(scope) if '/' in scope else canonical_address(scope)}"


def canonical_target(kind: TargetKind, target: str) -> str:
    if kind is TargetKind.ADDRESS:
        return str(canonical_address(target))
    if kind is TargetKind.CIDR:
        return str(canonical_network(target))
    if kind is TargetKind.FLOW:
        return str(parse_flow(target))
    return canonical_ja4(target)


def canonical_target_any(target: str) -> str:
    """The canonical form of a target whose kind is not given (a search filter)."""
    kind = (
        TargetKind.FLOW
        if "->" in target
        else TargetKind.CIDR
        if "/" in target
        else TargetKind.JA4
        if "_" in target
        else TargetKind.ADDRESS
    )
    try:
        return canonical_target(kind, target)
    except ValueError:
        return target.strip()


def canonical_subject(kind: str, subject: str) -> str:
    """A label's subject in canonical form, or ValueError naming it."""
    if kind == "addr":
        return str(canonical_address(subject))
    if kind == "cidr":
        return str(canonical_network(subject))
    if kind == "ja4":
        ja4 = str(subject).strip()
        if not _JA4.fullmatch(ja4):
            raise ValueError(f"not a JA4 fingerprint: {subject!r}")
        return ja4
    return _checked_text("cluster key", subject)


# ---- small checks ----


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None


def _check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _checked_text(what: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {value!r}")
    text = value.strip()
    if not text and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    if len(text) > MAX_TEXT or any(c in text for c in "\r\n\x00"):
        raise ValueError(f"{what} must be one line of at most {MAX_TEXT} characters: {value!r}")
    return text


def _checked_number(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _checked_features(features: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(features, Mapping):
        raise ValueError(f"features must map names to numbers, got {features!r}")
    out = {}
    for name, value in features.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"a feature name must be text, got {name!r}")
        out[name] = _checked_number(f"feature {name}", value)
    return out


def _check_page(limit: int, offset: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0, got {offset!r}")


def _prepare_files(path: Path) -> None:
    """State dir 0700, database 0600: it holds who blocked whom and why."""
    state = path.parent
    if not state.exists():
        state.mkdir(mode=0o700, parents=True)
        state.chmod(0o700)  # mkdir's mode goes through the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the store: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    # SQLite gives the -wal and -shm files the database's mode when it creates
    # them; ones left by an older, looser run are tightened here.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.chmod(0o600)


def _schema_version(tx: sqlite3.Connection, path: Path) -> int:
    tables = {row[0] for row in tx.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        if tables:
            raise StoreError(
                f"{path}: not a botwall store (tables {sorted(tables)} but no schema_version)"
            )
        return 0
    found = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    return int(found or 0)


# ---- reconciliation ----


@dataclass
class ReconcileReport:
    """What reconcile did to the kernel maps."""

    written: int = 0  # kernel entries (re)written from live decisions
    removed: int = 0  # kernel entries no live decision stood behind
    skipped_expired: int = 0  # live decisions whose TTL ran out before their write
    not_enforced: int = 0  # live MONITOR decisions: recorded, never in the kernel
    # Live decisions no kernel map holds as such, with the TTL they have left,
    # for Enforcer.apply: JA4 verdicts (hello keys and flow blocks), and
    # throttles and tarpits on a CIDR (address verdicts, as addresses show up).
    enforcer_decisions: list[Decision] = field(default_factory=list)

    @property
    def by_enforcer(self) -> int:
        return len(self.enforcer_decisions)


KernelKey = tuple[VerdictKind, str]
# Kernel entries no decision names: hello keys and exemptions stand for JA4
# decisions and the policy's spared clients (controlplane/enforce.py).
ENFORCER_KINDS = (VerdictKind.BLOCK_HELLO, VerdictKind.HELLO_EXEMPT)


def kernel_key(decision: Decision) -> KernelKey | None:
    """The one kernel entry a (canonical) decision becomes; None for a JA4, a
    monitor, and a throttle or tarpit on a CIDR, which the Enforcer writes
    per address (enforce.is_by_source)."""
    kind, action = decision.target_kind, decision.action
    if kind is TargetKind.JA4 or action is Action.MONITOR or is_by_source(decision):
        return None
    cidr = kind is TargetKind.CIDR
    verdict_kind = {
        Action.ALLOW: VerdictKind.ALLOW_CIDR if cidr else VerdictKind.ALLOW,
        Action.BLOCK: VerdictKind.BLOCK_CIDR if cidr else VerdictKind.BLOCK,
        Action.BLOCK_FLOW: VerdictKind.BLOCK_FLOW,
        Action.THROTTLE: VerdictKind.THROTTLE,
        Action.TARPIT: VerdictKind.TARPIT,
    }[action]
    return verdict_kind, decision.target


def reconcile(
    store: Store, verdicts: VerdictMaps, now: float | None = None, keep: Iterable[Decision] = ()
) -> ReconcileReport:
    """Makes the kernel's verdict maps hold exactly the store's live decisions.

    keep: decisions that live outside the store (the policy's allow list,
    which the agent writes next): their kernel entries stay as they are,
    rather than go and come back a moment later with a gap in between.

    Kernel entries without a live decision (left by an earlier run, or revoked
    or expired while the agent was down) go first; then every live decision is
    written with the TTL it has left. Going in this order matters: removing a
    stale block on an address also removes that address's throttle and tarpit
    (VerdictMaps.unblock takes all three), and the write puts a live one back
    a moment later.

    Several live decisions on one kernel entry (an engine block under a manual
    one) hold it until the last of them expires: the one expiring last is written.
    Writes go through an Enforcer, so a reconciled entry has exactly the reason
    text and buckets a live one gets."""
    start = store.clock() if now is None else now
    report = ReconcileReport()
    wanted: dict[KernelKey, DecisionRecord] = {}
    for record in store.live_decisions(start):
        if record.decision.action is Action.MONITOR:
            report.not_enforced += 1
            continue
        key = kernel_key(record.decision)
        if key is None:  # the Enforcer's (see ReconcileReport)
            report.enforcer_decisions.append(record.with_remaining_ttl(start))
            continue
        held = wanted.get(key)
        if held is None or record.expires_at > held.expires_at:
            wanted[key] = record

    kept = {key for key in map(kernel_key, keep) if key is not None}
    for entry in verdicts.list():
        if (entry.kind, entry.target) in wanted or (entry.kind, entry.target) in kept:
            continue
        if entry.kind in ENFORCER_KINDS:
            continue  # the Enforcer adopts and corrects these itself
        _remove(verdicts, entry.kind, entry.target)
        report.removed += 1

    writer = Enforcer(verdicts)
    for record in wanted.values():
        # With the store's own clock, each write gets the TTL left at its own
        # moment; a caller's fixed `now` stands for all of them.
        at = store.clock() if now is None else now
        if record.remaining_s(at) <= 0:
            report.skipped_expired += 1
            continue
        writer.apply(record.with_remaining_ttl(at))
        report.written += 1
    return report


def _remove(verdicts: VerdictMaps, kind: VerdictKind, target: str) -> None:
    if kind in (VerdictKind.ALLOW, VerdictKind.ALLOW_CIDR):
        verdicts.disallow(target)
    elif kind is VerdictKind.BLOCK_FLOW:
        verdicts.unblock_flow(parse_flow(target))
    else:
        verdicts.unblock(target)


__all__ = [
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AuditRecord",
    "DecisionNotFound",
    "DecisionRecord",
    "LabelRecord",
    "ModelNotFound",
    "ModelRecord",
    "PolicyRecord",
    "ReconcileReport",
    "SnapshotRecord",
    "Store",
    "StoreError",
    "canonical_target",
    "kernel_key",
    "parse_flow",
    "reconcile",
]
