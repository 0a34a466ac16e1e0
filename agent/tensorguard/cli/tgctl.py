"""`tgctl`: the one CLI people type; a thin layer over the units' control sockets."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import UNITS, __version__
from ..config import DEFAULT_CONFIG, ConfigError, load_config
from ..config.loader import read_merged
from ..config.reference import dumps, example_config
from ..control import ControlClient, RpcError, UnitUnavailable
from ..control.protocol import PERMISSION_DENIED
from . import completion
from .completion import DIRECTORY, FILE, complete_as

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_DENIED = 4

DEFAULT_SOCKET_DIR = Path("/run/tensorguard")
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))


def installed_units(unit_dirs: tuple[Path, ...] = UNIT_DIRS) -> tuple[list[str], list[str]]:
    """Units to expect, and units not installed.

    On a packaged system (tensorguard-agent.target is installed) a unit whose service file is
    absent, such as fl without the tensorguard-fl package, is not expected to run. Elsewhere
    (a development checkout) all three are.
    """
    def has(name: str) -> bool:
        return any((d / name).exists() for d in unit_dirs)

    if not has("tensorguard-agent.target"):
        return list(UNITS), []
    present = [u for u in UNITS if has(f"tensorguard-{u}.service")]
    return present, [u for u in UNITS if u not in present]

EPILOG = f"""\
exit status:
  {EXIT_OK}  success
  {EXIT_FAILED}  the command failed (invalid config, reload refused, error from a unit)
  {EXIT_USAGE}  usage error
  {EXIT_NOT_RUNNING}  a unit asked for is not running (without --unit: an installed unit)
  {EXIT_DENIED}  permission denied (run as root or as a member of group 'tensorguard')

environment:
  TENSORGUARD_CONFIG      main config file (default {DEFAULT_CONFIG})
  TENSORGUARD_SOCKET_DIR  socket directory (default: agent.socket_dir of the config,
                          else {DEFAULT_SOCKET_DIR})

examples:
  tgctl status                     one line per unit
  tgctl --json status              the same as JSON
  tgctl config validate            check /etc/tensorguard/agent.toml and agent.d/
  tgctl --unit identity config reload
"""


class Failure(Exception):
    """A command failed; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Ctl:
    """Resolved options shared by the subcommands."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json: bool = args.json
        self.timeout: float = args.timeout
        self.config = Path(args.config or os.environ.get("TENSORGUARD_CONFIG") or DEFAULT_CONFIG)
        self.units, self.not_installed = ([args.unit], []) if args.unit else installed_units()
        self.unit_given = args.unit is not None
        self.socket_dir = self._socket_dir(args.socket_dir)

    def _socket_dir(self, given: Path | None) -> Path:
        if given:
            return given
        if os.environ.get("TENSORGUARD_SOCKET_DIR"):
            return Path(os.environ["TENSORGUARD_SOCKET_DIR"])
        # Read the raw files: the socket must be found even when a drop-in is invalid.
        agent = read_merged(self.config)[1].get("agent")
        found = agent.get("socket_dir") if isinstance(agent, dict) else None
        return Path(found) if isinstance(found, str) and found.startswith("/") else (
            DEFAULT_SOCKET_DIR)

    def socket(self, unit: str) -> Path:
        return self.socket_dir / f"{unit}.sock"

    def call(self, unit: str, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            with ControlClient(self.socket(unit), self.timeout) as client:
                return client.call(method, params)
        except UnitUnavailable as exc:
            raise Failure(f"{unit}: not running ({exc.strerror})", EXIT_NOT_RUNNING) from None
        except PermissionError:
            raise Failure(f"{unit}: permission denied on {self.socket(unit)}; run as root or "
                          "as a member of group 'tensorguard'", EXIT_DENIED) from None
        except RpcError as exc:
            code = EXIT_DENIED if exc.code == PERMISSION_DENIED else EXIT_FAILED
            raise Failure(f"{unit}: {exc.message}", code) from None
        except (OSError, ValueError) as exc:
            raise Failure(f"{unit}: {self.socket(unit)}: {exc}") from None

    def emit(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2) if self.json else text)


def cmd_status(ctl: Ctl) -> int:
    rows = []
    worst = EXIT_OK
    for unit in ctl.units:
        try:
            health = ctl.call(unit, "sys.health")
            rows.append({"unit": unit, "running": True, "version": ctl.call(unit, "sys.version")
                         ["version"], "config_generation": health["config_generation"],
                         "status": health["status"], "subsystem": health["subsystem"],
                         "pid": health["pid"], "uptime_s": health["uptime_s"]})
        except Failure as exc:
            worst = max(worst, exc.code)
            rows.append({"unit": unit, "running": False, "error": str(exc).split(": ", 1)[1],
                         "exit_code": exc.code})
    rows += [{"unit": unit, "running": False, "installed": False} for unit in ctl.not_installed]
    lines = [f"{'UNIT':<9} {'STATE':<13} {'VERSION':<8} {'CONFIG':<7} SUBSYSTEM"]
    for row in rows:
        if row["running"]:
            sub = row["subsystem"]
            lines.append(f"{row['unit']:<9} {'running':<13} {row['version']:<8} "
                         f"{'gen ' + str(row['config_generation']):<7} "
                         f"{sub['state']}: {sub['detail']}")
        elif row.get("installed") is False:
            lines.append(f"{row['unit']:<9} {'not installed':<13} {'-':<8} {'-':<7} "
                         f"package tensorguard-{row['unit']} is not installed")
        else:
            lines.append(f"{row['unit']:<9} {'not running':<13} {'-':<8} {'-':<7} {row['error']}")
    ctl.emit({"units": rows}, "\n".join(lines))
    return worst


def cmd_config_validate(ctl: Ctl, file: Path | None) -> int:
    path = file or ctl.config
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        ctl.emit({"valid": False, "errors": [i.as_dict() for i in exc.issues]},
                 "\n".join(str(i) for i in exc.issues))
        return EXIT_FAILED
    ctl.emit({"valid": True, "sources": list(loaded.sources)},
             f"valid: {', '.join(loaded.sources)}")
    return EXIT_OK


def _first_running(ctl: Ctl, method: str) -> tuple[str, Any]:
    failure: Failure | None = None
    for unit in ctl.units:
        try:
            return unit, ctl.call(unit, method)
        except Failure as exc:
            if exc.code != EXIT_NOT_RUNNING:
                raise
            failure = exc
    assert failure is not None
    raise Failure("no unit is running" if not ctl.unit_given else str(failure), EXIT_NOT_RUNNING)


def cmd_config_show(ctl: Ctl) -> int:
    unit, shown = _first_running(ctl, "config.show")
    header = [f"# running config of {unit}, generation {shown['generation']}",
              *(f"# from {src}" for src in shown["sources"])]
    if shown.get("last_reload_error"):
        header.append("# last reload was refused:")
        header += [f"#   {e['file']}: {e['key']}: {e['message']}" for e in
                   shown["last_reload_error"]]
    ctl.emit({"unit": unit, **shown}, "\n".join(header) + "\n" + dumps(shown["config"]))
    return EXIT_OK


def cmd_config_reload(ctl: Ctl) -> int:
    results: dict[str, Any] = {}
    worst = EXIT_OK
    lines = []
    running = 0
    for unit in ctl.units:
        try:
            res = ctl.call(unit, "config.reload")
        except Failure as exc:
            if exc.code == EXIT_NOT_RUNNING and not ctl.unit_given:
                results[unit] = {"running": False}
                continue
            worst = max(worst, exc.code)
            results[unit] = {"error": str(exc)}
            lines.append(str(exc))
            running += exc.code != EXIT_NOT_RUNNING
            continue
        running += 1
        results[unit] = res
        lines.append(f"{unit}: reloaded, config generation {res['generation']}"
                     + ("" if res["changed"] else " (unchanged)"))
    if not running and not ctl.unit_given:
        worst = EXIT_NOT_RUNNING
        lines.append("no unit is running")
    if ctl.json:
        print(json.dumps(results, indent=2))
    else:
        for line in lines:
            print(line, file=sys.stderr if worst else sys.stdout)
    return worst


def cmd_config_example(ctl: Ctl) -> int:
    sys.stdout.write(example_config())
    return EXIT_OK


def _only(unit: str, commands: str) -> Callable[..., Any]:
    """A caller for commands that talk to one unit: ``--unit`` may only name that one."""

    def call(ctl: Ctl, method: str, params: dict[str, Any] | None = None) -> Any:
        if ctl.unit_given and ctl.units != [unit]:
            raise Failure(f"{commands} commands talk to the {unit} unit only", EXIT_USAGE)
        return ctl.call(unit, method, params)

    return call


_netguard = _only("netguard", "net")
_identity = _only("identity", "identity")


def cmd_net_status(ctl: Ctl) -> int:
    status = _netguard(ctl, "net.status")
    lines = [f"netguard: {status['state']}: {status['detail']}"]
    for ifname, info in status.get("interfaces", {}).items():
        lines.append(f"  {ifname}: eBPF {'attached' if info['attached'] else 'detached'}, "
                     f"mode {info['mode']}")
    pacer = status.get("pacer")
    if pacer:
        lines.append(f"  pacer (queue {pacer['queue']}): {pacer['released']} released, "
                     f"{pacer['held']} held, {pacer['dummies']} dummies, {pacer['dropped']} dropped, "
                     f"max hold {pacer['max_queue_delay'] * 1e3:.1f} ms")
    for unit, state in (status.get("units") or {}).items():
        lines.append(f"  unit {unit}: " + (f"running (cgroup {state['cgroup_id']}), its traffic is "
                                           "protected" if state["running"] else
                                           "not running; protected again as soon as it starts"))
    ctl.emit(status, "\n".join(lines))
    return EXIT_OK


def cmd_net_stats(ctl: Ctl) -> int:
    stats = _netguard(ctl, "net.stats")
    lines = [f"{'INTERFACE':<10} {'FLOW':<12} {'DIR':<8} {'PACKETS':>9} {'BYTES':>11} "
             f"{'DROPPED':>8} {'UNSHAPED':>9} {'~SIZE':>6}"]
    for row in stats:
        lines.append(f"{row['interface']:<10} {row['flow']:<12} {row['direction']:<8} "
                     f"{row['packets']:>9} {row['bytes']:>11} {row['dropped']:>8} {row['unshaped']:>9} "
                     f"{row['bytes'] / row['packets'] if row['packets'] else 0:>6.0f}")
    ctl.emit(stats, "\n".join(lines))
    return EXIT_OK


def cmd_net_flows(ctl: Ctl) -> int:
    flows = _netguard(ctl, "net.flows")
    lines = [f"{'FLOW':<12} {'DIR':<8} {'PROTO':<5} {'LOCAL':<30} {'REMOTE':<30} {'PACKETS':>9}"]
    for f in flows:
        lines.append(f"{f['flow']:<12} {f['direction']:<8} {f['protocol']!s:<5} "
                     f"{f['local']}:{f['local_port']!s:<30} {f['remote']}:{f['remote_port']!s:<30} "
                     f"{f['packets']:>9}")
    ctl.emit(flows, "\n".join(lines))
    return EXIT_OK


def cmd_net_defence(ctl: Ctl, kind: str, rate: float | None) -> int:
    params: dict[str, Any] = {"kind": kind}
    if rate is not None:
        params["rate_hz"] = rate
    status = _netguard(ctl, "net.defence.set", params)
    ctl.emit(status, f"netguard: {status['detail']} (until the next reload or restart)")
    return EXIT_OK




def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_identity_show(ctl: Ctl) -> int:
    info = _identity(ctl, "identity.show")
    lines = [f"identity: {info['state']}: {info['detail']}"]
    if "serial" in info:
        nxt = info.get("next_renewal_in_s")
        lines += [f"  spiffe id:     {info['spiffe_id']}",
                  f"  serial:        {info['serial']}",
                  f"  valid:         {_when(info['not_before'])} .. {_when(info['not_after'])} "
                  f"({info['expires_in_s']:.0f} s left)",
                  f"  next renewal:  {'-' if nxt is None else f'in {nxt:.0f} s'} ({info['phase']})",
                  f"  renewals:      {info['renewals']} ({info['failures']} failed attempts)"]
        for sink in info.get("sinks", []):
            state = {True: "current", False: "STALE", None: "-"}[sink["current"]]
            lines.append(f"  sink {sink['name']} ({sink['kind']}): {state}; reload: {sink['reload']}")
    if info.get("audit_size") is not None:
        lines.append(f"  audit log:     {info['audit_size']} entries")
    ctl.emit(info, "\n".join(lines))
    return EXIT_OK


def cmd_identity_renew(ctl: Ctl) -> int:
    done = _identity(ctl, "identity.renew")
    ctl.emit(done, f"identity: renewed: serial {done['serial']}, valid until {_when(done['not_after'])}")
    return EXIT_OK


def cmd_identity_enrol(ctl: Ctl, token_file: Path | None) -> int:
    if token_file is None or str(token_file) == "-":
        token = sys.stdin.readline().strip()
    else:
        try:
            token = token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure(f"cannot read the token from {token_file}: {exc}", EXIT_USAGE) from None
    if not token:
        raise Failure("no bootstrap token given (on stdin or with --token-file)", EXIT_USAGE)
    done = _identity(ctl, "identity.enrol", {"token": token})
    ctl.emit(done, f"identity: enrolled: serial {done['serial']}, valid until {_when(done['not_after'])}")
    return EXIT_OK


def cmd_identity_audit_verify(ctl: Ctl) -> int:
    result = _identity(ctl, "identity.audit.verify")
    if not result["ok"]:
        ctl.emit(result, f"identity audit: VERIFICATION FAILED: {result['error']}")
        return EXIT_FAILED
    ctl.emit(result, f"identity audit: ok: {result['size']} entries, root {result['root']}, "
             f"consistent with the previously verified size {result['previous_verified_size']} "
             f"({result['seconds'] * 1e3:.1f} ms)\nverifier key: {result['vkey']}")
    return EXIT_OK


def cmd_identity_audit_proof(ctl: Ctl, index: int, size: int | None) -> int:
    params: dict[str, Any] = {"index": index}
    if size is not None:
        params["size"] = size
    proof = _identity(ctl, "identity.audit.proof", params)
    print(json.dumps(proof, indent=2))
    return EXIT_OK


def cmd_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    try:
        sys.stdout.write(completion.script(parser, shell))
    except completion.CompletionUnavailable as exc:
        print(f"tgctl completion {shell}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgctl", description="Inspect and control the TensorGuard agent's units "
        "(netguard, identity, fl) through their control sockets.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tgctl {__version__}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--unit", choices=UNITS, help="address one unit (default: all)")
    complete_as(parser.add_argument("--config", type=Path, metavar="PATH",
                                    help=f"main config file (default: {DEFAULT_CONFIG})"), FILE)
    complete_as(parser.add_argument("--socket-dir", type=Path, metavar="DIR",
                                    help="directory of the units' sockets"), DIRECTORY)
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for a unit's answer (default: 10)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="state of each unit (exit 3 if one is not running)",
                   description="One line per unit: running or not, version, config "
                   "generation, subsystem state.")
    config = sub.add_parser("config", help="validate, show or reload the configuration")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    validate = csub.add_parser("validate", help="check a config and its drop-ins without "
                               "applying it", description="Validate FILE (default: the main "
                               "config) merged with the agent.d/*.toml drop-ins beside it.")
    complete_as(validate.add_argument("file", nargs="?", type=Path, metavar="FILE"), FILE)
    csub.add_parser("show", help="the running config of a unit, as TOML")
    csub.add_parser("reload", help="make running units re-read the config (refused if invalid)")
    csub.add_parser("example", help="print the documented example config")
    net = sub.add_parser("net", help="netguard: datapath status, wire statistics, defence")
    nsub = net.add_subparsers(dest="net_command", required=True, metavar="ACTION")
    nsub.add_parser("status", help="interfaces, eBPF mode, defence and pacer counters")
    nsub.add_parser("stats", help="wire view per protected flow and direction (from the eBPF maps)")
    nsub.add_parser("flows", help="protected connections seen on the wire")
    defence = nsub.add_parser("defence", help="switch the running defence (until reload/restart)")
    defence.add_argument("kind", choices=["none", "cbr", "front", "wtfpad", "regulator"])
    defence.add_argument("--rate", type=float, metavar="HZ", help="slots per second (cbr, regulator)")
    ident = sub.add_parser("identity", help="identity: certificate, renewal, enrolment, audit log")
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="ACTION")
    isub.add_parser("show", help="current certificate, expiry, next renewal and sinks")
    isub.add_parser("renew", help="renew now over mTLS and reload the sinks")
    enrol = isub.add_parser(
        "enrol", help="enrol with a one-time bootstrap token (the way back after expiry)",
        description="Enrol with a bootstrap token from `tensorguard server token create`, read "
        "from --token-file or from standard input (never from the command line, where other users "
        "could see it in the process list).")
    complete_as(enrol.add_argument("--token-file", type=Path, metavar="FILE", help="file holding "
                                   "the token (default: read standard input)"), FILE)
    audit = isub.add_parser("audit", help="verify the audit log or print an inclusion proof")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    asub.add_parser("verify", help="check every entry, the signed checkpoint and consistency with "
                    "the last verified checkpoint (exit 1 if anything fails)")
    proof = asub.add_parser("proof", help="RFC 9162 inclusion proof of one entry, as JSON")
    proof.add_argument("index", type=int, help="entry index (from 0)")
    proof.add_argument("--size", type=int, help="tree size to prove against (default: latest)")
    shell = sub.add_parser("completion", help="print a bash or zsh completion script (needs shtab)",
                           description="Print the completion script for SHELL, written by shtab "
                           "from this command's own parser. The Debian package installs both "
                           "already.")
    shell.add_argument("shell", choices=completion.SHELLS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        return cmd_completion(parser, args.shell)
    ctl = Ctl(args)
    commands: dict[tuple[str, str | None], Callable[[], int]] = {
        ("status", None): lambda: cmd_status(ctl),
        ("config", "validate"): lambda: cmd_config_validate(ctl, args.file),
        ("config", "show"): lambda: cmd_config_show(ctl),
        ("config", "reload"): lambda: cmd_config_reload(ctl),
        ("config", "example"): lambda: cmd_config_example(ctl),
        ("net", "status"): lambda: cmd_net_status(ctl),
        ("net", "stats"): lambda: cmd_net_stats(ctl),
        ("net", "flows"): lambda: cmd_net_flows(ctl),
        ("net", "defence"): lambda: cmd_net_defence(ctl, args.kind, args.rate),
        ("identity", "show"): lambda: cmd_identity_show(ctl),
        ("identity", "renew"): lambda: cmd_identity_renew(ctl),
        ("identity", "enrol"): lambda: cmd_identity_enrol(ctl, args.token_file),
        ("identity", "audit verify"): lambda: cmd_identity_audit_verify(ctl),
        ("identity", "audit proof"): lambda: cmd_identity_audit_proof(ctl, args.index, args.size),
    }
    action = (getattr(args, "config_command", None) or getattr(args, "net_command", None)
              or getattr(args, "identity_command", None))
    if action == "audit":
        action = f"audit {args.audit_command}"
    try:
        return commands[(args.command, action)]()
    except Failure as exc:
        print(f"tgctl: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
