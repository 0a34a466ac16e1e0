"""Real keys, CSRs and CA directories for the server tests (no mocks: everything is real x509)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tensorguard.server.ca import CertificateAuthority, init_ca
from tensorguard.server.policy import IssuancePolicy

TRUST_DOMAIN = "fleet.test"
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def make_ca(directory: Path, now: datetime = NOW, **policy: object) -> CertificateAuthority:
    init_ca(directory, TRUST_DOMAIN, ["localhost", "127.0.0.1"], now)
    return CertificateAuthority.load(directory, IssuancePolicy(TRUST_DOMAIN, **policy))  # type: ignore[arg-type]


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: object, cn: str | None = None, sans: Sequence[x509.GeneralName] = (),
             extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
             attributes: Sequence[x509.NameAttribute] = (),
             algorithm: hashes.HashAlgorithm | None = hashes.SHA256()) -> x509.CertificateSigningRequest:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([*names, *attributes]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def b64(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.b64encode(der(csr))


def tamper_signature(csr: x509.CertificateSigningRequest) -> bytes:
    """DER of ``csr`` with one bit of the signature flipped: still parses, no longer verifies."""
    raw = bytearray(der(csr))
    raw[-5] ^= 0x01
    return bytes(raw)


def spiffe(node: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/robot/{node}"


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
