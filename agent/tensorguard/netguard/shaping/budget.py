"""Cost accounting every machine shares: the padding budget and the delay deadline."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .base import Caps, Direction, Release


@dataclass
class PaddingBudget:
    """Grants padding only while padding stays within ``fraction`` of all bytes sent."""

    fraction: float
    real: int = 0
    padding: int = 0
    refused: int = 0

    def add_real(self, size: int) -> None:
        self.real += size

    def try_spend(self, size: int) -> bool:
        """Spend ``size`` padding bytes if the cap still holds afterwards; count a refusal if not."""
        after = self.padding + size
        if after <= self.fraction * (after + self.real):
            self.padding = after
            return True
        self.refused += 1
        return False


@dataclass
class CostLedger:
    """Per-direction padding budgets plus the delay cap (so each direction holds the cap)."""

    caps: Caps
    budgets: dict[Direction, PaddingBudget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.caps.max_padding_fraction < 1:
            raise ValueError("max_padding_fraction must be in [0, 1)")
        if self.caps.max_added_delay < 0:
            raise ValueError("max_added_delay must be >= 0")
        self.budgets = {d: PaddingBudget(self.caps.max_padding_fraction) for d in Direction}

    def deadline(self, arrival: float) -> float:
        return arrival + self.caps.max_added_delay

    def real(self, direction: Direction, size: int) -> None:
        self.budgets[direction].add_real(size)

    def pad(self, direction: Direction, size: int) -> bool:
        return self.budgets[direction].try_spend(size)

    def release_overdue(self, held: deque[tuple[int, float]], next_send: float | None,
                        now: float) -> list[Release]:
        """Held (id, arrival) packets whose deadline has come before their next send time leave
        now, off schedule: the delay cap wins over the shape."""
        out = []
        while held and self.deadline(held[0][1]) <= now and (next_send is None or next_send > now):
            out.append(Release(held.popleft()[0], now))
        return out
