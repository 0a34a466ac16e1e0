"""Who may call what on a control socket, decided from the peer's kernel-verified credentials."""

from __future__ import annotations

import enum
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass


class Access(enum.Enum):
    """What a connected peer may do."""

    NONE = "none"
    READ_ONLY = "read-only"
    FULL = "full"


@dataclass(frozen=True)
class PeerCred:
    """SO_PEERCRED of a connection: taken by the kernel at connect(), so it cannot be forged."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


class AccessPolicy:
    """Root, the unit's own user and members of ``group`` get FULL; others READ_ONLY or NONE."""

    def __init__(self, group: str, read_only_public: bool, owner_uid: int | None = None) -> None:
        self.group = group
        self.read_only_public = read_only_public
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        try:
            self.gid: int | None = grp.getgrnam(group).gr_gid
        except KeyError:
            self.gid = None

    def decide(self, peer: PeerCred) -> Access:
        if peer.uid in (0, self.owner_uid) or self._in_group(peer):
            return Access.FULL
        return Access.READ_ONLY if self.read_only_public else Access.NONE

    def _in_group(self, peer: PeerCred) -> bool:
        if self.gid is None:
            return False
        if peer.gid == self.gid:
            return True
        try:
            user = pwd.getpwuid(peer.uid)
        except KeyError:
            return False
        return self.gid in os.getgrouplist(user.pw_name, user.pw_gid)

    def describe_denial(self, peer: PeerCred, read_only: bool) -> str:
        need = f"root or a member of group {self.group!r}"
        if self.gid is None:
            need = f"root (group {self.group!r} does not exist)"
        what = "this method" if read_only else "this method (it changes state)"
        return f"permission denied: uid {peer.uid} may not call {what}; needs {need}"
