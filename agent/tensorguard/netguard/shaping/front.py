"""FRONT (Gong & Wang, USENIX Security 2020): zero-delay padding front-loaded by a Rayleigh law.

At the start of each trace every direction draws a padding budget n uniformly from
[1, max_dummies] and a window w uniformly from [w_min, w_max] seconds, then schedules n dummies at
times t0 + T where T ~ Rayleigh(w) (density t/w^2 * exp(-t^2 / 2w^2)): most padding lands in the
first seconds of the trace, where classifiers find the most information, and the per-trace random
n and w make every trace's padding different. Real packets are never delayed.

A trace starts with the first packet and again after ``trace_gap`` seconds without traffic.
Dummies beyond the padding cap are skipped (counted in ``ledger``). In single-ended pace mode the
dummies go to a discard port of the peer: FRONT then blurs the volume and timing of bursts as the
eavesdropper sees them, but not the size of the real packets.
"""

from __future__ import annotations

import heapq
import math
import random

from .base import Action, Caps, Direction, Dummy, Release
from .budget import CostLedger


def rayleigh(rng: random.Random, scale: float) -> float:
    """One sample of Rayleigh(scale) by inversion of its CDF 1 - exp(-t^2 / 2 scale^2)."""
    return scale * math.sqrt(-2.0 * math.log(1.0 - rng.random()))


class FrontMachine:
    """Front-loaded Rayleigh padding, per direction, restarted for each trace."""

    def __init__(self, caps: Caps, rng: random.Random, *, max_dummies: dict[Direction, int] | None = None,
                 w_min: float = 1.0, w_max: float = 14.0, dummy_size: int = 512,
                 trace_gap: float = 5.0) -> None:
        if not 0 < w_min <= w_max:
            raise ValueError("need 0 < w_min <= w_max")
        if dummy_size < 1 or trace_gap <= 0:
            raise ValueError("dummy_size must be >= 1 and trace_gap > 0")
        self.max_dummies = max_dummies or {Direction.OUT: 1700, Direction.IN: 1700}
        if any(n < 0 for n in self.max_dummies.values()):
            raise ValueError("max_dummies must be >= 0")
        self.rng = rng
        self.w_min, self.w_max = w_min, w_max
        self.dummy_size = dummy_size
        self.trace_gap = trace_gap
        self.ledger = CostLedger(caps)
        self.schedule: list[tuple[float, int, Direction]] = []  # (time, seq, direction)
        self._seq = 0
        self.last_packet: float | None = None
        self.windows: dict[Direction, float] = {}
        self.planned: dict[Direction, int] = {}

    def _start_trace(self, t0: float) -> None:
        self.schedule.clear()
        for direction, limit in self.max_dummies.items():
            n = self.rng.randint(1, limit) if limit > 0 else 0
            w = self.rng.uniform(self.w_min, self.w_max)
            self.windows[direction], self.planned[direction] = w, n
            for _ in range(n):
                self._seq += 1
                heapq.heappush(self.schedule, (t0 + rayleigh(self.rng, w), self._seq, direction))

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        if self.last_packet is None or now - self.last_packet >= self.trace_gap:
            self._start_trace(now)
        self.last_packet = now
        self.ledger.real(direction, size)
        return [Release(packet_id, now), *self.on_timer(now)]

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self.schedule and self.schedule[0][0] <= now:
            at, _, direction = heapq.heappop(self.schedule)
            if self.ledger.pad(direction, self.dummy_size):
                actions.append(Dummy(self.dummy_size, at, direction))
        return actions

    def next_wakeup(self) -> float | None:
        return self.schedule[0][0] if self.schedule else None
