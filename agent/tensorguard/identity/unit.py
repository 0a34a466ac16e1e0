"""The identity unit's control surface; this release reports its state and issues nothing."""

from __future__ import annotations

from ..service.unit import UnitService


class IdentityService(UnitService):
    """Machine identity: enrolment and certificate renewal."""

    name = "identity"
    section = "identity"
    not_built = "this release cannot enrol: no certificate is issued"
