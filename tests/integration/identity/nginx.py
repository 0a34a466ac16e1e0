"""A real nginx (Debian's package) serving TLS with the agent's certificate, and a client loop
that keeps handshaking with it, for the renewal-under-load test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Nginx:
    prefix: Path
    port: int

    @property
    def pidfile(self) -> Path:
        return self.prefix / "nginx.pid"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def nginx_serving(prefix: Path, cert: Path, key: Path) -> Iterator[Nginx]:
    """nginx as a daemon with its own prefix; stopped (and waited for) even when the test fails."""
    if not Path(NGINX).exists():
        import pytest  # noqa: PLC0415

        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(CONF.format(prefix=prefix, port=port, cert=cert, key=key))
    server = Nginx(prefix, port)
    subprocess.run([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "user root;"], check=True,
                   capture_output=True, timeout=30)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, f"nginx did not listen: {server.error_log()}"
            time.sleep(0.05)
        yield server
    finally:
        if server.pidfile.exists():
            pid = int(server.pidfile.read_text().strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):  # bounded wait for the master to exit
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)


@dataclass
class HandshakeLoop:
    """Handshakes with nginx back to back in a thread, recording each served serial.

    ``serials`` lists every served serial once, in the order first seen; ``last`` is the most recent.
    During a reload nginx's old worker finishes its connections (and may still accept a few) while
    the new one serves the new certificate, so old and new serials briefly alternate."""

    port: int
    trust_anchor: Path
    serials: list[int] = field(default_factory=list)
    last: int | None = None
    handshakes: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        context = ssl.create_default_context(cafile=str(self.trust_anchor))
        context.check_hostname = False  # the certificate names a SPIFFE ID, not a host
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), 5) as raw, \
                        context.wrap_socket(raw) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    serial = x509.load_der_x509_certificate(der).serial_number
                    if serial not in self.serials:
                        self.serials.append(serial)
                    self.last = serial
                    self.handshakes += 1
            except (OSError, ssl.SSLError, AssertionError) as exc:
                self.failures.append(f"{time.monotonic():.3f}: {exc!r}")

    @contextlib.contextmanager
    def running(self) -> Iterator[HandshakeLoop]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(10)
