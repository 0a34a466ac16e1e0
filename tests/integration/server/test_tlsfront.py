"""The real `tensorguard-tlsfront` between a TLS client and a Unix socket: what the workers are told.

The front's PROXY v2 header is parsed by the workers' own parser (`tlsfront.parse_header`), so these
tests check the two implementations against each other, and the front's handshake policy: a client
certificate is optional, must chain to the intermediate and is passed on whatever its dates; one from
another CA never reaches a worker."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tensorguard.server.ca import CAPaths, CertificateAuthority
from tensorguard.server.timeutil import utc_now
from tensorguard.server.tlsfront import ProxiedConnection, find_binary, parse_header
from tests.unit.server.helpers import key_pem, make_ca, make_csr, p256

pytestmark = pytest.mark.skipif(find_binary() is None, reason="tensorguard-tlsfront is not built (make tlsfront)")
IDLE = 2
"""The front's --idle-timeout in these tests, seconds."""


class Front:
    """The front on 127.0.0.1 (a free port) forwarding to one Unix socket this test accepts on."""

    def __init__(self, ca_dir: Path, work: Path) -> None:
        binary = find_binary()
        assert binary is not None
        paths = CAPaths(ca_dir)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(str(work / "worker.sock"))
        self.unix.listen(16)
        self.unix.settimeout(10)
        self.proc = subprocess.Popen(
            [str(binary), "--listen-fd", str(self.tcp.fileno()), "--upstream", str(work / "worker.sock"),
             "--cert", str(paths.server_cert), "--key", str(paths.server_key),
             "--client-ca", str(paths.intermediate_cert), "--handshake-timeout", "2", "--idle-timeout", str(IDLE)],
            pass_fds=(self.tcp.fileno(),), stderr=subprocess.PIPE)
        self.root = str(paths.root_cert)

    def client(self, cert: bytes | None = None, key: bytes | None = None, work: Path | None = None) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.root)
        if cert is not None and key is not None and work is not None:
            (work / "c.crt").write_bytes(cert)
            (work / "c.key").write_bytes(key)
            context.load_cert_chain(work / "c.crt", work / "c.key")
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=10),
                                   server_hostname="127.0.0.1")

    def worker_side(self, expect: bytes) -> tuple[ProxiedConnection, bytes, socket.socket]:
        """Accept the front's connection; the header, then ``expect``'s bytes of payload."""
        conn, _ = self.unix.accept()
        conn.settimeout(10)
        data = b""
        while True:
            parsed = parse_header(data)
            if parsed is not None and len(data) - parsed[1] >= len(expect):
                return parsed[0], data[parsed[1]:], conn
            chunk = conn.recv(65536)
            assert chunk, f"the front closed after {data!r}"
            data += chunk

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.tcp.close()
        self.unix.close()


@pytest.fixture()
def front(tmp_path: Path) -> Iterator[tuple[Front, CertificateAuthority, Path]]:
    ca = make_ca(tmp_path / "ca", utc_now() - timedelta(days=4))  # so that it can issue a long-expired cert
    work = tmp_path / "work"
    work.mkdir()
    handle = Front(tmp_path / "ca", work)
    try:
        yield handle, ca, work
    finally:
        handle.close()


def _robot(ca: CertificateAuthority, node: str, issued_at: object = None) -> tuple[bytes, bytes, bytes]:
    key = p256()
    cert = ca.issue(make_csr(key), node, issued_at or utc_now())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key), cert.public_bytes(serialization.Encoding.DER)


def test_a_robot_is_passed_on_with_its_address_and_certificate(front: tuple[Front, CertificateAuthority, Path]) -> None:
    handle, ca, work = front
    cert, key, der = _robot(ca, "r1")
    with handle.client(cert, key, work) as client:
        client.sendall(b"ping")
        connection, payload, conn = handle.worker_side(b"ping")
        with conn:
            assert payload == b"ping"
            assert connection.client == client.getsockname()[:2]
            assert connection.server == ("127.0.0.1", handle.port)
            assert (connection.client_cert_der, connection.tls_version) == (der, "TLSv1.3")
            conn.sendall(b"pong")
            assert client.recv(4) == b"pong"


def test_no_certificate_is_fine_and_an_expired_one_is_left_to_the_api(
        front: tuple[Front, CertificateAuthority, Path]) -> None:
    handle, ca, work = front
    with handle.client() as anonymous:
        anonymous.sendall(b"x")
        connection, _, conn = handle.worker_side(b"x")
        conn.close()
        assert connection.client_cert_der is None
    cert, key, der = _robot(ca, "r2", utc_now() - timedelta(days=3))  # one-hour lifetime: long expired
    with handle.client(cert, key, work) as client:
        client.sendall(b"y")
        connection, _, conn = handle.worker_side(b"y")
        conn.close()
        assert connection.client_cert_der == der


def test_a_certificate_of_another_ca_never_reaches_a_worker(
        front: tuple[Front, CertificateAuthority, Path], tmp_path: Path) -> None:
    handle, _, work = front
    twin = make_ca(tmp_path / "twin", utc_now())  # same names, other keys
    cert, key, _ = _robot(twin, "r3")
    with handle.client(cert, key, work) as client, pytest.raises((ssl.SSLError, ConnectionError)):
        client.sendall(b"z")
        assert client.recv(1) == b""  # TLS 1.3: the refusal arrives after the client's Finished
        raise ConnectionError("closed")
    handle.unix.settimeout(1)
    with pytest.raises(TimeoutError):
        handle.unix.accept()


def test_a_bad_command_line_or_file_says_what_is_wrong(tmp_path: Path) -> None:
    binary = find_binary()
    assert binary is not None
    usage = subprocess.run([str(binary), "--threads", "0"], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 2 and "--threads must be 1..64" in usage.stderr
    (tmp_path / "empty.pem").write_text("")
    files = subprocess.run([str(binary), "--listen-fd", "0", "--upstream", "/nonexistent", "--cert",
                            str(tmp_path / "empty.pem"), "--key", str(tmp_path / "missing.key"),
                            "--client-ca", str(tmp_path / "empty.pem")], capture_output=True, text=True, timeout=10)
    assert files.returncode == 1 and "empty.pem: no CERTIFICATE block" in files.stderr
    assert "--listen-fd FD" in subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                                              timeout=10).stdout


def test_a_connection_silent_after_its_answer_is_closed_on_both_legs(
        front: tuple[Front, CertificateAuthority, Path]) -> None:
    handle, ca, work = front
    cert, key, _ = _robot(ca, "r4")
    with handle.client(cert, key, work) as client:
        client.sendall(b"request")
        _, _, conn = handle.worker_side(b"request")
        with conn:
            conn.sendall(b"answer")
            assert client.recv(6) == b"answer"
            answered = time.monotonic()
            assert conn.recv(1) == b""  # the worker's leg: closed, not left to the worker
            worker_closed = time.monotonic() - answered
            with contextlib.suppress(ssl.SSLError, ConnectionError):  # an EOF without close_notify
                assert client.recv(1) == b""
            client_closed = time.monotonic() - answered
    assert IDLE - 0.5 < worker_closed < IDLE + 3 and client_closed < IDLE + 3, (worker_closed, client_closed)
