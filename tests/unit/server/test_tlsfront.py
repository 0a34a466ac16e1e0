"""The workers' side of the rustls front: the PROXY v2 header they trust, and what they do with a bad one."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Any

import pytest

from tensorguard.server.tlsfront import (
    SIGNATURE,
    TYPE_CLIENT_CERT_DER,
    TYPE_SSL,
    Proxied,
    ProxyHeaderError,
    parse_header,
    peer_uid,
)


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def header(source: str = "10.203.0.5", source_port: int = 40000, destination: str = "10.203.0.1",
           destination_port: int = 8443, der: bytes | None = b"DER", version: bytes = b"TLSv1.3",
           verify: int = 0, flags: int | None = None) -> bytes:
    """A header as the front writes it (proxy-protocol.txt 2.2), built here independently of the front."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack(">HH", source_port, destination_port)
    client = flags if flags is not None else 0x01 | (0x02 if der is not None else 0)
    body += _tlv(TYPE_SSL, bytes([client]) + struct.pack(">I", verify) + _tlv(0x21, version))
    if der is not None:
        body += _tlv(TYPE_CLIENT_CERT_DER, der)
    return SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(body)) + body


def test_a_whole_header_gives_the_robot_and_its_certificate() -> None:
    data = header() + b"POST / HTTP/1.1\r\n"
    parsed = parse_header(data)
    assert parsed is not None
    connection, length = parsed
    assert data[length:] == b"POST / HTTP/1.1\r\n"
    assert connection.client == ("10.203.0.5", 40000) and connection.server == ("10.203.0.1", 8443)
    assert (connection.tls_version, connection.client_cert_der) == ("TLSv1.3", b"DER")


def test_ipv6_and_no_certificate() -> None:
    parsed = parse_header(header("2001:db8::5", 1, "2001:db8::1", 2, der=None))
    assert parsed is not None
    assert parsed[0].client == ("2001:db8::5", 1) and parsed[0].client_cert_der is None


def test_a_partial_header_waits_for_more() -> None:
    whole = header()
    for cut in (0, 5, 12, 15, 16, len(whole) - 1):
        assert parse_header(whole[:cut]) is None


@pytest.mark.parametrize(("data", "needle"), [
    (b"GET / HTTP/1.1\r\n\r\n", "bad signature"),
    (b"\r\n\r\n\x01", "bad signature"),
    (SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), "expected 0x21"),
    (SIGNATURE + b"\x21\x31\x00\x00", "address family 0x31"),
    (SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "shorter than the 12 bytes"),
    (header(der=None) + b"\xe0\x00\x09DER", "overruns the header"),
    (header(verify=1), "did not verify"),
    (header(flags=0x01), "disagree"),
    (header(flags=0x00), "no PP2_TYPE_SSL"),
])
def test_a_malformed_header_is_refused_with_what_is_wrong(data: bytes, needle: str) -> None:
    if needle == "overruns the header":  # fix up the outer length so only the TLV is wrong
        data = data[:14] + struct.pack(">H", len(data) - 16) + data[16:]
    with pytest.raises(ProxyHeaderError, match=needle):
        parse_header(data)


class _Transport:
    """A transport stand-in (the test's own): records close() and hands out the given socket."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Base:
    """What uvicorn's protocol would do: remember the transport and the bytes it was fed."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.app: Any = "app"

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.fed.append(data)


class _Protocol(Proxied, _Base):
    server_cert_pem = "SERVER PEM"


def test_the_worker_feeds_uvicorn_only_after_the_header_and_sets_the_robot() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert peer_uid(left) == os.getuid()
        protocol = _Protocol()
        protocol.connection_made(_Transport(left))
        data = header() + b"GET /healthz HTTP/1.1\r\n\r\n"
        protocol.data_received(data[:20])
        assert protocol.fed == []
        protocol.data_received(data[20:])
        assert protocol.fed == [b"GET /healthz HTTP/1.1\r\n\r\n"]
        assert (protocol.client, protocol.server, protocol.scheme) == (("10.203.0.5", 40000), ("10.203.0.1", 8443),
                                                                       "https")
        assert protocol.app.tls["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")
        protocol.data_received(b"more")
        assert protocol.fed[-1] == b"more"


def test_garbage_or_a_stranger_is_closed_before_uvicorn_sees_a_byte(capsys: pytest.CaptureFixture[str]) -> None:
    left, right = socket.socketpair()
    with left, right:
        protocol = _Protocol()
        transport = _Transport(left)
        protocol.connection_made(transport)
        protocol.data_received(b"GET / HTTP/1.1\r\n\r\n")
        assert transport.closed and protocol.fed == []
        assert "bad signature" in capsys.readouterr().err
    stranger = _Protocol()
    transport = _Transport(None)  # no socket to ask: treated as a stranger
    stranger.connection_made(transport)
    assert transport.closed
    stranger.data_received(header())
    assert stranger.fed == []
