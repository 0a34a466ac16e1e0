"""Fixtures shared by unit and integration tests: config directories and real unit processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TENSORGUARD = [sys.executable, "-m", "tensorguard.cli.main"]
TGCTL = [sys.executable, "-m", "tensorguard.cli.tgctl"]


@dataclass
class AgentDir:
    """A self-contained config tree: agent.toml, agent.d/, socket and metrics directories."""

    root: Path
    extra: str = ""

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def drop_ins(self) -> Path:
        return self.root / "agent.d"

    @property
    def sockets(self) -> Path:
        return self.root / "run"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def socket(self, unit: str) -> Path:
        return self.sockets / f"{unit}.sock"

    def write(self, extra: str = "") -> None:
        self.extra = extra
        self.config.write_text(
            f'[agent]\nsocket_dir = "{self.sockets}"\nmetrics_dir = "{self.metrics}"\n'
            f"metrics_interval_s = 1\n{extra}"
        )

    def drop_in(self, name: str, text: str | bytes) -> Path:
        path = self.drop_ins / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path


def make_agent_dir(root: Path) -> AgentDir:
    agent = AgentDir(root)
    agent.drop_ins.mkdir(parents=True, exist_ok=True)
    agent.metrics.mkdir(exist_ok=True)
    agent.write()
    return agent


@pytest.fixture
def agent_dir(tmp_path: Path) -> AgentDir:
    return make_agent_dir(tmp_path)


@pytest.fixture
def public_agent_dir() -> Iterator[AgentDir]:
    """An agent dir other uids can traverse (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="tg-public-"))
    os.chmod(root, 0o755)
    try:
        yield make_agent_dir(root)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


@dataclass
class UnitProcess:
    """A real `tensorguard` process, with systemd's notification socket played by the test."""

    proc: subprocess.Popen[bytes]
    notify: socket.socket
    agent: AgentDir
    messages: list[str] = field(default_factory=list)

    def read_notifications(self, timeout: float = 0.0) -> list[str]:
        self.notify.settimeout(timeout if timeout > 0 else 0.001)
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.001)
        except (TimeoutError, BlockingIOError):
            pass
        return self.messages

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.read_notifications(0.1):
                if needle in msg:
                    return msg
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"unit exited with {self.proc.returncode} before {needle!r}: "
                    f"{self.stderr_text()}")
        raise AssertionError(f"no {needle!r} notification within {timeout}s: {self.messages}")

    def stderr_text(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_unit(agent: AgentDir, unit: str, env: dict[str, str] | None = None,
               wait_ready: bool = True) -> UnitProcess:
    notify_path = agent.root / f"notify-{unit}-{time.monotonic_ns()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})}
    full_env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen([*TENSORGUARD, unit, "--config", str(agent.config)],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    handle = UnitProcess(proc, notify, agent)
    if wait_ready:
        try:
            handle.wait_for("READY=1")
        except BaseException:
            handle.stop(signal.SIGKILL)
            notify.close()
            raise
    return handle


@pytest.fixture
def units() -> Iterator[list[UnitProcess]]:
    """Started units are appended here and always stopped, even when the test fails."""
    started: list[UnitProcess] = []
    yield started
    for unit in started:
        unit.stop(signal.SIGKILL if unit.proc.poll() is None else signal.SIGTERM)
        unit.notify.close()


def tgctl(agent: AgentDir, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TGCTL, "--config", str(agent.config), *args], capture_output=True,
                          text=True, timeout=60, check=False, **kwargs)  # type: ignore[call-overload]
