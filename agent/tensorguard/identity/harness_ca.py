"""The fault harness's CA: real x509 (ECDSA P-256 root and intermediate) on a simulated clock.

Real: keys, certificates, signatures, PEM encodings. Simulated: the CA's clock (it issues at the
true time the harness hands it) and the network (no EST round trip; whether the CA is reachable
and whether it accepts the request is decided by the harness from the fault schedule).
"""

from __future__ import annotations

import datetime
import math
import random
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .renewal import Validity

_UTC = datetime.UTC


def _naive_utc(epoch: float) -> datetime.datetime:
    """cryptography 38 wants naive datetimes in UTC."""
    return datetime.datetime.fromtimestamp(epoch, _UTC).replace(tzinfo=None)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TensorGuard harness"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Issued:
    """A leaf certificate as the CA produced it."""

    cert_pem: bytes
    validity: Validity
    spki: bytes
    """The SubjectPublicKeyInfo the CA put in the certificate (DER)."""


class SimulatedCa:
    """Root -> intermediate -> leaf; leaves live ``lifetime_s`` with not_before backdated."""

    def __init__(self, rng: random.Random, lifetime_s: float, backdate_s: float = 60.0,
                 trust_domain: str = "tensorguard.local", epoch: float = 1_717_200_000.0) -> None:
        self.rng = rng
        self.lifetime_s = lifetime_s
        self.backdate_s = backdate_s
        self.trust_domain = trust_domain
        start, end = _naive_utc(epoch - 86400), _naive_utc(epoch + 3650 * 86400)
        root_key = ec.generate_private_key(ec.SECP256R1())
        self._key = ec.generate_private_key(ec.SECP256R1())
        validity = (start, end)
        root = self._ca_cert(_name("harness root"), root_key.public_key(), root_key, validity, 1)
        self._issuer = _name("harness intermediate")
        intermediate = self._ca_cert(self._issuer, self._key.public_key(), root_key, validity, 0)
        self.root_pem = root.public_bytes(serialization.Encoding.PEM)
        self.chain_pem = intermediate.public_bytes(serialization.Encoding.PEM)

    def _ca_cert(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 signer: ec.EllipticCurvePrivateKey,
                 validity: tuple[datetime.datetime, datetime.datetime],
                 path_length: int) -> x509.Certificate:
        """Both CA certificates are issued by the root (the root by itself)."""
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(_name("harness root"))
                .public_key(public_key).serial_number(self.rng.getrandbits(63) + 1)
                .not_valid_before(validity[0]).not_valid_after(validity[1])
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                .sign(signer, hashes.SHA256()))

    def issue(self, public_key: ec.EllipticCurvePublicKey, node_id: str, now: float) -> Issued:
        """Sign a leaf for ``public_key`` at CA time ``now`` (x509 times have 1 s resolution)."""
        second = math.floor(now)
        not_before, not_after = second - self.backdate_s, second + self.lifetime_s
        spiffe = f"spiffe://{self.trust_domain}/robot/{node_id}"
        cert = (x509.CertificateBuilder().subject_name(_name(node_id)).issuer_name(self._issuer)
                .public_key(public_key).serial_number(self.rng.getrandbits(63) + 1)
                .not_valid_before(_naive_utc(not_before)).not_valid_after(_naive_utc(not_after))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                      ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        spki = public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        return Issued(cert.public_bytes(serialization.Encoding.PEM), Validity(not_before, not_after), spki)
