"""Slow clients on a real control socket: only complete requests buy time, so no one can hold a slot."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorguard.control import ControlClient, ServerLimits
from tensorguard.control.protocol import TOO_MANY_CLIENTS

from .test_control_server import Served, own_policy

TIMEOUT_S = 0.5
CAP = 8 * 1024 * 1024
SLOTS = 4


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "slow.sock", ServerLimits(max_frame_bytes=CAP, client_timeout_s=TIMEOUT_S,
                                                     max_clients=SLOTS), own_policy())
    yield s
    s.close()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def drip_until_closed(sock: socket.socket, drip: bytes, every_s: float, give_up_s: float) -> float:
    """Send ``drip`` every ``every_s``, reading any answer; seconds until the server hangs up."""
    sock.settimeout(every_s)
    start = time.monotonic()
    while time.monotonic() - start < give_up_s:
        try:
            sock.sendall(drip)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        try:
            while sock.recv(65536):
                pass
            return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    raise AssertionError(f"still connected after {give_up_s} s sending {drip[:40]!r} every {every_s} s")


KEEPALIVES = {
    "newlines": b"\n",
    "whitespace lines": b" \t\r \n",
    "empty batch": b"[]\n",
    "batch of invalid items": b"[1, {}, null]\n",
    "invalid request": b"{}\n",
    "parse error": b"not json\n",
    "one byte, no newline": b"{",
    "one space, no newline": b" ",
}


@pytest.mark.parametrize("drip", KEEPALIVES.values(), ids=KEEPALIVES.keys())
def test_a_client_sending_no_complete_request_is_dropped_after_the_timeout(slow: Served, drip: bytes) -> None:
    with connect(slow.server.path) as sock:
        held = drip_until_closed(sock, drip, every_s=0.05, give_up_s=6 * TIMEOUT_S)
    assert TIMEOUT_S * 0.8 < held < 3 * TIMEOUT_S


def test_oversize_frames_do_not_buy_time(tmp_path: Path) -> None:
    s = Served(tmp_path / "small.sock", ServerLimits(max_frame_bytes=1024, client_timeout_s=TIMEOUT_S,
                                                      max_clients=SLOTS), own_policy())
    try:
        with connect(s.server.path) as sock:
            held = drip_until_closed(sock, b"x" * 2000 + b"\n", every_s=0.05, give_up_s=6 * TIMEOUT_S)
    finally:
        s.close()
    assert held < 3 * TIMEOUT_S


def test_a_huge_partial_line_below_the_cap_is_dropped_after_the_timeout(slow: Served) -> None:
    with connect(slow.server.path) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"echo.say","params":["' + b"x" * (CAP - 4096))
        held = drip_until_closed(sock, b"y", every_s=0.05, give_up_s=6 * TIMEOUT_S)
    assert held < 3 * TIMEOUT_S


def test_newline_senders_cannot_hold_every_slot(slow: Served) -> None:
    """The issue's case: every slot taken by clients sending newlines; after the timeout a caller is served."""
    stop = threading.Event()
    holders = [connect(slow.server.path) for _ in range(SLOTS)]

    def keep_sending(sock: socket.socket) -> None:
        while not stop.is_set():
            try:
                sock.sendall(b"\n")
            except OSError:
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=keep_sending, args=(h,), daemon=True) for h in holders]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        with ControlClient(slow.server.path, timeout=2) as refused:
            assert json.loads(refused.read_line())["error"]["code"] == TOO_MANY_CLIENTS
        time.sleep(3 * TIMEOUT_S)
        with ControlClient(slow.server.path, timeout=2) as client:
            assert client.call("echo.say", {"text": "served"}) == "served"
        assert all(is_closed(h) for h in holders)
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        for h in holders:
            h.close()


def is_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_a_client_making_requests_keeps_its_connection(slow: Served) -> None:
    """The timeout counts from the last complete request, so a working client stays past many timeouts."""
    with ControlClient(slow.server.path, timeout=2) as client:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 5 * TIMEOUT_S:
            assert client.call("echo.say", {"text": str(n)}) == str(n)
            n += 1
            time.sleep(TIMEOUT_S * 0.6)
        # a notification is a complete request too, and a slow method's run does not count against it
        assert client._sock is not None
        client._sock.sendall(b'{"jsonrpc":"2.0","method":"echo.write"}\n')
        time.sleep(TIMEOUT_S * 0.6)
        assert client.call("echo.sleep", {"seconds": TIMEOUT_S * 0.8}) == TIMEOUT_S * 0.8
        time.sleep(TIMEOUT_S * 0.6)
        assert client.call("echo.write") == 2


def server_cpu_s(s: Served) -> float:
    assert s.thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(s.thread.ident))


def test_bytes_trickled_onto_a_huge_partial_line_cost_little_cpu(tmp_path: Path) -> None:
    """Each read scans only the new bytes for a newline, not the whole buffered line."""
    s = Served(tmp_path / "cpu.sock", ServerLimits(max_frame_bytes=CAP, client_timeout_s=30,
                                                    max_clients=SLOTS), own_policy())
    try:
        with connect(s.server.path) as sock:
            sock.sendall(b"x" * (CAP - 4096))
            time.sleep(0.3)
            before = server_cpu_s(s)
            drips = 1000
            for _ in range(drips):
                sock.sendall(b"x")
                time.sleep(0.0005)
            time.sleep(0.2)
            per_byte_us = (server_cpu_s(s) - before) / drips * 1e6
    finally:
        s.close()
    # scanning the 8 MiB line on each read costs ~200 us or more; a read of the new bytes, ~20 us
    assert per_byte_us < 100, f"{per_byte_us:.0f} us of server CPU per trickled byte"
