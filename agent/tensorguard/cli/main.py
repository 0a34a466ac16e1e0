"""`tensorguard`: run a unit in the foreground, as systemd does, or all three for development."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..service.runner import run_units  # noqa: PLC0415 (late import keeps --help fast)

    units = list(UNITS) if args.command == "agent" else [args.command]
    return run_units(units, args.config, args.drop_in_dir)


if __name__ == "__main__":
    sys.exit(main())
