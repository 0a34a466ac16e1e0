"""Who is on the other end of an mTLS connection: a robot of our trust domain with a current cert.

The TLS handshake checks the chain but not the dates (see tlsproto); here the issuer must be *our*
intermediate, the certificate must be valid now by the app's clock, and it must carry exactly one robot
SPIFFE ID of our trust domain. The intermediate's signature is checked here too unless the caller says
the handshake already did it against the intermediate as its only trust anchor (the server's own TLS
context, `tlsproto.server_context`): a second P-256 verification was ~8 % of the server's CPU per
mTLS renewal (measured) and proved nothing the handshake had not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from .. import der
from . import ecdsa
from .spiffe import parse_robot_id
from .timeutil import as_utc


class PeerError(Exception):
    """The client certificate does not authorise this request; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Peer:
    """A verified robot client certificate."""

    node_id: str
    serial: str
    not_before: datetime
    not_after: datetime


class PeerVerifier:
    """Verifies client certificates against the intermediate; caches signature checks by PEM."""

    def __init__(self, issuer: x509.Certificate, trust_domain: str, cache_size: int = 4096, *,
                 signature_checked_by_tls: bool = False) -> None:
        key = issuer.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TypeError("the intermediate must have an EC key")
        self.issuer_der = issuer.subject.public_bytes()
        self.issuer_key = key
        self.trust_domain = trust_domain
        self.signature_checked_by_tls = signature_checked_by_tls
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Peer] = OrderedDict()

    def _verify(self, pem: str) -> Peer:
        try:
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        except ValueError:
            raise PeerError("the client certificate does not parse") from None
        tbs = cert.tbs_certificate_bytes
        if der.tbs_issuer(tbs) != self.issuer_der:  # the exact bytes this CA writes; cheaper than Names
            raise PeerError(f"the client certificate was issued by {cert.issuer.rfc4514_string()}, not by "
                            "this CA's intermediate")
        if not self.signature_checked_by_tls:
            algorithm = cert.signature_hash_algorithm
            try:
                if algorithm is None:
                    raise InvalidSignature()
                ecdsa.verify(self.issuer_key, cert.signature, tbs, algorithm)
            except InvalidSignature:
                raise PeerError("the client certificate's signature does not verify with this CA") from None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise PeerError("the client certificate has no SPIFFE ID (no subjectAltName)") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        nodes = [parse_robot_id(uri, self.trust_domain) for uri in uris]
        if len(uris) != 1 or nodes[0] is None:
            raise PeerError(f"the client certificate must carry exactly one robot SPIFFE ID of trust "
                            f"domain {self.trust_domain}; it has {uris}")
        return Peer(nodes[0], format(cert.serial_number, "x"), as_utc(cert.not_valid_before),
                    as_utc(cert.not_valid_after))

    def verify(self, tls: Mapping[str, Any] | None, now: datetime) -> Peer:
        """The robot behind this connection's TLS extension, or PeerError."""
        if tls is None:
            raise PeerError("re-enrolment needs HTTPS with a client certificate")
        chain = list(tls.get("client_cert_chain") or ())
        if not chain:
            raise PeerError("no client certificate was presented; re-enrolment is authorised by the "
                            "current certificate (use simpleenroll with a bootstrap token otherwise)")
        pem = str(chain[0])
        peer = self._cache.get(pem)
        if peer is None:
            peer = self._verify(pem)
            self._cache[pem] = peer
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if now >= peer.not_after:
            raise PeerError(f"the client certificate (serial {peer.serial}) expired at "
                            f"{peer.not_after.isoformat()}; enrol again with a bootstrap token")
        if now < peer.not_before:
            raise PeerError(f"the client certificate (serial {peer.serial}) is not valid before "
                            f"{peer.not_before.isoformat()}")
        return peer
