"""Silent clients against the real server, TLS in the rustls front and in the workers (OpenSSL).

Clients that open TCP and never send a ClientHello, and clients that finish the handshake and never send
a request, must be closed after the configured timeouts (--handshake-timeout, --idle-timeout), and while
they are held open a robot's renewal over mutual TLS must go through at once. The server is started
with a soft limit of 256 open files (systemd gives a service 1024) and faces 400 such clients, so a
worker that kept the soft limit would run out of descriptors and stop accepting.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorguard.server.tlsfront import find_binary
from tests.integration.server.ca_process import PKCS10, SERVER, Server, running_ca
from tests.unit.server.helpers import TRUST_DOMAIN, b64, make_csr, p256

TIMEOUT = 4
"""Seconds, both the handshake and the idle timeout (the defaults are 10 and 30)."""
SLACK = 3.0
"""How late past its deadline a connection may be closed on a loaded machine."""
SILENT = IDLE = 200
SOFT_FILES = 256


@contextlib.contextmanager
def _soft_file_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE lowered to ``soft`` in the block (processes started inherit it)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


@pytest.fixture(params=["rustls", "openssl"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "rustls" and find_binary() is None:
        pytest.skip("tensorguard-tlsfront is not built (make tlsfront)")
    extra = ("--tls", request.param, "--handshake-timeout", str(TIMEOUT), "--idle-timeout", str(TIMEOUT))
    with contextlib.ExitStack() as stack:
        with _soft_file_limit(SOFT_FILES):
            handle = stack.enter_context(running_ca(tmp_path / "ca", TRUST_DOMAIN, extra=extra))
        yield handle


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def _closed(sock: socket.socket) -> bool:
    """True if the server has closed ``sock`` (readable: EOF, reset, or a TLS alert); False if a read would
    block (e.g. it only processed a post-handshake message). Data from a silent client's server fails."""
    try:
        data = sock.recv(1)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (ssl.SSLError, ConnectionError):
        return True
    assert data == b"", f"the server sent {data!r} to a client that sent nothing"
    return True


def _wait_closed(opened: dict[socket.socket, float], until: float) -> dict[socket.socket, float]:
    """When each socket was found closed (monotonic), waiting until ``until`` at most."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as selector:
        for sock in opened:
            selector.register(sock, selectors.EVENT_READ, sock)
        while len(closed) < len(opened) and time.monotonic() < until:
            for key, _ in selector.select(timeout=max(0.0, until - time.monotonic())):
                sock = key.data
                if _closed(sock):
                    closed[sock] = time.monotonic()
                    selector.unregister(sock)
    return closed


def _renew(server: Server, cert: Path, key: Path) -> float:
    """One robot renewal over mutual TLS; how long it took."""
    started = time.monotonic()
    with server.client(cert, key) as client:
        response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(p256())), headers=PKCS10)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_silent_clients_are_closed_in_time_and_do_not_hold_up_a_renewal(server: Server, tmp_path: Path) -> None:
    cert, key, _ = server.enrol("robot-i", tmp_path)
    address = _address(server)
    opened: dict[socket.socket, float] = {}
    try:
        for _ in range(SILENT):  # (a) TCP only: no ClientHello
            sock = socket.create_connection(address, timeout=10)
            sock.setblocking(False)
            opened[sock] = time.monotonic()
        context = ssl.create_default_context(cafile=str(server.root_cert))
        for index in range(IDLE):  # (b) a whole handshake, then no request
            try:
                tls = context.wrap_socket(socket.create_connection(address, timeout=10),
                                          server_hostname=address[0])
            except (ssl.SSLError, OSError) as exc:
                pytest.fail(f"handshake {index + 1} (with {len(opened)} silent connections open) failed: {exc!r}")
            tls.setblocking(False)
            opened[tls] = time.monotonic()
        took = _renew(server, cert, key)
        renewed = time.monotonic()
        first_deadline = min(opened.values()) + TIMEOUT
        closed = _wait_closed(opened, max(opened.values()) + TIMEOUT + SLACK)
        assert len(closed) == len(opened), (f"{len(opened) - len(closed)} of {len(opened)} silent connections "
                                            f"still open {TIMEOUT + SLACK} s after their timeout")
        early = [closed[s] - opened[s] for s in opened if closed[s] - opened[s] < TIMEOUT - 0.5]
        assert not early, f"{len(early)} closed before their timeout, e.g. after {min(early):.2f} s"
        assert renewed < first_deadline and took < 2, \
            f"the renewal took {took:.2f} s, the first silent connection was due at +{first_deadline - renewed:.2f} s"
        lifetimes = [closed[s] - opened[s] for s in opened]
        print(f"renewal {took * 1000:.0f} ms with {len(opened)} silent connections open; "
              f"all closed {min(lifetimes):.2f}..{max(lifetimes):.2f} s after opening")
    finally:
        for sock in opened:
            sock.close()
    assert server.proc.poll() is None
    assert _renew(server, cert, key) < 2


def _client_hello(server: Server) -> bytes:
    """The first flight of a real TLS client to this server (its ClientHello record)."""
    context = ssl.create_default_context(cafile=str(server.root_cert))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_client_that_drips_its_client_hello_is_closed_at_the_handshake_timeout(server: Server) -> None:
    """The handshake timeout counts from the connection, not from the client's last byte."""
    hello = _client_hello(server)
    assert len(hello) > 4 * TIMEOUT
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.setblocking(False)
        opened = time.monotonic()
        for byte in hello:  # one byte every 0.25 s: the whole would take over a minute
            if _closed(sock):
                break
            with contextlib.suppress(ConnectionError):
                sock.send(bytes([byte]))
            time.sleep(0.25)
            assert time.monotonic() - opened < TIMEOUT + SLACK, "still open past the handshake timeout"
        took = time.monotonic() - opened
    assert TIMEOUT - 0.5 < took < TIMEOUT + SLACK, took


def test_a_timeout_out_of_range_is_refused_by_name(tmp_path: Path) -> None:
    for flag, value, name in (("--idle-timeout", "0", "idle timeout"), ("--handshake-timeout", "301", "handshake timeout")):
        run = subprocess.run([*SERVER, "serve", "--dir", str(tmp_path), flag, value], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode != 0 and f"{name} must be 1..300 seconds, not {value}" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
