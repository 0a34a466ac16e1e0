"""The netguard unit's control surface; this release reports its state honestly and shapes nothing."""

from __future__ import annotations

from ..service.unit import SubsystemState, UnitService


class NetguardService(UnitService):
    """Traffic-analysis defence on the uplink."""

    name = "netguard"

    def subsystem(self) -> SubsystemState:
        if not self.store.current.config.network.enabled:
            return SubsystemState("disabled", "[network] enabled = false")
        return SubsystemState(
            "unavailable",
            "enabled in config, but this release has no netguard datapath: traffic is NOT shaped",
            healthy=False,
        )
