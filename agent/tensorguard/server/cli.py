"""`tensorguard server ...`: create the CA, hand out bootstrap tokens, run the API, benchmark it."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

from .engine import HTTP_CHOICES, LOOP_CHOICES, preview, select
from .settings import TLS_CHOICES
from .timeutil import parse_duration, utc_now
from .tlsfront import find_binary

DESCRIPTION = """\
The TensorGuard control plane. So far: a certificate authority (offline-capable
root, online intermediate) that gives robots short-lived certificates with their
SPIFFE ID (spiffe://<trust-domain>/robot/<node-id>) over RFC 7030 (EST):

  GET  /.well-known/est/cacerts         CA certificates (certs-only PKCS#7)
  POST /.well-known/est/simpleenroll    first certificate; Authorization: Bearer <token>
  POST /.well-known/est/simplereenroll  renewal; authorised by the current cert (mTLS)

Typical use:
  tensorguard server ca init --dir /var/lib/tensorguard/ca --trust-domain fleet.example \\
      --host-name ca.fleet.example
  tensorguard server token create --dir /var/lib/tensorguard/ca --node-id robot-0042
  tensorguard server serve --dir /var/lib/tensorguard/ca --host 0.0.0.0 --port 8443 --workers 2

After `ca init`, move DIR/root.key to offline storage: the server signs with the
intermediate only."""

EPILOG = """\
exit status:
  0  success
  1  failure (the message names the file or value that is wrong)
  2  bad command line"""


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(host_details: bool = True) -> argparse.ArgumentParser:
    """The argument parser; without host_details, for completion scripts built on another host."""
    parser = argparse.ArgumentParser(prog="tensorguard server", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="create or inspect the CA", description="Create or inspect the CA.")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    init = ca_sub.add_parser(
        "init", help="create root, intermediate and the API's server certificate",
        description="Create a new CA in DIR (refuses to overwrite one): root (P-256, pathlen 1), "
        "intermediate (pathlen 0) and a TLS certificate for the API's host names. Keys are written 0600.")
    init.add_argument("--dir", type=Path, required=True, help="CA directory (created 0700 if missing)")
    init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. fleet.example")
    init.add_argument("--host-name", dest="host_names", action="append", default=None, metavar="NAME",
                      help="DNS name or IP address of the API (repeatable; default: localhost and 127.0.0.1)")
    show = ca_sub.add_parser("show", help="print the CA's trust domain, validity and root key status",
                             description="Print what is in a CA directory as JSON.")
    show.add_argument("--dir", type=Path, required=True, help="CA directory")

    token = sub.add_parser("token", help="bootstrap tokens", description="Bootstrap tokens.")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="TOKEN_COMMAND")
    create = token_sub.add_parser(
        "create", help="create a one-time enrolment token for a node",
        description="Create a single-use bootstrap token bound to NODE_ID. The token is printed once, to "
        "stdout only; the CA stores only its SHA-256.")
    create.add_argument("--dir", type=Path, required=True, help="CA directory")
    create.add_argument("--node-id", required=True, help="the node the token may enrol")
    create.add_argument("--ttl", type=_duration, default=timedelta(hours=1),
                        help="how long the token stays valid, e.g. 30m, 1h, 7d (default: 1h)")

    auto = preview()
    here = auto.describe()

    def on_host(what: str) -> str:  # what this host would pick: in --help, not in completion scripts
        return f"; here: {what}" if host_details else ""

    srv = sub.add_parser("serve", help="run the HTTPS API", description="Run the HTTPS API (EST, /healthz, "
                         "/docs) until SIGTERM. Prints the URL on stdout once listening. HTTP/1.1 runs on "
                         f"httptools (C parser) and uvloop when they are installed, else on h11 and asyncio"
                         f"{on_host(here)} (also printed on stderr at start).")
    srv.add_argument("--dir", type=Path, required=True, help="CA directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8443, help="port (default: 8443; 0 picks a free one)")
    srv.add_argument("--workers", type=int, default=1,
                     help="worker processes sharing the socket (default: 1)")
    srv.add_argument("--cert-lifetime", type=_duration, default=timedelta(hours=1),
                     help="lifetime of issued certificates (default: 1h)")
    srv.add_argument("--backdate", type=_duration, default=timedelta(seconds=60),
                     help="notBefore is set this far in the past for clock skew (default: 60s)")
    srv.add_argument("--dns-template", dest="dns_templates", action="append", default=[], metavar="TEMPLATE",
                     help="DNS name a node may request, with {node} for its id, e.g. {node}.robots.example "
                     "(repeatable; default: none)")
    srv.add_argument("--max-body-bytes", type=int, default=16 * 1024,
                     help="largest accepted request body (default: 16384)")
    srv.add_argument("--sqlite-synchronous", default="NORMAL", choices=["NORMAL", "FULL"],
                     help="SQLite durability: NORMAL (WAL, no fsync per commit) or FULL (default: NORMAL)")
    srv.add_argument("--http", default="auto", choices=HTTP_CHOICES,
                     help=f"HTTP/1.1 parser (default: auto, i.e. httptools if installed{on_host(auto.http)})")
    srv.add_argument("--loop", default="auto", choices=LOOP_CHOICES,
                     help=f"event loop (default: auto, i.e. uvloop if installed{on_host(auto.loop)})")
    front = find_binary()
    srv.add_argument("--tls", default="auto", choices=TLS_CHOICES,
                     help="who terminates TLS: rustls (the tensorguard-tlsfront process, ~5x less CPU "
                     "per mutual-TLS handshake), openssl (Python's ssl in each worker), or auto, i.e. rustls "
                     f"when installed (default: auto{on_host('rustls' if front else 'openssl')})")
    srv.add_argument("--handshake-timeout", type=int, default=10, metavar="SECONDS",
                     help="close a connection whose TLS handshake is not done by then (default: 10)")
    srv.add_argument("--idle-timeout", type=int, default=30, metavar="SECONDS",
                     help="close a connection silent that long, before its first request or between "
                     "requests (default: 30)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--access-log", action="store_true", help="log every request")

    bench = sub.add_parser("bench", help="measure issuance throughput over HTTPS",
                           description="Start a real server (2 workers) on 127.0.0.1, enrol robots over "
                           "HTTPS from client processes, re-issue the fleet over mTLS, and print the "
                           "figures next to this machine's sign-only ceiling.")
    bench.add_argument("--quick", action="store_true", help="fewer robots (a few seconds)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--http", default="auto", choices=HTTP_CHOICES,
                       help="HTTP/1.1 parser of the server under test (default: auto)")
    bench.add_argument("--loop", default="auto", choices=LOOP_CHOICES,
                       help="event loop of the server under test (default: auto)")
    return parser


def _ca_init(args: argparse.Namespace) -> int:
    from .ca import init_ca  # noqa: PLC0415 (keep --help fast)

    hosts = args.host_names or ["localhost", "127.0.0.1"]
    init_ca(args.dir, args.trust_domain, hosts, utc_now())
    print(f"created CA for trust domain {args.trust_domain} in {args.dir}; API certificate for "
          f"{', '.join(hosts)}.\nMove {args.dir / 'root.key'} to offline storage: it is not needed to serve.")
    return 0


def _ca_show(args: argparse.Namespace) -> int:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

    from .ca import CAPaths, read_trust_domain  # noqa: PLC0415

    paths = CAPaths(args.dir)
    info: dict[str, object] = {"trust_domain": read_trust_domain(args.dir),
                               "root_key_present": paths.root_key.exists()}
    for name, path in (("root", paths.root_cert), ("intermediate", paths.intermediate_cert)):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        info[name] = {"subject": cert.subject.rfc4514_string(),
                      "not_after": cert.not_valid_after.isoformat() + "Z",
                      "sha256": cert.fingerprint(hashes.SHA256()).hex()}
    print(json.dumps(info, indent=2))
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from .ca import CAPaths, read_trust_domain  # noqa: PLC0415
    from .spiffe import check_node_id  # noqa: PLC0415
    from .store import SQLiteStore  # noqa: PLC0415
    from .tokens import new_token, token_hash, token_ref  # noqa: PLC0415

    read_trust_domain(args.dir)  # a CA must exist here
    node = check_node_id(args.node_id)
    store = SQLiteStore(CAPaths(args.dir).database)
    token = new_token()
    digest = token_hash(token)
    now = utc_now()
    expires = now + args.ttl
    store.add_token(digest, node, now, expires)
    store.append("token.created", {"time": now, "node": node, "token": token_ref(digest),
                                   "expires": expires.isoformat()})
    store.close()
    print(token)
    print(f"token {token_ref(digest)} for node {node}, single use, expires {expires.isoformat()}",
          file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve  # noqa: PLC0415
    from .settings import ServerSettings  # noqa: PLC0415

    settings = ServerSettings(
        ca_dir=args.dir, host=args.host, port=args.port, workers=args.workers,
        cert_lifetime=args.cert_lifetime, backdate=args.backdate, dns_templates=tuple(args.dns_templates),
        max_body_bytes=args.max_body_bytes,
        sqlite_synchronous=args.sqlite_synchronous, log_level=args.log_level, access_log=args.access_log,
        http=args.http, loop=args.loop, tls=args.tls, handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout)

    def announce(url: str) -> None:
        print(f"listening on {url}", flush=True)

    return serve(settings, announce)


def _bench(args: argparse.Namespace) -> int:
    from . import bench  # noqa: PLC0415

    def progress(message: str) -> None:
        print(f"[bench server] {message}", file=sys.stderr, flush=True)

    results = bench.run(args.quick, progress, select(args.http, args.loop))
    print(json.dumps(results, indent=2) if args.json else bench.table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `tensorguard server`; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {("ca", "init"): _ca_init, ("ca", "show"): _ca_show, ("token", "create"): _token_create}
    sub_command = getattr(args, "ca_command", "") or getattr(args, "token_command", "")
    key: tuple[str, str] = (args.command, sub_command)
    handler = handlers.get(key) or {"serve": _serve, "bench": _bench}.get(args.command)
    assert handler is not None
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 1
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"tensorguard server {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
