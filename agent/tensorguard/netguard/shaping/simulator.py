"""Offline driver: replays a trace through a machine on a virtual clock (no I/O, no sleeping).

The live pacer and this simulator drive the same machine objects, so what the analysis measures
is what the datapath does.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .base import Direction, Dummy, Machine, Release


@dataclass(frozen=True)
class TracePacket:
    """A packet of an undefended trace."""

    time: float
    size: int
    direction: Direction


@dataclass(frozen=True)
class WirePacket:
    """A packet as an eavesdropper sees it after the defence."""

    time: float
    size: int
    direction: Direction
    real: bool
    packet_id: int | None = None


@dataclass
class SimResult:
    """The defended trace and what the defence cost."""

    wire: list[WirePacket] = field(default_factory=list)
    delays: dict[int, float] = field(default_factory=dict)

    def bytes(self, direction: Direction, real: bool) -> int:
        return sum(p.size for p in self.wire if p.direction is direction and p.real is real)

    def padding_fraction(self, direction: Direction) -> float:
        pad, real = self.bytes(direction, False), self.bytes(direction, True)
        return pad / (pad + real) if pad + real else 0.0

    def max_delay(self) -> float:
        return max(self.delays.values(), default=0.0)


class SimulationError(RuntimeError):
    """The machine broke the contract (released a packet twice, never, or before it arrived)."""


def simulate(machine: Machine, trace: Iterable[TracePacket], until: float | None = None,
             max_events: int = 10_000_000) -> SimResult:
    """Run ``trace`` through ``machine``; padding after ``until`` (default: last arrival + 60 s)
    is not recorded, and the run ends once every real packet has been released."""
    packets = sorted(trace, key=lambda p: p.time)
    horizon = until if until is not None else (packets[-1].time + 60.0 if packets else 0.0)
    result = SimResult()
    arrivals: dict[int, TracePacket] = {}
    pending: list[tuple[float, int, Release | Dummy]] = []
    seq = 0

    def take(actions: list[Release | Dummy], now: float) -> None:
        nonlocal seq
        for action in actions:
            if action.at < now - 1e-9:
                raise SimulationError(f"{type(machine).__name__} scheduled {action} in the past ({now})")
            seq += 1
            heapq.heappush(pending, (action.at, seq, action))

    def flush(upto: float) -> None:
        while pending and pending[0][0] <= upto:
            at, _, action = heapq.heappop(pending)
            if isinstance(action, Release):
                packet = arrivals.pop(action.packet_id, None)
                if packet is None:
                    raise SimulationError(f"packet {action.packet_id} released twice or unknown")
                result.delays[action.packet_id] = at - packet.time
                result.wire.append(WirePacket(at, packet.size, packet.direction, True, action.packet_id))
            elif at <= horizon:
                result.wire.append(WirePacket(at, action.size, action.direction, False))

    index = 0
    events = 0
    while True:
        events += 1
        if events > max_events:
            raise SimulationError("too many events; does the machine ever go idle?")
        wake = machine.next_wakeup()
        next_arrival = packets[index].time if index < len(packets) else math.inf
        # Past the horizon the machine is only woken to release packets it still holds.
        if wake is not None and wake <= next_arrival and (wake <= horizon or arrivals):
            flush(wake)
            take(machine.on_timer(wake), wake)
        elif next_arrival < math.inf:
            packet = packets[index]
            flush(packet.time)
            arrivals[index] = packet
            take(machine.on_packet(packet.time, index, packet.size, packet.direction), packet.time)
            index += 1
        else:
            break
    flush(math.inf)
    if arrivals:
        raise SimulationError(f"{len(arrivals)} packet(s) never released: {sorted(arrivals)[:5]}")
    result.wire.sort(key=lambda p: p.time)
    return result
