"""NFQUEUE's netlink messages byte for byte, and the reader on datagrams the kernel could send."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from tensorguard.netguard.kernel import nfqueue as nfq


def attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def netlink(kind: int, body: bytes, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def packet_message(packet_id: int, *, mark: int | None = 0x7, payload: bytes = b"\x45" + bytes(63),
                   cap_len: int | None = 1500, queue: int = 3) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, queue)
    body += attr(nfq.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    if mark is not None:
        body += attr(nfq.NFQA_MARK, struct.pack("!I", mark))
    body += attr(5, struct.pack("!I", 2))  # NFQA_IFINDEX_INDEV: not read, must be skipped
    body += attr(nfq.NFQA_PAYLOAD, payload)
    if cap_len is not None:
        body += attr(nfq.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    return netlink(nfq.NFQNL_MSG_PACKET, body)


def ack(seq: int, error: int) -> bytes:
    return netlink(nfq.NLMSG_ERROR, struct.pack("=i", error) + bytes(16), seq)


def test_bind_and_params_requests() -> None:
    msg = nfq.config_request(18260, 9, command=nfq.NFQNL_CFG_CMD_BIND)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 0x0302, 0x5, 9, 0) and length == 28
    assert struct.unpack_from("!BBH", msg, 16) == (0, 0, 18260)  # queue number in network order
    assert msg[20:] == struct.pack("=HH", 8, 1) + bytes([1, 0, 0, 0])  # CMD: BIND, pad, pf 0
    msg = nfq.config_request(3, 1, copy_range=64, max_len=4096)
    params = struct.pack("=HH", 9, 2) + struct.pack("!IB", 64, 2) + bytes(3)  # 5 bytes, padded
    assert msg[20:] == params + struct.pack("=HH", 8, 3) + struct.pack("!I", 4096)
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        nfq.config_request(70000, 1, command=1)
    with pytest.raises(ValueError, match="copy range"):
        nfq.config_request(1, 1, copy_range=70000)


def test_fail_open_request() -> None:
    msg = nfq.fail_open_request(18260, sequence=9)
    assert len(msg) == 36 and struct.unpack_from("=HH", msg, 4) == (0x0302, 0x5)
    assert msg[20:] == (struct.pack("=HH", 8, 4) + struct.pack("!I", 1)  # MASK
                        + struct.pack("=HH", 8, 5) + struct.pack("!I", 1))  # FLAGS
    assert struct.unpack("!I", nfq.fail_open_request(1, 1, enable=False)[32:36]) == (0,)


def test_verdict_message() -> None:
    msg = nfq.verdict_message(3, 0xDEADBEEF, True, 0x10007)
    assert len(msg) == 40
    assert struct.unpack_from("=IHHII", msg) == (40, 0x0301, nfq.NLM_F_REQUEST, 0, 0)  # no ACK asked
    assert struct.unpack_from("!BBH", msg, 16) == (0, 0, 3)
    assert msg[20:32] == struct.pack("=HH", 12, 2) + struct.pack("!II", nfq.NF_ACCEPT, 0xDEADBEEF)
    assert msg[32:] == struct.pack("=HH", 8, 3) + struct.pack("!I", 0x10007)
    assert struct.unpack_from("!I", nfq.verdict_message(3, 1, False, 0), 24)[0] == nfq.NF_DROP


def test_packet_message_is_parsed() -> None:
    ((kind, _, body),) = nfq.messages(packet_message(41, mark=0x30007))
    assert kind == nfq.NFQNL_MSG_PACKET
    assert nfq.parse_packet(body) == nfq.QueuedPacket(41, 0x30007, 1500)
    # no mark, not cut at the copy range: mark 0 and the payload's own length
    ((_, _, body),) = nfq.messages(packet_message(42, mark=None, payload=b"abc", cap_len=None))
    assert nfq.parse_packet(body) == nfq.QueuedPacket(42, 0, 3)


@pytest.mark.parametrize("cut", [1, 17, 30, 40])
def test_truncated_messages_are_malformed_not_a_crash(cut: int) -> None:
    data = packet_message(1)
    with pytest.raises(nfq.MalformedMessage):
        for _, _, body in nfq.messages(data[:-cut]):
            nfq.parse_packet(body)


def test_packet_without_its_header_is_malformed() -> None:
    body = memoryview(struct.pack("!BBH", 2, 0, 3) + attr(nfq.NFQA_MARK, bytes(4)))
    with pytest.raises(nfq.MalformedMessage, match="NFQA_PACKET_HDR"):
        nfq.parse_packet(body)


def test_ack_parsing() -> None:
    assert nfq.ack_error(ack(9, 0), 9) == 0
    assert nfq.ack_error(ack(9, -1), 9) == 1  # EPERM
    assert nfq.ack_error(ack(8, 0), 9) is None  # another request's ACK
    assert nfq.ack_error(packet_message(1) + ack(9, -16), 9) == 16  # after a packet, same datagram
    assert nfq.ack_error(b"\0" * 5, 9) is None
    assert nfq.ack_error(struct.pack("=IHHII", 99, 2, 0, 9, 0), 9) is None  # lies about its length


@pytest.fixture
def fed() -> Iterator[tuple[nfq.NfQueue, socket.socket]]:
    """An NfQueue reading datagrams a test writes into the other end of a socketpair."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    queue = nfq.NfQueue(ours, 3)
    yield queue, kernel
    ours.close()
    kernel.close()


def test_receive_reads_packets_errors_and_garbage(fed: tuple[nfq.NfQueue, socket.socket]) -> None:
    queue, kernel = fed
    assert queue.receive() is None  # nothing waiting
    kernel.send(packet_message(1) + packet_message(2))
    assert [p.packet_id for p in queue.receive() or []] == [1, 2]
    kernel.send(ack(0, -2))  # the kernel refused a verdict (ENOENT)
    assert queue.receive() == [] and queue.refused == 1
    kernel.send(packet_message(3) + b"\xff" * 20)
    assert [p.packet_id for p in queue.receive() or []] == [3] and queue.malformed == 1
    kernel.send(b"")
    assert queue.receive() == []


def test_verdicts_are_batched_in_order(fed: tuple[nfq.NfQueue, socket.socket]) -> None:
    queue, kernel = fed
    queue.verdicts((i, i % 2 == 0, 0x10000) for i in range(300))
    first, second = kernel.recv(65536), kernel.recv(65536)
    assert len(first) == 256 * 40 and len(second) == 44 * 40
    ids = [struct.unpack_from("!I", first + second, 28 + 40 * i)[0] for i in range(300)]
    assert ids == list(range(300))
