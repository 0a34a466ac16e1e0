"""`tensorguard bench NAME`: each benchmark measures TensorGuard and its baseline in one run."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str], None]


def bench_datapath(quick: bool, as_json: bool, progress: Progress) -> int:
    from ..netguard.bench import datapath  # noqa: PLC0415 (only this bench needs it)

    results, verdicts = datapath.run(quick, progress=progress)
    if as_json:
        print(json.dumps({**datapath.as_json(results, datapath.BASELINE), "targets": verdicts},
                         indent=2))
    else:
        print(datapath.table(results, datapath.BASELINE))
        for proto, verdict in verdicts.items():
            print(f"\n{proto}: eBPF telemetry costs {verdict['telemetry_throughput_cost_pct']}% of "
                  f"throughput (median of paired rounds; target <= 5%: "
                  f"{'met' if verdict['telemetry_cost_ok'] else 'MISSED'}) and "
                  f"{verdict['telemetry_cpu_per_packet_cost_pct']}% CPU per packet; "
                  f"pace path {verdict['pace_capacity_pps']} pkt/s (target >= 30000: "
                  f"{'met' if verdict['pace_capacity_ok'] else 'MISSED'}), loss at 80% "
                  f"{verdict['pace_loss_at_80pct']} ({'met' if verdict['pace_zero_loss_ok'] else 'MISSED'}), "
                  f"added p99 {verdict['pace_added_latency_p99_ms']} ms (target <= "
                  f"{verdict['pace_latency_limit_ms']} ms: "
                  f"{'met' if verdict['pace_latency_ok'] else 'MISSED'})")
    return 0


def bench_renewal(quick: bool, as_json: bool, progress: Progress) -> int:
    from ..identity.harness import run_harness  # noqa: PLC0415

    robots = 100 if quick else 1000
    report = run_harness(robots, 24.0, 3600.0, seed=1, progress=progress)
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.table())
    return 0 if report.tensorguard_wins() else 1


def bench_identity(quick: bool, as_json: bool, progress: Progress) -> int:
    from ..identity.audit.bench import bench_verify  # noqa: PLC0415
    from ..server.bench import run as bench_ca  # noqa: PLC0415

    figures = bench_ca(quick, progress)
    entries = 100_000 if quick else 1_000_000
    progress(f"audit log: building and verifying {entries:,} entries")
    with tempfile.TemporaryDirectory(prefix="tg-bench-audit-") as tmp:
        audit = bench_verify(entries, Path(tmp) / "log")
    figures["audit_verify"] = audit
    if as_json:
        print(json.dumps(figures, indent=2))
        return 0
    print(identity_table(figures))
    return 0


def identity_table(figures: dict[str, object]) -> str:
    audit = figures["audit_verify"]
    assert isinstance(audit, dict)
    cores = figures["cores"]
    lines = [f"{'figure':<58} {'measured':>10} {'target':>10}", "-" * 80]
    for key, label, target in (
            ("e2e_certs_per_s", "CA issuance end to end over HTTPS (certs/s)", ">= 1500"),
            ("sign_only_certs_per_s", "sign-only ceiling of this machine (certs/s)", "-"),
            ("e2e_share_of_sign_only_pct", "end to end as % of sign-only", "-"),
            ("fleet_reissue_s",
             f"re-issue {figures['fleet_reissue_robots']:,} robots, sharing the CA's cores (s)", "-"),
            ("one_core_certs_per_s", f"mTLS re-issues/s of one CA core, TLS on {figures.get('one_core_tls')}",
             "-"),
            ("one_core_server_busy_pct", "  that core's busy share (%)", "-"),
            ("one_core_server_cpu_ms_per_cert", "  CA CPU per re-issue (ms)", "-"),
            ("one_core_openssl_server_cpu_ms_per_cert", "  the same, TLS on OpenSSL in the worker (ms)", "-"),
            ("one_core_rustls_to_openssl_ratio", "  CPU per re-issue, OpenSSL / rustls", "-"),
            ("fleet_10000_on_ca_cores_s", f"10,000-robot fleet on a {cores}-core CA (s)", "<= 10")):
        value = figures.get(key)
        lines.append(f"{label:<58} {value if value is not None else '-':>10} {target:>10}")
    lines.append(f"{'verify a ' + format(audit['entries'], ',') + '-entry audit log (s)':<58} "
                 f"{audit['verify_seconds']:>10} {'<= 5':>10}")
    lines.append(f"(the fleet on the CA's cores is 10,000 x the CA's CPU per re-issue / {cores} cores, "
                 "measured with the robots on the other cores)")
    return "\n".join(lines)


BENCHES: dict[str, Callable[[bool, bool, Progress], int]] = {
    "datapath": bench_datapath, "renewal": bench_renewal, "identity": bench_identity}


def run_bench(name: str, quick: bool, as_json: bool) -> int:
    def progress(message: str) -> None:
        print(f"[bench {name}] {message}", file=sys.stderr, flush=True)

    try:
        return BENCHES[name](quick, as_json, progress)
    except (PermissionError, RuntimeError) as exc:
        print(f"tensorguard bench {name}: {exc}", file=sys.stderr)
        return 1
