"""`tensorguard`: run a unit in the foreground, as systemd does, or all three for development."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import UNITS, __version__
from ..config import DEFAULT_CONFIG
from .completion import DIRECTORY, FILE, complete_as

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


def build_parser(server_tree: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``server_tree`` its `server` command carries server.cli's whole tree.

    ``main`` hands `tensorguard server ...` to server.cli before parsing, so running needs only a
    stub there; the completion scripts need the tree.
    """
    parser = argparse.ArgumentParser(
        prog="tensorguard", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tensorguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for unit in (*UNITS, "agent"):
        helptext = ("run netguard, identity and fl in one process" if unit == "agent"
                    else f"run the {unit} unit")
        cmd = sub.add_parser(unit, help=helptext, description=helptext)
        complete_as(cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="PATH",
                                     help=f"main config file (default: {DEFAULT_CONFIG})"), FILE)
        complete_as(cmd.add_argument("--drop-in-dir", type=Path, default=None, metavar="DIR",
                                     help="drop-in directory (default: agent.d beside the config)"),
                    DIRECTORY)
    server_help = "the control plane: CA, bootstrap tokens, HTTPS API (`tensorguard server --help`)"
    if server_tree:
        from ..server.cli import build_parser as server_parser  # noqa: PLC0415

        tree = server_parser(host_details=False)
        sub.add_parser("server", help=server_help, description=tree.description, epilog=tree.epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter, parents=[tree],
                       add_help=False)  # the tree's own -h comes with it
    else:
        sub.add_parser("server", help=server_help, add_help=False)
    bench = sub.add_parser(
        "bench", help="measure the project against its baseline in one run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks measure TensorGuard and its baseline in the same run and print a "
        "table with the ratio.\n\n"
        "  datapath  UDP and TCP between two network namespaces through (a) no agent, (b) netguard's\n"
        "            eBPF telemetry, (c) pace mode with CBR; needs root\n"
        "  renewal   the fault harness: 1,000 robots (100 with --quick) x 24 h of CA outages, clock\n"
        "            steps, suspends, kill -9 mid-install and full disks, replayed against\n"
        "            TensorGuard's renewal, step-ca's and cert-manager's policies\n"
        "  identity  CA issuance over HTTPS next to the sign-only ceiling, re-issuing a 10,000-robot\n"
        "            fleet, and verifying a 1,000,000-entry audit log")
    bench.add_argument("name", choices=["datapath", "renewal", "identity"])
    bench.add_argument("--quick", action="store_true", help="fewer packets: a minute or two")
    bench.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:  # its own command tree (tensorguard.server.cli)
        from ..server.cli import main as server_main  # noqa: PLC0415

        return server_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run_bench  # noqa: PLC0415 (late import keeps --help fast)

        return run_bench(args.name, args.quick, args.json)
    from ..service.runner import run_units  # noqa: PLC0415 (late import keeps --help fast)

    units = list(UNITS) if args.command == "agent" else [args.command]
    return run_units(units, args.config, args.drop_in_dir)


if __name__ == "__main__":
    sys.exit(main())
