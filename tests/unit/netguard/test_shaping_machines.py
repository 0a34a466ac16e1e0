"""Defence machines, driven by the simulator on a virtual clock (no root, no sleeping)."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import Counter

import pytest

from tensorguard.netguard.shaping.base import Caps, Direction, Dummy, Release
from tensorguard.netguard.shaping.budget import PaddingBudget
from tensorguard.netguard.shaping.cbr import CbrMachine
from tensorguard.netguard.shaping.front import FrontMachine, rayleigh
from tensorguard.netguard.shaping.regulator import RegulatorMachine
from tensorguard.netguard.shaping.simulator import SimulationError, TracePacket, simulate
from tensorguard.netguard.shaping.wtfpad import (
    Histogram,
    WtfPadMachine,
    learn_histograms,
    log_bins,
)

OUT, IN = Direction.OUT, Direction.IN
LOOSE = Caps(max_padding_fraction=0.9, max_added_delay=10.0)


def burst_trace(n: int = 50, gap: float = 0.001, size: int = 300, start: float = 0.0) -> list[TracePacket]:
    return [TracePacket(start + i * gap, size, OUT) for i in range(n)]


def test_padding_budget_holds_the_fraction() -> None:
    budget = PaddingBudget(0.5)
    assert not budget.try_spend(100)  # nothing real sent yet: any padding would exceed 50 %
    budget.add_real(300)
    assert budget.try_spend(200) and budget.try_spend(100)
    assert not budget.try_spend(1)
    assert (budget.padding, budget.refused) == (300, 2)


# --- CBR -------------------------------------------------------------------------------------

def test_cbr_releases_one_packet_per_slot_on_the_grid() -> None:
    result = simulate(CbrMachine(100.0, LOOSE), burst_trace(20))
    times = [p.time for p in result.wire if p.real]
    assert len(times) == 20
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(g - 0.01) < 1e-9 for g in gaps)
    assert result.max_delay() == pytest.approx(19 * 0.01 - 19 * 0.001)


def test_cbr_burst_releases_several_per_slot() -> None:
    result = simulate(CbrMachine(100.0, LOOSE, burst=4), burst_trace(20, gap=0.0))
    per_slot = Counter(round(p.time, 9) for p in result.wire)
    # the first packet has slot 0 to itself (it is alone when it arrives); then 4 per slot
    assert sorted(per_slot.values()) == [1, 3, 4, 4, 4, 4]
    assert sorted(per_slot) == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]


def test_cbr_pads_empty_slots_within_budget() -> None:
    caps = Caps(max_padding_fraction=0.5, max_added_delay=1.0)
    machine = CbrMachine(100.0, caps, pad=True, dummy_size=300)
    result = simulate(machine, burst_trace(10, gap=0.01), until=5.0)
    dummies = [p for p in result.wire if not p.real]
    assert len(dummies) == 10  # 3000 real bytes allow exactly 3000 padding bytes at 50 %
    slots = [p.time for p in result.wire]
    assert all(abs((t / 0.01) - round(t / 0.01)) < 1e-6 for t in slots)
    assert result.padding_fraction(OUT) == pytest.approx(0.5)


def test_cbr_delay_cap_releases_off_grid_at_the_deadline() -> None:
    caps = Caps(max_padding_fraction=0.0, max_added_delay=0.025)
    machine = CbrMachine(10.0, caps)
    result = simulate(machine, burst_trace(5, gap=0.0))
    assert result.max_delay() == pytest.approx(0.025)
    assert machine.deadline_releases == 4


def test_cbr_leaves_unshaped_direction_alone() -> None:
    trace = [TracePacket(0.0, 100, IN), TracePacket(0.0001, 100, IN)]
    result = simulate(CbrMachine(10.0, LOOSE), trace)
    assert result.max_delay() == 0.0


@pytest.mark.parametrize("kwargs", [{"rate_hz": 0}, {"rate_hz": 1, "burst": 0}, {"rate_hz": 1, "dummy_size": 0}])
def test_cbr_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CbrMachine(caps=LOOSE, **kwargs)  # type: ignore[arg-type]


# --- FRONT -----------------------------------------------------------------------------------

def test_rayleigh_sampler_matches_its_mean() -> None:
    rng = random.Random(7)
    samples = [rayleigh(rng, 2.0) for _ in range(20000)]
    assert statistics.fmean(samples) == pytest.approx(2.0 * math.sqrt(math.pi / 2), rel=0.02)


def ks_statistic(samples: list[float], cdf) -> float:  # type: ignore[no-untyped-def]
    ordered = sorted(samples)
    n = len(ordered)
    return max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(ordered))


def test_front_padding_times_follow_rayleigh_of_the_drawn_window() -> None:
    machine = FrontMachine(Caps(0.9, 0.0), random.Random(1234), max_dummies={OUT: 3000, IN: 0},
                           w_min=2.0, w_max=2.0, dummy_size=10)
    trace = [TracePacket(i * 0.01, 1000, OUT) for i in range(3000)]  # enough real bytes for the cap
    result = simulate(machine, trace, until=200.0)
    pads = [p.time for p in result.wire if not p.real]
    assert len(pads) == machine.planned[OUT] > 100
    d = ks_statistic(pads, lambda t: 1 - math.exp(-t * t / (2 * 2.0**2)))
    critical = 1.36 / math.sqrt(len(pads))  # 5 % level
    assert d < critical, (d, critical)
    assert result.max_delay() == 0.0


def test_front_budget_and_window_are_drawn_per_trace() -> None:
    machine = FrontMachine(LOOSE, random.Random(5), max_dummies={OUT: 500, IN: 500}, w_min=1, w_max=10)
    trace = burst_trace(10) + burst_trace(10, start=100.0)
    simulate(machine, burst_trace(10))
    first = (dict(machine.windows), dict(machine.planned))
    simulate(machine, trace)
    assert (machine.windows, machine.planned) != first
    assert all(1 <= w <= 10 for w in machine.windows.values())


def test_front_respects_padding_cap() -> None:
    caps = Caps(max_padding_fraction=0.2, max_added_delay=0.0)
    machine = FrontMachine(caps, random.Random(3), max_dummies={OUT: 1000, IN: 0}, w_min=1, w_max=1,
                           dummy_size=100)
    result = simulate(machine, burst_trace(40, gap=0.05, size=100), until=30.0)
    assert result.padding_fraction(OUT) <= 0.2 + 1e-12
    assert machine.ledger.budgets[OUT].refused > 0


# --- WTF-PAD ---------------------------------------------------------------------------------

def test_histogram_draws_in_proportion_and_refills() -> None:
    hist = Histogram((0.0, 1.0, 2.0), [1, 3], 0)
    rng = random.Random(0)
    seen = []
    for _ in range(8):  # two full cycles of 4 tokens
        index, delay = hist.draw(rng)
        assert hist.edges[index] <= delay <= hist.edges[index + 1]
        hist.consume(index)
        seen.append(index)
    assert sorted(seen) == [0, 0, 1, 1, 1, 1, 1, 1]


def test_histogram_token_removal_takes_from_the_bin_or_above() -> None:
    hist = Histogram((0.0, 1.0, 2.0, 3.0), [0, 1, 5], 2)
    hist.remove_token_for(0.5)  # bin 0 is empty: the next non-empty bin above pays
    assert hist.counts == [0, 0, 5]
    hist.remove_token_for(99.0)  # beyond the last edge: last bin
    assert hist.counts == [0, 0, 4]


def test_learn_histograms_splits_bursts_and_gaps() -> None:
    burst, gap = learn_histograms([0.001] * 30 + [0.5] * 5 + [60.0], burst_threshold=0.1)
    assert sum(burst.counts) == 30 and burst.infinity == 6
    assert sum(gap.counts) == 5 and gap.infinity == 1
    with pytest.raises(ValueError):
        learn_histograms([0.001], burst_threshold=0.1)


def test_wtfpad_gap_dummies_follow_the_gap_histogram_exactly_over_full_cycles() -> None:
    edges = log_bins(0.001, 1.0, 6)
    gap = Histogram(edges, [5, 0, 10, 3, 2, 0], 0)
    burst = Histogram(edges, [1, 0, 0, 0, 0, 0], 0)  # one short burst timer, then gap mode
    machine = WtfPadMachine(Caps(0.9, 0.0), random.Random(42), {OUT: (burst, gap)}, dummy_size=1)
    trace = [TracePacket(0.0, 100000, OUT)]
    result = simulate(machine, trace, until=2000.0)
    pads = [p.time for p in result.wire if not p.real]
    intervals = [b - a for a, b in itertools.pairwise(pads)]
    cycles = 20 * 40  # 20 tokens per cycle; take 40 complete cycles
    counts = [0] * 6
    for value in intervals[:cycles]:
        counts[min(max(next(i for i in range(6) if edges[i] <= value < edges[i + 1]), 0), 5)] += 1
    assert counts == [5 * 40, 0, 10 * 40, 3 * 40, 2 * 40, 0]


def test_wtfpad_infinity_bin_ends_padding_and_real_packets_are_not_delayed() -> None:
    edges = log_bins(0.001, 1.0, 4)
    hists = {OUT: (Histogram(edges, [1, 1, 0, 0], 2), Histogram(edges, [0, 2, 2, 0], 1))}
    machine = WtfPadMachine(LOOSE, random.Random(9), hists)
    result = simulate(machine, burst_trace(30, gap=0.02, size=1000), until=100.0)
    assert result.max_delay() == 0.0
    assert machine.next_wakeup() is None  # idle after the infinity draw or the budget


# --- RegulaTor-style -------------------------------------------------------------------------

def test_regulator_rate_decays_and_pads_only_while_high() -> None:
    caps = Caps(max_padding_fraction=0.9, max_added_delay=5.0)
    machine = RegulatorMachine(caps, initial_rate=100.0, decay=0.5, min_rate=10.0, dummy_size=100)
    result = simulate(machine, burst_trace(3, gap=0.0, size=1000), until=30.0)
    times = [p.time for p in result.wire]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx(0.01)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(gaps))  # slowing down
    assert times[-1] <= math.log(10 / 100) / math.log(0.5) + 0.2  # stops near min_rate
    assert machine.next_wakeup() is None


def test_regulator_new_surge_when_queue_builds_up() -> None:
    machine = RegulatorMachine(LOOSE, initial_rate=50.0, decay=0.9, min_rate=5.0, surge_threshold=2)
    simulate(machine, burst_trace(3, gap=0.0) + burst_trace(10, gap=0.0001, start=3.0))
    assert machine.surges >= 2


def test_simulator_detects_contract_breaches() -> None:
    class Leaky:
        def on_packet(self, now, packet_id, size, direction):  # type: ignore[no-untyped-def]
            return []

        def on_timer(self, now):  # type: ignore[no-untyped-def]
            return []

        def next_wakeup(self):  # type: ignore[no-untyped-def]
            return None

    class Twice(Leaky):
        def on_packet(self, now, packet_id, size, direction):  # type: ignore[no-untyped-def]
            return [Release(packet_id, now), Release(packet_id, now)]

    class Past(Leaky):
        def on_packet(self, now, packet_id, size, direction):  # type: ignore[no-untyped-def]
            return [Release(packet_id, now), Dummy(10, now - 1, direction)]

    for machine, message in ((Leaky(), "never released"), (Twice(), "released twice"),
                             (Past(), "in the past")):
        with pytest.raises(SimulationError, match=message):
            simulate(machine, burst_trace(2))
