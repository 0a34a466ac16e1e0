"""JSON-RPC 2.0 envelope checks."""

from __future__ import annotations

from typing import Any

import pytest

from tensorguard.control.protocol import (
    INVALID_REQUEST,
    PARSE_ERROR,
    RpcError,
    decode_frame,
    encode,
    parse_request,
    request_id_of,
)


@pytest.mark.parametrize("frame", [b"{", b"\xff\xfe", b"NaN", b'{"a": Infinity}', b"[" * 100000])
def test_unparseable_frames_are_parse_errors(frame: bytes) -> None:
    with pytest.raises(RpcError) as info:
        decode_frame(frame)
    assert info.value.code == PARSE_ERROR


@pytest.mark.parametrize(("obj", "fragment"), [
    ([], "must be a JSON object"),
    ({"method": "x"}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": "1.0", "method": "x"}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": "2.0"}, '"method" must be a non-empty string'),
    ({"jsonrpc": "2.0", "method": 5}, '"method" must be a non-empty string'),
    ({"jsonrpc": "2.0", "method": "x", "params": 3}, '"params" must be an object or array'),
    ({"jsonrpc": "2.0", "method": "x", "id": 1.5}, '"id" must be a string, integer or null'),
    ({"jsonrpc": "2.0", "method": "x", "id": True}, '"id" must be a string, integer or null'),
    ({"jsonrpc": "2.0", "method": "x", "extra": 1}, "unknown member(s) ['extra']"),
])
def test_bad_envelopes_are_invalid_requests(obj: Any, fragment: str) -> None:
    with pytest.raises(RpcError) as info:
        parse_request(obj)
    assert info.value.code == INVALID_REQUEST
    assert fragment in info.value.message


def test_notification_and_ids() -> None:
    assert parse_request({"jsonrpc": "2.0", "method": "m"}).is_notification
    req = parse_request({"jsonrpc": "2.0", "method": "m", "id": None, "params": [1]})
    assert not req.is_notification and req.id is None and req.params == [1]
    assert request_id_of({"id": 7}) == 7 and request_id_of({"id": [1]}) is None


def test_encode_is_one_line_and_rejects_nan() -> None:
    assert encode({"a": "x\ny"}) == b'{"a":"x\\ny"}\n'
    with pytest.raises(ValueError):
        encode({"a": float("nan")})
