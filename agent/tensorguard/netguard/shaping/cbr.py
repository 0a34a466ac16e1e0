"""CBR: constant-rate slots. Hides timing (and, with padding, volume) at the cost of delay.

Every direction sends on a fixed grid of 1/rate seconds anchored at its first packet: at each
slot up to ``burst`` held packets are released, and, with ``pad``, an empty slot carries a dummy
of ``dummy_size`` bytes while the padding budget allows. A packet that would wait longer than
the delay cap is released at its deadline, off the grid (counted in ``deadline_releases``): the
cap wins over the shape, so set the rate above the flow's peak to keep packets on the grid.

Single-ended pace mode: dummies go to a discard port of the peer and are visible as such to an
eavesdropper who can see ports (they are not inside an encrypted tunnel); what CBR hides there is
the timing of the real packets, not their sizes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .base import Action, Caps, Direction, Dummy, Release
from .budget import CostLedger


@dataclass
class _Lane:
    """State of one direction."""

    anchor: float | None = None
    next_slot: float | None = None
    last_slot: float = -math.inf
    held: deque[tuple[int, float]] = field(default_factory=deque)  # (id, arrival)


class CbrMachine:
    """Constant-rate pacing with optional padding of empty slots."""

    def __init__(self, rate_hz: float, caps: Caps, *, burst: int = 1, pad: bool = False,
                 dummy_size: int = 512, directions: tuple[Direction, ...] = (Direction.OUT,)) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if dummy_size < 1:
            raise ValueError("dummy_size must be >= 1")
        self.period = 1.0 / rate_hz
        self.burst = burst
        self.pad = pad
        self.dummy_size = dummy_size
        self.shaped = directions
        self.ledger = CostLedger(caps)
        self.lanes = {d: _Lane() for d in Direction}
        self.deadline_releases = 0

    def _slot_at_or_after(self, lane: _Lane, t: float) -> float:
        assert lane.anchor is not None
        k = math.ceil((t - lane.anchor) / self.period - 1e-9)
        return lane.anchor + max(k, 0) * self.period

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        self.ledger.real(direction, size)
        if direction not in self.shaped:
            return [Release(packet_id, now)]
        lane = self.lanes[direction]
        if lane.anchor is None:
            lane.anchor = now
        lane.held.append((packet_id, now))
        if lane.next_slot is None:  # the grid was paused: resume on it, never reusing a slot
            lane.next_slot = max(self._slot_at_or_after(lane, now), lane.last_slot + self.period)
        return self.on_timer(now)

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for direction in self.shaped:
            lane = self.lanes[direction]
            overdue = self.ledger.release_overdue(lane.held, lane.next_slot, now)
            self.deadline_releases += len(overdue)
            actions += overdue
            while lane.next_slot is not None and lane.next_slot <= now:
                slot = lane.next_slot
                lane.last_slot = slot
                sent = True
                if lane.held:
                    for _ in range(min(self.burst, len(lane.held))):
                        actions.append(Release(lane.held.popleft()[0], slot))
                elif self.pad and self.ledger.pad(direction, self.dummy_size):
                    actions.append(Dummy(self.dummy_size, slot, direction))
                else:
                    sent = False
                # The grid keeps its phase. It pauses when nothing is held and no padding is due
                # (padding off, or its budget spent); the next real packet resumes it.
                keep = lane.held or (self.pad and sent)
                lane.next_slot = slot + self.period if keep else None
        return actions

    def next_wakeup(self) -> float | None:
        times = []
        for direction in self.shaped:
            lane = self.lanes[direction]
            if lane.next_slot is not None:
                times.append(lane.next_slot)
            if lane.held:
                times.append(self.ledger.deadline(lane.held[0][1]))
        return min(times) if times else None
