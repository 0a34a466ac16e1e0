"""The contract between a defence machine and whatever drives it (live pacer or simulator).

A machine never touches the OS or a clock: the driver tells it what happened and when
(`on_packet`, `on_timer`) and executes the actions it returns, at the times it asks for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Direction(enum.Enum):
    """Seen from the robot: OUT is sent by the robot, IN is received by it."""

    OUT = "out"
    IN = "in"


@dataclass(frozen=True)
class Release:
    """Let held packet ``packet_id`` go at time ``at`` (seconds, the driver's clock)."""

    packet_id: int
    at: float


@dataclass(frozen=True)
class Dummy:
    """Send ``size`` bytes of padding in ``direction`` at time ``at``."""

    size: int
    at: float
    direction: Direction


Action = Release | Dummy


@dataclass(frozen=True)
class Caps:
    """Cost limits every machine enforces (from [network.defence])."""

    max_padding_fraction: float
    """Padding bytes may be at most this share of all bytes sent (real + padding)."""
    max_added_delay: float
    """Seconds a real packet may be held beyond its arrival."""


class Machine(Protocol):
    """A defence: events in, actions out; ``next_wakeup`` tells the driver when to call back."""

    def on_packet(self, now: float, packet_id: int, size: int, direction: Direction) -> list[Action]:
        """A real packet arrived at the shaper (it is held until a Release names it)."""

    def on_timer(self, now: float) -> list[Action]:
        """The time asked for by ``next_wakeup`` has come."""

    def next_wakeup(self) -> float | None:
        """Absolute time of the next ``on_timer`` call wanted, or None."""
