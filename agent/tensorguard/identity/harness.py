"""The fault harness: does a renewal policy keep a fleet's certificates valid and matching?

For each robot a random fault schedule (harness_faults) is drawn from the seed and replayed,
unchanged, against three policies: TensorGuard's ``RenewalScheduler`` and models of smallstep's
``step ca renew --daemon`` and cert-manager (baselines). Each run drives the real scheduler and the
real ``AtomicDir`` installer on a real directory (tmpfs /dev/shm when there is one), with real
x509 from a simulated CA, on simulated clocks; harness_robot says exactly what is simulated.

Measured per policy: seconds a consumer served an expired certificate (true time > not_after),
key/cert mismatches seen on disk (checked after every file-system step, every crash and every
reload), renewals, failed attempts, CA requests, operator re-enrolments and the worst margin
(least time left on the old certificate when a renewal succeeded). Deterministic for a seed:
the numbers do not depend on key material or on how robots are spread over worker processes.

Run it: ``python -m tensorguard.identity.harness --robots 1000 --hours 24``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from .baselines import CertManagerPolicy, StepCaPolicy
from .clocks import SimulatedClocks
from .harness_ca import SimulatedCa
from .harness_faults import Fault, FaultProfile, draw_schedule
from .harness_robot import Channel, RobotParams, RobotStats, ScheduleFactory, SimRobot
from .renewal import RenewalPolicy, RenewalSchedule, RenewalScheduler

POLICIES = ("tensorguard", "step-ca", "cert-manager")
CHUNK = 25
"""Robots per work item; results are summed per robot in robot order, so chunking never
changes the report."""
BACKDATE_S = 60.0


@dataclass(frozen=True)
class HarnessConfig:
    """Everything a worker needs to replay its robots."""

    robots: int
    hours: float
    lifetime_s: float
    seed: int
    profile: FaultProfile
    baseline_max_sleep_s: float | None
    reenrol_delay_s: float
    root: str


def _factories(config: HarnessConfig) -> dict[str, tuple[ScheduleFactory, Channel]]:
    policy = RenewalPolicy(backdate_s=BACKDATE_S)
    sleep = config.baseline_max_sleep_s

    def tensorguard(clocks: SimulatedClocks, rng: random.Random) -> RenewalSchedule:
        return RenewalScheduler(policy, clocks, rng)

    def step_ca(clocks: SimulatedClocks, rng: random.Random) -> RenewalSchedule:
        return StepCaPolicy(clocks, max_sleep_s=sleep)

    def cert_manager(clocks: SimulatedClocks, rng: random.Random) -> RenewalSchedule:
        return CertManagerPolicy(clocks, max_sleep_s=sleep)

    return {"tensorguard": (tensorguard, "mtls"), "step-ca": (step_ca, "mtls"),
            "cert-manager": (cert_manager, "issuer")}


def robot_schedule(config: HarnessConfig, index: int) -> list[Fault]:
    """The faults of robot ``index``: the same for every policy and every run with this seed."""
    rng = random.Random(f"{config.seed}:{index}:faults")  # noqa: S311 - simulation
    return draw_schedule(rng, config.hours,
                         config.lifetime_s, config.profile)


_CA: dict[tuple[float, int], SimulatedCa] = {}


def _ca(config: HarnessConfig) -> SimulatedCa:
    """One CA per worker process (key generation is the slow part)."""
    key = (config.lifetime_s, config.seed)
    if key not in _CA:
        serials = random.Random(f"{config.seed}:ca")  # noqa: S311 - serial numbers of a test CA
        _CA[key] = SimulatedCa(serials, config.lifetime_s, BACKDATE_S)
    return _CA[key]


RobotResult = tuple[int, list[RobotStats], Counter[str]]
"""Robot index, its stats under each of POLICIES (in order), and the faults it was given."""


def run_robots(config: HarnessConfig, indices: Sequence[int]) -> list[RobotResult]:
    """Replay robots ``indices`` under every policy; one directory per robot and policy."""
    factories = _factories(config)
    params = RobotParams(config.hours, config.lifetime_s, reenrol_delay_s=config.reenrol_delay_s)
    ca = _ca(config)
    out = []
    for index in indices:
        faults = robot_schedule(config, index)
        kinds: Counter[str] = Counter(f.kind for f in faults)
        per_policy = []
        for name in POLICIES:
            factory, channel = factories[name]
            directory = os.path.join(config.root, f"robot-{index:05d}-{name}")
            os.mkdir(directory, 0o700)
            try:
                robot = SimRobot(index, name, factory, channel, faults=faults, ca=ca,
                                 directory=directory, params=params, seed=f"{config.seed}:{index}:{name}")
                per_policy.append(robot.run())
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        out.append((index, per_policy, kinds))
    return out


@dataclass
class PolicyReport(RobotStats):
    """One policy's totals over the fleet: a robot's counters summed, plus how many robots saw expiry."""

    robots_with_expired: int = 0

    def add(self, robot: RobotStats) -> None:
        for f in fields(RobotStats):
            value = getattr(robot, f.name)
            if isinstance(value, int | float) and f.name != "worst_margin_s":
                setattr(self, f.name, getattr(self, f.name) + value)
        self.robots_with_expired += robot.expired_served_s > 0
        self.worst_margin_s = min(self.worst_margin_s, robot.worst_margin_s)
        self.crash_points.update(robot.crash_points)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "crash_points":
                value = dict(sorted(value.items()))
            elif isinstance(value, float):
                value = round(value, 3) if math.isfinite(value) else None
            out[f.name] = value
        return out


@dataclass
class HarnessReport:
    """The harness result: per-policy totals, the faults injected, and how long it took."""

    robots: int
    hours: float
    lifetime_s: float
    seed: int
    overlapping: bool
    policies: list[PolicyReport]
    faults: Counter[str]
    runtime_s: float = 0.0

    def policy(self, name: str) -> PolicyReport:
        return next(p for p in self.policies if p.policy == name)

    def tensorguard_wins(self) -> bool:
        """TensorGuard served no expired certificate, saw no mismatch, and did better than both."""
        tg = self.policy("tensorguard")
        others = [p for p in self.policies if p.policy != "tensorguard"]
        return (tg.expired_served_s == 0 and tg.mismatches == 0 and tg.missing == 0
                and all(o.expired_served_s > tg.expired_served_s for o in others))

    def table(self) -> str:
        head = (f"fault harness: {self.robots} robots x {self.hours:g} h, certificate lifetime "
                f"{self.lifetime_s:g} s, seed {self.seed}, "
                f"{'overlapping' if self.overlapping else 'separate'} incidents, {self.runtime_s:.1f} s")
        injected = "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        rows = [("", *[p.policy for p in self.policies])]

        def row(label: str, render: Callable[[PolicyReport], str]) -> None:
            rows.append((label, *[render(p) for p in self.policies]))

        row("expired served (s)", lambda p: f"{p.expired_served_s:.0f}")
        row("robots with expired", lambda p: str(p.robots_with_expired))
        row("certificates expired", lambda p: str(p.expiries))
        row("key/cert mismatches", lambda p: str(p.mismatches))
        row("pair missing", lambda p: str(p.missing))
        row("disk checks", lambda p: str(p.checks))
        row("renewals", lambda p: str(p.renewals))
        row("failed attempts", lambda p: str(p.failed_attempts))
        row("CA requests", lambda p: str(p.ca_requests))
        row("install failures", lambda p: str(p.install_failures))
        row("refused (expired)", lambda p: str(p.refused_expired))
        row("operator re-enrols", lambda p: str(p.reenrolments))
        row("agent crashes", lambda p: str(p.crashes))
        row("clock events seen", lambda p: str(p.clock_events))
        row("worst margin (s)",
            lambda p: f"{p.worst_margin_s:.0f}" if math.isfinite(p.worst_margin_s) else "-")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, injected]
        lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                            enumerate(zip(r, widths, strict=True))) for r in rows]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"robots": self.robots, "hours": self.hours, "lifetime_s": self.lifetime_s,
                "seed": self.seed, "overlapping": self.overlapping,
                "runtime_s": round(self.runtime_s, 3), "faults": dict(sorted(self.faults.items())),
                "tensorguard_wins": self.tensorguard_wins(),
                "policies": {p.policy: p.as_json() for p in self.policies}}


SHM = "/dev/shm"  # noqa: S108 - only the parent of a private mkdtemp directory


def _scratch_root() -> str:
    """A private (0700) directory, on tmpfs when there is one: fsync is cheap there."""
    base = SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None
    return tempfile.mkdtemp(prefix="tg-renewal-harness-", dir=base)


def run_harness(robots: int, hours: float, lifetime_s: float, seed: int,
                progress: Callable[[str], None] | None = None, *, workers: int | None = None,
                profile: FaultProfile | None = None, baseline_max_sleep_s: float | None = None,
                reenrol_delay_s: float = 1800.0) -> HarnessReport:
    """Replay ``robots`` random fault schedules against every policy and total the results.

    ``workers`` processes share the robots (default: one per CPU); the report does not depend on it.
    ``baseline_max_sleep_s=None`` lets the baselines sleep like Go timers (on CLOCK_MONOTONIC).
    """
    started = time.monotonic()
    profile = profile if profile is not None else FaultProfile()
    root = _scratch_root()
    config = HarnessConfig(robots, hours, lifetime_s, seed, profile, baseline_max_sleep_s,
                           reenrol_delay_s, root)
    chunks = [range(i, min(i + CHUNK, robots)) for i in range(0, robots, CHUNK)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, len(chunks))
    results: dict[int, tuple[list[RobotStats], Counter[str]]] = {}

    def collect(batch: list[RobotResult]) -> None:
        for index, stats, kinds in batch:
            results[index] = (stats, kinds)
        if progress is not None:
            progress(f"{len(results)}/{robots} robots replayed ({time.monotonic() - started:.1f} s)")

    try:
        if workers <= 1:
            for chunk in chunks:
                collect(run_robots(config, chunk))
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for batch in pool.map(run_robots, [config] * len(chunks), chunks):
                    collect(batch)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    policies = [PolicyReport(name) for name in POLICIES]
    faults: Counter[str] = Counter()
    for index in range(robots):
        stats, kinds = results[index]
        faults.update(kinds)
        for report, robot in zip(policies, stats, strict=True):
            report.add(robot)
    return HarnessReport(robots, hours, lifetime_s, seed, profile.overlapping, policies, faults,
                         time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table (or JSON); exit 1 unless TensorGuard wins."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--robots", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="certificate lifetime (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--overlapping", action="store_true", help="let incidents overlap")
    parser.add_argument("--baseline-max-sleep", type=float, default=None,
                        help="wake the baselines at least this often (default: Go-timer sleeps)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run_harness(args.robots, args.hours, args.lifetime, args.seed,
                         lambda line: print(line, file=sys.stderr), workers=args.workers,
                         profile=FaultProfile(overlapping=args.overlapping),
                         baseline_max_sleep_s=args.baseline_max_sleep)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.table())
    return 0 if report.tensorguard_wins() else 1


if __name__ == "__main__":
    sys.exit(main())
