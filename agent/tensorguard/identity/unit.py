"""The identity unit's control surface; this release reports its state honestly and issues nothing."""

from __future__ import annotations

from ..service.unit import SubsystemState, UnitService


class IdentityService(UnitService):
    """Machine identity: enrolment and certificate renewal."""

    name = "identity"

    def subsystem(self) -> SubsystemState:
        if not self.store.current.config.identity.enabled:
            return SubsystemState("disabled", "[identity] enabled = false")
        return SubsystemState(
            "unavailable",
            "enabled in config, but this release cannot enrol: no certificate is issued",
            healthy=False,
        )
