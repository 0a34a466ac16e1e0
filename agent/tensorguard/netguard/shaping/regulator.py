"""Rate regulation in the spirit of RegulaTor (Holland & Hopper, PETS 2022).

Each shaped direction sends on a schedule whose rate decays: a surge starts at ``initial_rate``
packets/s when traffic begins (or when more than ``surge_threshold`` packets are held), and the
rate then falls as initial_rate * decay^t until it reaches ``min_rate``. At every send time a held
real packet goes out, or a dummy when nothing is held and the rate is still above ``min_rate``
(and the padding budget allows). Below ``min_rate`` the machine only drains held packets at
``min_rate`` and goes idle. Bursts of real traffic thus look like one family of decaying
surges whatever their true shape; the delay cap releases a packet at its deadline if the
schedule would hold it longer (counted in ``deadline_releases``).

Single-ended pace mode: as for CBR, what is hidden is the timing and burst shape of real
packets; dummies to the peer's discard port are distinguishable by port.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .base import Action, Caps, Direction, Dummy, Release
from .budget import CostLedger


@dataclass
class _Lane:
    surge_start: float | None = None
    next_send: float | None = None
    held: deque[tuple[int, float]] = field(default_factory=deque)  # (id, arrival)


class RegulatorMachine:
    """Decaying-rate surges with padding while the rate is high."""

    def __init__(self, caps: Caps, *, initial_rate: float = 200.0, decay: float = 0.9,
                 min_rate: float = 10.0, surge_threshold: int = 4, dummy_size: int = 512,
                 directions: tuple[Direction, ...] = (Direction.OUT,)) -> None:
        if not 0 < min_rate <= initial_rate:
            raise ValueError("need 0 < min_rate <= initial_rate")
        if not 0 < decay < 1:
            raise ValueError("decay must be in (0, 1)")
        if surge_threshold < 1 or dummy_size < 1:
            raise ValueError("surge_threshold and dummy_size must be >= 1")
        self.initial_rate, self.decay, self.min_rate = initial_rate, decay, min_rate
        self.surge_threshold = surge_threshold
        self.dummy_size = dummy_size
        self.shaped = directions
        self.ledger = CostLedger(caps)
        self.lanes = {d: _Lane() for d in Direction}
        self.deadline_releases = 0
        self.surges = 0

    def rate(self, lane: _Lane, t: float) -> float:
        if lane.surge_start is None:
            return self.min_rate
        return max(self.min_rate, self.initial_rate * float(self.decay ** (t - lane.surge_start)))

    def _surge(self, lane: _Lane, now: float) -> None:
        lane.surge_start = now
        lane.next_send = now
        self.surges += 1

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        self.ledger.real(direction, size)
        if direction not in self.shaped:
            return [Release(packet_id, now)]
        lane = self.lanes[direction]
        lane.held.append((packet_id, now))
        if lane.next_send is None or len(lane.held) > self.surge_threshold:
            self._surge(lane, now)
        return self.on_timer(now)

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for direction in self.shaped:
            lane = self.lanes[direction]
            overdue = self.ledger.release_overdue(lane.held, lane.next_send, now)
            self.deadline_releases += len(overdue)
            actions += overdue
            while lane.next_send is not None and lane.next_send <= now:
                at = lane.next_send
                rate = self.rate(lane, at)
                if lane.held:
                    actions.append(Release(lane.held.popleft()[0], at))
                elif rate > self.min_rate and self.ledger.pad(direction, self.dummy_size):
                    actions.append(Dummy(self.dummy_size, at, direction))
                else:
                    lane.next_send, lane.surge_start = None, None
                    break
                lane.next_send = at + 1.0 / rate
        return actions

    def next_wakeup(self) -> float | None:
        times: list[float] = []
        for direction in self.shaped:
            lane = self.lanes[direction]
            if lane.next_send is not None:
                times.append(lane.next_send)
            if lane.held:
                times.append(self.ledger.deadline(lane.held[0][1]))
        return min(times) if times else None
