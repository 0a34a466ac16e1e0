"""The fail-open config message, byte for byte, and the ACK parser."""

from __future__ import annotations

import struct

import pytest

from tensorguard.netguard.kernel.nfqueue_config import ack_error, fail_open_request


def test_request_layout() -> None:
    msg = fail_open_request(18260, sequence=9)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 0x0302, 0x5, 9, 0) and length == 36
    family, version, res_id = struct.unpack_from("!BBH", msg, 16)
    assert (family, version, res_id) == (0, 0, 18260)  # queue number in network order
    attrs = msg[20:]
    assert struct.unpack("=HH", attrs[:4]) == (8, 4) and struct.unpack("!I", attrs[4:8]) == (1,)  # MASK
    assert struct.unpack("=HH", attrs[8:12]) == (8, 5) and struct.unpack("!I", attrs[12:16]) == (1,)  # FLAGS
    assert struct.unpack("!I", fail_open_request(1, 1, enable=False)[32:36]) == (0,)
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        fail_open_request(70000, 1)


def test_ack_parsing() -> None:
    def ack(seq: int, error: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", error) + bytes(16)

    assert ack_error(ack(9, 0), 9) == 0
    assert ack_error(ack(9, -1), 9) == 1  # EPERM
    assert ack_error(ack(8, 0), 9) is None  # another request's ACK
    assert ack_error(struct.pack("=IHHII", 16, 0x0300, 0, 9, 0) + bytes(4), 9) is None  # a packet
    assert ack_error(b"\0" * 5, 9) is None
