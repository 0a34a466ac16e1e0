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
    # enrolment, the shared-core re-issue and the one-core re-issue each put one row per robot
    assert figures["issued_rows"] == len(SQLiteStore(CAPaths(ca_dir).database).issued()) == 3 * robots
    assert figures["e2e_certs_per_s"] > 0 and figures["one_core_certs_per_s"] > 0
    assert 0 < figures["one_core_server_busy_pct"] <= 110  # /proc ticks are 10 ms: a little slack
    assert any("one server worker alone on core" in message for message in messages)
    assert f"{bench.IN_FLIGHT} robots at once each" in figures["clients"]
