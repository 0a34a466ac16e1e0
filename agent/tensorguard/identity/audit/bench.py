"""Measure how long a full audit verification takes, so the 1,000,000-entry budget is a number.

Run ``python -m tensorguard.identity.audit.bench 1000000 /var/tmp/audit-bench`` (the work
directory must not exist yet; it is left in place for inspection).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .log import ENTRIES_FILE, AuditLog, EntryKind, verify_log_directory
from .storage import create_signer_key

BENCH_ORIGIN = "tensorguard.example/audit-bench"
_EPOCH = 1_735_689_600.0  # 2025-01-01T00:00:00Z


def renew_records(count: int, start: int = 0) -> Iterator[tuple[EntryKind, Mapping[str, Any]]]:
    """Renewal records shaped like the identity unit's: node, SPIFFE ID, serial, validity."""
    for i in range(start, start + count):
        node = f"robot-{i % 512:04d}"
        issued = _EPOCH + 1800 * i
        yield EntryKind.RENEW, {
            "node_id": node,
            "spiffe_id": f"spiffe://fleet.example/robot/{node}",
            "serial": f"{(i * 0x9E3779B97F4A7C15) % (1 << 128):032x}",
            "not_before": int(issued),
            "not_after": int(issued) + 3600,
            "attempt": 1,
        }


class _StepClock:
    """A deterministic wall clock that moves half a second per entry."""

    def __init__(self) -> None:
        self.now = _EPOCH

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def bench_verify(n_entries: int, workdir: Path) -> dict[str, Any]:
    """Build a log of ``n_entries`` renewals in ``workdir`` and time full verifications of it.

    ``verify_seconds`` is the first verification (no verified checkpoint yet);
    ``verify_after_append_seconds`` re-verifies after 1000 more appends, which adds the
    consistency proof against the kept checkpoint. Files are in the page cache (warm).
    """
    workdir.mkdir(parents=True)
    signer = create_signer_key(workdir / "audit.key", BENCH_ORIGIN)
    log_dir = workdir / "log"
    started = time.perf_counter()
    with AuditLog.open(log_dir, signer, BENCH_ORIGIN, _StepClock()) as log:
        log.append_many(renew_records(n_entries))
    build_seconds = time.perf_counter() - started
    first = verify_log_directory(log_dir, signer.verifier().vkey)
    with AuditLog.open(log_dir, signer, BENCH_ORIGIN, _StepClock()) as log:
        log.append_many(renew_records(1000, n_entries))
    second = verify_log_directory(log_dir, signer.verifier().vkey)
    return {
        "entries": n_entries,
        "entries_bytes": (log_dir / ENTRIES_FILE).stat().st_size,
        "build_seconds": round(build_seconds, 3),
        "verify_seconds": round(first.seconds, 3),
        "verify_after_append_seconds": round(second.seconds, 3),
        "verified_size": second.size,
        "previous_verified_size": second.previous_verified_size,
        "root": second.root.hex(),
        "cpus": os.cpu_count(),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("entries", type=int)
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    print(json.dumps(bench_verify(args.entries, args.workdir), indent=2))


if __name__ == "__main__":
    main()
