"""NFQUEUE's fail-open flag, which the netfilterqueue binding does not expose.

``iptables ... NFQUEUE --queue-bypass`` lets packets through when no program listens on the
queue; it does not help when the queue is *full* (the pacer fell behind): the kernel then drops.
With ``NFQA_CFG_F_FAIL_OPEN`` set on the queue, the kernel accepts such packets instead. The flag
can only be set by the socket bound to the queue (the kernel checks the sender's port id), so the
message is sent on netfilterqueue's own netlink socket. Message layout: netlink(7), nfnetlink's
``nfgenmsg``, and linux/netfilter/nfnetlink_queue.h.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 0x1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (network order, packed by hand)
_NLATTR_U32 = struct.Struct("=HH")  # length, type; payload: a big-endian u32


def _attr_be32(kind: int, value: int) -> bytes:
    return _NLATTR_U32.pack(8, kind) + struct.pack("!I", value)


def fail_open_request(queue_num: int, sequence: int, enable: bool = True) -> bytes:
    """The NFQNL_MSG_CONFIG message that sets (or clears) NFQA_CFG_F_FAIL_OPEN on a queue."""
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number {queue_num} is outside 0..65535")
    body = (_NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(queue_num))
            + _attr_be32(NFQA_CFG_MASK, NFQA_CFG_F_FAIL_OPEN)
            + _attr_be32(NFQA_CFG_FLAGS, NFQA_CFG_F_FAIL_OPEN if enable else 0))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                            NLM_F_REQUEST | NLM_F_ACK, sequence, 0)
    return header + body


def ack_error(message: bytes, sequence: int) -> int | None:
    """For a netlink message: the errno of the ACK to ``sequence`` (0: success), None if it is
    something else (another message, or an ACK to another request)."""
    if len(message) < _NLMSGHDR.size + 4:
        return None
    _, kind, _, seq, _ = _NLMSGHDR.unpack_from(message)
    if kind != NLMSG_ERROR or seq != sequence:
        return None
    code: int = struct.unpack_from("=i", message, _NLMSGHDR.size)[0]
    return -code


def set_fail_open(fd: int, queue_num: int, *, sequence: int = 0x7467, timeout: float = 1.0) -> None:
    """Send the request on the queue's own netlink socket ``fd`` and wait for the kernel's ACK.

    Call it right after binding and before any rule sends packets to the queue: messages read
    here while waiting for the ACK would be lost to the binding."""
    os.write(fd, fail_open_request(queue_num, sequence))
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in range(16):  # bounded: the ACK is the next message on an idle queue
        if not poller.poll(timeout * 1000):
            raise OSError(errno.ETIMEDOUT, f"no answer from the kernel setting fail-open on queue "
                          f"{queue_num}")
        code = ack_error(os.read(fd, 65536), sequence)
        if code is None:
            continue
        if code:
            raise OSError(code, f"the kernel refused fail-open on NFQUEUE {queue_num}: "
                          f"{os.strerror(code)}")
        return
    raise OSError(errno.EPROTO, f"no ACK from the kernel setting fail-open on queue {queue_num}")
