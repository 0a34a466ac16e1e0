"""NFQUEUE over nfnetlink in pure Python: bind a queue, read its packets, give verdicts.

The pacer needs five messages of the protocol, so it speaks them itself instead of through
libnetfilter_queue and a compiled binding: the agent then runs unchanged on every CPython Debian
ships. Layouts: netlink(7), nfnetlink's ``nfgenmsg`` and linux/netfilter/nfnetlink_queue.h. The
codec (pure, unit-tested without root) comes first, the socket (`NfQueue`) after.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3

# message types (subsystem << 8 | message)
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2

# NFQA_CFG_CMD commands, NFQA_CFG_PARAMS copy modes, NFQA_CFG_FLAGS
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 0x1

# attributes of a config message
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

# attributes of a packet / verdict message
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13

NF_DROP = 0
NF_ACCEPT = 1

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, resource id = queue number
_NLATTR = struct.Struct("=HH")  # length (header included, padding not), type
_PACKET_HDR = struct.Struct("!IHB")  # packet id, hardware protocol, hook
_BE32 = struct.Struct("!I")
# A whole verdict with a mark, in one pack: nlmsghdr, nfgenmsg, VERDICT_HDR(verdict, id), MARK.
_VERDICT_MARK = struct.Struct("=IHHII" "BBH" "HH" "II" "HH" "I")
_HEAD = _NLMSGHDR.size + _NFGENMSG.size


class NfqueueError(OSError):
    """The kernel refused a queue request, or the queue socket failed."""


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One packet waiting in the queue for its verdict."""

    packet_id: int
    mark: int
    length: int
    """The packet's whole length (its copied bytes stop at the copy range)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(value), kind) + value + bytes(_align(len(value)) - len(value))


def _message(kind: int, flags: int, sequence: int, queue_num: int, attrs: bytes) -> bytes:
    if not 0 <= queue_num <= 0xFFFF:
        raise ValueError(f"queue number {queue_num} is outside 0..65535")
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue_num) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, sequence, 0) + body


def config_request(queue_num: int, sequence: int, *, command: int | None = None,
                   copy_range: int | None = None, max_len: int | None = None,
                   flags: tuple[int, int] | None = None) -> bytes:
    """An acknowledged NFQNL_MSG_CONFIG; ``flags`` is (mask, value) of NFQA_CFG_F_* bits."""
    attrs = b""
    if command is not None:  # struct nfqnl_msg_config_cmd: command, pad, pf (ignored since 3.8)
        attrs += _attr(NFQA_CFG_CMD, struct.pack("!BxH", command, socket.AF_UNSPEC))
    if copy_range is not None:  # struct nfqnl_msg_config_params, packed: range, mode
        if not 0 <= copy_range <= 0xFFFF:
            raise ValueError(f"copy range {copy_range} is outside 0..65535")
        attrs += _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
    if max_len is not None:
        if not 1 <= max_len <= 0xFFFFFFFF:
            raise ValueError(f"queue length {max_len} is outside 1..2^32-1")
        attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
    if flags is not None:
        attrs += _attr(NFQA_CFG_MASK, _BE32.pack(flags[0])) + _attr(NFQA_CFG_FLAGS, _BE32.pack(flags[1]))
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, sequence, queue_num, attrs)


def fail_open_request(queue_num: int, sequence: int, enable: bool = True) -> bytes:
    """The config message that sets (or clears) NFQA_CFG_F_FAIL_OPEN on a queue."""
    value = NFQA_CFG_F_FAIL_OPEN if enable else 0
    return config_request(queue_num, sequence, flags=(NFQA_CFG_F_FAIL_OPEN, value))


def verdict_message(queue_num: int, packet_id: int, accept: bool, mark: int) -> bytes:
    """An unacknowledged NFQNL_MSG_VERDICT that also sets the packet's mark."""
    return _VERDICT_MARK.pack(
        _VERDICT_MARK.size, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0,
        socket.AF_UNSPEC, 0, socket.htons(queue_num),
        _NLATTR.size + 8, NFQA_VERDICT_HDR,
        socket.htonl(NF_ACCEPT if accept else NF_DROP), socket.htonl(packet_id),
        _NLATTR.size + 4, NFQA_MARK, socket.htonl(mark & 0xFFFFFFFF))


class MalformedMessage(ValueError):
    """A netlink datagram that does not follow its own lengths."""


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(type, sequence, body) of each netlink message in one datagram."""
    view = memoryview(data)
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, kind, _, sequence, _ = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            raise MalformedMessage(f"netlink message at byte {offset} claims {length} bytes, "
                                   f"{len(view) - offset} left")
        yield kind, sequence, view[offset + _NLMSGHDR.size:offset + length]
        offset += _align(length)


def attributes(body: memoryview, start: int) -> dict[int, memoryview]:
    """The attributes of a message body from ``start``, by type (the last one wins)."""
    found: dict[int, memoryview] = {}
    offset = start
    while offset + _NLATTR.size <= len(body):
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < _NLATTR.size or offset + length > len(body):
            raise MalformedMessage(f"attribute at byte {offset} claims {length} bytes, "
                                   f"{len(body) - offset} left")
        found[kind & NLA_TYPE_MASK] = body[offset + _NLATTR.size:offset + length]
        offset += _align(length)
    return found


def parse_packet(body: memoryview) -> QueuedPacket:
    """The queued packet an NFQNL_MSG_PACKET body describes."""
    attrs = attributes(body, _NFGENMSG.size)
    header = attrs.get(NFQA_PACKET_HDR)
    if header is None or len(header) < _PACKET_HDR.size:
        raise MalformedMessage("packet message without its NFQA_PACKET_HDR")
    packet_id = _PACKET_HDR.unpack_from(header)[0]
    mark_attr = attrs.get(NFQA_MARK)
    mark = _BE32.unpack_from(mark_attr)[0] if mark_attr is not None and len(mark_attr) >= 4 else 0
    cap_len = attrs.get(NFQA_CAP_LEN)  # present when the payload was cut at the copy range
    if cap_len is not None and len(cap_len) >= 4:
        length = _BE32.unpack_from(cap_len)[0]
    else:
        length = len(attrs.get(NFQA_PAYLOAD, b""))
    return QueuedPacket(packet_id, mark, length)


def ack_error(message: bytes | memoryview, sequence: int) -> int | None:
    """For a netlink datagram: the errno of the ACK to ``sequence`` (0: success), None if it is
    something else (another message, or an ACK to another request)."""
    try:
        for kind, seq, body in messages(message):
            if kind == NLMSG_ERROR and seq == sequence and len(body) >= 4:
                code: int = struct.unpack_from("=i", body)[0]
                return -code
    except MalformedMessage:
        return None
    return None


class NfQueue:
    """One bound NFQUEUE queue on its own netlink socket (see `bind`)."""

    RECEIVE_BUFFER = 65536 + 4096

    def __init__(self, sock: socket.socket, queue_num: int) -> None:
        self.sock = sock
        self.queue_num = queue_num
        self.malformed = 0
        """Datagrams from the kernel that did not parse (their packets wait for the unbind)."""
        self.refused = 0
        """Error answers from the kernel, e.g. a verdict for a packet it no longer holds."""
        self.overruns = 0
        """Times the socket's receive buffer overflowed (the kernel accepted or dropped those)."""
        self._buffer = bytearray(self.RECEIVE_BUFFER)
        self._sequence = 0x7467

    @classmethod
    def bind(cls, queue_num: int, *, copy_range: int, max_len: int, receive_buffer: int,
             sock: socket.socket | None = None) -> NfQueue:
        """Bind ``queue_num`` on ``sock`` (a new NETLINK_NETFILTER socket by default) and set it to
        copy ``copy_range`` bytes of each packet and hold at most ``max_len`` packets."""
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            try:  # root may exceed net.core.rmem_max; others get what the sysctl allows
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            queue = cls(sock, queue_num)
            queue.request(config_request(queue_num, queue.next_sequence(), command=NFQNL_CFG_CMD_BIND),
                          "bind")
            queue.request(config_request(queue_num, queue.next_sequence(), copy_range=copy_range,
                                         max_len=max_len), "set the copy range and length of")
        except BaseException:
            sock.close()
            raise
        return queue

    def next_sequence(self) -> int:
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return self._sequence

    def request(self, message: bytes, what: str, timeout: float = 1.0) -> None:
        """Send an acknowledged config ``message`` and wait for its ACK; refusal raises.

        Call it before any rule sends packets to the queue: packets read while waiting for the
        ACK are not kept (the kernel accepts or drops them at the unbind)."""
        sequence = _NLMSGHDR.unpack_from(message)[3]
        self.sock.send(message)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        for _ in range(16):  # bounded: the ACK is the next message on an idle queue
            if not poller.poll(timeout * 1000):
                raise NfqueueError(errno.ETIMEDOUT, f"NFQUEUE {self.queue_num}: no answer from the "
                                   f"kernel to the request to {what} it")
            code = ack_error(self.sock.recv(self.RECEIVE_BUFFER), sequence)
            if code is None:
                continue
            if code:
                hint = (" (another program has bound it)" if code == errno.EBUSY else
                        " (needs CAP_NET_ADMIN)" if code == errno.EPERM else "")
                raise NfqueueError(code, f"the kernel refused to {what} NFQUEUE {self.queue_num}: "
                                   f"{os.strerror(code)}{hint}")
            return
        raise NfqueueError(errno.EPROTO, f"NFQUEUE {self.queue_num}: no ACK from the kernel to the "
                           f"request to {what} it")

    def set_fail_open(self) -> None:
        """Let the kernel accept, not drop, packets when the queue is full (the reader fell behind).

        ``iptables ... --queue-bypass`` helps only when nobody listens; this is for a full queue.
        Only the socket bound to the queue may set it (the kernel checks the sender's port id)."""
        self.request(fail_open_request(self.queue_num, self.next_sequence()), "set fail-open on")

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def receive(self) -> list[QueuedPacket] | None:
        """The packets of one datagram; None when none is waiting (non-blocking socket)."""
        try:
            n = self.sock.recv_into(self._buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self.overruns += 1
                return []
            raise
        packets: list[QueuedPacket] = []
        try:
            for kind, _, body in messages(memoryview(self._buffer)[:n]):
                if kind == NFQNL_MSG_PACKET:
                    packets.append(parse_packet(body))
                elif kind == NLMSG_ERROR and len(body) >= 4 and struct.unpack_from("=i", body)[0]:
                    self.refused += 1
        except MalformedMessage:
            self.malformed += 1
        return packets

    def verdicts(self, verdicts: Iterable[tuple[int, bool, int]]) -> None:
        """ACCEPT (True) or DROP each (packet id, accept, mark), many per datagram."""
        batch: list[bytes] = []
        for packet_id, accept, mark in verdicts:
            batch.append(verdict_message(self.queue_num, packet_id, accept, mark))
            if len(batch) == 256:
                self._send(b"".join(batch))
                batch.clear()
        if batch:
            self._send(b"".join(batch))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except BlockingIOError:  # a full socket buffer: wait for room rather than lose verdicts
            select.select([], [self.sock], [], 1.0)
            self.sock.send(data)

    def close(self) -> None:
        """Unbind (the kernel drops the packets still queued) and close."""
        if self.sock.fileno() < 0:
            return
        try:
            message = config_request(self.queue_num, self.next_sequence(), command=NFQNL_CFG_CMD_UNBIND)
            self.sock.send(message)
        except OSError:
            pass  # closing the socket unbinds as well
        finally:
            self.sock.close()
