"""The netguard unit's control surface; this release reports its state and shapes nothing."""

from __future__ import annotations

from ..service.unit import UnitService


class NetguardService(UnitService):
    """Traffic-analysis defence on the uplink."""

    name = "netguard"
    section = "network"
    not_built = "this release has no netguard datapath: traffic is NOT shaped"
