"""Control API: methods declared once with ``@export``, served over Unix sockets, called by tgctl."""

from .access import Access, AccessPolicy, PeerCred
from .client import ControlClient, UnitUnavailable, call
from .export import Method, collect, export
from .protocol import PROTOCOL_VERSION, RpcError
from .server import ControlServer, ServerLimits, SocketInUse

__all__ = [
    "PROTOCOL_VERSION",
    "Access",
    "AccessPolicy",
    "ControlClient",
    "ControlServer",
    "Method",
    "PeerCred",
    "RpcError",
    "ServerLimits",
    "SocketInUse",
    "UnitUnavailable",
    "call",
    "collect",
    "export",
]
