"""The clocks renewal depends on, behind one seam so tests and the fault harness can bend time.

Linux gives three clocks that disagree on purpose: the wall clock (CLOCK_REALTIME) can be stepped
by NTP or an operator, CLOCK_MONOTONIC never steps but stops while the machine is suspended, and
CLOCK_BOOTTIME is CLOCK_MONOTONIC plus the time spent suspended. Comparing them is how the
scheduler notices clock steps and suspend/resume; the boot id tells it whether BOOTTIME readings
taken earlier are still comparable (they are not after a reboot).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class Clocks(Protocol):
    """What the scheduler may ask about time; nothing else in identity/ reads a clock directly."""

    def wall(self) -> float:
        """Seconds since the epoch by the (steppable) wall clock."""

    def monotonic(self) -> float:
        """Seconds on CLOCK_MONOTONIC: never steps, stops during suspend (asyncio sleeps on it)."""

    def boottime(self) -> float:
        """Seconds on CLOCK_BOOTTIME: never steps, keeps counting during suspend."""

    def boot_id(self) -> str:
        """Changes at every boot; boottime readings are comparable only within one boot id."""


class SystemClocks:
    """The real clocks of this machine."""

    def __init__(self, boot_id_path: Path = BOOT_ID_PATH) -> None:
        self._boot_id_path = boot_id_path
        self._boot_id: str | None = None

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def boottime(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def boot_id(self) -> str:
        """Read once: the boot id cannot change while this process lives."""
        if self._boot_id is None:
            try:
                self._boot_id = self._boot_id_path.read_text().strip()
            except OSError as exc:
                raise RuntimeError(f"cannot read the boot id from {self._boot_id_path}: {exc}") from exc
        return self._boot_id


class SimulatedClocks:
    """A robot's clocks on a simulated timeline, with the faults real robots see.

    ``true`` is the reference time the CA keeps (and by which expiry is judged). The robot's wall
    clock is ``true + wall_offset``; ``step_wall`` changes the offset like an NTP step or an
    operator's ``date -s``. ``suspend`` advances true, wall and boottime but not monotonic.
    ``reboot`` starts a new boot id with boottime and monotonic back near zero.
    """

    def __init__(self, true_start: float, wall_offset: float = 0.0, boot_id: str = "boot-0",
                 boottime_start: float = 1000.0, monotonic_start: float = 1000.0) -> None:
        self.true = true_start
        self.wall_offset = wall_offset
        self._boot = boottime_start
        self._mono = monotonic_start
        self._boot_id = boot_id
        self.suspended_s = 0.0
        self._boots = 0

    def wall(self) -> float:
        return self.true + self.wall_offset

    def monotonic(self) -> float:
        return self._mono

    def boottime(self) -> float:
        return self._boot

    def boot_id(self) -> str:
        return self._boot_id

    def advance(self, seconds: float) -> None:
        """Time passes with the machine running: every clock moves by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"time cannot run backwards: advance({seconds})")
        self.true += seconds
        self._boot += seconds
        self._mono += seconds

    def advance_to(self, true_time: float) -> None:
        """Run (not suspended) until the reference clock reads ``true_time``."""
        self.advance(max(0.0, true_time - self.true))

    def step_wall(self, delta: float) -> None:
        """The wall clock jumps by ``delta`` seconds; no time passes."""
        self.wall_offset += delta

    def suspend(self, seconds: float) -> None:
        """The machine sleeps for ``seconds``: monotonic stands still, the others move on."""
        if seconds < 0:
            raise ValueError(f"cannot suspend for a negative time: {seconds}")
        self.true += seconds
        self._boot += seconds
        self.suspended_s += seconds

    def reboot(self, downtime: float = 30.0, boot_id: str | None = None) -> None:
        """Power cycle: ``downtime`` passes, then a new boot starts its clocks afresh."""
        self.true += downtime
        self._boot = 5.0
        self._mono = 5.0
        self._boots += 1
        self._boot_id = boot_id if boot_id is not None else f"{self._boot_id}+{self._boots}"
