"""What the CA will sign: a CSR is checked against the node it is for, and only then signed.

Nothing from the CSR is copied into a certificate except its public key and the names checked here;
every other requested extension is ignored (and asking to be a CA is refused outright).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from . import csr as csrmod
from . import ecdsa
from .spiffe import check_node_id, check_trust_domain, robot_id

CertificatePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
ALLOWED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_ECDSA = {SignatureAlgorithmOID.ECDSA_WITH_SHA256, SignatureAlgorithmOID.ECDSA_WITH_SHA384,
          SignatureAlgorithmOID.ECDSA_WITH_SHA512}
_RSA = {SignatureAlgorithmOID.RSA_WITH_SHA256, SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512, SignatureAlgorithmOID.RSASSA_PSS}
_DNS_TEMPLATE = re.compile(r"^[a-z0-9.{}-]+$")


class PolicyError(ValueError):
    """The CSR may not be signed; ``code`` is machine-readable, ``reason`` says why for a human."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


BAD_REQUEST = "bad_request"
BAD_SIGNATURE = "bad_signature"
KEY_NOT_ALLOWED = "key_not_allowed"
NAME_NOT_ALLOWED = "name_not_allowed"


@dataclass(frozen=True)
class IssuancePolicy:
    """The trust domain, certificate lifetime and the only DNS names a node may ask for."""

    trust_domain: str
    lifetime: timedelta = timedelta(hours=1)
    backdate: timedelta = timedelta(seconds=60)
    """notBefore is set this far in the past so robots whose clocks lag a little accept the cert."""
    dns_templates: tuple[str, ...] = ()
    """e.g. '{node}.robots.example.com': a node may ask for these names with its own id filled in."""
    min_rsa_bits: int = 2048

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.lifetime <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, not {self.lifetime}")
        if self.backdate < timedelta(0) or self.backdate > timedelta(hours=1):
            raise ValueError(f"backdate must be between 0 and 1 h, not {self.backdate}")
        for template in self.dns_templates:
            if template.count("{node}") != 1 or not _DNS_TEMPLATE.match(template.replace("{node}", "")):
                raise ValueError(f"DNS template {template!r} must contain '{{node}}' once and otherwise "
                                 "only lowercase letters, digits, '.' and '-'")

    def dns_names_for(self, node_id: str) -> set[str]:
        """The DNS names ``node_id`` may have in its certificate."""
        return {template.replace("{node}", node_id.lower()) for template in self.dns_templates}


@dataclass(frozen=True)
class Approved:
    """Everything the CA needs to sign: checked key, node and names."""

    node_id: str
    spiffe_id: str
    public_key: CertificatePublicKey
    dns_names: tuple[str, ...] = ()
    spki: bytes | None = None
    """The key's SubjectPublicKeyInfo as the request carried it, when that is already canonical DER
    (`csr.canonical_spki`); the CA then need not encode the key again."""


def _verify_ec(csr: x509.CertificateSigningRequest, key: ec.EllipticCurvePublicKey) -> None:
    if key.curve.name not in ALLOWED_CURVES:
        raise PolicyError(KEY_NOT_ALLOWED, f"EC curve {key.curve.name} is not allowed; use P-256 or P-384")
    if csr.signature_algorithm_oid not in _ECDSA:
        raise PolicyError(BAD_SIGNATURE, f"signature algorithm {csr.signature_algorithm_oid.dotted_string} "
                          "does not match an EC key (expected ECDSA with SHA-256/384/512)")
    algorithm = csr.signature_hash_algorithm
    assert algorithm is not None  # every OID in _ECDSA names a hash
    ecdsa.verify(key, csr.signature, csr.tbs_certrequest_bytes, algorithm)


def _verify_rsa(csr: x509.CertificateSigningRequest, key: rsa.RSAPublicKey, min_bits: int) -> None:
    if key.key_size < min_bits:
        raise PolicyError(KEY_NOT_ALLOWED,
                          f"RSA key of {key.key_size} bits is too small (minimum {min_bits})")
    if csr.signature_algorithm_oid not in _RSA:
        raise PolicyError(BAD_SIGNATURE, f"signature algorithm {csr.signature_algorithm_oid.dotted_string} "
                          "is not allowed for an RSA key (expected SHA-256/384/512 or PSS)")
    if not csr.is_signature_valid:
        raise InvalidSignature()


def check_key_and_signature(csr: x509.CertificateSigningRequest, min_rsa_bits: int = 2048
                            ) -> CertificatePublicKey:
    """Node-independent checks: the key type is allowed and the CSR is signed by that key."""
    try:
        key = csrmod.public_key(csr)
    except csrmod.CsrError as exc:
        raise PolicyError(KEY_NOT_ALLOWED, exc.reason) from None
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            _verify_ec(csr, key)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if csr.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
                raise PolicyError(BAD_SIGNATURE, "an Ed25519 key must sign the request with Ed25519")
            key.verify(csr.signature, csr.tbs_certrequest_bytes)
        elif isinstance(key, rsa.RSAPublicKey):
            _verify_rsa(csr, key, min_rsa_bits)
        else:
            kind = type(key).__name__.removeprefix("_")
            raise PolicyError(KEY_NOT_ALLOWED, f"{kind} keys are not allowed; use ECDSA P-256/P-384, Ed25519 "
                              "or RSA >= 2048")
    except InvalidSignature:
        raise PolicyError(BAD_SIGNATURE, "the request's self-signature does not verify with its own public "
                          "key (altered request or signed with another key)") from None
    except UnsupportedAlgorithm as exc:
        raise PolicyError(BAD_SIGNATURE, f"unsupported signature algorithm: {exc}") from None
    return key


def _check_subject(csr: x509.CertificateSigningRequest, node_id: str) -> None:
    for attribute in csr.subject:
        if attribute.oid != NameOID.COMMON_NAME:
            raise PolicyError(NAME_NOT_ALLOWED, f"subject attribute {attribute.rfc4514_string()} is not "
                              f"allowed; the subject must be empty or CN={node_id}")
        if attribute.value != node_id:
            raise PolicyError(NAME_NOT_ALLOWED, f"subject CN={attribute.value!s} asks for another node; "
                              f"this request is authorised for node {node_id}")


def _check_san(general_names: x509.SubjectAlternativeName, node_id: str, policy: IssuancePolicy
               ) -> list[str]:
    spiffe_id = robot_id(policy.trust_domain, node_id)
    allowed_dns = policy.dns_names_for(node_id)
    dns: list[str] = []
    for name in general_names:
        if isinstance(name, x509.UniformResourceIdentifier):
            if name.value != spiffe_id:
                raise PolicyError(NAME_NOT_ALLOWED, f"URI SAN {name.value} is not allowed; the only URI "
                                  f"this request may name is {spiffe_id}")
        elif isinstance(name, x509.DNSName):
            if name.value.lower() not in allowed_dns:
                allowed = ", ".join(sorted(allowed_dns)) or "none"
                raise PolicyError(NAME_NOT_ALLOWED, f"DNS SAN {name.value} is not allowed for node "
                                  f"{node_id} (allowed: {allowed})")
            if name.value.lower() not in dns:
                dns.append(name.value.lower())
        else:
            raise PolicyError(NAME_NOT_ALLOWED, f"{type(name).__name__} SANs are not allowed "
                              "(only this node's SPIFFE ID and its allowed DNS names)")
    return dns


def check_names(csr: x509.CertificateSigningRequest, node_id: str, policy: IssuancePolicy
                ) -> tuple[str, ...]:
    """Node-bound checks: the CSR names nothing but ``node_id``; returns the allowed DNS names asked for."""
    _check_subject(csr, node_id)
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise PolicyError(BAD_REQUEST, f"the request's extensions do not parse: {exc}") from None
    dns: list[str] = []
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            dns = _check_san(value, node_id, policy)
        elif isinstance(value, x509.BasicConstraints) and value.ca:
            raise PolicyError(NAME_NOT_ALLOWED, "the request asks for a CA certificate (basicConstraints "
                              "CA:TRUE); robots get end-entity certificates only")
    return tuple(dns)


def approve(csr: x509.CertificateSigningRequest, node_id: str, policy: IssuancePolicy,
            key: CertificatePublicKey | None = None) -> Approved:
    """All checks for issuing ``csr`` to ``node_id``. Pass ``key`` if the signature was checked already:
    it must be what `check_key_and_signature` returned for this very ``csr`` (whose SPKI bytes the
    certificate then carries when they are canonical)."""
    try:
        check_node_id(node_id)
    except ValueError as exc:
        raise PolicyError(NAME_NOT_ALLOWED, str(exc)) from None
    checked = key if key is not None else check_key_and_signature(csr, policy.min_rsa_bits)
    dns = check_names(csr, node_id, policy)
    try:
        spki = csrmod.canonical_spki(csr)
    except csrmod.CsrError:
        spki = None
    return Approved(node_id, robot_id(policy.trust_domain, node_id), checked, dns, spki)
