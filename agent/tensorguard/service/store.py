"""The running configuration: loaded once, replaced atomically on reload, never half-applied."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, ConfigIssue, LoadedConfig, load_config

log = logging.getLogger(__name__)

RESTART_ONLY = ("agent.socket_dir",)
"""Keys a running unit cannot change: a reload that changes them is refused."""


@dataclass(frozen=True)
class ReloadResult:
    """What a successful reload did."""

    generation: int
    changed: bool
    sources: tuple[str, ...]


class ConfigStore:
    """Holds the current LoadedConfig and its generation; listeners apply a new one."""

    def __init__(self, path: Path, drop_in_dir: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.drop_in_dir = drop_in_dir
        self.clock = clock
        self._listeners: list[Callable[[LoadedConfig], None]] = []
        self._checks: list[Callable[[LoadedConfig], None]] = []
        self.current = load_config(path, drop_in_dir)
        self.generation = 1
        self.loaded_at = clock()
        self.reloads_ok = 0
        self.reloads_refused = 0
        self.apply_errors = 0
        self.last_error: list[ConfigIssue] | None = None

    def subscribe(self, listener: Callable[[LoadedConfig], None]) -> None:
        """Call ``listener`` with every new config that was accepted."""
        self._listeners.append(listener)

    def add_check(self, check: Callable[[LoadedConfig], None]) -> None:
        """Let ``check`` refuse a new config (by raising ConfigError) before anything applies it."""
        self._checks.append(check)

    def reload(self) -> ReloadResult:
        """Re-read the files; on any error raise ConfigError and keep the running config."""
        try:
            new = load_config(self.path, self.drop_in_dir)
            self._check_restart_only(new)
            for check in self._checks:
                check(new)
        except ConfigError as exc:
            self.reloads_refused += 1
            self.last_error = exc.issues
            for issue in exc.issues:
                log.error("config reload refused, keeping generation %d: %s", self.generation, issue)
            raise
        self.reloads_ok += 1
        self.last_error = None
        if new.digest == self.current.digest:
            log.info("config reloaded: unchanged, generation %d", self.generation)
            return ReloadResult(self.generation, False, new.sources)
        self.current = new
        self.generation += 1
        self.loaded_at = self.clock()
        log.info("config reloaded: generation %d from %s", self.generation, ", ".join(new.sources))
        for listener in self._listeners:
            try:
                listener(new)
            except Exception:  # checks passed, so this is a bug or an OS failure: keep going
                self.apply_errors += 1
                log.exception("applying config generation %d failed in %s", self.generation,
                              getattr(listener, "__qualname__", listener))
        return ReloadResult(self.generation, True, new.sources)

    def _check_restart_only(self, new: LoadedConfig) -> None:
        old_data, new_data = self.current.as_dict(), new.as_dict()
        issues = []
        for key in RESTART_ONLY:
            before, after = _lookup(old_data, key), _lookup(new_data, key)
            if before != after:
                issues.append(ConfigIssue(new.origins.get(key, str(self.path)),
                                          f"cannot change while running (is {before!r}); restart "
                                          "the unit instead", key, repr(after)))
        if issues:
            raise ConfigError(issues)

    def describe(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "loaded_at": self.loaded_at,
            "digest": self.current.digest,
            "sources": list(self.current.sources),
            "config": self.current.as_dict(),
            "last_reload_error": [i.as_dict() for i in self.last_error] if self.last_error else None,
        }


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node
