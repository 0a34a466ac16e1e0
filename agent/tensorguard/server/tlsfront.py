"""TLS on rustls in front of the API: finding `tensorguard-tlsfront`, and the workers' side of its sockets.

The front (``tlsfront/``, Rust) terminates the robots' TLS and opens one connection per robot to a
worker's Unix socket, starting with a PROXY protocol v2 header (HAProxy's proxy-protocol.txt, 2.2):
the robot's address, the TLS version, and in TLV 0xE0 the DER of the client certificate that the
handshake verified against the intermediate (dates excepted, as with the in-process TLS of tlsproto).
The workers trust that header because nothing else can connect: the sockets live in a 0700 directory
of the server's user, and each connection's peer credentials must be that user. A connection whose
header is malformed is closed without an answer; nothing reaches the app before the header is whole.

Why: Debian 12's OpenSSL 3.0 spends ~0.6 ms of CPU on its side of one mutual-TLS handshake and rustls
~0.1 ms (measured, same certificates), and a robot's renewal is one new mTLS connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .asgitls import TLSExtension, WithTLS

BINARY = "tensorguard-tlsfront"
INSTALLED = Path("/usr/lib/tensorguard") / BINARY
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
TYPE_SSL = 0x20
SUBTYPE_SSL_VERSION = 0x21
TYPE_CLIENT_CERT_DER = 0xE0
_ADDRESS_SIZES = {0x11: 12, 0x21: 36}  # TCP over IPv4 / IPv6


class TLSFrontError(ValueError):
    """``--tls rustls`` was asked for and the front is not installed."""


class ProxyHeaderError(ValueError):
    """The front's header is not what it writes: the connection is closed."""


@dataclass(frozen=True)
class ProxiedConnection:
    """What the front says about one robot connection."""

    client: tuple[str, int]
    server: tuple[str, int]
    tls_version: str | None
    client_cert_der: bytes | None


def find_binary() -> Path | None:
    """The front's executable: $TENSORGUARD_TLSFRONT, the packaged one, one beside this Python (a venv's
    bin, where `make` puts it), or on PATH; None if there is none."""
    override = os.environ.get("TENSORGUARD_TLSFRONT")
    if override:
        return Path(override)
    for candidate in (INSTALLED, Path(sys.executable).parent / BINARY):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(BINARY)
    return Path(found) if found else None


def _tlvs(data: bytes, where: str) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError(f"{where}: truncated TLV at byte {offset}")
        kind, length = data[offset], struct.unpack_from(">H", data, offset + 1)[0]
        if offset + 3 + length > len(data):
            raise ProxyHeaderError(f"{where}: TLV 0x{kind:02x} of {length} bytes overruns the header")
        values[kind] = data[offset + 3:offset + 3 + length]
        offset += 3 + length
    return values


def parse_header(buffer: bytes) -> tuple[ProxiedConnection, int] | None:
    """The header at the start of ``buffer`` and its length, None while incomplete, ProxyHeaderError if
    it is not a PROXY v2 header for TCP with the TLS TLV the front writes."""
    if len(buffer) < 16:
        if not SIGNATURE.startswith(buffer[:12]):
            raise ProxyHeaderError("not a PROXY v2 header (bad signature)")
        return None
    if buffer[:12] != SIGNATURE:
        raise ProxyHeaderError("not a PROXY v2 header (bad signature)")
    if buffer[12] != 0x21:
        raise ProxyHeaderError(f"version/command byte 0x{buffer[12]:02x}, expected 0x21 (v2, PROXY)")
    family, length = buffer[13], struct.unpack_from(">H", buffer, 14)[0]
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        raise ProxyHeaderError(f"address family 0x{family:02x}, expected TCP over IPv4 or IPv6")
    if length < size:
        raise ProxyHeaderError(f"length {length} is shorter than the {size} bytes of addresses")
    if len(buffer) < 16 + length:
        return None
    body = buffer[16:16 + length]
    half = size // 2 - 2
    make = ipaddress.IPv4Address if family == 0x11 else ipaddress.IPv6Address
    source, destination = make(body[:half]), make(body[half:2 * half])
    source_port, destination_port = struct.unpack_from(">HH", body, 2 * half)
    tlvs = _tlvs(body[size:], "PROXY header")
    ssl = tlvs.get(TYPE_SSL)
    if ssl is None or len(ssl) < 5 or not ssl[0] & 0x01:
        raise ProxyHeaderError("no PP2_TYPE_SSL TLV: the front always sends one")
    if struct.unpack_from(">I", ssl, 1)[0] != 0:
        raise ProxyHeaderError("the client certificate did not verify (PP2_TYPE_SSL verify != 0)")
    version = _tlvs(ssl[5:], "PP2_TYPE_SSL").get(SUBTYPE_SSL_VERSION)
    der = tlvs.get(TYPE_CLIENT_CERT_DER)
    if bool(ssl[0] & 0x02) != (der is not None):
        raise ProxyHeaderError("PP2_CLIENT_CERT_CONN and the certificate TLV disagree")
    return ProxiedConnection((str(source), source_port), (str(destination), destination_port),
                             version.decode("ascii", "replace") if version else None, der), 16 + length


def peer_uid(sock: Any) -> int | None:
    """The uid at the other end of a Unix socket (SO_PEERCRED), None if it cannot be read."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


class Proxied:
    """Mixin for a uvicorn HTTP protocol class (first among the bases) serving the front's Unix socket:
    checks the peer's uid, reads the PROXY header, then hands the rest to uvicorn with the robot's
    address and the ASGI TLS extension in every scope."""

    server_cert_pem: str | None = None
    app: Any
    client: Any
    server: Any
    scheme: Literal["http", "https"] | None
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header = b""
        self._proxied = False
        sock = transport.get_extra_info("socket")
        if sock is None or peer_uid(sock) != os.getuid():
            self._refuse(f"the peer of the API socket is not uid {os.getuid()}")

    def _refuse(self, reason: str) -> None:
        print(f"tensorguard server: closing a front connection: {reason}", file=sys.stderr, flush=True)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._proxied:
            super().data_received(data)  # type: ignore[misc]
            return
        if self.transport.is_closing():
            return
        self._header += data
        try:  # never more than 16 + 65535 bytes are buffered: the header's length field is 16 bits
            parsed = parse_header(self._header)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if parsed is None:
            return
        connection, length = parsed
        rest, self._header = self._header[length:], b""
        self._proxied = True
        self.client, self.server, self.scheme = connection.client, connection.server, "https"
        self.app = WithTLS(self.app, TLSExtension(connection.client_cert_der, self.server_cert_pem,
                                                  connection.tls_version))
        if rest:
            super().data_received(rest)  # type: ignore[misc]

