"""Tokens and the SQLite store: hashed, single-use, expiring, atomic under concurrency."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from tensorguard.server.store import EXPIRED, UNKNOWN, USED, IssuedRecord, RedeemError, SQLiteStore
from tensorguard.server.tokens import TokenFormatError, new_token, token_hash, token_ref

from .helpers import NOW


def test_tokens_are_prefixed_high_entropy_and_distinct() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert token.startswith("tgbt_") and len(token) >= 5 + 43
        assert len(token_hash(token)) == 32


@pytest.mark.parametrize("value", ["", "tgbt_", "tgbt_short", "xxxx_" + "a" * 43, "tgbt_" + "a" * 42 + "!"])
def test_malformed_tokens_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(TokenFormatError) as info:
        token_hash(value)
    if len(value) > 6:
        assert value not in str(info.value)


def test_the_store_keeps_only_the_hash(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ca.sqlite3")
    token = new_token()
    store.add_token(token_hash(token), "r1", NOW, NOW + timedelta(hours=1))
    store.close()
    for path in tmp_path.iterdir():
        assert token.encode() not in path.read_bytes()
        assert token[5:].encode() not in path.read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "ca.sqlite3").st_mode) == 0o600


def test_redeem_once_then_used_unknown_and_expired(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ca.sqlite3")
    good, old = token_hash(new_token()), token_hash(new_token())
    store.add_token(good, "r1", NOW, NOW + timedelta(hours=1))
    store.add_token(old, "r2", NOW, NOW + timedelta(minutes=1))
    assert store.token_node(good, NOW) == "r1"
    assert store.redeem_token(good, NOW) == "r1"
    for digest, when, code in ((good, NOW, USED), (token_hash(new_token()), NOW, UNKNOWN),
                               (old, NOW + timedelta(minutes=1), EXPIRED)):
        with pytest.raises(RedeemError) as info:
            store.redeem_token(digest, when)
        assert info.value.code == code
        assert token_ref(digest) in info.value.reason
    with pytest.raises(RedeemError, match="single-use"):
        store.token_node(good, NOW)


def _record(serial: str, node: str = "r1") -> IssuedRecord:
    return IssuedRecord(serial, node, "enroll", NOW - timedelta(seconds=60), NOW + timedelta(hours=1), NOW)


def test_record_issued_consumes_the_token_in_the_same_transaction(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ca.sqlite3")
    digest = token_hash(new_token())
    store.add_token(digest, "r1", NOW, NOW + timedelta(hours=1))
    store.record_issued(_record("aa"), ("est.enroll.issued", {"node": "r1", "serial": "aa"}), digest)
    with pytest.raises(RedeemError) as info:
        store.record_issued(_record("bb"), ("est.enroll.issued", {"node": "r1", "serial": "bb"}), digest)
    assert info.value.code == USED
    assert [r.serial for r in store.issued()] == ["aa"]
    assert [r.fields["serial"] for r in store.audit_records("est.enroll.issued")] == ["aa"]


def test_a_token_cannot_record_a_certificate_for_another_node(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ca.sqlite3")
    digest = token_hash(new_token())
    store.add_token(digest, "r1", NOW, NOW + timedelta(hours=1))
    with pytest.raises(RedeemError, match="another node"):
        store.record_issued(_record("aa", node="r2"), ("x", {}), digest)
    assert store.issued() == []
    assert store.token_node(digest, NOW) == "r1"  # rolled back: nothing was consumed either


def test_audit_records_keep_columns_and_extra_fields(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ca.sqlite3")
    store.append("est.enroll.refused", {"time": NOW, "node": "r1", "reason": "bad", "remote": "1.2.3.4:5",
                                        "code": "bad_request", "status": 400})
    (record,) = store.audit_records("est.")
    assert (record.time, record.kind, record.node, record.reason, record.remote) == (
        NOW, "est.enroll.refused", "r1", "bad", "1.2.3.4:5")
    assert record.fields == {"code": "bad_request", "status": 400}
    assert store.audit_records("token.") == []


def _race(path: str, digest: bytes, start: object, out: object) -> None:
    store = SQLiteStore(Path(path))
    start.wait()  # type: ignore[attr-defined]
    try:
        store.redeem_token(digest, NOW)
        out.put("won")  # type: ignore[attr-defined]
    except RedeemError as exc:
        out.put(exc.code)  # type: ignore[attr-defined]


def test_concurrent_redemptions_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "ca.sqlite3"
    store = SQLiteStore(path)
    ctx = mp.get_context("fork")
    for _ in range(5):
        digest = token_hash(new_token())
        store.add_token(digest, "r1", NOW, NOW + timedelta(hours=1))
        start, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), digest, start, out)) for _ in range(8)]
        for proc in procs:
            proc.start()
        results = sorted(out.get(timeout=30) for _ in procs)
        for proc in procs:
            proc.join(timeout=30)
        assert results == ["used"] * 7 + ["won"]
