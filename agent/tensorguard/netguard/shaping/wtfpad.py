"""WTF-PAD (Juarez et al., ESORICS 2016): adaptive padding that fills statistically unlikely gaps.

Each direction runs the burst/gap state machine of adaptive padding:

* IDLE: nothing is sent. A real packet moves to BURST.
* BURST: a delay is drawn from the burst histogram. A real packet arriving first re-draws it;
  if the delay expires, a dummy is sent and the machine moves to GAP.
* GAP: a delay is drawn from the gap histogram; on expiry a dummy is sent and a new delay drawn.
  A real packet moves back to BURST.

Drawing the "infinity" bin returns to IDLE (this is what ends padding). Histograms hold tokens:
every real inter-arrival time removes a token from its bin ("token
removal") and every dummy sent takes the token of its own draw, so real and padding
inter-arrivals together follow the histogram; an emptied
histogram is refilled from its learned original. Real packets are never delayed.

``learn_histograms`` builds both histograms from inter-arrival times of undefended traces.
"""

from __future__ import annotations

import bisect
import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import Action, Caps, Direction, Dummy, Release
from .budget import CostLedger

INFINITY = -1
"""Index of the infinity bin in a draw."""


def log_bins(low: float = 1e-4, high: float = 10.0, count: int = 20) -> tuple[float, ...]:
    """``count + 1`` bin edges spaced evenly in log time from ``low`` to ``high`` seconds."""
    if not 0 < low < high or count < 1:
        raise ValueError("need 0 < low < high and count >= 1")
    ratio = (high / low) ** (1 / count)
    return tuple(low * ratio**i for i in range(count + 1))


@dataclass
class Histogram:
    """Token counts per inter-arrival bin, plus the infinity bin that ends padding."""

    edges: tuple[float, ...]
    counts: list[int]
    infinity: int
    original: tuple[tuple[int, ...], int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError("need one count per bin (len(edges) - 1)")
        if any(c < 0 for c in self.counts) or self.infinity < 0:
            raise ValueError("token counts must be >= 0")
        if sum(self.counts) + self.infinity == 0:
            raise ValueError("a histogram needs at least one token")
        self.original = (tuple(self.counts), self.infinity)

    def total(self) -> int:
        return sum(self.counts) + self.infinity

    def refill(self) -> None:
        self.counts, self.infinity = list(self.original[0]), self.original[1]

    def draw(self, rng: random.Random) -> tuple[int, float]:
        """A bin chosen in proportion to its tokens, and a delay uniform within it."""
        if self.total() == 0:
            self.refill()
        pick = rng.randrange(self.total())
        for index, count in enumerate(self.counts):
            if pick < count:
                return index, rng.uniform(self.edges[index], self.edges[index + 1])
            pick -= count
        return INFINITY, math.inf

    def consume(self, index: int) -> None:
        """Take one token from ``index`` (a draw that was used)."""
        if index == INFINITY:
            self.infinity = max(0, self.infinity - 1)
        else:
            self.counts[index] = max(0, self.counts[index] - 1)
        if self.total() == 0:
            self.refill()

    def remove_token_for(self, interval: float) -> None:
        """Token removal: a real inter-arrival time takes a token from its bin (or the nearest
        non-empty bin above it), so real traffic counts against the padding distribution."""
        index = bisect.bisect_right(self.edges, interval) - 1
        index = min(max(index, 0), len(self.counts) - 1)
        for candidate in range(index, len(self.counts)):
            if self.counts[candidate] > 0:
                self.counts[candidate] -= 1
                break
        if self.total() == 0:
            self.refill()


def learn_histograms(intervals: Sequence[float], burst_threshold: float,
                     edges: tuple[float, ...] | None = None) -> tuple[Histogram, Histogram]:
    """Burst and gap histograms from inter-arrival times of undefended traffic (one direction).

    Intervals below ``burst_threshold`` are within bursts; the others are gaps between bursts.
    Each burst ends once, so the burst histogram's infinity bin gets one token per gap; the gap
    histogram's infinity bin gets one token per gap longer than the last bin (idle periods).
    """
    edges = edges or log_bins()
    burst = [0] * (len(edges) - 1)
    gap = [0] * (len(edges) - 1)
    gaps = idle = 0
    for value in intervals:
        if value < 0:
            raise ValueError("inter-arrival times must be >= 0")
        index = min(max(bisect.bisect_right(edges, value) - 1, 0), len(burst) - 1)
        if value < burst_threshold:
            burst[index] += 1
        else:
            gaps += 1
            if value >= edges[-1]:
                idle += 1
            else:
                gap[index] += 1
    if sum(burst) == 0 or sum(gap) == 0:
        raise ValueError("need intervals on both sides of burst_threshold to learn from")
    return Histogram(edges, burst, max(gaps, 1)), Histogram(edges, gap, idle)


class Mode(enum.Enum):
    IDLE = "idle"
    BURST = "burst"
    GAP = "gap"


@dataclass
class _Lane:
    burst: Histogram
    gap: Histogram
    mode: Mode = Mode.IDLE
    expires: float | None = None
    drawn: int = INFINITY
    last_real: float | None = None


class WtfPadMachine:
    """Adaptive padding with per-direction burst and gap histograms."""

    def __init__(self, caps: Caps, rng: random.Random,
                 histograms: dict[Direction, tuple[Histogram, Histogram]], *,
                 dummy_size: int = 512) -> None:
        if dummy_size < 1:
            raise ValueError("dummy_size must be >= 1")
        self.rng = rng
        self.dummy_size = dummy_size
        self.ledger = CostLedger(caps)
        self.lanes = {d: _Lane(b, g) for d, (b, g) in histograms.items()}

    def _arm(self, lane: _Lane, now: float, mode: Mode) -> None:
        hist = lane.burst if mode is Mode.BURST else lane.gap
        index, delay = hist.draw(self.rng)
        if index == INFINITY:
            hist.consume(index)
            lane.mode, lane.expires, lane.drawn = Mode.IDLE, None, INFINITY
        else:
            lane.mode, lane.expires, lane.drawn = mode, now + delay, index

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        self.ledger.real(direction, size)
        lane = self.lanes.get(direction)
        if lane is not None:
            if lane.last_real is not None:
                hist = lane.burst if lane.mode is Mode.BURST else lane.gap
                hist.remove_token_for(now - lane.last_real)
            lane.last_real = now
            self._arm(lane, now, Mode.BURST)
        return [Release(packet_id, now), *self.on_timer(now)]

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for direction, lane in self.lanes.items():
            while lane.expires is not None and lane.expires <= now:
                at = lane.expires
                (lane.burst if lane.mode is Mode.BURST else lane.gap).consume(lane.drawn)
                if self.ledger.pad(direction, self.dummy_size):
                    actions.append(Dummy(self.dummy_size, at, direction))
                    self._arm(lane, at, Mode.GAP)
                else:  # budget spent: stop padding until real traffic comes back
                    lane.mode, lane.expires, lane.drawn = Mode.IDLE, None, INFINITY
        return actions

    def next_wakeup(self) -> float | None:
        times = [lane.expires for lane in self.lanes.values() if lane.expires is not None]
        return min(times) if times else None
