"""One simulated robot of the fault harness: the real scheduler and installer on a simulated clock.

Real here: the renewal policy objects (TensorGuard's ``RenewalScheduler`` and the baselines),
the ``AtomicDir`` installer doing real file-system calls on a real directory, the ECDSA P-256
keys and x509 certificates, and every check, which reads cert.pem and key.pem back from disk
through the user-visible symlinks. Simulated: time (``SimulatedClocks``, advanced from event to
event, no sleeping), the agent process (its death is a ``SimulatedCrash`` raised at a file-system
step, or at the consumer reload; its restart rebuilds all state from disk and the clocks), the
network to the CA (instant, up or down per the fault schedule), the consumer (an nginx stand-in
that loads the pair at each reload and serves that certificate until the next reload), and the
operator who re-enrols a robot whose served certificate has been expired for ``reenrol_delay_s``.

To keep 1,000 robots fast, what a PEM file contains is looked up by its exact bytes in
``PairFacts``, which learns the facts when the key is generated and when the CA signs; bytes it
has never seen (a torn or foreign file) are parsed for real.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .atomicdir import AtomicDir, AtomicDirError, CredentialSet
from .certinfo import cert_spki, key_spki, validity_of
from .clocks import SimulatedClocks
from .filesystem import FaultyFileSystem, SimulatedCrash, When
from .harness_ca import SimulatedCa
from .harness_faults import Fault
from .renewal import Anchor, RenewalSchedule, Validity

ANCHOR_FILE = "anchor.json"
Channel = Literal["mtls", "issuer"]
"""mtls: renewal authenticates with the current certificate, so the CA refuses it once expired
(TensorGuard's EST re-enrolment, ``step ca renew``). issuer: the requester has its own
credentials (cert-manager), so expiry of the leaf does not block renewal."""
ScheduleFactory = Callable[[SimulatedClocks, random.Random], RenewalSchedule]


class PairFacts:
    """What key and certificate bytes contain, keyed by the exact bytes."""

    def __init__(self) -> None:
        self._key_spki: dict[bytes, bytes] = {}
        self._cert_spki: dict[bytes, bytes] = {}
        self._validity: dict[bytes, Validity] = {}

    def learn_key(self, pem: bytes, spki: bytes) -> None:
        self._key_spki[pem] = spki

    def learn_cert(self, pem: bytes, spki: bytes, validity: Validity) -> None:
        self._cert_spki[pem] = spki
        self._validity[pem] = validity

    def key(self, pem: bytes) -> bytes | None:
        """SPKI of a private key, None if the bytes are not a key."""
        if pem not in self._key_spki:
            try:
                self._key_spki[pem] = key_spki(pem)
            except ValueError:
                return None
        return self._key_spki[pem]

    def cert(self, pem: bytes) -> bytes | None:
        if pem not in self._cert_spki:
            try:
                self._cert_spki[pem] = cert_spki(pem)
            except ValueError:
                return None
        return self._cert_spki[pem]

    def validity(self, pem: bytes) -> Validity:
        if pem not in self._validity:
            self._validity[pem] = validity_of(pem)
        return self._validity[pem]

    def forget(self) -> None:
        self._key_spki.clear()
        self._cert_spki.clear()
        self._validity.clear()


@dataclass
class RobotStats:
    """What happened to one robot under one policy."""

    policy: str
    expired_served_s: float = 0.0
    expiries: int = 0
    """Certificates the consumer went on serving past not_after."""
    mismatches: int = 0
    """Checks (after every step, crash and reload) that found key.pem not matching cert.pem."""
    missing: int = 0
    """Checks that found cert.pem or key.pem missing or unreadable after the first enrolment."""
    checks: int = 0
    renewals: int = 0
    failed_attempts: int = 0
    ca_requests: int = 0
    install_failures: int = 0
    refused_expired: int = 0
    crashes: int = 0
    reenrolments: int = 0
    clock_events: int = 0
    worst_margin_s: float = math.inf
    crash_points: Counter[str] = field(default_factory=Counter)


_VERSION = re.compile(r"\.\.cred\.[0-9a-f]+")


def _label(step_name: str, sink: str) -> str:
    """Step names without the random version or robot directory, for the crash-point histogram."""
    return _VERSION.sub("..cred.*", step_name).replace(sink, "sink").replace(" ENOSPC", "")


class Consumer:
    """nginx stand-in: takes the pair from disk at reload, serves that certificate until the next."""

    def __init__(self, directory: str, facts: PairFacts) -> None:
        self.directory = directory
        self.facts = facts
        self.validity: Validity | None = None

    def read_pair(self) -> tuple[bytes, bytes] | None:
        try:
            with open(os.path.join(self.directory, "cert.pem"), "rb") as cert:
                cert_pem = cert.read()
            with open(os.path.join(self.directory, "key.pem"), "rb") as key:
                key_pem = key.read()
        except FileNotFoundError:
            return None
        return cert_pem, key_pem

    def reload(self) -> Literal["ok", "mismatch", "missing"]:
        """Like nginx -s reload: a bad pair is refused and the old one keeps serving."""
        pair = self.read_pair()
        if pair is None:
            return "missing"
        cert_pem, key_pem = pair
        spki = self.facts.cert(cert_pem)
        if spki is None or spki != self.facts.key(key_pem):
            return "mismatch"
        self.validity = self.facts.validity(cert_pem)
        return "ok"


@dataclass(frozen=True)
class RobotParams:
    """Knobs of the simulated world that are not faults."""

    hours: float
    lifetime_s: float
    epoch: float = 1_717_200_000.0
    restart_delay_s: float = 5.0
    """systemd Restart=always, RestartSec=5."""
    reenrol_delay_s: float = 1800.0
    """How long after a served certificate expires the operator re-enrols the robot."""
    operator_retry_s: float = 300.0


class SimRobot:
    """Runs one robot through its fault schedule under one policy; ``run()`` returns the stats."""

    def __init__(self, index: int, policy: str, factory: ScheduleFactory, channel: Channel, *,
                 faults: list[Fault], ca: SimulatedCa, directory: str, params: RobotParams,
                 seed: str) -> None:
        self.index = index
        self.factory = factory
        self.channel = channel
        self.faults = faults
        self.ca = ca
        self.params = params
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not cryptography
        self.stats = RobotStats(policy)
        self.clocks = SimulatedClocks(params.epoch, boot_id=f"robot-{index}")
        self.facts = PairFacts()
        self.fs = FaultyFileSystem(on_step=lambda _n, _name: self.check())
        self.sink = AtomicDir(directory, self.fs)
        self.consumer = Consumer(directory, self.facts)
        self.enrolled = False
        self.schedule: RenewalSchedule | None = None
        self.on_disk: Validity | None = None
        self.wake_mono = math.inf
        self.restart_at = math.inf
        self.operator_at = math.inf
        self.pending_kill: tuple[int, When] | None = None
        self.suspended_until = -math.inf
        self.expiry_counted = False
        start = params.epoch
        self.ca_down = sorted((start + f.at, start + f.end) for f in faults
                              if f.kind in ("ca_outage", "ca_restart"))

    # -- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        """Open cert.pem and key.pem as any reader would, now; count what is wrong."""
        self.stats.checks += 1
        pair = self.consumer.read_pair()
        if pair is None:
            if self.enrolled:
                self.stats.missing += 1
            return
        cert_spki_ = self.facts.cert(pair[0])
        if cert_spki_ is None or cert_spki_ != self.facts.key(pair[1]):
            self.stats.mismatches += 1

    # -- time ---------------------------------------------------------------------------------

    def serve_until(self, t: float) -> None:
        """The consumer serves its loaded certificate from now to ``t``; time moves on."""
        now = self.clocks.true
        if t <= now:
            return
        loaded = self.consumer.validity
        if loaded is not None and t > loaded.not_after:
            self.stats.expired_served_s += t - max(now, loaded.not_after)
            if not self.expiry_counted:
                self.stats.expiries += 1
                self.expiry_counted = True
        self.clocks.advance_to(t)

    def ca_up(self, t: float) -> bool:
        return not any(start <= t < end for start, end in self.ca_down)

    def next_ca_up(self, t: float) -> float:
        while not self.ca_up(t):
            t = max(end for start, end in self.ca_down if start <= t < end)
        return t

    # -- the agent process --------------------------------------------------------------------

    def reload_consumer(self) -> None:
        before = self.consumer.validity
        result = self.consumer.reload()
        if result == "mismatch":
            self.stats.mismatches += 1
        elif result == "missing" and self.enrolled:
            self.stats.missing += 1
        if self.consumer.validity is not None and self.consumer.validity != before:
            self.expiry_counted = False
            self.operator_at = self.consumer.validity.not_after + self.params.reenrol_delay_s

    def start_agent(self) -> None:
        """A (re)started agent knows only the disk and the clocks."""
        self.sink.recover()
        self.check()
        creds = self.sink.current()
        if creds is None:
            raise RuntimeError(f"robot {self.index}: no credentials on disk after enrolment")
        self.on_disk = self.facts.validity(creds.cert)
        raw_anchor = creds.extra_file(ANCHOR_FILE)
        anchor = None if raw_anchor is None else Anchor.from_bytes(raw_anchor, ANCHOR_FILE)
        self.schedule = self.factory(self.clocks, self.rng)
        self.schedule.load(self.on_disk, anchor)
        self.reload_consumer()  # a crash may have come between the swap and the reload
        self.restart_at = math.inf
        self.wake_mono = self.clocks.monotonic()

    def crash(self, where: str) -> None:
        self.stats.crashes += 1
        self.stats.crash_points[where] += 1
        self.schedule = None
        self.wake_mono = math.inf
        self.restart_at = self.clocks.true + self.params.restart_delay_s
        self.check()

    def new_credentials(self) -> tuple[CredentialSet, Validity]:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        issued = self.ca.issue(key.public_key(), f"node-{self.index:05d}", self.clocks.true)
        self.facts.learn_key(key_pem, issued.spki)
        self.facts.learn_cert(issued.cert_pem, issued.spki, issued.validity)
        anchor = Anchor.take(self.clocks)
        creds = CredentialSet(key_pem, issued.cert_pem, self.ca.chain_pem,
                              extra=((ANCHOR_FILE, anchor.to_bytes()),))
        return creds, issued.validity

    def agent_install(self, creds: CredentialSet) -> Literal["ok", "failed", "crashed"]:
        """Install and reload, with the pending kill (if any) armed at its step."""
        kill, self.pending_kill = self.pending_kill, None
        if kill is not None:
            self.fs.crash_at(self.fs.steps + kill[0], kill[1])
        try:
            self.sink.install(creds)
        except SimulatedCrash as crash:
            self.crash(f"{crash.when} {_label(crash.name, os.path.basename(self.sink.path))}")
            return "crashed"
        except AtomicDirError:
            if self.fs.armed and kill is not None:
                self.pending_kill = kill  # the install stopped before the kill's step: keep it
            self.fs.disarm()
            return "failed"
        if self.fs.armed and kill is not None:  # the kill's step lies past the install: the reload
            self.fs.disarm()
            if kill[1] == "after":
                self.reload_consumer()
            self.crash(f"{kill[1]} reload")
            return "crashed"
        self.reload_consumer()
        return "ok"

    def attempt(self) -> None:
        schedule, current = self.schedule, self.on_disk
        assert schedule is not None and current is not None
        self.stats.ca_requests += 1
        now = self.clocks.true
        if not self.ca_up(now):
            outcome = "failed"
        elif self.channel == "mtls" and now >= current.not_after:
            self.stats.refused_expired += 1
            outcome = "failed"
        else:
            creds, validity = self.new_credentials()
            outcome = self.agent_install(creds)
            if outcome == "failed":
                self.stats.install_failures += 1
            elif outcome == "ok":
                self.stats.renewals += 1
                self.stats.worst_margin_s = min(self.stats.worst_margin_s, current.not_after - now)
                self.on_disk = validity
                anchor = creds.extra_file(ANCHOR_FILE)
                assert anchor is not None
                schedule.load(validity, Anchor.from_bytes(anchor, ANCHOR_FILE))
        if outcome == "failed":
            self.stats.failed_attempts += 1
            schedule.failed()

    def wake(self) -> None:
        schedule = self.schedule
        assert schedule is not None
        if schedule.due():
            self.attempt()
        if self.schedule is not None:  # still alive
            self.stats.clock_events += len(self.schedule.events())
            self.wake_mono = self.clocks.monotonic() + max(self.schedule.sleep_for(), 0.5)

    # -- the operator -------------------------------------------------------------------------

    def operator(self) -> None:
        """Re-enrol with a fresh bootstrap token if the served certificate is still expired."""
        served = self.consumer.validity
        now = self.clocks.true
        if served is None or now <= served.not_after:
            self.operator_at = math.inf if served is None else served.not_after + self.params.reenrol_delay_s
            return
        if not self.ca_up(now):
            self.operator_at = self.next_ca_up(now)
            return
        creds, validity = self.new_credentials()
        armed, self.pending_kill = self.pending_kill, None  # kills aim at the agent, not at tgctl
        try:
            self.sink.install(creds)
        except AtomicDirError:
            self.operator_at = now + self.params.operator_retry_s
            return
        finally:
            self.pending_kill = armed
        self.stats.reenrolments += 1
        self.on_disk = validity
        self.reload_consumer()
        if self.schedule is not None:
            anchor = creds.extra_file(ANCHOR_FILE)
            assert anchor is not None
            self.schedule.load(validity, Anchor.from_bytes(anchor, ANCHOR_FILE))
            self.wake_mono = self.clocks.monotonic()

    # -- faults -------------------------------------------------------------------------------

    def apply(self, kind: str, fault: Fault) -> None:
        if kind == "suspend":
            self.clocks.suspend(fault.duration)
        elif kind == "wall_step":
            self.clocks.step_wall(fault.delta)
        elif kind == "disk_full_start":
            self.fs.disk_full = True
        elif kind == "disk_full_end":
            self.fs.disk_full = False
        elif kind == "kill":
            if fault.step > 0:
                self.pending_kill = (fault.step, fault.when)
            elif self.schedule is not None:
                self.crash("idle")
        # ca_outage / ca_restart: the CA's availability is looked up by time in ca_up().

    def timeline(self) -> list[tuple[float, str, Fault]]:
        start = self.params.epoch
        events: list[tuple[float, str, Fault]] = []
        for fault in self.faults:
            if fault.kind == "disk_full":
                events.append((start + fault.at, "disk_full_start", fault))
                events.append((start + fault.end, "disk_full_end", fault))
            elif fault.kind in ("suspend", "wall_step", "kill"):
                events.append((start + fault.at, fault.kind, fault))
        return sorted(events, key=lambda e: e[0])

    def run(self) -> RobotStats:
        end = self.params.epoch + self.params.hours * 3600.0
        creds, validity = self.new_credentials()  # first enrolment, before any fault
        self.sink.install(creds)
        self.enrolled = True
        self.on_disk = validity
        self.start_agent()
        events = self.timeline()
        index = 0
        while True:
            t_fault = events[index][0] if index < len(events) else math.inf
            t_wake = (self.clocks.true + max(0.0, self.wake_mono - self.clocks.monotonic())
                      if self.schedule is not None else math.inf)
            t = min(t_fault, t_wake, self.restart_at, self.operator_at)
            if t >= end:
                self.serve_until(end)
                break
            self.serve_until(t)
            if t == t_fault:
                self.apply(events[index][1], events[index][2])
                index += 1
            elif t == self.restart_at:
                self.start_agent()
            elif t == self.operator_at:
                self.operator()
            else:
                self.wake()
        self.facts.forget()
        return self.stats
