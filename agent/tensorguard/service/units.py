"""Registry of the three units by name."""

from __future__ import annotations

from ..fl.unit import FlService
from ..identity.unit import IdentityService
from ..netguard.unit import NetguardService
from .unit import UnitService

UNIT_CLASSES: dict[str, type[UnitService]] = {
    cls.name: cls for cls in (NetguardService, IdentityService, FlService)
}
