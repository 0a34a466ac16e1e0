"""Run the API as real server processes: the rustls TLS front and N uvicorn workers behind it, or N
uvicorn workers terminating TLS themselves (``--tls openssl``).

The parent binds the TCP socket(s) (so port 0 picks a free port it can announce) and checks the CA once.
With the front (`tlsfront`), it makes a 0700 directory with one Unix socket per worker, starts
`tensorguard-tlsfront` on the TCP socket (it hands each robot connection to a worker, round robin,
behind a PROXY v2 header) and forks the workers onto the Unix sockets. Without it, it builds the TLS
context and forks the workers, each on its own TCP socket: the sockets share the port through
SO_REUSEPORT, so the kernel spreads connections evenly (with one shared socket, whichever worker woke
first accepted every pending connection, since uvloop accepts until the queue is empty). Each worker
builds its own app and SQLite connection after the fork and runs the parser and loop `engine.select`
picked (httptools on uvloop when installed, h11 on asyncio otherwise); workers and front exit when the
parent dies. TCP sockets are created with IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such
sockets, and without it Nagle plus delayed ACKs add ~40 ms to every keep-alive request. uvicorn's
proxy-header middleware is off: TLS ends in this server (mTLS cannot pass a proxy), so an
X-Forwarded-For header from a local client must not rewrite the address in audit rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ..service.sdnotify import Notifier, watchdog_interval
from .app import create_app
from .ca import CertificateAuthority, read_trust_domain
from .deadlines import HandshakeDeadlineServer, with_first_request_deadline
from .engine import Engine, select
from .policy import IssuancePolicy
from .settings import ServerSettings
from .store import SQLiteStore
from .tlsfront import BINARY, INSTALLED, TLSFrontError, find_binary
from .tlsproto import server_context

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies."""


def bind(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """``count`` listening TCP sockets on one address (IPv4 or IPv6 by the host's form), one per worker;
    port 0 picks a free port. With more than one they share the port through SO_REUSEPORT, after a probe
    without it has shown that nothing else listens there (SO_REUSEPORT would silently share the port with
    another server of the same user, e.g. one left running)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        if port and count > 1:
            with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # the others join the port the first one got
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(exc.errno, f"cannot listen on {host} port {port}: {exc.strerror}") from None
    return socks


def check(settings: ServerSettings) -> Engine:
    """Fail before forking if the CA directory or database cannot be used (CAError, OSError...), or if
    the parser or loop asked for is missing (EngineError); returns the engine the workers will run."""
    engine = select(settings.http, settings.loop)
    policy = IssuancePolicy(read_trust_domain(settings.ca_dir), settings.cert_lifetime, settings.backdate,
                            settings.dns_templates)
    CertificateAuthority.load(settings.ca_dir, policy)
    SQLiteStore(settings.paths.database, settings.sqlite_synchronous).close()
    return engine


def tls_context(settings: ServerSettings) -> ssl.SSLContext:
    """The API's TLS context: its certificate chain, and client certificates signed by the intermediate."""
    paths = settings.paths
    return server_context(paths.server_cert, paths.server_key, paths.intermediate_cert)


def run_worker(settings: ServerSettings, sock: socket.socket, context: ssl.SSLContext | None = None,
               engine: Engine | None = None, proxied: bool = False) -> None:
    """One uvicorn server on its listening socket, until SIGTERM/SIGINT: HTTPS with ``context`` (built
    from the settings if None), or with ``proxied`` plain HTTP from the rustls front on a Unix socket.
    A connection silent for the idle timeout (before its first request too) or slower than the handshake
    timeout to finish its TLS handshake is closed (see `deadlines`)."""
    paths = settings.paths
    if context is None and not proxied:
        context = tls_context(settings)
    if engine is None:
        engine = select(settings.http, settings.loop)
    server_pem = paths.server_cert.read_text().split("-----END CERTIFICATE-----")[0] + \
        "-----END CERTIFICATE-----\n"
    tls: dict[str, Any] = {} if proxied else {"ssl_context_factory": lambda _config, _default: context}
    config = uvicorn.Config(
        create_app(settings), http=with_first_request_deadline(engine.protocol(server_pem, proxied)),
        loop=engine.loop, proxy_headers=False, lifespan="off", log_level=settings.log_level,
        access_log=settings.access_log, server_header=False, timeout_keep_alive=settings.idle_timeout, **tls)
    HandshakeDeadlineServer(config, settings.handshake_timeout).run(sockets=[sock])


def follow_parent(parent: int) -> None:
    """In a worker: SIGTERM when ``parent`` dies, even by SIGKILL, so that no orphan keeps serving (or
    keeps the CA's key); exits at once if it is gone already. Without prctl (a seccomp filter), the
    unit's KillMode= still stops every process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def select_front(choice: str) -> Path | None:
    """The rustls front's executable for ``--tls`` ``choice``, or None for TLS in the workers (OpenSSL);
    TLSFrontError if rustls was asked for and is not installed."""
    if choice == "openssl":
        return None
    binary = find_binary()
    if binary is None and choice == "rustls":
        raise TLSFrontError(f"--tls rustls: {BINARY} is not installed (looked for $TENSORGUARD_TLSFRONT, "
                            f"{INSTALLED}, beside {sys.executable} and on PATH)")
    return binary


def unix_listener(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (in a 0700 directory), inheritable by the workers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_front(binary: Path, settings: ServerSettings, listener: socket.socket,
                upstreams: list[Path]) -> subprocess.Popen[bytes]:
    """`tensorguard-tlsfront` on the TCP ``listener``, forwarding to the workers' ``upstreams``."""
    paths = settings.paths
    command = [str(binary), "--listen-fd", str(listener.fileno()), "--cert", str(paths.server_cert),
               "--key", str(paths.server_key), "--client-ca", str(paths.intermediate_cert),
               "--threads", str(settings.workers), "--handshake-timeout", str(settings.handshake_timeout),
               "--idle-timeout", str(settings.idle_timeout)]
    for upstream in upstreams:
        command += ["--upstream", str(upstream)]
    return subprocess.Popen(command, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL)


def wait_child(timeout: float | None) -> tuple[int, int]:
    """(pid, status) of a child that exited, or (0, 0) when none did within ``timeout`` seconds."""
    if timeout is None:
        return os.wait()
    deadline = time.monotonic() + timeout
    while True:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid or time.monotonic() >= deadline:
            return pid, code
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def raise_file_limit() -> None:
    """Raise the soft limit on open files to the hard one, for this process and the workers it forks:
    systemd gives a service 1024, and a worker that reaches it stops accepting (asyncio retries each
    second), renewals included, until enough of the open connections have timed out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(settings: ServerSettings, announce: Callable[[str], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (1 if a worker or the front died on its own)."""
    engine = check(settings)
    raise_file_limit()
    front = select_front(settings.tls)
    context = None if front else tls_context(settings)
    tls = f"TLS on rustls ({front})" if front else f"TLS on {ssl.OPENSSL_VERSION} in the workers"
    print(f"tensorguard server: {settings.workers} worker(s), HTTP/1.1 on {engine.describe()}, {tls}",
          file=sys.stderr, flush=True)
    socks = bind(settings.host, settings.port, 1 if front else settings.workers)
    host, port = socks[0].getsockname()[:2]
    url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    notifier = Notifier()
    ping = watchdog_interval()
    if settings.workers == 1 and not front and ping is None:
        announce(url)
        notifier.ready(f"serving {url}")
        run_worker(settings, socks[0], context, engine)
        return 0
    # Under systemd's watchdog even one worker runs in a child: the supervisor pings WATCHDOG=1
    # only while every worker and the front are running.
    children: set[int] = set()
    stopping = False
    rundir: Path | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if front:
            rundir = Path(tempfile.mkdtemp(prefix="tensorguard-server-"))  # 0700: only this user connects
            upstreams = [rundir / f"worker{index}.sock" for index in range(settings.workers)]
            listeners = [unix_listener(path) for path in upstreams]
            children.add(start_front(front, settings, socks[0], upstreams).pid)
            socks[0].close()
            socks = listeners
        for index, sock in enumerate(socks):
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                follow_parent(parent)
                for other in socks[:index] + socks[index + 1:]:
                    other.close()
                status = 0
                try:
                    run_worker(settings, sock, context, engine, proxied=front is not None)
                except BaseException as exc:  # a worker must never return into the parent's code
                    print(f"tensorguard server worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
                    status = 1
                os._exit(status)
            children.add(pid)
        for sock in socks:
            sock.close()
        announce(url)
        count = f"{len(children)} process(es)" if front else f"{len(children)} worker(s)"
        notifier.ready(f"serving {url} with {count}")
        status = 0
        while children:
            try:
                pid, code = wait_child(ping)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:  # nothing exited for a watchdog interval: all are running
                if not stopping:
                    notifier.watchdog()
                continue
            children.discard(pid)
            if not stopping:
                what = "process" if front else "worker"
                print(f"tensorguard server: {what} {pid} exited ({code}); stopping the others",
                      file=sys.stderr, flush=True)
                status = 1
                stop(signal.SIGTERM, None)
        return status
    finally:
        notifier.stopping("stopping")
        if rundir is not None:
            shutil.rmtree(rundir, ignore_errors=True)
