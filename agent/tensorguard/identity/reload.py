"""Tell the services that use a certificate to pick up the new one: a command or a signal.

Hooks run without a shell, with a timeout, and their failure is reported (and audited) but never
undoes an install: the new certificate is on disk and the next renewal reloads again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOOK_TIMEOUT_S = 30.0
SIGNALS = {"HUP": signal.SIGHUP, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2,
           "TERM": signal.SIGTERM}


class ReloadError(Exception):
    """A reload hook failed; the message says which and why."""


@dataclass(frozen=True)
class ReloadHook:
    """What to do after a sink received a new certificate."""

    command: tuple[str, ...] = ()
    signal_name: str | None = None
    pidfile: Path | None = None

    def describe(self) -> str:
        parts = []
        if self.command:
            parts.append("run " + " ".join(self.command))
        if self.signal_name and self.pidfile:
            parts.append(f"SIG{self.signal_name} to the pid in {self.pidfile}")
        return "; ".join(parts) or "none"

    def run(self) -> None:
        if self.signal_name and self.pidfile:
            signal_pidfile(self.pidfile, self.signal_name)
        if self.command:
            run_command(self.command)


def read_pidfile(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise ReloadError(f"cannot read pid file {path}: {exc.strerror}") from None
    if not text.isdigit() or not 1 < int(text) < 1 << 22:
        raise ReloadError(f"pid file {path} does not hold a process id (got {text[:20]!r})")
    return int(text)


def signal_pidfile(path: Path, signal_name: str) -> None:
    pid = read_pidfile(path)
    try:
        os.kill(pid, SIGNALS[signal_name])
    except ProcessLookupError:
        raise ReloadError(f"no process {pid} (from {path}) to send SIG{signal_name} to") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid} (from {path})") from None


def run_command(argv: tuple[str, ...] | list[str]) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=HOOK_TIMEOUT_S,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ReloadError(f"reload command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ReloadError(f"reload command {' '.join(argv)} did not finish in "
                          f"{HOOK_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ReloadError(f"reload command {' '.join(argv)} exited with {done.returncode}"
                          + (f": {detail[-1][:300]}" if detail else ""))
