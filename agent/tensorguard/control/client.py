"""Blocking client for the control sockets, used by tgctl, systemd's ExecReload and tests."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from .protocol import RpcError, encode

MAX_ANSWER_BYTES = 64 * 1024 * 1024


class UnitUnavailable(OSError):
    """Nothing is serving the socket: the unit is not running (or the path is wrong)."""


class ControlClient:
    """One connection to one unit; ``call`` sends a request and waits for its answer."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)

    def connect(self) -> ControlClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise UnitUnavailable(exc.errno, f"no unit is serving {self.path}") from None
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self.connect() if self._sock is None else self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Return the method's result; raise RpcError with the server's code and message."""
        if self._sock is None:
            self.connect()
        rid = next(self._ids)
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            request["params"] = params
        answer = self.exchange(encode(request))
        if not isinstance(answer, dict):
            raise RpcError(-32603, f"unexpected answer from {self.path}: {answer!r:.200}")
        if "error" in answer:
            err = answer["error"]
            raise RpcError(int(err.get("code", -32603)), str(err.get("message")), err.get("data"))
        return answer.get("result")

    def exchange(self, frame: bytes) -> Any:
        """Send raw bytes and parse the next answer line (for tests of malformed input too)."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(frame)
        return json.loads(self.read_line())

    def read_line(self) -> bytes:
        assert self._sock is not None
        while (newline := self._buf.find(b"\n")) < 0:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{self.path} closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_ANSWER_BYTES:
                raise ConnectionError(f"answer from {self.path} exceeds {MAX_ANSWER_BYTES} bytes")
        line = bytes(self._buf[:newline])
        del self._buf[: newline + 1]
        return line


def call(path: Path | str, method: str, params: dict[str, Any] | None = None,
         timeout: float = 10.0) -> Any:
    """One request on a fresh connection."""
    with ControlClient(path, timeout) as client:
        return client.call(method, params)
