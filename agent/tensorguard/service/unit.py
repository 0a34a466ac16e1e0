"""What every unit serves on its socket (sys.*, config.*), declared once for all three."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, ClassVar

from .. import __version__
from ..config import ConfigError, LoadedConfig
from ..control import PROTOCOL_VERSION, Method, RpcError, collect, export
from ..control.protocol import CONFIG_INVALID
from .metrics import Family
from .store import ConfigStore


@dataclass(frozen=True)
class SubsystemState:
    """A unit's honest account of its subsystem: state is a short word, detail a sentence."""

    state: str
    detail: str
    healthy: bool = True


class UnitService:
    """Base of the three units; subclasses say what their subsystem is doing."""

    name: ClassVar[str] = ""
    section: ClassVar[str] = ""
    """The config table with this unit's ``enabled`` switch."""
    not_built: ClassVar[str] = ""
    """What an operator must know when the subsystem is enabled but not part of this release."""

    def __init__(self, store: ConfigStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self.started = clock()

    @cached_property
    def methods(self) -> dict[str, Method]:
        """The exported methods, bound to this instance (what the control socket serves)."""
        return collect(self)

    def subsystem(self) -> SubsystemState:
        if not getattr(self.store.current.config, self.section).enabled:
            return SubsystemState("disabled", f"[{self.section}] enabled = false")
        return SubsystemState("unavailable", f"enabled in config, but {self.not_built}",
                              healthy=False)

    def metric_families(self) -> list[Family]:
        """Subsystem metrics; units with a datapath add theirs."""
        return []

    # Subsystem life cycle, called by the runner. The defaults suit a unit with nothing to run.

    async def start(self) -> None:
        """Bring the subsystem up with the current config (before READY=1 is sent)."""

    async def stop(self) -> None:
        """Tear the subsystem down completely (on SIGTERM, before the socket goes)."""

    def check_config(self, new: LoadedConfig) -> None:
        """Raise ConfigError if ``new`` is valid but cannot be applied; nothing may change here."""

    def apply_config(self, new: LoadedConfig) -> None:
        """Switch to ``new``, which every unit's ``check_config`` accepted."""

    @export("sys.hello", read_only=True)
    def hello(self) -> dict[str, Any]:
        """Protocol handshake: protocol version, unit name and the methods it serves."""
        return {"protocol": PROTOCOL_VERSION, "unit": self.name, "version": __version__,
                "methods": sorted(self.methods)}

    @export("sys.version", read_only=True)
    def version(self) -> dict[str, Any]:
        """Versions of the agent, the protocol and the Python runtime."""
        return {"version": __version__, "protocol": PROTOCOL_VERSION,
                "python": platform.python_version()}

    @export("sys.health", read_only=True)
    def health(self) -> dict[str, Any]:
        """Liveness, uptime, config generation and the subsystem's state."""
        sub = self.subsystem()
        return {
            "unit": self.name,
            "status": "ok" if sub.healthy else "degraded",
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started, 3),
            "config_generation": self.store.generation,
            "subsystem": asdict(sub),
        }

    @export("config.show", read_only=True)
    def config_show(self) -> dict[str, Any]:
        """The running configuration, its generation and source files."""
        return self.store.describe()

    @export("config.reload")
    def config_reload(self) -> dict[str, Any]:
        """Re-read agent.toml and drop-ins; an invalid config is refused and the old one kept."""
        try:
            result = self.store.reload()
        except ConfigError as exc:
            raise RpcError(
                CONFIG_INVALID,
                f"config refused, still running generation {self.store.generation}:\n{exc}",
                {"errors": [i.as_dict() for i in exc.issues]},
            ) from None
        return {"generation": result.generation, "changed": result.changed,
                "sources": list(result.sources)}
