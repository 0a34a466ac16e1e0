"""The netguard unit: runs the datapath from [network] and serves net.* on its socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from ..config import ConfigError, LoadedConfig
from ..config.schema import DefenceSettings, NetworkSettings
from ..control import RpcError, export
from ..control.protocol import CONFIG_INVALID, UNAVAILABLE
from ..service.metrics import Family
from ..service.unit import SubsystemState, UnitService
from .cgroupwatch import CgroupWatch
from .datapath import Datapath, system_slice

log = logging.getLogger(__name__)


class NetguardService(UnitService):
    """Traffic-analysis defence on the uplink."""

    name = "netguard"
    section = "network"

    datapath: Datapath | None = None
    failure: str | None = None
    follower: asyncio.Task[None] | None = None
    RECHECK_S = 1.0
    """How often protected units' cgroups are re-checked when no inotify event arrives."""

    @staticmethod
    def make_datapath(net: NetworkSettings) -> Datapath:
        return Datapath(net, netns=net.netns, pin_root=Path(net.pin_dir))

    def _refusal(self, loaded: LoadedConfig) -> ConfigError | None:
        net = loaded.config.network
        if not net.enabled:
            return None
        problems = self.make_datapath(net).preflight(net)
        if not problems:
            return None
        return ConfigError([loaded.issue(p.key, p.message, p.value) for p in problems])

    async def start(self) -> None:
        refusal = self._refusal(self.store.current)
        if refusal is not None:
            raise refusal
        net = self.store.current.config.network
        if net.enabled:
            datapath = self.make_datapath(net)
            await asyncio.to_thread(datapath.start)
            self.datapath = datapath
            log.info("netguard running: %s", self.subsystem().detail)
        self.follower = asyncio.create_task(self._follow_units(), name="netguard-follow-units")

    async def _follow_units(self) -> None:
        """Re-apply unit-scoped selectors whenever a protected unit starts, stops or restarts."""
        watch = CgroupWatch([system_slice()])
        watch.open()
        try:
            while True:
                await watch.wait(self.RECHECK_S)
                datapath = self.datapath
                if datapath is None or not datapath.follows_units:
                    continue
                try:
                    changed = datapath.refresh_cgroups()
                except Exception as exc:  # keep following; the next event or timeout retries
                    log.error("netguard: re-applying selectors for restarted units failed: %s", exc)
                    continue
                for unit in changed:
                    ref = datapath.cgroups.get(unit)
                    log.info("netguard: %s %s; its selectors were re-applied", unit,
                             f"runs in cgroup {ref[0]}" if ref else "stopped")
        finally:
            watch.close()

    async def stop(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.follower
            self.follower = None
        if self.datapath is not None:
            datapath, self.datapath = self.datapath, None
            await asyncio.to_thread(datapath.stop)
            log.info("netguard stopped: qdiscs, filters, chains, pins and queue removed")

    def check_config(self, new: LoadedConfig) -> None:
        refusal = self._refusal(new)
        if refusal is not None:
            raise refusal

    def apply_config(self, new: LoadedConfig) -> None:
        net = new.config.network
        try:
            if self.datapath is not None and net.enabled:
                self.datapath.reconfigure(net)
            elif self.datapath is not None:
                self.datapath.stop()
                self.datapath = None
            elif net.enabled:
                datapath = self.make_datapath(net)
                datapath.start()
                self.datapath = datapath
            self.failure = None
        except Exception as exc:
            self.failure = f"applying generation {self.store.generation} failed: {exc}"
            log.exception("netguard: %s", self.failure)

    def subsystem(self) -> SubsystemState:
        net = self.store.current.config.network
        if self.failure:
            return SubsystemState("failed", self.failure, healthy=False)
        if self.datapath is None:
            if net.enabled:
                return SubsystemState("starting", "bringing the datapath up", healthy=False)
            return SubsystemState("disabled", "[network] enabled = false")
        settings = self.datapath.settings
        defence = settings.defence
        shaping = "telemetry only (defence none)" if defence.kind == "none" else (
            f"defence {defence.kind} at {defence.rate_hz:g} Hz, fail-{settings.fail_mode}")
        return SubsystemState("running", f"{len(settings.protect)} protected flow(s) on "
                              f"{', '.join(settings.interfaces)}; {shaping}")

    def metric_families(self) -> list[Family]:
        """Wire counters per protected flow and the pacer's, for node-exporter."""
        if self.datapath is None:
            return []
        wire = {name: Family(f"tensorguard_net_{name}_total", doc, "counter") for name, doc in (
            ("packets", "Protected packets on the wire."), ("bytes", "Protected bytes on the wire."),
            ("dropped", "Protected packets the leak guard dropped (fail-closed)."),
            ("unshaped", "Protected packets that bypassed the shaper (fail-open)."))}
        for row in self.datapath.flow_stats():
            for name, family in wire.items():
                family.add(row[name], interface=row["interface"], flow=row["flow"],
                           direction=row["direction"])
        families = list(wire.values())
        if self.datapath.pacer is not None:
            stats = self.datapath.pacer.stats
            families += [
                Family("tensorguard_net_pacer_released_total", "Packets the pacer released.",
                       "counter").add(stats.released),
                Family("tensorguard_net_pacer_dummies_total", "Dummy packets the pacer sent.",
                       "counter").add(stats.dummies),
                Family("tensorguard_net_pacer_held", "Packets held right now.").add(stats.held),
                Family("tensorguard_net_pacer_max_hold_seconds", "Longest hold so far.")
                .add(stats.max_queue_delay),
            ]
        return families

    def _running(self) -> Datapath:
        if self.datapath is None:
            raise RpcError(UNAVAILABLE, f"netguard is not running ({self.subsystem().detail})")
        return self.datapath

    @export("net.status", read_only=True)
    def net_status(self) -> dict[str, Any]:
        """The datapath's parts: interfaces and their eBPF mode, defence, pacer counters."""
        state = self.subsystem()
        out: dict[str, Any] = {"state": state.state, "detail": state.detail}
        if self.datapath is not None:
            out.update(self.datapath.status())
        return out

    @export("net.stats", read_only=True)
    def net_stats(self) -> list[dict[str, Any]]:
        """Wire view per protected flow and direction: counters, size and inter-arrival histograms."""
        return self._running().flow_stats()

    @export("net.flows", read_only=True)
    def net_flows(self) -> list[dict[str, Any]]:
        """Protected connections seen on the wire."""
        return self._running().flows()

    @export("net.defence.set")
    def net_defence_set(self, kind: str, rate_hz: float | None = None) -> dict[str, Any]:
        """Switch the running defence until the next reload or restart (the config is not changed)."""
        datapath = self._running()
        current = datapath.settings
        update: dict[str, Any] = {"kind": kind}
        if rate_hz is not None:
            update["rate_hz"] = rate_hz
        try:
            defence = DefenceSettings.model_validate({**current.defence.model_dump(), **update})
        except ValueError as exc:
            raise RpcError(CONFIG_INVALID, f"invalid defence: {exc}") from None
        new = current.model_copy(update={"defence": defence})
        problems = datapath.preflight(new)
        if problems:
            raise RpcError(CONFIG_INVALID, "; ".join(f"{p.key}: {p.message}" for p in problems))
        datapath.reconfigure(new)
        return self.net_status()
