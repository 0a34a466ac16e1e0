"""Build the configured defence machine from [network.defence]."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

from ...config.schema import DefenceSettings
from .base import Caps, Direction, Machine
from .cbr import CbrMachine
from .front import FrontMachine
from .regulator import RegulatorMachine
from .wtfpad import Histogram, WtfPadMachine


class HistogramFileError(ValueError):
    """The WTF-PAD histogram file cannot be used; the message names the file and the field."""


def caps_of(defence: DefenceSettings) -> Caps:
    return Caps(defence.max_padding_fraction, defence.max_added_delay_ms / 1000.0)


def load_histograms(path: Path) -> dict[Direction, tuple[Histogram, Histogram]]:
    """Read {"edges": [...], "out": {"burst": {"counts": [...], "infinity": N}, "gap": ...}, "in": ...}."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistogramFileError(f"{path}: cannot read histograms: {exc}") from None
    try:
        edges = tuple(float(e) for e in data["edges"])
        if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] < 0:
            raise ValueError("edges must be >= 2 increasing non-negative numbers")
        out: dict[Direction, tuple[Histogram, Histogram]] = {}
        for direction in Direction:
            if direction.value not in data:
                continue
            pair = []
            for kind in ("burst", "gap"):
                hist = data[direction.value][kind]
                counts = [int(c) for c in hist["counts"]]
                pair.append(Histogram(edges, counts, int(hist["infinity"])))
            out[direction] = (pair[0], pair[1])
    except (KeyError, TypeError, ValueError) as exc:
        raise HistogramFileError(f"{path}: invalid histograms: {exc!s}") from None
    if not out:
        raise HistogramFileError(f'{path}: no "out" or "in" histograms')
    return out


def build_machine(defence: DefenceSettings, rng: random.Random,
                  directions: tuple[Direction, ...] = (Direction.OUT,)) -> Machine | None:
    """The machine for ``defence.kind`` (None for "none"), shaping ``directions``."""
    caps = caps_of(defence)
    if defence.kind == "cbr":
        return CbrMachine(defence.rate_hz, caps, burst=defence.burst, pad=defence.pad,
                          dummy_size=defence.dummy_size, directions=directions)
    if defence.kind == "front":
        front = defence.front
        return FrontMachine(caps, rng, max_dummies={d: front.max_dummies for d in directions},
                            w_min=front.window_min_s, w_max=front.window_max_s,
                            dummy_size=defence.dummy_size, trace_gap=front.trace_gap_s)
    if defence.kind == "regulator":
        reg = defence.regulator
        return RegulatorMachine(caps, initial_rate=defence.rate_hz, decay=reg.decay,
                                min_rate=reg.min_rate_hz, surge_threshold=reg.surge_threshold,
                                dummy_size=defence.dummy_size, directions=directions)
    if defence.kind == "wtfpad":
        assert defence.wtfpad.histograms is not None  # the schema requires it for wtfpad
        hists = load_histograms(Path(defence.wtfpad.histograms))
        return WtfPadMachine(caps, rng, {d: h for d, h in hists.items() if d in directions},
                             dummy_size=defence.dummy_size)
    return None
