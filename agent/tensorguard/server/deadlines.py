"""Deadlines uvicorn leaves unset on a worker's connections, so that a client that connects and stays
silent is closed instead of holding a descriptor and a slot of the worker for good.

uvicorn arms its keep-alive timer only once it has answered a request: a connection that never sends
its first one stayed open forever. And it creates its TLS server without asyncio's
``ssl_handshake_timeout``, so a client that never sends a ClientHello held its connection for asyncio's
default of 60 s. The rustls front has both deadlines of its own (``--handshake-timeout``,
``--idle-timeout``); these are the workers' side, which also serve TLS themselves with ``--tls openssl``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn


class FirstRequestDeadline:
    """Mixin for a uvicorn HTTP protocol class (first among the bases): a new connection gets uvicorn's
    keep-alive timer at once, as if it had just been answered; uvicorn cancels it on the first bytes."""

    loop: asyncio.AbstractEventLoop
    timeout_keep_alive: int
    timeout_keep_alive_task: asyncio.TimerHandle | None
    timeout_keep_alive_handler: Callable[[], None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)


def with_first_request_deadline(protocol: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``protocol`` (a uvicorn HTTP protocol class) with `FirstRequestDeadline` in front."""
    return type(protocol.__name__, (FirstRequestDeadline, protocol), {})


class HandshakeDeadlineServer(uvicorn.Server):
    """uvicorn's server whose TLS listeners close a connection that has not finished its handshake within
    ``handshake_timeout`` seconds (asyncio's ``ssl_handshake_timeout``, which uvicorn does not pass)."""

    def __init__(self, config: uvicorn.Config, handshake_timeout: float) -> None:
        super().__init__(config)
        self.handshake_timeout = handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        create_server = loop.create_server

        async def with_deadline(*args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout)
            return await create_server(*args, **kwargs)

        # uvicorn calls loop.create_server while it starts: this loop's own attribute shadows the method
        # for that call only (asyncio's and uvloop's loops are Python objects with a __dict__)
        setattr(loop, "create_server", with_deadline)  # noqa: B010 (mypy refuses assigning to a method)
        try:
            await super().startup(sockets)
        finally:
            delattr(loop, "create_server")
