"""Test access to the robot/peer veth testbed (tensorguard.netguard.testbed), with root checks."""

from __future__ import annotations

import os
import shutil

import pytest

from tensorguard.netguard.testbed import Link, run, veth_pair

__all__ = ["Link", "require_root_netns", "run", "veth_pair"]


def require_root_netns() -> None:
    """Skip (with the reason) where namespaces cannot be made: not root, or no `ip`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
