"""A robot and its peer in two network namespaces joined by a veth pair (tests and benchmarks).

Everything created here is removed on exit, also on failure. Addresses are in 10.203.0.0/16 and
fd00:203::/64; traffic never leaves the two namespaces.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output as text."""
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


@dataclass(frozen=True)
class Link:
    """Robot namespace ↔ peer namespace over one veth pair."""

    robot_ns: str
    peer_ns: str
    robot_if: str
    peer_if: str
    robot_ip: str
    peer_ip: str
    robot_ip6: str
    peer_ip6: str

    def robot(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.robot_ns, *cmd], check=check, timeout=timeout)

    def peer(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.peer_ns, *cmd], check=check, timeout=timeout)


@contextmanager
def veth_pair(subnet: int = 1) -> Iterator[Link]:
    """Create robot/peer namespaces (10.203.<subnet>.1 ↔ .2); always delete them afterwards."""
    tag = secrets.token_hex(3)
    link = Link(
        robot_ns=f"tg-robot-{tag}", peer_ns=f"tg-peer-{tag}",
        robot_if="tgr0", peer_if="tgp0",
        robot_ip=f"10.203.{subnet}.1", peer_ip=f"10.203.{subnet}.2",
        robot_ip6=f"fd00:203:{subnet}::1", peer_ip6=f"fd00:203:{subnet}::2",
    )
    try:
        run(["ip", "netns", "add", link.robot_ns])
        run(["ip", "netns", "add", link.peer_ns])
        run(["ip", "-n", link.robot_ns, "link", "add", link.robot_if, "type", "veth",
             "peer", "name", link.peer_if, "netns", link.peer_ns])
        for ns, dev, ip4, ip6 in ((link.robot_ns, link.robot_if, link.robot_ip, link.robot_ip6),
                                  (link.peer_ns, link.peer_if, link.peer_ip, link.peer_ip6)):
            run(["ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", dev])
            run(["ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", dev, "nodad"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        yield link
    finally:
        # Deleting a namespace removes its links, qdiscs, filters and netfilter tables with it.
        for ns in (link.robot_ns, link.peer_ns):
            run(["ip", "netns", "del", ns], check=False)
