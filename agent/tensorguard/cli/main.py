"""`tensorguard`: run a unit in the foreground, as systemd does, or all three for development."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import UNITS, __version__
from ..config import DEFAULT_CONFIG

DESCRIPTION = """\
Run TensorGuard units in the foreground. systemd runs `tensorguard netguard`,
`tensorguard identity` and `tensorguard fl` (one unit each); `tensorguard agent`
runs all three in one process for development and demos.

Each unit loads CONFIG plus CONFIG's directory/agent.d/*.toml, serves its control
socket (agent.socket_dir/<unit>.sock), notifies systemd when ready, re-reads the
config on SIGHUP (keeping the old one if the new one is invalid) and exits
cleanly on SIGTERM or Ctrl-C, removing its socket."""

EPILOG = """\
exit status:
  0   stopped cleanly
  1   could not start (e.g. the control socket is in use)
  78  the configuration is invalid (each error is logged with file and key)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorguard", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tensorguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for unit in (*UNITS, "agent"):
        helptext = ("run netguard, identity and fl in one process" if unit == "agent"
                    else f"run the {unit} unit")
        cmd = sub.add_parser(unit, help=helptext, description=helptext)
        cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="PATH",
                         help=f"main config file (default: {DEFAULT_CONFIG})")
        cmd.add_argument("--drop-in-dir", type=Path, default=None, metavar="DIR",
                         help="drop-in directory (default: agent.d beside the config)")
    bench = sub.add_parser(
        "bench", help="measure the project against its baseline in one run",
        description="Benchmarks measure TensorGuard and its baseline in the same run and print a "
        "table with the ratio. datapath: UDP and TCP between two network namespaces through (a) no "
        "agent, (b) netguard's eBPF telemetry, (c) pace mode with CBR; needs root.")
    bench.add_argument("name", choices=["datapath"])
    bench.add_argument("--quick", action="store_true", help="fewer packets: a minute or two")
    bench.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    return parser


def run_bench(name: str, quick: bool, as_json: bool) -> int:
    from ..netguard.bench import datapath  # noqa: PLC0415 (only the bench needs it)

    def progress(message: str) -> None:
        print(f"[bench {name}] {message}", file=sys.stderr, flush=True)

    try:
        results, verdicts = datapath.run(quick, progress=progress)
    except (PermissionError, RuntimeError) as exc:
        print(f"tensorguard bench {name}: {exc}", file=sys.stderr)
        return 1
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench(args.name, args.quick, args.json)
    from ..service.runner import run_units  # noqa: PLC0415 (late import keeps --help fast)

    units = list(UNITS) if args.command == "agent" else [args.command]
    return run_units(units, args.config, args.drop_in_dir)


if __name__ == "__main__":
    sys.exit(main())
