"""The identity audit log: append-only entries, RFC 9162 tree, signed checkpoints, rewrite detection.

Directory layout (all in one directory, one writer at a time):

* ``entries.jsonl``: one canonical JSON object per line (sorted keys, compact separators,
  ASCII), the leaf data of the Merkle tree. Appends are fsynced before ``append`` returns.
* ``leaves.bin``: 32-byte leaf hash per entry, a derived cache rebuilt from the entries when it
  is missing, short or wrong. It speeds up opening and proofs; ``verify`` never trusts it.
* ``checkpoint``: the latest C2SP checkpoint, signed with Ed25519, replaced atomically.
* ``verified-checkpoint``: the last checkpoint a full ``verify`` accepted. The next verify proves
  the current tree consistent with it, so truncating and re-appending, or editing an old entry
  and re-signing, is caught even by someone holding the signing key.

Entries are evidence for auditors and are never redacted: callers must never put secrets
(private keys, bootstrap tokens, passwords) into ``fields``. Values that look like private keys
are refused as a last line of defence, but that check is not a substitute for care.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from .merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleTree,
    ProofError,
    leaf_hash,
    pack_leaf_hashes,
    root_from_leaf_hashes,
    verify_consistency,
)
from .note import Checkpoint, Ed25519Signer, Ed25519Verifier, NoteError, open_checkpoint
from .storage import fsync_dir, write_all, write_atomic

ENTRIES_FILE = "entries.jsonl"
LEAVES_FILE = "leaves.bin"
CHECKPOINT_FILE = "checkpoint"
VERIFIED_FILE = "verified-checkpoint"
WRITER_LOCK_FILE = "writer.lock"
VERIFY_LOCK_FILE = "verify.lock"

FILE_MODE = 0o640
DIR_MODE = 0o750
MAX_LINE_BYTES = 64 * 1024
MAX_FIELD_DEPTH = 16
MAX_CHECKPOINT_BYTES = 64 * 1024
_CHUNK = 8 << 20
_ENTRY_KEYS = frozenset({"fields", "index", "kind", "time"})
_SECRET_MARKERS = ("PRIVATE KEY", "PRIVATE+KEY+")

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Wall clock: seconds since the Unix epoch (``time.time`` in production, a fake in tests)."""


class EntryKind(enum.StrEnum):
    """The identity operations the audit trail records."""

    ENROL = "enrol"
    RENEW = "renew"
    INSTALL = "install"
    RELOAD = "reload"
    FAILURE = "failure"
    CONFIG_CHANGE = "config-change"


class AuditError(Exception):
    """The audit log cannot be used as asked; the message names the file and what is wrong."""


class VerifyError(AuditError):
    """Verification failed; ``check`` names the failed check, ``index`` the entry when known."""

    def __init__(self, check: str, message: str, index: int | None = None) -> None:
        super().__init__(f"audit verify failed [{check}]: {message}")
        self.check = check
        self.index = index


@dataclass(frozen=True)
class OpenReport:
    """What opening had to repair: nothing is fixed silently."""

    torn_bytes: int
    """Bytes of a partial last line (a crash mid-append) that were truncated away."""
    recovered_entries: int
    """Complete entries found after the signed checkpoint (a crash before signing), now signed."""
    rehashed_leaves: int
    """Leaf hashes recomputed because the leaf cache was missing, short or wrong."""
    removed_temp_files: int
    """Temporary files of an interrupted checkpoint or cache replacement that were deleted."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a full verification (raised as VerifyError instead when anything fails)."""

    entries: int
    """Complete lines in the entries file (``size`` plus any not yet checkpointed)."""
    size: int
    """Tree size of the signed checkpoint that was verified."""
    root: bytes
    seconds: float
    previous_verified_size: int | None
    """Size of the verified checkpoint this one was proven consistent with (None: first run)."""
    leaf_cache_ok: bool


def _rfc3339_ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        raise ValueError(f"clock returned {seconds!r}, not a finite time")
    ms = round(seconds * 1000)
    stamp = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _check_json(value: object, where: str, depth: int = 0) -> None:
    """Refuse anything that would not survive a JSON round trip unchanged, or that looks secret."""
    if depth > MAX_FIELD_DEPTH:
        raise ValueError(f"{where} nests deeper than {MAX_FIELD_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; JSON has no NaN or infinity")
        return
    if isinstance(value, str):
        if any(marker in value for marker in _SECRET_MARKERS):
            raise ValueError(f"{where} looks like a private key; secrets must never enter the audit log")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has key {key!r} of type {type(key).__name__}; "
                                "JSON keys are strings")
            _check_json(item, f"{where}.{key}", depth + 1)
        return
    raise TypeError(f"{where} is a {type(value).__name__}, which is not JSON "
                    "(use str, int, float, bool, None, list or dict)")


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The one byte encoding an entry has: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def encode_entry(index: int, when: float, kind: EntryKind | str, fields: Mapping[str, Any]) -> bytes:
    """Validate and encode one entry line (without the newline)."""
    try:
        kind = EntryKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in EntryKind)
        raise ValueError(f"unknown audit entry kind {kind!r} (known: {known})") from None
    if not isinstance(fields, Mapping):
        raise TypeError(f"entry fields must be a mapping, got {type(fields).__name__}")
    plain = dict(fields)
    _check_json(plain, "fields")
    line = canonical_json({"fields": plain, "index": index, "kind": kind.value, "time": _rfc3339_ms(when)})
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"entry {index} encodes to {len(line)} bytes, more than {MAX_LINE_BYTES}")
    return line


def decode_entry(line: bytes, index: int) -> dict[str, Any]:
    """Parse an entry line and check it is exactly what ``encode_entry`` would have written."""
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"entry {index} (line {index + 1}) is not JSON") from None
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise ValueError(f"entry {index} (line {index + 1}) must have exactly the keys "
                         f"{sorted(_ENTRY_KEYS)}")
    if type(entry["index"]) is not int or entry["index"] != index:
        raise ValueError(f"entry {index} (line {index + 1}) says index {entry['index']!r}")
    if entry["kind"] not in set(EntryKind):
        raise ValueError(f"entry {index} (line {index + 1}) has unknown kind {entry['kind']!r}")
    if not isinstance(entry["fields"], dict) or not isinstance(entry["time"], str):
        raise ValueError(f"entry {index} (line {index + 1}) has malformed fields or time")
    if canonical_json(entry) != line:
        raise ValueError(f"entry {index} (line {index + 1}) is not in canonical form")
    return entry


class _LineBlocks:
    """A file's whole lines in large blocks (each ends with a newline); after the iteration ``tail``
    is the length of the partial last line, if any."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tail = 0

    def __iter__(self) -> Iterator[bytes]:
        carry = b""
        with open(self.path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                carry = data[cut:]
                yield data[:cut]
        self.tail = len(carry)


def _scan_lines(path: Path, start: int, stop: int | None = None) -> tuple[int, list[bytes], int]:
    """Count complete lines and collect lines ``start``..``stop``; also the partial tail length.

    Blocks that hold no wanted line are only counted, never split, so finding the tail of a
    large file costs one read.
    """
    total = 0
    wanted: list[bytes] = []
    blocks = _LineBlocks(path)
    for complete in blocks:
        count = complete.count(b"\n")
        if total + count > start and (stop is None or total < stop):
            lines = complete.split(b"\n")[:-1]
            lo = max(start - total, 0)
            hi = count if stop is None else min(stop - total, count)
            wanted.extend(lines[lo:hi])
        total += count
    return total, wanted, blocks.tail


def _hash_lines(path: Path, limit: int, deep: bool) -> tuple[bytearray, int]:
    """Leaf hashes of the first ``limit`` lines, and the number of complete lines in the file."""
    packed = bytearray()
    total = 0
    for complete in _LineBlocks(path):
        if total >= limit:  # past the checkpoint: pending entries are only counted
            total += complete.count(b"\n")
            continue
        lines = complete.split(b"\n")
        lines.pop()
        hashed = lines[:limit - total]
        if deep:
            for offset, line in enumerate(hashed):
                try:
                    decode_entry(line, total + offset)
                except ValueError as exc:
                    raise VerifyError("entry", str(exc), total + offset) from None
        packed += pack_leaf_hashes(hashed)
        total += len(lines)
    return packed, total


def _read_checkpoint(path: Path, verifier: Ed25519Verifier, what: str) -> tuple[Checkpoint, bytes]:
    with open(path, "rb") as handle:
        data = handle.read(MAX_CHECKPOINT_BYTES + 1)
    try:
        return open_checkpoint(data, [verifier]), data
    except NoteError as exc:
        raise VerifyError(what, f"{path}: {exc}") from None


def _locate_edit(directory: Path, packed: bytes | bytearray, checkpoint: Checkpoint) -> int | None:
    """First entry whose hash differs from the leaf cache, if the cache still matches the checkpoint."""
    try:
        with open(directory / LEAVES_FILE, "rb") as handle:
            cache = handle.read(checkpoint.size * HASH_SIZE)
    except FileNotFoundError:
        return None
    if len(cache) != checkpoint.size * HASH_SIZE or root_from_leaf_hashes(cache) != checkpoint.root:
        return None
    for i in range(checkpoint.size):
        span = slice(i * HASH_SIZE, (i + 1) * HASH_SIZE)
        if cache[span] != packed[span]:
            return i
    return None


def _record_verified(directory: Path, verifier: Ed25519Verifier, note: bytes, size: int) -> None:
    """Keep ``note`` as the verified checkpoint unless a concurrent verify already kept a larger one."""
    fd = os.open(directory / VERIFY_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = directory / VERIFIED_FILE
        if path.exists():
            try:
                kept, _ = _read_checkpoint(path, verifier, "verified-checkpoint")
            except VerifyError:
                kept = None
            if kept is not None and kept.size > size:
                return
        write_atomic(path, note, FILE_MODE)
    finally:
        os.close(fd)


def verify_log_directory(path: Path, verifier_key: str | Ed25519Verifier, *, record: bool = True,
                         deep: bool = False) -> VerifyResult:
    """Fully verify an audit log directory with only the public key; raise VerifyError on any failure.

    Recomputes every leaf hash from the entries file, checks the checkpoint signature and root,
    and proves the tree consistent with the last verified checkpoint, which ``record`` then
    replaces. ``deep`` also checks that every entry is canonical with the right index (slower).
    Safe to run while the writer appends: it reads the checkpoint first and entries after.
    """
    started = time.perf_counter()
    directory = Path(path)
    verifier = verifier_key if isinstance(verifier_key, Ed25519Verifier) else \
        Ed25519Verifier.from_vkey(verifier_key)
    checkpoint_path = directory / CHECKPOINT_FILE
    if not checkpoint_path.exists():
        raise VerifyError("checkpoint", f"{checkpoint_path} does not exist")
    checkpoint, note = _read_checkpoint(checkpoint_path, verifier, "checkpoint")
    previous: Checkpoint | None = None
    verified_path = directory / VERIFIED_FILE
    if verified_path.exists():
        previous, _ = _read_checkpoint(verified_path, verifier, "verified-checkpoint")
        if previous.origin != checkpoint.origin:
            raise VerifyError("origin", f"checkpoint origin {checkpoint.origin!r} differs from the "
                                        f"verified checkpoint's {previous.origin!r}")
    entries_path = directory / ENTRIES_FILE
    if not entries_path.exists():
        raise VerifyError("entries", f"{entries_path} does not exist")
    packed, lines = _hash_lines(entries_path, checkpoint.size, deep)
    if lines < checkpoint.size:
        raise VerifyError("entries", f"{entries_path} holds {lines} entries but the signed checkpoint "
                                     f"commits to {checkpoint.size}: entries were removed")
    tree = MerkleTree(packed)
    root = tree.root()
    if root != checkpoint.root:
        index = _locate_edit(directory, packed, checkpoint)
        where = (f"entry {index} (line {index + 1}) differs from the leaf hash recorded when it was "
                 "appended" if index is not None else "the leaf cache cannot locate the change")
        raise VerifyError("root", f"entries do not match the signed checkpoint root at size "
                                  f"{checkpoint.size}: {where}", index)
    if previous is not None:
        if previous.size > checkpoint.size:
            raise VerifyError("consistency", f"log has {checkpoint.size} entries but {previous.size} "
                                             "were verified before: history was truncated")
        try:
            verify_consistency(previous.size, checkpoint.size, previous.root, root,
                               tree.consistency_proof(previous.size))
        except ProofError as exc:
            raise VerifyError("consistency", f"log at size {checkpoint.size} is not an extension of the "
                                             f"verified checkpoint at size {previous.size}: history was "
                                             f"rewritten ({exc})") from None
    leaf_cache_ok = False
    try:
        with open(directory / LEAVES_FILE, "rb") as handle:
            leaf_cache_ok = handle.read(len(packed)) == packed
    except FileNotFoundError:
        pass
    if record:
        _record_verified(directory, verifier, note, checkpoint.size)
    return VerifyResult(entries=lines, size=checkpoint.size, root=root,
                        seconds=time.perf_counter() - started,
                        previous_verified_size=None if previous is None else previous.size,
                        leaf_cache_ok=leaf_cache_ok)


def _repair_torn_tail(fd: int) -> int:
    """Truncate a partial last line (no newline) left by a crash; return the bytes dropped."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(end - 65536, 0)
        block = os.pread(fd, end - start, start)
        if end == size and block.endswith(b"\n"):
            return 0
        newline = block.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(fd, end)
    os.fsync(fd)
    return size - end


def _leaf_tree(entries_path: Path, cache: bytes,
               checkpoint: Checkpoint | None) -> tuple[MerkleTree, int, int]:
    """Tree of every complete entry, from the leaf cache where it holds, checked against the checkpoint.

    Returns the tree, the number of entries and how many leaf hashes had to be recomputed. A
    cache that disagrees with the signed root is discarded and every entry rehashed; if the
    entries still disagree, history was modified and the log refuses to open.
    """
    signed = checkpoint.size if checkpoint else 0
    cached = len(cache) // HASH_SIZE
    total, tail, _ = _scan_lines(entries_path, cached)
    if total < signed:
        raise AuditError(f"{entries_path} holds {total} entries but the signed checkpoint commits to "
                         f"{signed}: entries were removed")
    cached = min(cached, total)
    tree = MerkleTree(cache[:cached * HASH_SIZE] + pack_leaf_hashes(tail))
    rehashed = total - cached
    if checkpoint is None or tree.root(signed) == checkpoint.root:
        return tree, total, rehashed
    if cached:
        _, lines, _ = _scan_lines(entries_path, 0)
        tree = MerkleTree(pack_leaf_hashes(lines))
        if tree.root(signed) == checkpoint.root:
            return tree, total, total
    raise AuditError(f"{entries_path} does not match the signed checkpoint at size {signed}: "
                     "history was modified; run an audit verify")


def _remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files a crashed writer left mid-replace (only the writer's own, never a verifier's)."""
    removed = 0
    for name in (CHECKPOINT_FILE, LEAVES_FILE):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def _take_writer_lock(directory: Path) -> int:
    fd = os.open(directory / WRITER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(f"audit log {directory} is already open for writing elsewhere") from None
    return fd


class AuditLog:
    """The single writer of an audit log directory; every method leaves the files consistent.

    One instance per directory (a lock file enforces it across processes); methods may be called
    from several threads.
    """

    def __init__(self, directory: Path, signer: Ed25519Signer, origin: str, clock: Clock, *,
                 lock_fd: int, entries_fd: int, leaves_fd: int, tree: MerkleTree, note: bytes,
                 report: OpenReport) -> None:
        """Use ``AuditLog.open``."""
        self.directory = directory
        self.origin = origin
        self.report = report
        self._signer = signer
        self._clock = clock
        self._lock_fd = lock_fd
        self._entries_fd = entries_fd
        self._leaves_fd = leaves_fd
        self._compact = tree.compact_range()
        self._tree: MerkleTree | None = None
        self._note = note
        self._closed = False
        self._mutex = threading.RLock()

    @classmethod
    def open(cls, directory: Path, signer: Ed25519Signer, origin: str, clock: Clock) -> AuditLog:
        """Open (or create) the log, repairing a torn last line and checking the signed checkpoint.

        Raises AuditError if the entries no longer match the signed checkpoint, or the checkpoint
        is missing while entries exist: the log then needs an auditor, not an automatic fix.
        """
        Checkpoint(origin, 0, EMPTY_ROOT)  # validates the origin line
        directory = Path(directory)
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        lock_fd = _take_writer_lock(directory)
        fds: list[int] = []
        try:
            return cls._open_locked(directory, signer, origin, clock, lock_fd=lock_fd, fds=fds)
        except BaseException:
            for fd in [*fds, lock_fd]:
                os.close(fd)
            raise

    @classmethod
    def _open_locked(cls, directory: Path, signer: Ed25519Signer, origin: str, clock: Clock, *,
                     lock_fd: int, fds: list[int]) -> AuditLog:
        entries_path = directory / ENTRIES_FILE
        leaves_path = directory / LEAVES_FILE
        checkpoint_path = directory / CHECKPOINT_FILE
        flags = os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        entries_fd = os.open(entries_path, os.O_RDWR | flags, FILE_MODE)
        fds.append(entries_fd)
        torn = _repair_torn_tail(entries_fd)
        removed = _remove_stale_temp_files(directory)
        checkpoint: Checkpoint | None = None
        note = b""
        if checkpoint_path.exists():
            try:
                checkpoint, note = _read_checkpoint(checkpoint_path, signer.verifier(), "checkpoint")
            except VerifyError as exc:
                raise AuditError(f"{exc} (is this the log's signing key?)") from None
            if checkpoint.origin != origin:
                raise AuditError(f"{checkpoint_path} is for origin {checkpoint.origin!r}, not {origin!r}")
        elif os.fstat(entries_fd).st_size:
            raise AuditError(f"{entries_path} has entries but {checkpoint_path} is missing; refusing to "
                             "sign history that was never signed")
        signed = checkpoint.size if checkpoint else 0
        cache = leaves_path.read_bytes() if leaves_path.exists() else b""
        tree, total, rehashed = _leaf_tree(entries_path, cache, checkpoint)
        if total > signed:
            _, recovered, _ = _scan_lines(entries_path, signed)
            for offset, line in enumerate(recovered):
                try:
                    decode_entry(line, signed + offset)
                except ValueError as exc:
                    raise AuditError(f"{entries_path}: unsigned {exc}; refusing to sign it") from None
        packed = tree.packed_leaf_hashes()
        if packed != cache:
            write_atomic(leaves_path, packed, FILE_MODE)
        leaves_fd = os.open(leaves_path, os.O_WRONLY | flags, FILE_MODE)
        fds.append(leaves_fd)
        if checkpoint is None or total > signed:
            note = Checkpoint(origin, total, tree.root()).sign(signer)
            write_atomic(checkpoint_path, note, FILE_MODE)
        fsync_dir(directory)
        report = OpenReport(torn_bytes=torn, recovered_entries=total - signed, rehashed_leaves=rehashed,
                            removed_temp_files=removed)
        if torn or total > signed or rehashed or removed:
            log.warning("audit log %s repaired on open: %d bytes of a torn last line dropped, %d unsigned "
                        "entries signed, %d leaf hashes recomputed, %d temp files removed",
                        directory, torn, total - signed, rehashed, removed)
        return cls(directory, signer, origin, clock, lock_fd=lock_fd, entries_fd=entries_fd,
                   leaves_fd=leaves_fd, tree=tree, note=note, report=report)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                for fd in (self._entries_fd, self._leaves_fd, self._lock_fd):
                    os.close(fd)

    def _check_open(self) -> None:
        if self._closed:
            raise AuditError(f"audit log {self.directory} is closed")

    @property
    def size(self) -> int:
        return self._compact.size

    @property
    def root(self) -> bytes:
        return self._compact.root()

    @property
    def checkpoint(self) -> bytes:
        """The latest signed checkpoint note, as written to disk."""
        return self._note

    def verifier(self) -> Ed25519Verifier:
        return self._signer.verifier()

    def append(self, kind: EntryKind | str, fields: Mapping[str, Any]) -> int:
        """Record one identity operation durably and sign the new checkpoint; return its index."""
        return self.append_many([(kind, fields)]).start

    def append_many(self, records: Iterable[tuple[EntryKind | str, Mapping[str, Any]]]) -> range:
        """Record several operations with one fsync and one signature; all or none are kept."""
        with self._mutex:
            return self._append_locked(records)

    def _append_locked(self, records: Iterable[tuple[EntryKind | str, Mapping[str, Any]]]) -> range:
        self._check_open()
        start = self._compact.size
        base = os.fstat(self._entries_fd).st_size
        hashes = bytearray()
        count = 0
        try:
            buffer = bytearray()
            for kind, fields in records:
                line = encode_entry(start + count, self._clock(), kind, fields)
                hashes += leaf_hash(line)
                buffer += line
                buffer += b"\n"
                count += 1
                if len(buffer) >= _CHUNK:
                    write_all(self._entries_fd, bytes(buffer))
                    buffer.clear()
            write_all(self._entries_fd, bytes(buffer))
            os.fsync(self._entries_fd)
        except BaseException:
            self._rollback(base)
            raise
        if not count:
            return range(start, start)
        write_all(self._leaves_fd, bytes(hashes))
        for i in range(count):
            h = bytes(hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE])
            self._compact.append(h)
            if self._tree is not None:
                self._tree.append(h)
        try:
            self._sign()
        except OSError as exc:
            raise AuditError(f"entries {start}..{start + count - 1} are stored in {self.directory} but the "
                             f"checkpoint could not be written ({exc.strerror}); the next append or open "
                             "signs them") from exc
        return range(start, start + count)

    def _rollback(self, size: int) -> None:
        try:
            os.ftruncate(self._entries_fd, size)
            os.fsync(self._entries_fd)
        except OSError as exc:
            self.close()
            raise AuditError(f"{self.directory / ENTRIES_FILE}: could not undo a failed append "
                             f"({exc.strerror}); reopen the log to repair it") from exc

    def _sign(self) -> None:
        note = Checkpoint(self.origin, self._compact.size, self._compact.root()).sign(self._signer)
        write_atomic(self.directory / CHECKPOINT_FILE, note, FILE_MODE)
        self._note = note

    def verify(self, *, deep: bool = False) -> VerifyResult:
        """Full verification against this log's key; keeps the result as the verified checkpoint."""
        with self._mutex:
            self._check_open()
            return verify_log_directory(self.directory, self.verifier(), record=True, deep=deep)

    def _proof_tree(self) -> MerkleTree:
        if self._tree is None:
            with open(self.directory / LEAVES_FILE, "rb") as handle:
                tree = MerkleTree(handle.read(self.size * HASH_SIZE))
            if tree.size != self.size or tree.root() != self.root:
                raise AuditError(f"{self.directory / LEAVES_FILE} no longer matches the log; reopen it")
            self._tree = tree
        return self._tree

    def _resolve(self, size: int | None) -> int:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ValueError(f"tree size {n} is outside 0..{self.size}")
        return n

    def entry_line(self, index: int) -> bytes:
        """The stored line of entry ``index``, checked against its leaf hash."""
        with self._mutex:
            return self._entry_line_locked(index)

    def _entry_line_locked(self, index: int) -> bytes:
        self._check_open()
        if not 0 <= index < self.size:
            raise ValueError(f"entry index {index} is outside 0..{self.size - 1}")
        _, lines, _ = _scan_lines(self.directory / ENTRIES_FILE, index, index + 1)
        if leaf_hash(lines[0]) != self._proof_tree().leaf_hash(index):
            raise AuditError(f"entry {index} in {self.directory / ENTRIES_FILE} does not match its leaf "
                             "hash; run an audit verify")
        return lines[0]

    def prove_inclusion(self, index: int, size: int | None = None) -> dict[str, Any]:
        """Inclusion proof of entry ``index`` in the tree of ``size`` (default: latest), as JSON data.

        ``checkpoint`` is the signed note when ``size`` is the latest size; otherwise pair the
        proof with a consistency proof up to a signed checkpoint.
        """
        with self._mutex:
            n = self._resolve(size)
            if not 0 <= index < n:
                raise ValueError(f"entry index {index} is outside 0..{n - 1} (tree size {n})")
            line = self._entry_line_locked(index)
            tree = self._proof_tree()
            return {
                "type": "inclusion",
                "origin": self.origin,
                "index": index,
                "tree_size": n,
                "entry": line.decode("ascii"),
                "leaf_hash": tree.leaf_hash(index).hex(),
                "root": tree.root(n).hex(),
                "proof": [p.hex() for p in tree.inclusion_proof(index, n)],
                "checkpoint": self._note.decode() if n == self.size else None,
            }

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> dict[str, Any]:
        """Consistency proof from ``old_size`` to ``new_size`` (default: latest), as JSON data."""
        with self._mutex:
            n = self._resolve(new_size)
            tree = self._proof_tree()
            proof = tree.consistency_proof(old_size, n)
            return {
                "type": "consistency",
                "origin": self.origin,
                "old_size": old_size,
                "new_size": n,
                "old_root": tree.root(old_size).hex(),
                "new_root": tree.root(n).hex(),
                "proof": [p.hex() for p in proof],
                "checkpoint": self._note.decode() if n == self.size else None,
            }

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, decoded and checked for canonical form (for reports, not for proofs)."""
        with self._mutex:
            self._check_open()
            _, lines, _ = _scan_lines(self.directory / ENTRIES_FILE, 0, self.size)
        for index, line in enumerate(lines):
            yield decode_entry(line, index)
