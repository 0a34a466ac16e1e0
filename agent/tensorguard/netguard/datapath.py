"""netguard's kernel state as one object: eBPF on the uplinks, NFQUEUE chains and the pacer.

Built from [network]: ``preflight`` finds everything that cannot be applied before the kernel is
touched; ``start`` brings the parts up in an order that never leaves protected traffic unguarded
longer than necessary; ``reconfigure`` swaps selectors and the defence in place; ``stop`` removes
every trace (qdiscs, filters, chains, pinned maps, queue binding).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import random
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config.schema import NetworkSettings
from .kernel import bpf_maps as maps
from .kernel import iptables
from .kernel.tc import DatapathError, TcDatapath, cgroup2_root, cgroup_ref, cleanup_stale, in_netns
from .pacer import NfqueuePacer
from .shaping.base import Machine
from .shaping.factory import HistogramFileError, build_machine

log = logging.getLogger(__name__)

QUEUE_NUM = 18260
"""NFQUEUE number of the pace path (0x4754, "GT"): clear of the default queue 0 others use."""
SHAPER_MARK = 0x10000
"""skb mark bit the pacer sets on what it released; the eBPF leak guard looks for it."""
MAX_PACE_RATE_HZ = 50_000.0
"""Slots per second the pace path is allowed: below the ~70,000 packets/s it measured here."""
BPF_OBJECT_PATHS = (
    Path("/usr/lib/tensorguard/bpf/netguard.bpf.o"),
    Path(__file__).resolve().parents[3] / "bpf" / "build" / "netguard.bpf.o",  # a checkout
)


def find_bpf_object() -> Path | None:
    """The compiled datapath: $TENSORGUARD_BPF_OBJECT, the installed one, or a checkout's build."""
    override = os.environ.get("TENSORGUARD_BPF_OBJECT")
    candidates = [Path(override)] if override else list(BPF_OBJECT_PATHS)
    return next((p for p in candidates if p.is_file()), None)


@dataclass(frozen=True)
class Problem:
    """Why a [network] setting cannot be applied: the dotted key, its value and the reason."""

    key: str
    message: str
    value: str | None = None


def system_slice() -> Path:
    """Where systemd keeps the cgroups of system services."""
    return (cgroup2_root() or Path("/sys/fs/cgroup")) / "system.slice"


def unit_cgroup(unit: str) -> Path:
    """The cgroup systemd gives a service while it runs (``system.slice/UNIT``)."""
    return system_slice() / unit


UnitCgroups = dict[str, tuple[int, int] | None]
"""Protected unit -> (cgroup id, level) of its running instance, None while it is not running."""


def resolve_unit_cgroups(settings: NetworkSettings) -> UnitCgroups:
    refs: UnitCgroups = {}
    for flow in settings.protect:
        if flow.unit and flow.unit not in refs:
            try:
                refs[flow.unit] = cgroup_ref(unit_cgroup(flow.unit))
            except DatapathError:
                refs[flow.unit] = None
    return refs


class Datapath:
    """Owns netguard's kernel objects for one [network] configuration at a time."""

    def __init__(self, settings: NetworkSettings, *, netns: str | None = None,
                 pin_root: Path = Path("/sys/fs/bpf/tensorguard"), bpf_object: Path | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.netns = netns
        self.pin_root = pin_root
        self.bpf_object = bpf_object or find_bpf_object()
        # Padding schedules must not be predictable to the eavesdropper: the OS's CSPRNG.
        self.rng = rng or random.SystemRandom()
        self.tc: dict[str, TcDatapath] = {}
        self.pacer: NfqueuePacer | None = None
        self.rules_applied = False
        self.cgroups: UnitCgroups = {}

    # -- checks -----------------------------------------------------------------------------

    def preflight(self, settings: NetworkSettings) -> list[Problem]:
        """Everything about ``settings`` that would fail in the kernel; changes nothing."""
        problems: list[Problem] = []
        if not settings.interfaces:
            problems.append(Problem("network.interfaces", "at least one uplink interface is needed "
                                    "when netguard is enabled", "[]"))
        for i, ifname in enumerate(settings.interfaces):
            if not self._interface_exists(ifname):
                where = f" in network namespace {self.netns}" if self.netns else ""
                problems.append(Problem(f"network.interfaces[{i}]", f"no such interface{where}",
                                        f'"{ifname}"'))
        if not settings.protect:
            problems.append(Problem("network.protect", "no flow to protect: add [[network.protect]]"))
        defence = settings.defence
        if defence.kind in {"cbr", "regulator"} and defence.rate_hz > MAX_PACE_RATE_HZ:
            problems.append(Problem("network.defence.rate_hz", "exceeds the pace path's capacity of "
                                    f"{MAX_PACE_RATE_HZ:.0f} packets/s", str(defence.rate_hz)))
        try:
            build_machine(defence, self.rng)
        except HistogramFileError as exc:
            problems.append(Problem("network.defence.wtfpad.histograms", str(exc)))
        if self.bpf_object is None:
            problems.append(Problem("network.enabled", "the compiled eBPF datapath (netguard.bpf.o) "
                                    "is not installed"))
        ruleset = None if problems else self._ruleset(settings, resolve_unit_cgroups(settings))
        if ruleset is not None and defence.kind != "none":
            try:
                iptables.check(ruleset, self.netns)
            except (iptables.IptablesError, iptables.RulesetError) as exc:
                problems.append(Problem("network.protect", f"iptables refuses the rules: {exc}"))
        return problems

    def _interface_exists(self, ifname: str) -> bool:
        try:
            with in_netns(self.netns):
                socket.if_nametoindex(ifname)
        except (OSError, DatapathError):
            return False
        return True

    # -- building blocks ----------------------------------------------------------------------

    # A flow scoped to a unit that is not running has no cgroup to match: it is left out of the
    # kernel until the unit starts (`refresh_cgroups`). Selector numbers stay the flow's position.

    def _ruleset(self, settings: NetworkSettings, cgroups: UnitCgroups) -> iptables.Ruleset | None:
        selectors = tuple(
            iptables.Selector.parse(f"tg:{flow.name}:{i}", flow.destination, protocol=flow.protocol,
                                    ports=flow.ports, unit=flow.unit)
            for i, flow in enumerate(settings.protect) if not flow.unit or cgroups.get(flow.unit))
        if not selectors:
            return None
        mode = iptables.FailMode.CLOSED if settings.fail_mode == "closed" else iptables.FailMode.OPEN
        return iptables.Ruleset(selectors, QUEUE_NUM, mode, SHAPER_MARK, SHAPER_MARK)

    def _bpf_selectors(self, settings: NetworkSettings, cgroups: UnitCgroups) -> list[maps.Selector]:
        return [maps.Selector.parse(i + 1, flow.destination, flow.protocol, flow.ports,
                                    cgroup=cgroups[flow.unit] if flow.unit else None)
                for i, flow in enumerate(settings.protect) if not flow.unit or cgroups.get(flow.unit)]

    def _mode(self, settings: NetworkSettings) -> maps.Mode:
        if settings.defence.kind == "none":
            return maps.Mode.OBSERVE  # nothing shapes, so nothing can be "unshaped"
        return maps.Mode.FAIL_CLOSED if settings.fail_mode == "closed" else maps.Mode.FAIL_OPEN

    def _discard(self, settings: NetworkSettings) -> tuple[str, int] | None:
        target = settings.defence.discard
        if target is None:
            return None
        host, _, port = target.rpartition(":")
        return host.strip("[]"), int(port)

    # -- life cycle ---------------------------------------------------------------------------

    def cleanup_stale(self) -> None:
        """Remove what a killed earlier run left: our filters, pinned maps and chains."""
        names = set(self.settings.interfaces)
        if self.pin_root.is_dir():
            names |= {p.name for p in self.pin_root.iterdir() if p.is_dir()}
        for ifname in sorted(names):
            report = cleanup_stale(self.pin_root / ifname, [ifname] if self._interface_exists(ifname)
                                   else [], netns=self.netns)
            if not report.empty:
                log.warning("removed leftovers of an earlier run on %s: %s", ifname, report)
        iptables.remove(self.netns)

    def start(self) -> None:
        """eBPF first (telemetry and guard), then the pacer, then the rules that feed it."""
        settings = self.settings
        self.cleanup_stale()
        self.cgroups = resolve_unit_cgroups(settings)
        try:
            for ifname in settings.interfaces:
                dp = TcDatapath(ifname, self.netns, self.pin_root / ifname, str(self.bpf_object),
                                config=maps.Config(maps.Mode.OBSERVE, SHAPER_MARK, SHAPER_MARK))
                dp.load()
                self.tc[ifname] = dp
                dp.set_selectors(self._bpf_selectors(settings, self.cgroups))
                dp.attach()
            self._start_shaping(settings)
            for dp in self.tc.values():
                dp.set_mode(self._mode(settings))
        except BaseException:
            self.stop()
            raise

    def _start_shaping(self, settings: NetworkSettings, machine: Machine | None = None) -> None:
        machine = machine or build_machine(settings.defence, self.rng)
        if machine is None:
            return
        self.pacer = NfqueuePacer(machine, QUEUE_NUM, mark=SHAPER_MARK, mask=SHAPER_MARK,
                                  discard=self._discard(settings),
                                  fail_closed=settings.fail_mode == "closed", netns=self.netns,
                                  realtime_priority=10)
        self.pacer.start()
        self._apply_rules(settings)

    def _apply_rules(self, settings: NetworkSettings) -> None:
        """Swap in the rule set for ``settings`` and the current cgroups (none left: remove it)."""
        ruleset = self._ruleset(settings, self.cgroups)
        if ruleset is not None:
            iptables.apply(ruleset, self.netns)
            self.rules_applied = True
        elif self.rules_applied:
            iptables.remove(self.netns)
            self.rules_applied = False

    def _stop_shaping(self) -> None:
        if self.rules_applied:
            iptables.remove(self.netns)  # first: no new packet is queued from here on
            self.rules_applied = False
        if self.pacer is not None:
            self.pacer.stop()
            self.pacer = None

    def stop(self) -> None:
        """Rules, then pacer (held packets leave), then eBPF; every step runs even if one fails."""
        errors: list[BaseException] = []
        try:
            self._stop_shaping()
        except Exception as exc:
            errors.append(exc)
        for ifname, dp in list(self.tc.items()):
            try:
                dp.detach()
            except Exception as exc:
                errors.append(exc)
            del self.tc[ifname]
        if errors:
            raise DatapathError("; ".join(str(e) for e in errors))

    def reconfigure(self, new: NetworkSettings) -> None:
        """Apply ``new`` (already preflighted). Selectors and defence switch in place; a change
        of interfaces re-attaches (their traffic is unguarded for that moment)."""
        old = self.settings
        if new.interfaces != old.interfaces:
            self.stop()
            self.settings = new
            self.start()
            return
        self.settings = new
        self.cgroups = resolve_unit_cgroups(new)
        for dp in self.tc.values():
            dp.set_selectors(self._bpf_selectors(new, self.cgroups))
        restarted = False
        if new.defence != old.defence or new.fail_mode != old.fail_mode:
            machine = build_machine(new.defence, self.rng)
            in_place = (machine is not None and self.pacer is not None
                        and new.fail_mode == old.fail_mode
                        and new.defence.discard == old.defence.discard)
            if in_place:
                assert self.pacer is not None and machine is not None
                self.pacer.replace_machine(machine)
            else:  # the pacer's own settings change: a new pacer, which applies the new rules
                self._stop_shaping()
                self._start_shaping(new, machine)
                restarted = True
        if not restarted and self.pacer is not None and new.protect != old.protect:
            self._apply_rules(new)
        for dp in self.tc.values():
            dp.set_mode(self._mode(new))

    def refresh_cgroups(self) -> list[str]:
        """Follow protected units across restarts: a unit's new cgroup (new id, and a new
        ``xt_cgroup`` target) replaces the old one in the eBPF selectors and the rule set.

        Returns the units whose cgroup changed (started, stopped or restarted)."""
        current = resolve_unit_cgroups(self.settings)
        changed = [unit for unit, ref in current.items() if self.cgroups.get(unit) != ref]
        if not changed:
            return []
        self.cgroups = current
        for dp in self.tc.values():
            dp.set_selectors(self._bpf_selectors(self.settings, current))
        if self.pacer is not None:
            self._apply_rules(self.settings)
        return changed

    @property
    def follows_units(self) -> bool:
        return any(flow.unit for flow in self.settings.protect)

    # -- what tgctl shows ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "interfaces": {name: {"attached": dp.attached, "mode": self._mode(self.settings).name.lower()}
                           for name, dp in self.tc.items()},
            "defence": self.settings.defence.kind,
            "fail_mode": self.settings.fail_mode,
            "pacer": None if self.pacer is None else {
                "queue": QUEUE_NUM, **_jsonable(asdict(self.pacer.stats))},
            "iptables_rules": self.rules_applied,
            "units": {unit: {"running": ref is not None, "cgroup_id": ref[0] if ref else None}
                      for unit, ref in self.cgroups.items()},
        }

    def _flow_names(self) -> dict[int, str]:
        """Selector id (as ``_bpf_selectors`` numbers them) -> the flow's configured name."""
        return {i + 1: flow.name for i, flow in enumerate(self.settings.protect)}

    def flow_stats(self) -> list[dict[str, Any]]:
        """Per protected selector and direction: the wire view from the eBPF maps."""
        names = self._flow_names()
        out = []
        for ifname, dp in self.tc.items():
            stats = dp.stats()
            for sel in stats.selectors:
                out.append({"interface": ifname, "flow": names.get(sel.selector_id, "?"),
                            "direction": sel.direction.name.lower(), "packets": sel.packets,
                            "bytes": sel.bytes, "unshaped": sel.unshaped, "dropped": sel.dropped,
                            "size_hist": list(sel.size_hist), "iat_hist": list(sel.iat_hist)})
        return out

    def flows(self) -> list[dict[str, Any]]:
        """Individual protected connections seen on the wire (5-tuples)."""
        names = self._flow_names()
        out = []
        for ifname, dp in self.tc.items():
            for f in dp.stats().flows:
                row = _jsonable(asdict(f))
                row["protocol"] = {6: "tcp", 17: "udp"}.get(f.protocol, str(f.protocol))
                out.append({"interface": ifname, "flow": names.get(f.selector_id, "?"), **row})
        return out


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            out[key] = str(value)
        elif isinstance(value, enum.Enum):
            out[key] = value.name.lower()
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out
