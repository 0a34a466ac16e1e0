"""`serve` under systemd's notify protocol: READY once serving, WATCHDOG only while its workers live.

The real server process, with $NOTIFY_SOCKET pointing at a datagram socket this test reads, as
systemd's would be for a Type=notify unit with WatchdogSec=.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorguard.server.bench import stop_server

from .ca_process import SERVER


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def messages(sock: socket.socket, seconds: float, until: str | None = None) -> list[str]:
    """What arrives for ``seconds``, or up to the first datagram holding ``until``."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and (until is None or until not in out):
        sock.settimeout(left)
        try:
            out += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            break
    return out


def start_serve(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A fresh CA served by one worker with TLS in Python, in environment ``env``."""
    ca_dir = tmp_path / "ca"
    subprocess.run([*SERVER, "ca", "init", "--dir", str(ca_dir), "--trust-domain", "notify.test",
                    "--host-name", "localhost"], capture_output=True, text=True, timeout=60, check=True)
    return subprocess.Popen([*SERVER, "serve", "--dir", str(ca_dir), "--port", "0", "--workers", "1",
                             "--tls", "openssl", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, path
    sock.close()


def test_ready_then_watchdog_pings_that_stop_when_a_worker_dies(
        tmp_path: Path, notify_socket: tuple[socket.socket, Path]) -> None:
    sock, path = notify_socket
    # a watchdog ping every 0.3 s
    proc = start_serve(tmp_path, {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"})
    try:
        first = messages(sock, 20, until="READY=1")
        assert "READY=1" in first, first
        assert any(m.startswith("STATUS=serving https://") for m in first), first
        pings = messages(sock, 1.5).count("WATCHDOG=1")
        assert pings >= 3, f"{pings} watchdog pings in 1.5 s at a 0.3 s interval"
        (worker,) = children(proc.pid)  # one worker: under the watchdog it runs in a child too
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=15) == 1
        after = messages(sock, 0.2)
        assert after.count("WATCHDOG=1") <= 1 and "STOPPING=1" in after, after
        assert f"worker {worker} exited" in (proc.stderr.read() if proc.stderr else "")
    finally:
        stop_server(proc, timeout=15)


def test_without_a_watchdog_one_worker_serves_in_process(
        tmp_path: Path, notify_socket: tuple[socket.socket, Path]) -> None:
    sock, path = notify_socket
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    proc = start_serve(tmp_path, {**env, "NOTIFY_SOCKET": str(path)})
    try:
        assert "READY=1" in messages(sock, 20, until="READY=1")
        assert children(proc.pid) == []
    finally:
        stop_server(proc, timeout=15)
