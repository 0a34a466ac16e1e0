"""The facts renewal needs from PEM files: a certificate's validity and whether a key matches it.

After a restart the unit knows nothing but what is on disk, so these read the real x509 and key
encodings (cryptography 38 API: naive-UTC ``not_valid_before``/``not_valid_after``).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .renewal import Validity

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _epoch(moment: datetime.datetime) -> float:
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def validity_of(cert_pem: bytes, where: str = "certificate") -> Validity:
    """not_before/not_after of the first certificate in ``cert_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValueError(f"{where}: not a PEM certificate ({exc})") from exc
    return Validity(_epoch(cert.not_valid_before), _epoch(cert.not_valid_after))


def cert_spki(cert_pem: bytes, where: str = "certificate") -> bytes:
    """The certificate's SubjectPublicKeyInfo (DER), the thing a private key must match."""
    try:
        return x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(*_SPKI)
    except ValueError as exc:
        raise ValueError(f"{where}: not a PEM certificate ({exc})") from exc


def key_spki(key_pem: bytes, where: str = "private key") -> bytes:
    """The SubjectPublicKeyInfo of an unencrypted PEM private key (the key itself is never shown)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not an unencrypted PEM private key") from exc
    return key.public_key().public_bytes(*_SPKI)


def pair_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    """The key is the certificate's key (what nginx checks before loading a pair)."""
    return key_spki(key_pem) == cert_spki(cert_pem)
