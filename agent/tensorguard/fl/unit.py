"""The fl unit's control surface; this release reports its state and trains nothing."""

from __future__ import annotations

from ..service.unit import UnitService


class FlService(UnitService):
    """Federated learning client."""

    name = "fl"
    section = "fl"
    not_built = "this release has no Flower client: no training takes place"
