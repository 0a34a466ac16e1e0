"""Run one or more units in the foreground: the life cycle systemd expects of a Type=notify unit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from .. import __version__
from ..config import ConfigError, LoadedConfig
from ..control import AccessPolicy, ControlServer, ServerLimits, SocketInUse
from . import logs
from .metrics import Family, render, write_atomic
from .sdnotify import Notifier, watchdog_interval
from .store import ConfigStore
from .unit import UnitService
from .units import UNIT_CLASSES

log = logging.getLogger(__name__)

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78  # sysexits(3); the units set RestartPreventExitStatus=78


def limits_of(loaded: LoadedConfig) -> ServerLimits:
    control = loaded.config.agent.control
    return ServerLimits(control.max_frame_bytes, control.client_timeout_s, control.max_clients)


def policy_of(loaded: LoadedConfig) -> AccessPolicy:
    control = loaded.config.agent.control
    return AccessPolicy(control.group, control.read_only_public)


class Runner:
    """Owns the units of one process, their sockets, and the timers for watchdog and metrics."""

    def __init__(self, services: list[UnitService], store: ConfigStore, notifier: Notifier) -> None:
        self.store = store
        self.notifier = notifier
        self.services = services
        self.servers: list[ControlServer] = []
        self.stop_event = asyncio.Event()
        self.started_wall = time.time()
        self._metrics_warned: str | None = None
        store.subscribe(self._apply)
        for service in self.services:
            store.add_check(service.check_config)
            store.subscribe(service.apply_config)

    @property
    def label(self) -> str:
        return "+".join(s.name for s in self.services)

    async def start(self) -> None:
        socket_dir = Path(self.store.current.config.agent.socket_dir)
        for service in self.services:
            server = ControlServer(socket_dir / f"{service.name}.sock", service.methods,
                                   limits_of(self.store.current), policy_of(self.store.current))
            await server.start()
            self.servers.append(server)
            log.info("%s serving %s", service.name, server.path)

    async def close(self) -> None:
        for server in self.servers:
            await server.close()
        self.servers.clear()

    def _apply(self, loaded: LoadedConfig) -> None:
        """Apply a new config to live parts; the socket path cannot change (store refuses it)."""
        logs.set_level(loaded.config.agent.log_level)
        policy = policy_of(loaded)
        for server in self.servers:
            server.limits = limits_of(loaded)
            if (policy.group, policy.read_only_public) != (server.policy.group,
                                                           server.policy.read_only_public):
                server.policy = policy
                with contextlib.suppress(OSError):
                    if policy.gid is not None:
                        os.chown(server.path, -1, policy.gid)
                    os.chmod(server.path, 0o666 if policy.read_only_public else 0o660)

    def status_line(self) -> str:
        parts = [f"{s.name}: {s.subsystem().state}" for s in self.services]
        return f"config generation {self.store.generation}; " + ", ".join(parts)

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            self.store.reload()  # logs the outcome
        except ConfigError as exc:
            self.notifier.reloaded(f"config reload refused ({len(exc.issues)} error(s)); "
                                   + self.status_line())
            return
        self.notifier.reloaded(self.status_line())

    async def watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def metrics(self) -> None:
        while True:
            self.write_metrics(up=True)
            await asyncio.sleep(self.store.current.config.agent.metrics_interval_s)

    def write_metrics(self, up: bool) -> None:
        directory = self.store.current.config.agent.metrics_dir
        if not directory:
            return
        for service, server in zip(self.services, self.servers, strict=False):
            try:
                write_atomic(Path(directory), f"tensorguard_{service.name}.prom",
                             render(self.families(service, server, up)))
            except OSError as exc:
                message = f"{directory}: {exc.strerror}"
                if message != self._metrics_warned:
                    log.warning("cannot write metrics to %s", message)
                    self._metrics_warned = message

    def families(self, service: UnitService, server: ControlServer, up: bool) -> list[Family]:
        unit = service.name
        stats = server.stats
        sub = service.subsystem()
        requests = Family("tensorguard_control_requests_total",
                          "Control requests by method.", "counter")
        for method, count in sorted(stats.requests.items()):
            requests.add(count, unit=unit, method=method)
        errors = Family("tensorguard_control_errors_total",
                        "Control error answers by JSON-RPC code.", "counter")
        for code, count in sorted(stats.errors.items()):
            errors.add(count, unit=unit, code=str(code))
        return [
            Family("tensorguard_up", "1 while the unit runs, 0 after a clean stop.")
            .add(1 if up else 0, unit=unit),
            Family("tensorguard_build_info", "Agent version.").add(1, unit=unit,
                                                                    version=__version__),
            Family("tensorguard_start_time_seconds", "Unix time the unit started.")
            .add(self.started_wall, unit=unit),
            Family("tensorguard_config_generation", "Generation of the running config.")
            .add(self.store.generation, unit=unit),
            Family("tensorguard_config_reloads_total", "Config reloads by result.", "counter")
            .add(self.store.reloads_ok, unit=unit, result="ok")
            .add(self.store.reloads_refused, unit=unit, result="refused"),
            Family("tensorguard_subsystem_healthy", "1 when the subsystem is healthy.")
            .add(1 if sub.healthy else 0, unit=unit, state=sub.state),
            Family("tensorguard_control_connections_total", "Control connections accepted.",
                   "counter").add(stats.connections, unit=unit),
            Family("tensorguard_control_refused_total",
                   "Control connections refused over the client limit.", "counter")
            .add(stats.refused, unit=unit),
            requests,
            errors,
            *service.metric_families(),
        ]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except (SocketInUse, OSError) as exc:
            log.error("cannot open control socket: %s", exc)
            await self.close()
            return EX_FAILURE
        started: list[UnitService] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("%s cannot start: %s", service.name, issue)
            self.notifier.send(f"STATUS={service.name} cannot start: {exc.issues[0]}")
            await self._stop_services(started)
            await self.close()
            return EX_CONFIG
        except Exception:
            log.exception("%s failed to start", service.name)
            await self._stop_services(started)
            await self.close()
            return EX_FAILURE
        tasks = [asyncio.create_task(self.metrics())]
        interval = watchdog_interval()
        if interval:
            tasks.append(asyncio.create_task(self.watchdog(interval)))
        self.notifier.ready(self.status_line())
        log.info("%s %s ready: %s", self.label, __version__, self.status_line())
        await self.stop_event.wait()
        self.notifier.stopping("stopping")
        log.info("%s stopping", self.label)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_services(self.services)
        self.write_metrics(up=False)
        await self.close()
        return EX_OK

    async def _stop_services(self, services: list[UnitService]) -> None:
        """Stop in reverse order; one failing teardown does not keep the others from running."""
        for service in reversed(services):
            try:
                await service.stop()
            except Exception:
                log.exception("%s did not stop cleanly", service.name)


def run_units(units: list[str], config_path: Path, drop_in_dir: Path | None = None) -> int:
    """Entry point of `tensorguard <unit>`: returns the process exit status."""
    label = "+".join(units)
    logs.setup("info", label)
    try:
        store = ConfigStore(config_path, drop_in_dir)
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("invalid config: %s", issue)
        Notifier().send(f"STATUS=invalid config: {exc.issues[0]}")
        return EX_CONFIG
    logs.set_level(store.current.config.agent.log_level)
    runner = Runner([UNIT_CLASSES[u](store) for u in units], store, Notifier())
    return asyncio.run(runner.run())
