"""Time as the CA sees it: one injectable clock, aware UTC datetimes, and human durations."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime; tests pass a fixed or stepping one."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def utc_now() -> datetime:
    """The real clock (aware, UTC)."""
    return datetime.now(UTC)


def parse_duration(text: str) -> timedelta:
    """Parse '90', '90s', '15m', '1h', '7d' (a bare number is seconds) so CLI options read naturally."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"duration {text!r} is not a number with an optional unit ms, s, m, h or d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return timedelta(seconds=seconds)


def as_utc(value: datetime) -> datetime:
    """cryptography 38 hands out naive datetimes that mean UTC; make them comparable with aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
