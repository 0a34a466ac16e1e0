"""Property: whatever the traffic and parameters, no machine exceeds its delay or padding caps."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tensorguard.netguard.shaping.base import Caps, Direction, Machine
from tensorguard.netguard.shaping.cbr import CbrMachine
from tensorguard.netguard.shaping.front import FrontMachine
from tensorguard.netguard.shaping.regulator import RegulatorMachine
from tensorguard.netguard.shaping.simulator import SimResult, TracePacket, simulate
from tensorguard.netguard.shaping.wtfpad import Histogram, WtfPadMachine, log_bins

TRACES = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(40, 1500), st.sampled_from(list(Direction))),
    min_size=1, max_size=60,
).map(lambda items: [TracePacket(t, s, d) for t, s, d in items])
CAPS = st.builds(Caps, st.floats(0, 0.95), st.floats(0, 0.5))


def machines(caps: Caps, seed: int, rate: float, dummy: int) -> list[Machine]:
    edges = log_bins(0.001, 2.0, 8)
    rng = random.Random(seed)

    def hists() -> tuple[Histogram, Histogram]:
        return (Histogram(edges, [rng.randint(0, 5) for _ in range(8)], rng.randint(1, 3)),
                Histogram(edges, [rng.randint(1, 5) for _ in range(8)], rng.randint(0, 2)))

    both = (Direction.OUT, Direction.IN)
    return [
        CbrMachine(rate, caps, pad=True, dummy_size=dummy, directions=both),
        CbrMachine(rate, caps, burst=3, pad=False),
        FrontMachine(caps, random.Random(seed), max_dummies={Direction.OUT: 300, Direction.IN: 300},
                     w_min=0.1, w_max=3.0, dummy_size=dummy),
        WtfPadMachine(caps, random.Random(seed), {Direction.OUT: hists(), Direction.IN: hists()},
                      dummy_size=dummy),
        RegulatorMachine(caps, initial_rate=rate * 4, decay=0.8, min_rate=rate / 2, dummy_size=dummy,
                         directions=both),
    ]


def assert_within_caps(result: SimResult, caps: Caps, trace: list[TracePacket]) -> None:
    assert len(result.delays) == len(trace)
    assert max(result.delays.values()) <= caps.max_added_delay + 1e-9
    for direction in Direction:
        real = pad = 0
        for packet in result.wire:  # every prefix of what went on the wire holds the cap
            if packet.direction is not direction:
                continue
            if packet.real:
                real += packet.size
            else:
                pad += packet.size
            assert pad <= caps.max_padding_fraction * (pad + real) + 1e-6, (direction, pad, real)


@settings(max_examples=150, deadline=None)
@given(trace=TRACES, caps=CAPS, seed=st.integers(0, 2**32 - 1), rate=st.floats(5, 500),
       dummy=st.integers(1, 1500))
def test_no_machine_exceeds_its_caps(trace: list[TracePacket], caps: Caps, seed: int, rate: float,
                                     dummy: int) -> None:
    for machine in machines(caps, seed, rate, dummy):
        assert_within_caps(simulate(machine, trace, until=20.0), caps, trace)
