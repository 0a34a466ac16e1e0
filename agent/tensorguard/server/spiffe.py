"""SPIFFE IDs for robots (spiffe://<trust-domain>/robot/<node-id>) and the names they are built from."""

from __future__ import annotations

import re

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SCHEME = "spiffe://"


def check_trust_domain(value: str) -> str:
    """A trust domain per the SPIFFE ID spec: lowercase letters, digits, '.', '-', '_'."""
    if not _TRUST_DOMAIN.match(value):
        raise ValueError(f"trust domain {value!r} must be 1-255 of lowercase a-z, 0-9, '.', '-', '_'")
    return value


def check_node_id(value: str) -> str:
    """Node ids become a SPIFFE path segment and a CN, so keep them to a safe, short alphabet."""
    if not _NODE_ID.match(value):
        raise ValueError(f"node id {value!r} must be 1-63 of A-Z, a-z, 0-9, '.', '-', '_' and start "
                         "with a letter or digit")
    return value


def robot_id(trust_domain: str, node_id: str) -> str:
    """The one URI SAN every robot certificate carries."""
    return f"{SCHEME}{trust_domain}/robot/{node_id}"


def parse_robot_id(uri: str, trust_domain: str) -> str | None:
    """The node id if ``uri`` is exactly a robot ID of ``trust_domain``, else None."""
    prefix = f"{SCHEME}{trust_domain}/robot/"
    if not uri.startswith(prefix):
        return None
    node = uri[len(prefix):]
    return node if _NODE_ID.match(node) else None
