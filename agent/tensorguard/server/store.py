"""CA state behind a small interface: bootstrap tokens (hashed), issued certificates, audit records.

SQLite is the default backend (WAL, one connection per thread and process, short write
transactions); PostgreSQL can implement the same `CAStore` protocol later. Audit records go through
`AuditSink` so they can also be fed into the Merkle log.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from .tokens import token_ref

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tokens (hash BLOB PRIMARY KEY, node_id TEXT NOT NULL, created REAL NOT NULL,"
    " expires REAL NOT NULL, used_at REAL)",
    "CREATE TABLE IF NOT EXISTS issued (serial TEXT PRIMARY KEY, node_id TEXT NOT NULL, kind TEXT NOT NULL,"
    " not_before REAL NOT NULL, not_after REAL NOT NULL, issued_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS issued_node ON issued (node_id)",
    "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, time REAL NOT NULL, kind TEXT NOT NULL,"
    " node TEXT, reason TEXT, remote TEXT, fields TEXT NOT NULL)",
)

UNKNOWN, USED, EXPIRED = "unknown", "used", "expired"


class RedeemError(Exception):
    """A token that cannot be redeemed; ``code`` is unknown/used/expired, ``reason`` explains."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class IssuedRecord:
    """One issued certificate, for the registry (serial as lowercase hex)."""

    serial: str
    node_id: str
    kind: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry as stored."""

    time: datetime
    kind: str
    node: str | None
    reason: str | None
    remote: str | None
    fields: dict[str, object]


class AuditSink(Protocol):
    """Where identity events go; the SQLite store is one, the Merkle log will be another."""

    def append(self, kind: str, fields: Mapping[str, object]) -> None:
        """Record one event; ``fields`` holds JSON-able values and never a secret."""


class CAStore(AuditSink, Protocol):
    """Everything the CA persists."""

    def add_token(self, digest: bytes, node_id: str, created: datetime, expires: datetime) -> None:
        """Store a new token's hash, bound to ``node_id``."""

    def token_node(self, digest: bytes, now: datetime) -> str:
        """The node of a token that is usable now (nothing is consumed); RedeemError if it is not."""

    def redeem_token(self, digest: bytes, now: datetime) -> str:
        """Atomically mark the token used and return its node id; RedeemError if it cannot be used."""

    def record_issued(self, record: IssuedRecord, audit: tuple[str, Mapping[str, object]],
                      token: bytes | None = None) -> None:
        """In one transaction: consume ``token`` if given (RedeemError, and nothing written, if it is no
        longer usable), add the certificate to the registry and append the audit record."""

    def issued(self, node_id: str | None = None) -> list[IssuedRecord]:
        """Issued certificates, oldest first, optionally for one node."""

    def audit_records(self, kind_prefix: str = "") -> list[AuditRecord]:
        """Audit entries, oldest first, optionally only those whose kind starts with a prefix."""


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


class SQLiteStore:
    """`CAStore` on one SQLite file; safe across threads and worker processes."""

    def __init__(self, path: Path, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"sqlite synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        if not path.exists():  # token hashes and audit data: owner only, and so are -wal/-shm
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self._transaction() as conn:
            for statement in SCHEMA:
                conn.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection in this process (a forked child never reuses its parent's)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # timeout=0: waiting for the write lock is done in _transaction, in short steps; SQLite's
            # own busy handler sleeps 1, 2, 5, 10 ms..., stalling a worker's whole event loop.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _retry(self, action: _Action) -> None:
        """Run ``action`` until it does not fail with 'database is locked', up to the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                action()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError(
                        f"{self.path}: database stayed locked for {self.busy_timeout_ms} ms") from None
                time.sleep(0.0001)

    def _transaction(self) -> _Transaction:
        """A write transaction (BEGIN IMMEDIATE, retried in 0.1 ms steps), committed on success."""
        conn = self._conn()
        self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        return _Transaction(conn)

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def add_token(self, digest: bytes, node_id: str, created: datetime, expires: datetime) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO tokens (hash, node_id, created, expires) VALUES (?, ?, ?, ?)",
                         (digest, node_id, _ts(created), _ts(expires)))

    @staticmethod
    def _token_error(conn: sqlite3.Connection, digest: bytes) -> RedeemError:
        found = conn.execute("SELECT used_at, expires FROM tokens WHERE hash = ?", (digest,)).fetchone()
        ref = token_ref(digest)
        if found is None:
            return RedeemError(UNKNOWN, f"bootstrap token {ref} is not known to this CA")
        if found[0] is not None:
            return RedeemError(USED, f"bootstrap token {ref} was already used at "
                               f"{_dt(found[0]).isoformat()}; tokens are single-use")
        return RedeemError(EXPIRED, f"bootstrap token {ref} expired at {_dt(found[1]).isoformat()}")

    def token_node(self, digest: bytes, now: datetime) -> str:
        conn = self._conn()
        row = conn.execute("SELECT node_id FROM tokens WHERE hash = ? AND used_at IS NULL AND expires > ?",
                           (digest, _ts(now))).fetchone()
        if row is None:
            raise self._token_error(conn, digest)
        return str(row[0])

    def _redeem(self, conn: sqlite3.Connection, digest: bytes, now: datetime) -> str:
        row = conn.execute(
            "UPDATE tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL AND expires > ? "
            "RETURNING node_id", (_ts(now), digest, _ts(now))).fetchone()
        if row is None:
            raise self._token_error(conn, digest)
        return str(row[0])

    def redeem_token(self, digest: bytes, now: datetime) -> str:
        with self._transaction() as conn:
            return self._redeem(conn, digest, now)

    def record_issued(self, record: IssuedRecord, audit: tuple[str, Mapping[str, object]],
                      token: bytes | None = None) -> None:
        with self._transaction() as conn:
            if token is not None and self._redeem(conn, token, record.issued_at) != record.node_id:
                raise RedeemError(UNKNOWN, f"bootstrap token {token_ref(token)} is bound to another node")
            conn.execute(
                "INSERT INTO issued (serial, node_id, kind, not_before, not_after, issued_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.serial, record.node_id, record.kind, _ts(record.not_before), _ts(record.not_after),
                 _ts(record.issued_at)))
            self._insert_audit(conn, *audit)

    def append(self, kind: str, fields: Mapping[str, object]) -> None:
        with self._transaction() as conn:
            self._insert_audit(conn, kind, fields)

    @staticmethod
    def _insert_audit(conn: sqlite3.Connection, kind: str, fields: Mapping[str, object]) -> None:
        extra = {k: v for k, v in fields.items() if k not in {"time", "node", "reason", "remote"}}
        when = fields.get("time")
        stamp = _ts(when) if isinstance(when, datetime) else datetime.now(UTC).timestamp()
        conn.execute(
            "INSERT INTO audit (time, kind, node, reason, remote, fields) VALUES (?, ?, ?, ?, ?, ?)",
            (stamp, kind, _opt(fields.get("node")), _opt(fields.get("reason")), _opt(fields.get("remote")),
             json.dumps(extra, sort_keys=True, default=str)))

    def issued(self, node_id: str | None = None) -> list[IssuedRecord]:
        query = "SELECT serial, node_id, kind, not_before, not_after, issued_at FROM issued"
        conn = self._conn()
        rows = (conn.execute(query + " WHERE node_id = ? ORDER BY issued_at", (node_id,))
                if node_id is not None else conn.execute(query + " ORDER BY issued_at"))
        return [IssuedRecord(r[0], r[1], r[2], _dt(r[3]), _dt(r[4]), _dt(r[5])) for r in rows]

    def audit_records(self, kind_prefix: str = "") -> list[AuditRecord]:
        rows = self._conn().execute(
            "SELECT time, kind, node, reason, remote, fields FROM audit WHERE substr(kind, 1, ?) = ? "
            "ORDER BY id", (len(kind_prefix), kind_prefix))
        return [AuditRecord(_dt(r[0]), r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]


class _Action(Protocol):
    def __call__(self) -> object: ...


class _Transaction:
    """Context manager: COMMIT on success, ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
