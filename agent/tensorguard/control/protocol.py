"""JSON-RPC 2.0 message shapes and error codes of the control protocol (no I/O here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
"""Bumped on incompatible changes; clients compare it with the answer of ``sys.hello``."""

MAX_BATCH = 64

# JSON-RPC 2.0 reserved codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# TensorGuard's own codes (the -32000..-32099 server range).
FRAME_TOO_LARGE = -32001
PERMISSION_DENIED = -32002
CONFIG_INVALID = -32003
TOO_MANY_CLIENTS = -32004
UNAVAILABLE = -32005


class RpcError(Exception):
    """An error answer: raised by methods (or the dispatcher) and sent to the client as is."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


@dataclass(frozen=True)
class Request:
    """A well-formed request; ``id`` is absent (``is_notification``) for notifications."""

    method: str
    params: list[Any] | dict[str, Any]
    id: str | int | None
    is_notification: bool


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_frame(frame: bytes) -> Any:
    """Parse one line; raises RpcError(PARSE_ERROR) with the reason."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RpcError(PARSE_ERROR, f"parse error: not UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {exc}") from None


def parse_request(obj: Any) -> Request:
    """Check the JSON-RPC 2.0 envelope; raises RpcError(INVALID_REQUEST) naming the fault."""
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: must be a JSON object")
    if obj.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    unknown = set(obj) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        raise RpcError(INVALID_REQUEST, f"invalid request: unknown member(s) {sorted(unknown)}")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a non-empty string')
    params = obj.get("params", {})
    if not isinstance(params, dict | list):
        raise RpcError(INVALID_REQUEST, 'invalid request: "params" must be an object or array')
    is_notification = "id" not in obj
    rid = obj.get("id")
    if not is_notification and (isinstance(rid, bool) or not isinstance(rid, str | int | None)):
        raise RpcError(INVALID_REQUEST, 'invalid request: "id" must be a string, integer or null')
    return Request(method, params, rid, is_notification)


def request_id_of(obj: Any) -> str | int | None:
    """Best-effort id of a request that failed validation, for the error answer."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            return rid
    return None


def result_message(rid: str | int | None, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def error_message(rid: str | int | None, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": error.as_dict()}


def encode(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
