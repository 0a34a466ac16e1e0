"""`tensorguard bench identity`'s measuring code on a small fleet: every phase really issues, and the
figures it prints come from what happened (registry rows, CPU shares within bounds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensorguard.server import bench
from tensorguard.server.ca import CAPaths, init_ca
from tensorguard.server.store import SQLiteStore
from tensorguard.server.timeutil import utc_now


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the one-core phase needs two cores")
def test_a_small_fleet_is_enrolled_and_reissued_twice(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir, "bench.test", ["127.0.0.1"], utc_now())
    messages: list[str] = []
    robots = 48
    figures = bench.end_to_end(ca_dir, robots, messages.append)
    assert figures["robots"] == figures["fleet_reissue_robots"] == figures["one_core_reissue_robots"] == robots
    # enrolment, the shared-core re-issue and each one-core re-issue (per TLS terminator) put one row per robot
    runs = bench._tls_modes()
    assert figures["issued_rows"] == len(SQLiteStore(CAPaths(ca_dir).database).issued()) == (2 + len(runs)) * robots
    assert figures["e2e_certs_per_s"] > 0 and figures["one_core_certs_per_s"] > 0
    assert 0 < figures["one_core_server_busy_pct"] <= 110  # /proc ticks are 10 ms: a little slack
    cores = sorted(os.sched_getaffinity(0))
    assert [m for m in messages if "alone on core" in m] == [
        f"again with one server worker (TLS on {tls}) alone on core {cores[0]} and the robots on {cores[1:]}"
        for tls in runs]
    assert f"{bench.IN_FLIGHT} robots at once each" in figures["clients"]
    if "rustls" in runs:  # built by `make tlsfront`: measured against TLS in the worker
        assert figures["one_core_tls"] == "rustls" and figures["one_core_openssl_certs_per_s"] > 0
        assert figures["one_core_rustls_to_openssl_ratio"] > 0
    assert "10,000-robot fleet on a 2-core CA" in bench.table(
        {**figures, "cores": 2, "sign_only_certs_per_s": 1, "e2e_target_met": True, "e2e_share_of_sign_only_pct": 1,
         "fleet_10000_on_ca_cores_s": 1.0, "fleet_target_met": True})
