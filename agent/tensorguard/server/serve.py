"""Run the API as real HTTPS server processes: one listening socket shared by N uvicorn workers.

The parent binds the socket (so port 0 picks a free port it can announce), checks the CA once, builds
the TLS context, then forks the workers; each builds its own app and SQLite connection after the
fork. The workers inherit one TLS context, hence one set of session-ticket keys, so a robot can
resume its TLS session on any worker (resumption skips the certificate signature and chain checks,
which dominate a handshake's cost). The socket is
created with IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets, and without it
Nagle plus delayed ACKs add ~40 ms to every keep-alive request.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from .app import create_app
from .ca import CertificateAuthority, read_trust_domain
from .policy import IssuancePolicy
from .settings import ServerSettings
from .store import SQLiteStore
from .tlsproto import PeerCertH11Protocol, server_context


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 by the host's form); port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check(settings: ServerSettings) -> None:
    """Fail before forking if the CA directory or database cannot be used (CAError, OSError...)."""
    policy = IssuancePolicy(read_trust_domain(settings.ca_dir), settings.cert_lifetime, settings.backdate,
                            settings.dns_templates)
    CertificateAuthority.load(settings.ca_dir, policy)
    SQLiteStore(settings.paths.database, settings.sqlite_synchronous).close()


def run_worker(settings: ServerSettings, sock: socket.socket, context: ssl.SSLContext | None = None) -> None:
    """One uvicorn server on the shared socket, until SIGTERM/SIGINT."""
    paths = settings.paths
    if context is None:
        context = server_context(paths.server_cert, paths.server_key, paths.bundle)
    server_pem = paths.server_cert.read_text().split("-----END CERTIFICATE-----")[0] + \
        "-----END CERTIFICATE-----\n"
    protocol = type("ServerPeerCertH11Protocol", (PeerCertH11Protocol,), {"server_cert_pem": server_pem})
    config = uvicorn.Config(
        create_app(settings), http=protocol, ssl_context_factory=lambda _config, _default: context,
        lifespan="off", log_level=settings.log_level, access_log=settings.access_log,
        server_header=False, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


def serve(settings: ServerSettings, announce: Callable[[str], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (1 if a worker died on its own)."""
    check(settings)
    paths = settings.paths
    context = server_context(paths.server_cert, paths.server_key, paths.bundle)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if settings.workers == 1:
        announce(url)
        run_worker(settings, sock, context)
        return 0
    children: set[int] = set()
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            status = 0
            try:
                run_worker(settings, sock, context)
            except BaseException as exc:  # a worker must never return into the parent's code
                print(f"tensorguard server worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
                status = 1
            os._exit(status)
        children.add(pid)
    sock.close()
    announce(url)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        children.discard(pid)
        if not stopping:
            print(f"tensorguard server: worker {pid} exited ({code}); stopping the others", file=sys.stderr,
                  flush=True)
            status = 1
            stop(signal.SIGTERM, None)
    return status
