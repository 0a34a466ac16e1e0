"""sd_notify datagrams and the Prometheus textfile writer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tensorguard.service.metrics import Family, render, write_atomic
from tensorguard.service.sdnotify import Notifier, watchdog_interval


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("serving")
        assert notifier.watchdog()
        first = sink.recv(4096).decode().split("\n")
        assert first[:2] == ["READY=1", "STATUS=serving"]
        assert first[2] == f"MAINPID={os.getpid()}"
        assert sink.recv(4096) == b"WATCHDOG=1"


def test_notifier_without_systemd_is_silent() -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready("x") is False


def test_notifier_abstract_address() -> None:
    assert Notifier({"NOTIFY_SOCKET": "@/org/x"}).address == "\0/org/x"


def test_unreachable_notify_socket_is_not_fatal(tmp_path: Path) -> None:
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")}).watchdog() is False


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_render_text_format() -> None:
    text = render([
        Family("tg_x_total", "Things.", "counter").add(3, unit="fl", method='a"b\\c\nd'),
        Family("tg_y", "Y.").add(1.5).add(float("inf"), k="v"),
    ])
    assert text == (
        "# HELP tg_x_total Things.\n# TYPE tg_x_total counter\n"
        'tg_x_total{method="a\\"b\\\\c\\nd",unit="fl"} 3\n'
        "# HELP tg_y Y.\n# TYPE tg_y gauge\ntg_y 1.5\n"
        'tg_y{k="v"} +Inf\n'
    )


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    write_atomic(tmp_path, "a.prom", "one\n")
    write_atomic(tmp_path, "a.prom", "two\n")
    assert (tmp_path / "a.prom").read_text() == "two\n"
    assert os.listdir(tmp_path) == ["a.prom"]
    assert (tmp_path / "a.prom").stat().st_mode & 0o777 == 0o644


def test_write_atomic_into_missing_dir_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing", "a.prom", "x")
