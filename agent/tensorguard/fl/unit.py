"""The fl unit's control surface; this release reports its state honestly and trains nothing."""

from __future__ import annotations

from ..service.unit import SubsystemState, UnitService


class FlService(UnitService):
    """Federated learning client."""

    name = "fl"

    def subsystem(self) -> SubsystemState:
        if not self.store.current.config.fl.enabled:
            return SubsystemState("disabled", "[fl] enabled = false")
        return SubsystemState(
            "unavailable",
            "enabled in config, but this release has no Flower client: no training takes place",
            healthy=False,
        )
