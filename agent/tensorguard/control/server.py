"""The control socket: line-delimited JSON-RPC 2.0 over a Unix stream socket, one per unit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .access import Access, AccessPolicy, peer_credentials
from .export import Method, lookup
from .protocol import (
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_BATCH,
    PERMISSION_DENIED,
    TOO_MANY_CLIENTS,
    RpcError,
    decode_frame,
    encode,
    error_message,
    parse_request,
    request_id_of,
    result_message,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 65536


@dataclass(frozen=True)
class ServerLimits:
    """Per-socket limits; swapped atomically on config reload, used by new reads at once."""

    max_frame_bytes: int = 1_048_576
    client_timeout_s: float = 30.0
    max_clients: int = 64


@dataclass
class ServerStats:
    """Counters exported as metrics."""

    connections: int = 0
    refused: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[int] = field(default_factory=Counter)


class SocketInUse(RuntimeError):
    """Another live process already serves the socket path."""


class ControlServer:
    """Serves ``methods`` on ``path``; malformed input is answered with an error, never fatal."""

    def __init__(
        self, path: Path, methods: dict[str, Method], limits: ServerLimits, policy: AccessPolicy
    ) -> None:
        self.path = path
        self.methods = methods
        self.limits = limits
        self.policy = policy
        self.stats = ServerStats()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = self._bind()
        self._server = await asyncio.start_unix_server(self._serve_client, sock=sock)

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mode = 0o666 if self.policy.read_only_public else 0o660
        old_umask = os.umask(0o177)  # no window where the socket is wider than 0600
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        if self.policy.gid is not None and os.stat(self.path).st_gid != self.policy.gid:
            try:
                os.chown(self.path, -1, self.policy.gid)
            except PermissionError:
                log.warning("cannot give %s to group %s; only root and uid %d may connect",
                            self.path, self.policy.group, os.geteuid())
        os.chmod(self.path, mode)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def close(self) -> None:
        """Stop accepting, end open connections, and remove the socket file if it is still ours."""
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # let connections accepted just before close() register
        while self._clients:
            pending = list(self._clients)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.stats.connections += 1
        try:
            if len(self._clients) >= self.limits.max_clients:
                self.stats.refused += 1
                await self._send(writer, error_message(None, RpcError(
                    TOO_MANY_CLIENTS, f"too many clients (limit {self.limits.max_clients})")))
                return
            self._clients.add(task)
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock)
            access = self.policy.decide(peer)
            await self._conversation(reader, writer, access, peer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, access: Access, peer: Any
    ) -> None:
        """Answer each line; only a well-formed request restarts the client's timeout.

        Blank lines, unparsable or oversize frames, empty batches and bytes that never end a line
        buy no time, so a client that sends nothing useful loses its slot after
        ``client_timeout_s`` however it trickles; the timeout restarts once the request's answer is
        sent, so a slow method does not count against the caller.
        """
        loop = asyncio.get_running_loop()
        buf = bytearray()
        discarding = False
        deadline = loop.time() + self.limits.client_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                chunk = await asyncio.wait_for(reader.read(_READ_CHUNK), remaining)
            except TimeoutError:
                return
            cap = self.limits.max_frame_bytes
            if not chunk:
                if buf and not discarding:
                    await self._answer_line(bytes(buf), writer, access, peer)
                return
            scan_from = len(buf)  # the buffered part has no newline: look in the new bytes only
            buf += chunk
            while (newline := buf.find(b"\n", scan_from)) >= 0:
                scan_from = 0
                line = bytes(buf[:newline])
                del buf[: newline + 1]
                if discarding:
                    discarding = False
                    continue
                if len(line) > cap:
                    await self._too_large(writer, cap)
                    continue
                if await self._answer_line(line, writer, access, peer):
                    deadline = loop.time() + self.limits.client_timeout_s
            if len(buf) > cap:
                if not discarding:
                    await self._too_large(writer, cap)
                discarding = True
                buf.clear()

    async def _too_large(self, writer: asyncio.StreamWriter, cap: int) -> None:
        self.stats.errors[FRAME_TOO_LARGE] += 1
        await self._send(writer, error_message(None, RpcError(
            FRAME_TOO_LARGE, f"frame too large: limit is {cap} bytes per line; frame skipped")))

    async def _answer_line(
        self, line: bytes, writer: asyncio.StreamWriter, access: Access, peer: Any
    ) -> bool:
        """Answer one frame; True when it held at least one well-formed request."""
        if not line.strip():
            return False
        try:
            obj = decode_frame(line)
        except RpcError as exc:
            self.stats.errors[exc.code] += 1
            await self._send(writer, error_message(None, exc))
            return False
        if not isinstance(obj, list):
            answer, well_formed = await self._answer(obj, access, peer)
            if answer is not None:
                await self._send(writer, answer)
            return well_formed
        if not obj or len(obj) > MAX_BATCH:
            reason = f"batch of {len(obj)} exceeds {MAX_BATCH}" if obj else "empty batch"
            self.stats.errors[INVALID_REQUEST] += 1
            await self._send(writer, error_message(None, RpcError(
                INVALID_REQUEST, f"invalid request: {reason}")))
            return False
        answers = [await self._answer(item, access, peer) for item in obj]
        replies = [answer for answer, _ in answers if answer is not None]
        if replies:
            await self._send(writer, replies)
        return any(well_formed for _, well_formed in answers)

    async def _answer(self, obj: Any, access: Access, peer: Any) -> tuple[dict[str, Any] | None, bool]:
        """The answer to one request object (None for a notification), and whether it was well-formed."""
        try:
            request = parse_request(obj)
        except RpcError as exc:
            self.stats.errors[exc.code] += 1
            return error_message(request_id_of(obj), exc), False
        try:
            method = lookup(self.methods, request.method)
            self.stats.requests[method.name] += 1
            allowed = access is Access.FULL or (access is Access.READ_ONLY and method.read_only)
            if not allowed:
                raise RpcError(PERMISSION_DENIED, self.policy.describe_denial(peer, method.read_only))
            result = await method.call(request.params)
            encode(result)  # fail here, as an internal error, rather than after a partial write
            answer = result_message(request.id, result)
        except RpcError as exc:
            self.stats.errors[exc.code] += 1
            answer = error_message(request.id, exc)
        except Exception:
            log.exception("control method %s failed", request.method)
            self.stats.errors[INTERNAL_ERROR] += 1
            answer = error_message(request.id, RpcError(
                INTERNAL_ERROR, "internal error; the unit's journal has the details"))
        return (None if request.is_notification else answer), True

    async def _send(self, writer: asyncio.StreamWriter, message: Any) -> None:
        writer.write(encode(message))
        await asyncio.wait_for(writer.drain(), self.limits.client_timeout_s)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a crashed run; refuse to steal one a live process serves."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise SocketInUse(f"cannot check existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketInUse(f"{path} is served by another running process")
