"""Other tools' renewal policies behind TensorGuard's interface, so the fault harness can compare.

These are models of the published behaviour, not ports of the tools' code:

* ``StepCaPolicy``, after ``step ca renew --daemon`` (smallstep): renew when 2/3 of the validity
  has elapsed, retry every 60 s on failure. (The real daemon also draws a random jitter before the
  2/3 point; it is left out here, as in the brief's "renew at 2/3, retry every 60 s".)
* ``CertManagerPolicy``, after cert-manager: renewBefore defaults to 1/3 of the duration, so
  renewal starts at 2/3; failed requests back off exponentially from 1 h, doubling up to 32 h.

Both judge time by the robot's wall clock (they compare time.Now with NotAfter) and sleep with
Go timers, which run on CLOCK_MONOTONIC on Linux and so stop during suspend. ``max_sleep_s=None``
models that (the whole wait is one monotonic sleep); a number makes the driver re-check at least
that often, which isolates the policy from the sleeping behaviour when comparing.
"""

from __future__ import annotations

import math

from .clocks import Clocks
from .renewal import EARLY_S, Anchor, ClockEvent, Phase, Validity

TWO_THIRDS = 2.0 / 3.0


class WallClockPolicy:
    """Shared mechanics: a fixed renewal point and wall-clock judgement; subclasses set retries."""

    name = "wall-clock"

    def __init__(self, clocks: Clocks, max_sleep_s: float | None = None) -> None:
        self.clocks = clocks
        self.max_sleep_s = max_sleep_s
        self.validity: Validity | None = None
        self.failures = 0
        self._next_at = math.inf

    def load(self, validity: Validity, anchor: Anchor | None) -> None:
        """The anchor is ignored: these tools only look at the wall clock."""
        self.validity = validity
        self.failures = 0
        self._next_at = validity.not_before + TWO_THIRDS * validity.lifetime

    def phase(self) -> Phase:
        if self.validity is None:
            return Phase.UNENROLLED
        now = self.clocks.wall()
        if now >= self.validity.not_after:
            return Phase.EXPIRED
        return Phase.RENEWING if now >= self._next_at or self.failures else Phase.WAITING

    def due(self) -> bool:
        """These tools keep trying after expiry: whether that can work is the CA's decision."""
        return self.validity is not None and self.clocks.wall() >= self._next_at - EARLY_S

    def next_attempt_in(self) -> float | None:
        if self.validity is None:
            return None
        wait = self._next_at - self.clocks.wall()
        return 0.0 if wait <= EARLY_S else wait

    def sleep_for(self) -> float:
        wait = self.next_attempt_in()
        if wait is None:
            return self.max_sleep_s if self.max_sleep_s is not None else 3600.0
        return wait if self.max_sleep_s is None else min(wait, self.max_sleep_s)

    def retry_delay(self) -> float:
        raise NotImplementedError

    def failed(self) -> float:
        self.failures += 1
        delay = self.retry_delay()
        self._next_at = self.clocks.wall() + delay
        return delay

    def events(self) -> list[ClockEvent]:
        """These tools do not watch the clocks."""
        return []


class StepCaPolicy(WallClockPolicy):
    """smallstep's ``step ca renew --daemon``: renew at 2/3, retry every 60 s."""

    name = "step-ca"
    retry_s = 60.0

    def retry_delay(self) -> float:
        return self.retry_s


class CertManagerPolicy(WallClockPolicy):
    """cert-manager: renew at 2/3, then back off 1 h, 2 h, 4 h ... capped at 32 h."""

    name = "cert-manager"
    base_s = 3600.0
    cap_s = 32 * 3600.0

    def retry_delay(self) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 60))
