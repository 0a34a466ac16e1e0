"""When to renew the robot's certificate: pure decisions over a certificate, a clock seam and an RNG.

The scheduler never sleeps, reads files or talks to the CA. The identity unit (or the fault
harness) loads the current certificate's validity and the anchor taken when it was issued, asks
``due()`` and ``sleep_for()``, reports failed attempts with ``failed()``, and logs/audits the
clock events it drains with ``events()``.

Time base. The CA judges expiry by its own clock, so the scheduler estimates the CA's time rather
than trusting the robot's wall clock: at issuance the CA's clock read ``not_before + backdate``
(the CA backdates not_before by a configured skew) and the robot recorded an ``Anchor`` (boot id,
CLOCK_BOOTTIME, wall). Within the same boot, CA time is that issuance instant plus the BOOTTIME
elapsed since the anchor: immune to wall-clock steps and counting time spent suspended. After a
reboot BOOTTIME readings are no longer comparable, so the estimate falls back to the wall clock,
taking the later of "raw wall" and "wall elapsed since the anchor" (the earlier renewal is the
safe mistake). Without an anchor (a certificate found on disk with none) it is the raw wall.

Renewal point. Renewal starts at a point drawn uniformly in ``[fraction - jitter, fraction]`` of
the lifetime: jitter only ever moves renewal EARLIER. With the defaults (0.5, 0.1) the latest
first attempt is at 0.5 L, so a CA outage of 0.45 L starting then still leaves 0.05 L of retries
before expiry; jitter added after 0.5 L would eat into that margin.

Retries. Capped exponential backoff with full jitter (uniform in [0, cap]); the cap also shrinks
to ``remaining / min_attempts_before_expiry`` so that at least that many attempts always fit
before expiry, and no delay is shorter than ``min_retry_s`` (to spare the CA). The guarantee
therefore holds while at least ``min_attempts_before_expiry * min_retry_s`` remain.

Suspend. asyncio sleeps on CLOCK_MONOTONIC, which stops during suspend, so a unit sleeping until
the renewal point would wake late by the whole suspend. ``sleep_for()`` is capped at
``max_sleep_s``: the unit re-asks ``due()`` at least that often, and after resume the BOOTTIME
based estimate makes an overdue renewal due at once.

After expiry (phase EXPIRED) the CA no longer accepts the certificate for mTLS re-enrolment, so
the scheduler stops asking for renewals. The way back is a new enrolment: the operator provides a
fresh one-time bootstrap token (placed where the identity unit reads it, or through the operator
command of tgctl) and the unit enrols again exactly as on first boot, with a new key.
"""

from __future__ import annotations

import enum
import json
import math
import random
from dataclasses import dataclass
from typing import Literal, Protocol

from .clocks import Clocks

EARLY_S = 1e-3
"""A wake-up this close before an attempt's time counts as on time (timers and float sums round)."""


@dataclass(frozen=True)
class Validity:
    """A certificate's validity window in epoch seconds, as the issuing CA counts them."""

    not_before: float
    not_after: float

    def __post_init__(self) -> None:
        if not self.not_after > self.not_before:
            raise ValueError(f"certificate validity ends ({self.not_after}) before it starts "
                             f"({self.not_before})")

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


@dataclass(frozen=True)
class Anchor:
    """The robot's clocks at the moment a certificate arrived: ties CA time to BOOTTIME."""

    boot_id: str
    boottime: float
    wall: float

    @classmethod
    def take(cls, clocks: Clocks) -> Anchor:
        """Read every clock now (call right after the CA answered)."""
        return cls(clocks.boot_id(), clocks.boottime(), clocks.wall())

    def to_bytes(self) -> bytes:
        """Stored next to the certificate, in the same atomic set, so a restart finds both."""
        return json.dumps({"boot_id": self.boot_id, "boottime": self.boottime, "wall": self.wall},
                          sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Anchor:
        """Parse what ``to_bytes`` wrote; ``where`` names the file in the error."""
        try:
            raw = json.loads(data)
            return cls(str(raw["boot_id"]), float(raw["boottime"]), float(raw["wall"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a renewal anchor ({type(exc).__name__}: {exc})") from exc


class Phase(enum.Enum):
    """Where a certificate is in its life, as the scheduler sees it."""

    UNENROLLED = "unenrolled"
    """No certificate loaded: only enrolment with a bootstrap token can help."""
    WAITING = "waiting"
    """Before the renewal point."""
    RENEWING = "renewing"
    """Renewal point passed (or an attempt failed): attempting with backoff."""
    EXPIRED = "expired"
    """Past not_after: mTLS renewal is impossible, re-enrolment is needed."""


@dataclass(frozen=True)
class ClockEvent:
    """Something the clocks did that the unit should log and audit."""

    kind: Literal["wall_step", "suspend", "reboot"]
    seconds: float
    """wall_step: how far the wall clock jumped (signed); suspend: time asleep; reboot: 0."""

    def __str__(self) -> str:
        if self.kind == "wall_step":
            return f"wall clock stepped by {self.seconds:+.1f} s (relative to CLOCK_BOOTTIME)"
        if self.kind == "suspend":
            return f"machine was suspended for {self.seconds:.1f} s"
        return "the machine rebooted since the certificate was issued: timing falls back to the wall clock"


class RenewalSchedule(Protocol):
    """What the unit and the fault harness drive: TensorGuard's scheduler and the baselines."""

    name: str

    def load(self, validity: Validity, anchor: Anchor | None) -> None:
        """A certificate is now installed (new, or found on disk after a restart)."""

    def phase(self) -> Phase:
        """Where the loaded certificate is in its life."""

    def due(self) -> bool:
        """An attempt should be made now."""

    def next_attempt_in(self) -> float | None:
        """Seconds until the next attempt (0 when due), None when no attempt is planned."""

    def sleep_for(self) -> float:
        """Seconds the caller may sleep on CLOCK_MONOTONIC before asking ``due()`` again."""

    def failed(self) -> float:
        """An attempt failed; returns the seconds until the next one."""

    def events(self) -> list[ClockEvent]:
        """Clock events noticed since the last call (and forgets them)."""


@dataclass(frozen=True)
class RenewalPolicy:
    """Tunables of TensorGuard's schedule; defaults follow SPIRE (renew at 1/2 with 10 % jitter)."""

    fraction: float = 0.5
    """Latest renewal point, as a fraction of the lifetime."""
    jitter: float = 0.1
    """Renewal starts uniformly in [fraction - jitter, fraction] of the lifetime (never later)."""
    backoff_base_s: float = 10.0
    backoff_cap_s: float = 300.0
    min_retry_s: float = 5.0
    """No two attempts closer than this, whatever the remaining time (spares the CA)."""
    min_attempts_before_expiry: int = 6
    max_sleep_s: float = 60.0
    """Longest monotonic sleep between checks: bounds how late a resume from suspend is noticed."""
    backdate_s: float = 60.0
    """How far the CA backdates not_before: the CA's clock read not_before + backdate_s at issuance."""
    clock_step_threshold_s: float = 30.0
    """Wall vs BOOTTIME (or BOOTTIME vs MONOTONIC) disagreement reported as a step (or a suspend)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.fraction < 1:
            problems.append(f"fraction={self.fraction} must be in (0, 1)")
        if not 0 <= self.jitter < self.fraction:
            problems.append(f"jitter={self.jitter} must be in [0, fraction={self.fraction}) so that "
                            "the earliest renewal point stays after issuance")
        if not 0 < self.min_retry_s <= self.backoff_base_s <= self.backoff_cap_s:
            problems.append(f"need 0 < min_retry_s ({self.min_retry_s}) <= backoff_base_s "
                            f"({self.backoff_base_s}) <= backoff_cap_s ({self.backoff_cap_s})")
        if self.min_attempts_before_expiry < 1:
            problems.append(f"min_attempts_before_expiry={self.min_attempts_before_expiry} must be >= 1")
        if self.max_sleep_s <= 0 or self.backdate_s < 0 or self.clock_step_threshold_s <= 0:
            problems.append("max_sleep_s and clock_step_threshold_s must be > 0, backdate_s >= 0")
        if problems:
            raise ValueError("invalid renewal policy: " + "; ".join(problems))

    def backoff_cap(self, failures: int, remaining: float) -> float:
        """Upper bound of the next retry delay: exponential in ``failures`` (>= 1), capped, and
        shrunk so ``min_attempts_before_expiry`` attempts fit in ``remaining`` seconds."""
        exponential = self.backoff_base_s * 2.0 ** min(failures - 1, 60)
        return min(self.backoff_cap_s, exponential, max(remaining, 0.0) / self.min_attempts_before_expiry)

    def retry_delay(self, failures: int, remaining: float, rng: random.Random) -> float:
        """Full jitter under ``backoff_cap``, never below ``min_retry_s``."""
        return max(self.min_retry_s, rng.uniform(0.0, self.backoff_cap(failures, remaining)))


@dataclass
class _Observation:
    boottime: float
    monotonic: float


class RenewalScheduler:
    """TensorGuard's schedule (see the module docstring for the reasoning)."""

    name = "tensorguard"

    def __init__(self, policy: RenewalPolicy, clocks: Clocks, rng: random.Random) -> None:
        self.policy = policy
        self.clocks = clocks
        self.rng = rng
        self.validity: Validity | None = None
        self.anchor: Anchor | None = None
        self.renew_at = math.inf
        """Estimated CA time of the first renewal attempt for the loaded certificate."""
        self.failures = 0
        self._next_at = math.inf
        self._reported_skew = 0.0
        self._last: _Observation | None = None
        self._events: list[ClockEvent] = []

    def load(self, validity: Validity, anchor: Anchor | None) -> None:
        self.validity = validity
        self.anchor = anchor
        low = self.policy.fraction - self.policy.jitter
        self.renew_at = validity.not_before + self.rng.uniform(low, self.policy.fraction) * validity.lifetime
        self.failures = 0
        self._next_at = self.renew_at
        self._reported_skew = 0.0
        if anchor is not None and anchor.boot_id != self.clocks.boot_id():
            self._events.append(ClockEvent("reboot", 0.0))
        self._observe()

    @property
    def issued_ca(self) -> float:
        """The CA's clock at issuance: not_before plus the backdating skew."""
        if self.validity is None:
            raise RuntimeError("no certificate loaded")
        return self.validity.not_before + self.policy.backdate_s

    def same_boot(self) -> bool:
        return self.anchor is not None and self.anchor.boot_id == self.clocks.boot_id()

    def now_ca(self) -> float:
        """Best estimate of the CA's clock now (see "Time base" in the module docstring)."""
        wall = self.clocks.wall()
        if self.anchor is None or self.validity is None:
            return wall
        if self.same_boot():
            return self.issued_ca + (self.clocks.boottime() - self.anchor.boottime)
        return max(wall, self.issued_ca + (wall - self.anchor.wall))

    def _observe(self) -> None:
        """Compare the clocks with the anchor and the previous look; queue what they reveal."""
        boot, mono = self.clocks.boottime(), self.clocks.monotonic()
        threshold = self.policy.clock_step_threshold_s
        if self._last is not None:
            asleep = (boot - self._last.boottime) - (mono - self._last.monotonic)
            if asleep > threshold:
                self._events.append(ClockEvent("suspend", asleep))
        self._last = _Observation(boot, mono)
        if self.anchor is not None and self.same_boot():
            skew = (self.clocks.wall() - self.anchor.wall) - (boot - self.anchor.boottime)
            if abs(skew - self._reported_skew) > threshold:
                self._events.append(ClockEvent("wall_step", skew - self._reported_skew))
                self._reported_skew = skew

    def phase(self) -> Phase:
        self._observe()
        return self._phase(self.now_ca())

    def _phase(self, now: float) -> Phase:
        if self.validity is None:
            return Phase.UNENROLLED
        if now >= self.validity.not_after:
            return Phase.EXPIRED
        if now >= self.renew_at or self.failures:
            return Phase.RENEWING
        return Phase.WAITING

    def due(self) -> bool:
        self._observe()
        now = self.now_ca()
        return self._phase(now) in (Phase.WAITING, Phase.RENEWING) and now >= self._next_at - EARLY_S

    def next_attempt_in(self) -> float | None:
        now = self.now_ca()
        if self._phase(now) not in (Phase.WAITING, Phase.RENEWING):
            return None
        wait = self._next_at - now
        return 0.0 if wait <= EARLY_S else wait

    def sleep_for(self) -> float:
        self._observe()
        wait = self.next_attempt_in()
        return self.policy.max_sleep_s if wait is None else min(wait, self.policy.max_sleep_s)

    def failed(self) -> float:
        if self.validity is None:
            raise RuntimeError("failed() without a loaded certificate")
        self.failures += 1
        now = self.now_ca()
        delay = self.policy.retry_delay(self.failures, self.validity.not_after - now, self.rng)
        self._next_at = now + delay
        return delay

    def events(self) -> list[ClockEvent]:
        out, self._events = self._events, []
        return out
