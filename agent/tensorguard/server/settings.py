"""Everything `tensorguard server serve` needs, in one value (the [server] table of agent.toml later)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .ca import CAPaths
from .engine import HTTP_CHOICES, LOOP_CHOICES

TLS_CHOICES = ("auto", "rustls", "openssl")
MAX_TIMEOUT = 300
"""Longest handshake or idle timeout, in seconds (the rustls front's own limit)."""


@dataclass(frozen=True)
class ServerSettings:
    """Server settings; the trust domain is not here because `ca init` fixes it in the CA directory."""

    ca_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    workers: int = 1
    cert_lifetime: timedelta = timedelta(hours=1)
    backdate: timedelta = timedelta(seconds=60)
    dns_templates: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024
    sqlite_synchronous: str = "NORMAL"
    log_level: str = "info"
    access_log: bool = False
    http: str = "auto"
    """HTTP/1.1 parser: httptools (C), h11 (pure Python), or auto (httptools when installed)."""
    loop: str = "auto"
    """Event loop: uvloop, asyncio, or auto (uvloop when installed)."""
    tls: str = "auto"
    """Who terminates TLS: rustls (the tensorguard-tlsfront process), openssl (Python's ssl in each worker),
    or auto (rustls when the front is installed)."""
    handshake_timeout: int = 10
    """Seconds a client has from connecting to the end of its TLS handshake."""
    idle_timeout: int = 30
    """Seconds a connection may stay silent, before its first request or between requests."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 0..65535")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64, not {self.workers}")
        if self.http not in HTTP_CHOICES:
            raise ValueError(f"http must be one of {', '.join(HTTP_CHOICES)}, not {self.http!r}")
        if self.loop not in LOOP_CHOICES:
            raise ValueError(f"loop must be one of {', '.join(LOOP_CHOICES)}, not {self.loop!r}")
        if self.tls not in TLS_CHOICES:
            raise ValueError(f"tls must be one of {', '.join(TLS_CHOICES)}, not {self.tls!r}")
        timeouts = (("handshake timeout", self.handshake_timeout), ("idle timeout", self.idle_timeout))
        for name, seconds in timeouts:
            if not 1 <= seconds <= MAX_TIMEOUT:
                raise ValueError(f"{name} must be 1..{MAX_TIMEOUT} seconds, not {seconds}")
        if not 1024 <= self.max_body_bytes <= 1024 * 1024:
            raise ValueError(f"max body must be 1 KiB..1 MiB, not {self.max_body_bytes} bytes")

    @property
    def paths(self) -> CAPaths:
        return CAPaths(self.ca_dir)
