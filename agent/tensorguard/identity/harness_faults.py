"""Random fault schedules for the harness: what goes wrong around one robot, and when.

A schedule is drawn once per robot from a seeded RNG and replayed unchanged against every policy.
Episodes with a duration (CA outage, CA restart, disk full, suspend) are, by default, separate
incidents: they do not overlap and at least ``min_quiet_s`` of normal operation separates them.
That is the fault model TensorGuard's guarantee is stated for (one outage of up to 0.45 L at a
time); ``overlapping=True`` draws each kind independently so incidents can pile up, to see how
the policies degrade beyond that model. Wall-clock steps and kills are instantaneous and land
anywhere, also inside episodes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from .filesystem import When

FaultKind = Literal["ca_outage", "ca_restart", "disk_full", "suspend", "wall_step", "kill"]
EPISODES: tuple[FaultKind, ...] = ("ca_outage", "ca_restart", "disk_full", "suspend")
WHENS: tuple[When, ...] = ("before", "during", "after")


@dataclass(frozen=True)
class Fault:
    """One fault, ``at`` seconds after the simulation starts (true time)."""

    at: float
    kind: FaultKind
    duration: float = 0.0
    """Episodes: how long it lasts."""
    delta: float = 0.0
    """wall_step: the jump of the robot's wall clock (seconds, signed)."""
    step: int = 0
    """kill: 0 kills the agent at ``at``; n > 0 arms a kill at step n of the next credential
    install (counting write/fsync/rename/... steps, then the consumer reload as the last)."""
    when: When = "before"

    @property
    def end(self) -> float:
        return self.at + self.duration


@dataclass(frozen=True)
class FaultProfile:
    """How often each fault happens (per day) and how big it gets."""

    outages_per_day: float = 6.0
    outage_fraction: tuple[float, float] = (0.05, 0.45)
    """Outage length as a fraction of the certificate lifetime."""
    ca_restarts_per_day: float = 6.0
    ca_restart_s: tuple[float, float] = (2.0, 15.0)
    disk_full_per_day: float = 2.0
    disk_full_s: tuple[float, float] = (60.0, 900.0)
    suspends_per_day: float = 4.0
    suspend_s: tuple[float, float] = (60.0, 1500.0)
    wall_steps_per_day: float = 4.0
    max_wall_offset_s: float = 600.0
    """Steps of up to this size; the robot's clock never drifts further than this from true time."""
    kills_per_day: float = 8.0
    install_kill_share: float = 0.75
    """Share of kills aimed at a random step of the next install (the rest kill an idle agent)."""
    install_steps: int = 12
    """Kill steps are drawn in 1..install_steps (an install takes about 10 steps, plus reload)."""
    min_quiet_s: float = 600.0
    overlapping: bool = False

    def episode_rate(self, kind: FaultKind) -> float:
        return {"ca_outage": self.outages_per_day, "ca_restart": self.ca_restarts_per_day,
                "disk_full": self.disk_full_per_day, "suspend": self.suspends_per_day}[kind] / 86400.0

    def duration(self, kind: FaultKind, rng: random.Random, lifetime_s: float) -> float:
        if kind == "ca_outage":
            low, high = self.outage_fraction
            return rng.uniform(low, high) * lifetime_s
        low, high = {"ca_restart": self.ca_restart_s, "disk_full": self.disk_full_s,
                     "suspend": self.suspend_s}[kind]
        return rng.uniform(low, high)


def _poisson_times(rng: random.Random, rate: float, horizon: float) -> list[float]:
    times: list[float] = []
    if rate <= 0:
        return times
    t = rng.expovariate(rate)
    while t < horizon:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _episodes(rng: random.Random, horizon: float, lifetime_s: float, profile: FaultProfile) -> list[Fault]:
    if profile.overlapping:
        return [Fault(t, kind, profile.duration(kind, rng, lifetime_s))
                for kind in EPISODES for t in _poisson_times(rng, profile.episode_rate(kind), horizon)]
    rates = [profile.episode_rate(kind) for kind in EPISODES]
    total = sum(rates)
    out: list[Fault] = []
    if total <= 0:
        return out
    t = profile.min_quiet_s
    while True:
        t += rng.expovariate(total)
        if t >= horizon:
            return out
        kind = rng.choices(EPISODES, weights=rates)[0]
        fault = Fault(t, kind, profile.duration(kind, rng, lifetime_s))
        out.append(fault)
        t = fault.end + profile.min_quiet_s


def _wall_steps(rng: random.Random, horizon: float, profile: FaultProfile) -> list[Fault]:
    out = []
    offset = 0.0
    bound = profile.max_wall_offset_s
    for t in _poisson_times(rng, profile.wall_steps_per_day / 86400.0, horizon):
        delta = rng.choice((-1.0, 1.0)) * rng.uniform(0.1 * bound, bound)
        if abs(offset + delta) > bound:  # same sign as the offset: stepping back stays in bounds
            delta = -delta
        offset += delta
        out.append(Fault(t, "wall_step", delta=delta))
    return out


def _kills(rng: random.Random, horizon: float, profile: FaultProfile) -> list[Fault]:
    out = []
    for t in _poisson_times(rng, profile.kills_per_day / 86400.0, horizon):
        if rng.random() < profile.install_kill_share:
            out.append(Fault(t, "kill", step=rng.randint(1, profile.install_steps), when=rng.choice(WHENS)))
        else:
            out.append(Fault(t, "kill"))
    return out


def draw_schedule(rng: random.Random, hours: float, lifetime_s: float,
                  profile: FaultProfile | None = None) -> list[Fault]:
    """Every fault for one robot over ``hours`` of true time, sorted by time."""
    profile = profile if profile is not None else FaultProfile()
    horizon = hours * 3600.0
    faults = (_episodes(rng, horizon, lifetime_s, profile) + _wall_steps(rng, horizon, profile)
              + _kills(rng, horizon, profile))
    return sorted(faults, key=lambda f: (f.at, f.kind))
