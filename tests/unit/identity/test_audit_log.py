"""The audit log on real files: appends, crash repair, tamper detection, proofs and key files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tensorguard.identity.audit import merkle
from tensorguard.identity.audit.bench import bench_verify, renew_records
from tensorguard.identity.audit.log import (
    CHECKPOINT_FILE,
    ENTRIES_FILE,
    LEAVES_FILE,
    VERIFIED_FILE,
    AuditError,
    AuditLog,
    EntryKind,
    VerifyError,
    encode_entry,
    verify_log_directory,
)
from tensorguard.identity.audit.note import Checkpoint, Ed25519Signer, open_checkpoint
from tensorguard.identity.audit.storage import (
    KeyFileError,
    create_signer_key,
    load_or_create_signer_key,
    load_signer_key,
    write_atomic,
)

ORIGIN = "robot-0042.fleet.example/identity-audit"


class FakeClock:
    """Wall clock that advances 1.25 s per reading, so every entry's time is predictable."""

    def __init__(self, start: float = 1_735_689_600.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.25
        return self.now


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate(ORIGIN)


def _open(path: Path, signer: Ed25519Signer, clock: FakeClock | None = None) -> AuditLog:
    return AuditLog.open(path, signer, ORIGIN, clock or FakeClock())


def _fill(log: AuditLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        log.append(EntryKind.RENEW, {"node_id": "robot-0042", "serial": f"{i:08x}", "not_after": 1000 + i})


def _lines(path: Path) -> list[bytes]:
    return (path / ENTRIES_FILE).read_bytes().splitlines()


def _check(path: Path, signer: Ed25519Signer, **kwargs: Any) -> VerifyError:
    with pytest.raises(VerifyError) as info:
        verify_log_directory(path, signer.verifier().vkey, **kwargs)
    return info.value


def test_append_reopen_and_signed_checkpoint(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        assert log.size == 0 and log.root == merkle.EMPTY_ROOT
        assert log.append(EntryKind.ENROL, {"node_id": "robot-0042", "method": "bootstrap-token"}) == 0
        assert log.append("renew", {"serial": "0a"}) == 1
        assert log.append_many([(EntryKind.INSTALL, {"sink": "file"}), (EntryKind.RELOAD, {"pid": 7})]) \
            == range(2, 4)
        assert log.append_many([]) == range(4, 4)
        root = log.root
    lines = _lines(tmp_path)
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first == {"fields": {"method": "bootstrap-token", "node_id": "robot-0042"}, "index": 0,
                     "kind": "enrol", "time": "2025-01-01T00:00:01.250Z"}
    assert lines[0] == json.dumps(first, sort_keys=True, separators=(",", ":")).encode()
    assert [json.loads(line)["time"] for line in lines[1:]] == [
        "2025-01-01T00:00:02.500Z", "2025-01-01T00:00:03.750Z", "2025-01-01T00:00:05.000Z"]
    cp = open_checkpoint((tmp_path / CHECKPOINT_FILE).read_bytes(), [signer.verifier()])
    assert (cp.origin, cp.size, cp.root) == (ORIGIN, 4, merkle.root_from_leaf_hashes(
        [merkle.leaf_hash(line) for line in lines]))
    assert (tmp_path / LEAVES_FILE).read_bytes() == merkle.pack_leaf_hashes(lines)
    with _open(tmp_path, signer) as log:
        assert (log.size, log.root) == (4, root)
        assert (log.report.torn_bytes, log.report.recovered_entries, log.report.rehashed_leaves) == (0, 0, 0)
        assert [e["kind"] for e in log.entries()] == ["enrol", "renew", "install", "reload"]
        assert log.checkpoint == (tmp_path / CHECKPOINT_FILE).read_bytes()
        assert log.prove_inclusion(3)["checkpoint"] == log.checkpoint.decode()
        assert log.append(EntryKind.CONFIG_CHANGE, {"key": "identity.renew_fraction", "new": 0.5}) == 4
    for name in (ENTRIES_FILE, LEAVES_FILE, CHECKPOINT_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_first_verify_then_consistency_with_the_kept_checkpoint(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        first = log.verify()
        assert (first.size, first.entries, first.previous_verified_size) == (0, 0, None)
        _fill(log, 5)
        second = log.verify(deep=True)
        assert (second.size, second.previous_verified_size, second.leaf_cache_ok) == (5, 0, True)
        assert second.root == log.root and second.seconds > 0
        _fill(log, 3, 5)
    kept = open_checkpoint((tmp_path / VERIFIED_FILE).read_bytes(), [signer.verifier()])
    assert kept.size == 5
    result = verify_log_directory(tmp_path, signer.verifier().vkey, record=False)
    assert (result.size, result.previous_verified_size) == (8, 5)
    assert open_checkpoint((tmp_path / VERIFIED_FILE).read_bytes(), [signer.verifier()]).size == 5
    verify_log_directory(tmp_path, signer.verifier())
    assert open_checkpoint((tmp_path / VERIFIED_FILE).read_bytes(), [signer.verifier()]).size == 8


@pytest.mark.parametrize(("fields", "error", "reason"), [
    ({"when": {1, 2}}, TypeError, r"fields\.when is a set"),
    ({"pair": (1, 2)}, TypeError, r"fields\.pair is a tuple"),
    ({"raw": b"\x00"}, TypeError, "bytes"),
    ({"nested": {"deep": [1, object()]}}, TypeError, r"fields\.nested\.deep\[1\] is a object"),
    ({"ratio": float("nan")}, ValueError, "NaN"),
    ({"ratio": float("inf")}, ValueError, "infinity"),
    ({"ids": {1: "a"}}, TypeError, "JSON keys are strings"),
    ({"key": "-----BEGIN PRIVATE KEY-----\nMC4CAQ..."}, ValueError, "looks like a private key"),
    ({"key": "PRIVATE+KEY+robot+01020304+AYEK"}, ValueError, "secrets must never"),
    ({"blob": "x" * 70000}, ValueError, "more than 65536"),
])
def test_non_json_fields_are_refused_and_nothing_is_written(tmp_path: Path, signer: Ed25519Signer,
                                                             fields: dict[str, Any], error: type[Exception],
                                                             reason: str) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
        before = (tmp_path / ENTRIES_FILE).read_bytes()
        with pytest.raises(error, match=reason):
            log.append(EntryKind.FAILURE, fields)
        # A bad record in the middle of a batch keeps none of the batch.
        with pytest.raises(error):
            log.append_many([(EntryKind.RENEW, {"ok": 1}), (EntryKind.RENEW, fields)])
        assert (tmp_path / ENTRIES_FILE).read_bytes() == before
        assert log.size == 2
        assert log.append(EntryKind.RENEW, {"ok": True}) == 2
    verify_log_directory(tmp_path, signer.verifier())


def test_unknown_kind_and_bad_clock_are_refused(tmp_path: Path, signer: Ed25519Signer) -> None:
    with AuditLog.open(tmp_path, signer, ORIGIN, lambda: float("nan")) as log:
        with pytest.raises(ValueError, match="unknown audit entry kind 'renewal'"):
            log.append("renewal", {})
        with pytest.raises(ValueError, match="not a finite time"):
            log.append(EntryKind.RENEW, {})
        with pytest.raises(TypeError, match="mapping"):
            log.append(EntryKind.RENEW, [("a", 1)])  # type: ignore[arg-type]
        assert log.size == 0


def test_torn_last_line_is_repaired_and_reported(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 3)
    partial = b'{"fields":{"node_id":"robot-0042","ser'
    with open(tmp_path / ENTRIES_FILE, "ab") as handle:
        handle.write(partial)
    # A reader does not stumble on the in-flight line either.
    assert verify_log_directory(tmp_path, signer.verifier(), record=False).entries == 3
    with _open(tmp_path, signer) as log:
        assert log.report.torn_bytes == len(partial)
        assert log.report.recovered_entries == 0
        assert log.size == 3
        _fill(log, 1, 3)
    assert (tmp_path / ENTRIES_FILE).read_bytes().endswith(b"\n")
    assert len(_lines(tmp_path)) == 4
    assert verify_log_directory(tmp_path, signer.verifier()).size == 4


def test_entry_written_but_not_signed_is_recovered_on_open(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
    # A crash after the entry's fsync but before the checkpoint rename leaves this state.
    with open(tmp_path / ENTRIES_FILE, "ab") as handle:
        handle.write(encode_entry(2, 1_800_000_000.0, EntryKind.FAILURE, {"error": "CA unreachable"}) + b"\n")
    pending = verify_log_directory(tmp_path, signer.verifier(), record=False)
    assert (pending.size, pending.entries) == (2, 3)
    with _open(tmp_path, signer) as log:
        assert log.report.recovered_entries == 1
        assert log.size == 3
    cp = open_checkpoint((tmp_path / CHECKPOINT_FILE).read_bytes(), [signer.verifier()])
    assert cp.size == 3
    verify_log_directory(tmp_path, signer.verifier(), deep=True)


def test_unsigned_line_that_is_not_a_valid_entry_is_not_signed(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
    with open(tmp_path / ENTRIES_FILE, "ab") as handle:
        handle.write(encode_entry(7, 1_800_000_000.0, EntryKind.RENEW, {}) + b"\n")  # wrong index
    with pytest.raises(AuditError, match="entry 2 \\(line 3\\) says index 7; refusing to sign"):
        _open(tmp_path, signer)
    with open(tmp_path / ENTRIES_FILE, "r+b") as handle:
        handle.truncate(len(b"".join(line + b"\n" for line in _lines(tmp_path)[:2])))
        handle.seek(0, os.SEEK_END)
        handle.write(b'{"index":2, "kind":"renew"}\n')
    with pytest.raises(AuditError, match="must have exactly the keys"):
        _open(tmp_path, signer)


def test_leaf_cache_missing_or_corrupt_is_rebuilt(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 9)
        root = log.root
    (tmp_path / LEAVES_FILE).unlink()
    with _open(tmp_path, signer) as log:
        assert log.report.rehashed_leaves == 9 and log.root == root
    data = bytearray((tmp_path / LEAVES_FILE).read_bytes())
    data[5 * 32] ^= 0xFF
    (tmp_path / LEAVES_FILE).write_bytes(bytes(data[:-7]))  # one hash flipped, the last one torn
    assert verify_log_directory(tmp_path, signer.verifier(), record=False).leaf_cache_ok is False
    with _open(tmp_path, signer) as log:
        assert log.report.rehashed_leaves == 9 and log.root == root
    assert verify_log_directory(tmp_path, signer.verifier()).leaf_cache_ok is True


def test_edited_old_entry_is_detected_and_located(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 6)
        log.verify()
    lines = _lines(tmp_path)
    lines[2] = lines[2].replace(b'"serial":"00000002"', b'"serial":"0000000f"')
    (tmp_path / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines))
    error = _check(tmp_path, signer)
    assert error.check == "root" and error.index == 2
    assert "entry 2 (line 3) differs from the leaf hash recorded" in str(error)
    # Opening trusts the leaf cache (it matches the checkpoint), so only verify sees the edit...
    _open(tmp_path, signer).close()
    # ...until the cache is gone and open has to rehash the entries itself.
    (tmp_path / LEAVES_FILE).unlink()
    error = _check(tmp_path, signer)
    assert error.check == "root" and error.index is None
    with pytest.raises(AuditError, match="does not match the signed checkpoint at size 6"):
        _open(tmp_path, signer)


def test_deleted_entry_is_detected(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 4)
    lines = _lines(tmp_path)
    (tmp_path / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines[:1] + lines[2:]))
    assert _check(tmp_path, signer).check == "entries"
    with pytest.raises(AuditError, match="holds 3 entries but the signed checkpoint commits to 4"):
        _open(tmp_path, signer)


def _rewrite_history(path: Path, signer: Ed25519Signer, keep: int, new: int) -> None:
    """What an intruder holding the signing key can do: cut the log and re-sign a new history."""
    lines = _lines(path)[:keep]
    (path / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines))
    (path / LEAVES_FILE).unlink()
    root = merkle.root_from_leaf_hashes([merkle.leaf_hash(line) for line in lines])
    write_atomic(path / CHECKPOINT_FILE, Checkpoint(ORIGIN, keep, root).sign(signer))
    with _open(path, signer, FakeClock(1_900_000_000.0)) as log:
        for i in range(new):
            log.append(EntryKind.INSTALL, {"sink": "forged", "n": i})


def test_truncated_and_rewritten_history_is_caught_by_the_verified_checkpoint(
        tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 6)
        log.verify()
    _rewrite_history(tmp_path, signer, keep=3, new=5)
    # The forged log is internally perfect: only the kept checkpoint shows the rewrite.
    error = _check(tmp_path, signer)
    assert error.check == "consistency"
    assert "not an extension of the verified checkpoint at size 6" in str(error)
    (tmp_path / VERIFIED_FILE).unlink()
    assert verify_log_directory(tmp_path, signer.verifier()).size == 8


def test_truncation_alone_is_caught_by_the_verified_checkpoint(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 6)
        log.verify()
    _rewrite_history(tmp_path, signer, keep=4, new=0)
    error = _check(tmp_path, signer)
    assert error.check == "consistency" and "history was truncated" in str(error)


def test_tampered_checkpoint_is_detected(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 3)
    note = (tmp_path / CHECKPOINT_FILE).read_bytes()
    text, sig = note.rsplit(b" ", 1)
    flipped = text + b" " + sig[:40] + (b"B" if sig[40:41] == b"A" else b"A") + sig[41:]
    (tmp_path / CHECKPOINT_FILE).write_bytes(flipped)
    error = _check(tmp_path, signer)
    assert error.check == "checkpoint" and "does not verify" in str(error)
    with pytest.raises(AuditError, match="does not verify"):
        _open(tmp_path, signer)
    (tmp_path / CHECKPOINT_FILE).write_bytes(note.replace(b"\n3\n", b"\n2\n"))  # edited tree size
    assert _check(tmp_path, signer).check == "checkpoint"
    other = Ed25519Signer.generate(ORIGIN)
    (tmp_path / CHECKPOINT_FILE).write_bytes(note)
    assert _check(tmp_path, other).check == "checkpoint"
    with pytest.raises(AuditError, match="no signature from a known key"):
        _open(tmp_path, other)


def test_tampered_verified_checkpoint_is_detected(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 3)
        log.verify()
    path = tmp_path / VERIFIED_FILE
    path.write_bytes(path.read_bytes().replace(b"\n3\n", b"\n1\n"))
    assert _check(tmp_path, signer).check == "verified-checkpoint"
    path.write_bytes(Checkpoint("someone.else/log", 1, merkle.EMPTY_ROOT).sign(
        Ed25519Signer.generate(ORIGIN)))
    assert _check(tmp_path, signer).check == "verified-checkpoint"


def test_refusals_at_open(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
        with pytest.raises(AuditError, match="already open for writing"):
            _open(tmp_path, signer)
    with pytest.raises(AuditError, match="is for origin"):
        AuditLog.open(tmp_path, signer, "other.example/log", FakeClock())
    (tmp_path / CHECKPOINT_FILE).unlink()
    with pytest.raises(AuditError, match="checkpoint is missing"):
        _open(tmp_path, signer)
    with pytest.raises(ValueError, match="origin"):
        AuditLog.open(tmp_path / "x", signer, "two\nlines", FakeClock())
    closed = _open(tmp_path / "fresh", signer)
    closed.close()
    with pytest.raises(AuditError, match="closed"):
        closed.append(EntryKind.RENEW, {})


def test_proofs_check_with_merkle_alone(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 13)
        proofs = [json.loads(json.dumps(log.prove_inclusion(i))) for i in range(13)]
        old = json.loads(json.dumps(log.prove_inclusion(4, 7)))
        consistency = [json.loads(json.dumps(log.prove_consistency(m))) for m in range(14)]
        _fill(log, 1, 13)  # proofs keep working after appends, from the in-memory tree
        later = log.prove_inclusion(13)
    verifier = signer.verifier()
    for i, proof in enumerate(proofs):
        cp = open_checkpoint(proof["checkpoint"].encode(), [verifier])
        assert cp.size == proof["tree_size"] == 13 and cp.root.hex() == proof["root"]
        leaf = merkle.leaf_hash(proof["entry"].encode())
        assert leaf.hex() == proof["leaf_hash"]
        merkle.verify_inclusion(leaf, i, 13, [bytes.fromhex(p) for p in proof["proof"]], cp.root)
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(merkle.leaf_hash(proof["entry"].encode() + b" "), i, 13,
                                    [bytes.fromhex(p) for p in proof["proof"]], cp.root)
    # An older tree size has no checkpoint of its own: pair it with a consistency proof.
    assert old["checkpoint"] is None and old["tree_size"] == 7
    merkle.verify_inclusion(bytes.fromhex(old["leaf_hash"]), 4, 7, [bytes.fromhex(p) for p in old["proof"]],
                            bytes.fromhex(old["root"]))
    head = open_checkpoint(consistency[0]["checkpoint"].encode(), [verifier])
    for c in consistency:
        assert c["new_root"] == head.root.hex()
        merkle.verify_consistency(c["old_size"], c["new_size"], bytes.fromhex(c["old_root"]),
                                  head.root, [bytes.fromhex(p) for p in c["proof"]])
    assert consistency[7]["old_root"] == old["root"]
    assert later["tree_size"] == 14 and json.loads(later["entry"])["index"] == 13


def test_proof_requests_outside_the_log_are_refused(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 3)
        with pytest.raises(ValueError, match=r"outside 0\.\.2"):
            log.prove_inclusion(3)
        with pytest.raises(ValueError, match="tree size 4"):
            log.prove_inclusion(0, 4)
        with pytest.raises(ValueError, match="old size 4"):
            log.prove_consistency(4)


def test_entry_line_is_checked_against_its_leaf_hash(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 3)
        assert json.loads(log.entry_line(1))["fields"]["serial"] == "00000001"
        lines = _lines(tmp_path)
        lines[1] = lines[1].replace(b"00000001", b"00000009")
        (tmp_path / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines))
        with pytest.raises(AuditError, match=r"entry 1 .* does not match its leaf hash"):
            log.prove_inclusion(1)


def test_deep_verify_catches_a_signed_but_non_canonical_entry(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
    lines = _lines(tmp_path)
    lines[1] = json.dumps(json.loads(lines[1])).encode()  # spaces: not canonical
    (tmp_path / ENTRIES_FILE).write_bytes(b"".join(line + b"\n" for line in lines))
    root = merkle.root_from_leaf_hashes([merkle.leaf_hash(line) for line in lines])
    write_atomic(tmp_path / CHECKPOINT_FILE, Checkpoint(ORIGIN, 2, root).sign(signer))
    assert verify_log_directory(tmp_path, signer.verifier(), record=False).size == 2
    error = _check(tmp_path, signer, deep=True)
    assert error.check == "entry" and error.index == 1 and "not in canonical form" in str(error)


def test_key_file_is_0600_and_loads(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        created = create_signer_key(tmp_path / "audit.key", ORIGIN)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "audit.key").stat().st_mode) == 0o600
    assert (tmp_path / "audit.key").read_text().startswith(f"PRIVATE+KEY+{ORIGIN}+")
    loaded = load_signer_key(tmp_path / "audit.key", ORIGIN)
    assert loaded.verifier().vkey == created.verifier().vkey
    assert load_or_create_signer_key(tmp_path / "audit.key", ORIGIN).key_id == created.key_id
    fresh = load_or_create_signer_key(tmp_path / "new.key", ORIGIN)
    assert load_signer_key(tmp_path / "new.key").key_id == fresh.key_id
    with pytest.raises(KeyFileError, match="already exists"):
        create_signer_key(tmp_path / "audit.key", ORIGIN)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "audit.key"
    create_signer_key(path, ORIGIN)
    # PRIVATE+KEY+name+hexid+base64: the base64 part may itself contain "+" (a split from the right
    # then took a piece of it, or nothing at all: this test failed about once in seven runs).
    secret = path.read_text().strip().split("+", 4)[4]
    assert len(secret) >= 44
    path.chmod(mode)
    if mode & 0o077:
        with pytest.raises(KeyFileError, match=f"mode {mode:04o}") as info:
            load_signer_key(path)
        assert secret not in str(info.value)
    else:
        load_signer_key(path)


def test_key_file_other_refusals_never_show_the_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    signer = create_signer_key(path, ORIGIN)
    # PRIVATE+KEY+name+hexid+base64: the base64 part may itself contain "+" (a split from the right
    # then took a piece of it, or nothing at all: this test failed about once in seven runs).
    secret = path.read_text().strip().split("+", 4)[4]
    assert len(secret) >= 44
    with pytest.raises(KeyFileError, match="expected 'other'"):
        load_signer_key(path, "other")
    (tmp_path / "link.key").symlink_to(path)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_signer_key(tmp_path / "link.key")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_signer_key(tmp_path / "missing.key")
    broken = tmp_path / "broken.key"
    broken.write_text(signer.skey()[:-3] + "\n")
    broken.chmod(0o600)
    with pytest.raises(KeyFileError, match="not hold a valid") as info:
        load_signer_key(broken)
    assert secret[:10] not in str(info.value)
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_signer_key(tmp_path / "dir.key")


def test_bench_verify_small(tmp_path: Path) -> None:
    result = bench_verify(3000, tmp_path / "bench")
    assert result["entries"] == 3000
    assert result["verified_size"] == 4000 and result["previous_verified_size"] == 3000
    assert result["verify_seconds"] > 0 and result["verify_after_append_seconds"] > 0
    lines = _lines(tmp_path / "bench" / "log")
    assert len(lines) == 4000
    assert result["root"] == merkle.root_from_leaf_hashes(merkle.pack_leaf_hashes(lines)).hex()
    kind, fields = next(iter(renew_records(1, 7)))
    assert kind is EntryKind.RENEW and fields["node_id"] == "robot-0007"
    assert json.loads(lines[7])["fields"] == fields


def test_copied_log_verifies_elsewhere_with_the_public_key_only(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path / "log", signer) as log:
        _fill(log, 5)
        vkey = log.verifier().vkey
    shutil.copytree(tmp_path / "log", tmp_path / "copy")
    result = verify_log_directory(tmp_path / "copy", vkey)
    assert result.size == 5 and (tmp_path / "copy" / VERIFIED_FILE).exists()
    assert not (tmp_path / "log" / VERIFIED_FILE).exists()


def test_stale_temp_files_of_the_writer_are_removed(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 1)
    (tmp_path / f".{CHECKPOINT_FILE}.4242.deadbeef.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f".{LEAVES_FILE}.4242.deadbeef.tmp").write_bytes(b"\x00" * 7)
    verifier_tmp = tmp_path / f".{VERIFIED_FILE}.4243.cafef00d.tmp"  # a verifier's: not ours to delete
    verifier_tmp.write_bytes(b"x")
    with _open(tmp_path, signer) as log:
        assert log.report.removed_temp_files == 2 and log.size == 1
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [verifier_tmp.name]


_CHILD = """
import sys, time
from pathlib import Path
from tensorguard.identity.audit import AuditLog, EntryKind, load_signer_key
directory, key, origin, batch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
log = AuditLog.open(directory, load_signer_key(key), origin, time.time)
while True:
    done = log.append_many([(EntryKind.RENEW, {"serial": log.size + i, "pad": "x" * 40000})
                            for i in range(batch)])
    print(done.stop, flush=True)
"""


@pytest.mark.parametrize(("batch", "delay"), [(1, 0.15), (1, 0.4), (300, 0.5), (300, 0.9)])
def test_kill_9_mid_append_leaves_a_log_that_opens_and_verifies(tmp_path: Path, batch: int,
                                                                  delay: float) -> None:
    """A real SIGKILL at an arbitrary point (page cache survives it; power loss is not simulated)."""
    key = tmp_path / "audit.key"
    signer = create_signer_key(key, ORIGIN)
    directory = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "agent")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), str(key), ORIGIN, str(batch)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    acknowledged = int(child.stdout.readline())  # at least one append finished
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    rest = child.stdout.read().split()
    child.wait()
    if rest:
        acknowledged = int(rest[-1])
    with _open(directory, signer) as log:
        assert log.size >= acknowledged
        report = log.report
        size = log.size
    print(f"killed after {acknowledged} acknowledged: size {size}, {report}")
    result = verify_log_directory(directory, signer.verifier(), deep=True)
    assert result.size == size
    assert report.recovered_entries <= (batch if batch > 1 else 1)


def test_batch_refused_after_a_flush_is_rolled_back(tmp_path: Path, signer: Ed25519Signer) -> None:
    with _open(tmp_path, signer) as log:
        _fill(log, 2)
        before = (tmp_path / ENTRIES_FILE).read_bytes()
        big = [(EntryKind.RENEW, {"pad": "x" * 50_000, "i": i}) for i in range(200)]  # > 8 MiB: flushed
        with pytest.raises(TypeError, match=r"fields\.bad is a set"):
            log.append_many([*big, (EntryKind.RENEW, {"bad": set()})])
        assert (tmp_path / ENTRIES_FILE).read_bytes() == before
        assert log.append(EntryKind.RENEW, {"after": True}) == 2
    assert verify_log_directory(tmp_path, signer.verifier()).size == 3


_FULL_DISK_CHILD = """
import resource, signal, sys, time
from pathlib import Path
from tensorguard.identity.audit import AuditLog, EntryKind, load_signer_key
directory, key, origin = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
entries = directory / "entries.jsonl"
log = AuditLog.open(directory, load_signer_key(key), origin, time.time)
log.append_many([(EntryKind.RENEW, {"i": i}) for i in range(5)])
before = entries.stat().st_size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (before + 100_000, hard))
try:
    log.append_many([(EntryKind.RENEW, {"pad": "x" * 50_000, "i": i}) for i in range(4)])
except OSError as exc:
    print("errno", exc.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("unchanged", entries.stat().st_size == before, log.size)
print("appended", log.append(EntryKind.FAILURE, {"error": "disk was full"}))
"""


def test_failed_write_is_rolled_back(tmp_path: Path) -> None:
    """A real short write then EFBIG (RLIMIT_FSIZE in a child), the way a full disk fails."""
    key = tmp_path / "audit.key"
    signer = create_signer_key(key, ORIGIN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "agent")}
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "log"), str(key), ORIGIN],
                         capture_output=True, text=True, env=env, check=True).stdout.split("\n")
    assert out[:3] == ["errno 27", "unchanged True 5", "appended 5"]  # 27: EFBIG
    result = verify_log_directory(tmp_path / "log", signer.verifier(), deep=True)
    assert (result.size, result.entries) == (6, 6)
