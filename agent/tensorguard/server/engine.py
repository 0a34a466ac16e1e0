"""Which HTTP/1.1 parser and event loop serve the API: the C ones when installed, else pure Python.

httptools (uvicorn's C parser) and uvloop (libuv, with its TLS transport in Cython) take ~15 % off the
server's CPU per enrolment and per mTLS renewal against h11 on asyncio's pure-Python SSL transport
(measured with the same app). They are optional: Debian ships them as python3-httptools and
python3-uvloop, and without them the server runs the same code on h11 and asyncio. ``auto`` takes each
fast one that imports.
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass
from importlib import metadata

HTTP_CHOICES = ("auto", "httptools", "h11")
LOOP_CHOICES = ("auto", "uvloop", "asyncio")
_MINIMUM = {"httptools": (0, 8, 0), "uvloop": (0, 15, 1)}
"""Oldest versions uvicorn's [standard] extra accepts (Debian 12's python3-httptools 0.1.1 is older)."""


class EngineError(ValueError):
    """An explicitly requested parser or loop is not installed (or too old) on this host."""


def _version(name: str) -> tuple[int, ...] | None:
    try:
        text = metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installed(name: str) -> bool:
    """``name`` is installed in at least the version uvicorn needs (metadata only: cheap for --help)."""
    version = _version(name)
    return version is not None and version >= _MINIMUM[name]


def usable(name: str) -> bool:
    """``name`` is installed in a version uvicorn accepts, and imports."""
    if not installed(name):
        return False
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Engine:
    """The chosen parser and loop; ``describe`` names them with versions for logs and --help."""

    http: str
    loop: str

    def protocol(self, server_cert_pem: str | None, proxied: bool = False) -> type[asyncio.Protocol]:
        """uvicorn's protocol class for this parser, with the ASGI TLS extension for our certificate:
        from the connection's own TLS, or with ``proxied`` from the rustls front's header."""
        if self.http == "httptools":
            from . import tls_httptools  # noqa: PLC0415 (optional dependency)

            base: type[asyncio.Protocol] = (tls_httptools.ProxiedHttpToolsProtocol if proxied
                                            else tls_httptools.PeerCertHttpToolsProtocol)
        else:
            from .tlsproto import PeerCertH11Protocol, ProxiedH11Protocol  # noqa: PLC0415

            base = ProxiedH11Protocol if proxied else PeerCertH11Protocol
        return type(f"Server{base.__name__}", (base,), {"server_cert_pem": server_cert_pem})

    def describe(self) -> str:
        """e.g. 'httptools 0.9.0 on uvloop 0.23.0'."""
        def named(name: str) -> str:
            version = _version(name)
            return f"{name} {'.'.join(map(str, version))}" if version else name
        return f"{named(self.http)} on {named(self.loop)}"


def select(http: str = "auto", loop: str = "auto") -> Engine:
    """Resolve ``auto`` to the fast implementation when usable; EngineError if one asked for is not."""
    if http not in HTTP_CHOICES:
        raise EngineError(f"HTTP parser must be one of {', '.join(HTTP_CHOICES)}, not {http!r}")
    if loop not in LOOP_CHOICES:
        raise EngineError(f"event loop must be one of {', '.join(LOOP_CHOICES)}, not {loop!r}")
    for choice, fast in ((http, "httptools"), (loop, "uvloop")):
        if choice == fast and not usable(fast):
            found = _version(fast)
            state = "is not installed" if found is None else \
                f"{'.'.join(map(str, found))} is older than {'.'.join(map(str, _MINIMUM[fast]))} or broken"
            raise EngineError(f"{fast} {state} (pip install {fast}, or apt install python3-{fast})")
    if http == "auto":
        http = "httptools" if usable("httptools") else "h11"
    if loop == "auto":
        loop = "uvloop" if usable("uvloop") else "asyncio"
    return Engine(http, loop)


def preview() -> Engine:
    """What ``auto`` would pick, from package metadata alone (for --help, which must not import them)."""
    return Engine("httptools" if installed("httptools") else "h11",
                  "uvloop" if installed("uvloop") else "asyncio")
