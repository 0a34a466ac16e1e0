"""One-time bootstrap tokens: high-entropy, so a plain SHA-256 is enough to store them safely."""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "tgbt_"
_TOKEN = re.compile(r"^tgbt_[A-Za-z0-9_-]{43,128}$")


class TokenFormatError(ValueError):
    """The presented value is not shaped like a bootstrap token (the value itself is never echoed)."""


def new_token() -> str:
    """A fresh token: the prefix makes leaked tokens greppable by secret scanners; 32 random bytes."""
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What the store keeps instead of the token; checks the shape first."""
    if not _TOKEN.match(token):
        raise TokenFormatError("the bearer value is not a bootstrap token (expected tgbt_ followed by "
                               "43 or more base64url characters)")
    return hashlib.sha256(token.encode("ascii")).digest()


def token_ref(digest: bytes) -> str:
    """A short, non-secret reference to a token for audit records (a prefix of its hash)."""
    return digest[:6].hex()
