"""The benchmark's traffic harness, between two real namespaces (baseline case only)."""

from __future__ import annotations

import pytest

from tensorguard.netguard.bench.datapath import as_json, no_agent, run_cases, table, transfer

from ...netns import require_root_netns, veth_pair


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_transfer_delivers_and_times_every_message(proto: str) -> None:
    require_root_netns()
    with veth_pair(30) as link:
        run = transfer(link, proto, 3000, 2000.0)
    assert (run.sent, run.received, run.loss) == (3000, 3000, 0)
    assert 1.3 < run.seconds < 3.0  # paced at 2000/s
    assert 0 < run.latency_p50_ms <= run.latency_p99_ms < 50
    assert run.cpu_seconds > 0


def test_case_report_has_ratios_against_the_baseline() -> None:
    require_root_netns()
    with veth_pair(31) as link:
        (result,) = run_cases(link, {"no agent": no_agent}, ("udp",), count=5000, latency_rate=500.0,
                              progress=print, repeats=2)
    assert result.capacity_pps > 1000 and result.loss_at_80pct == 0
    report = as_json([result], "no agent")
    assert set(report["no agent"]["udp"]) >= {"capacity_pps", "cpu_us_per_packet", "latency_p99_ms"}
    assert "no agent" in table([result], "no agent")
