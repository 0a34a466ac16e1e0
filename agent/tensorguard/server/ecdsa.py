"""ECDSA verification over a hashlib digest: cryptography 38 hashes in Python objects for ~25 us a call,
a third of a P-256 verification; hashlib does the same SHA-2 in ~1 us (Prehashed is the same check)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

_HASHLIB = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes,
           algorithm: hashes.HashAlgorithm) -> None:
    """Raise InvalidSignature unless ``signature`` is ``key``'s ECDSA signature of ``data`` with
    ``algorithm``; any hash other than SHA-256/384/512 takes cryptography's own path."""
    hasher = _HASHLIB.get(algorithm.name)
    if hasher is None:
        key.verify(signature, data, ec.ECDSA(algorithm))
        return
    key.verify(signature, hasher(data).digest(), ec.ECDSA(Prehashed(algorithm)))
