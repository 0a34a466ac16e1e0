"""Turning an EST request body into a parsed CSR and its public key, fast and with exact errors.

OpenSSL 3's generic key decoder costs ~0.2 ms per key; for the key types robots use (EC P-256/P-384,
Ed25519) the SubjectPublicKeyInfo has a fixed DER prefix, so the key is rebuilt from its raw bytes
instead (about ten times faster). Other keys take the generic path.
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import der

PEM_MARKERS = (b"-----BEGIN CERTIFICATE REQUEST-----", b"-----BEGIN NEW CERTIFICATE REQUEST-----")
_WHITESPACE = b" \t\r\n"

CsrPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

# DER of SubjectPublicKeyInfo up to the key bytes, for named-curve EC (uncompressed and compressed
# points) and Ed25519.
_EC_P256 = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
_EC_P384 = bytes.fromhex("301006072a8648ce3d020106052b81040022")
_SPKI_PREFIXES: dict[bytes, tuple[str, int]] = {
    bytes.fromhex("3059") + _EC_P256 + bytes.fromhex("034200"): ("p256", 65),
    bytes.fromhex("3039") + _EC_P256 + bytes.fromhex("032200"): ("p256", 33),
    bytes.fromhex("3076") + _EC_P384 + bytes.fromhex("036200"): ("p384", 97),
    bytes.fromhex("3046") + _EC_P384 + bytes.fromhex("033200"): ("p384", 49),
    bytes.fromhex("302a300506032b6570032100"): ("ed25519", 32),
}


class CsrError(ValueError):
    """The body is not a usable PKCS#10 request; ``reason`` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_body(body: bytes) -> x509.CertificateSigningRequest:
    """RFC 7030 sends base64 DER (line breaks allowed); PEM is accepted as a convenience."""
    stripped = body.strip(_WHITESPACE)
    if not stripped:
        raise CsrError("empty body: expected a base64 DER PKCS#10 certificate request")
    if stripped.startswith(PEM_MARKERS):
        try:
            return x509.load_pem_x509_csr(stripped)
        except ValueError as exc:
            raise CsrError(f"PEM certificate request does not parse: {exc}") from None
    compact = stripped.translate(None, _WHITESPACE)
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CsrError("body is neither base64 (RFC 7030 application/pkcs10) nor a PEM certificate "
                       "request") from None
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise CsrError(f"base64 decodes but is not a DER PKCS#10 certificate request: {exc}") from None


def spki_der(csr: x509.CertificateSigningRequest) -> bytes:
    """The SubjectPublicKeyInfo bytes of a parsed CSR (version, subject, then SPKI in its info)."""
    tbs = csr.tbs_certrequest_bytes
    try:
        _, start, _ = der.read(tbs, 0)  # CertificationRequestInfo SEQUENCE
        _, _, after_version = der.read(tbs, start)
        _, _, after_subject = der.read(tbs, after_version)
        _, _, end = der.read(tbs, after_subject)
    except ValueError as exc:
        raise CsrError(f"certificate request: {exc}") from None
    return tbs[after_subject:end]


_CANONICAL = {prefix: size for prefix, (kind, size) in _SPKI_PREFIXES.items() if size in (65, 97, 32)}
"""The fixed-prefix SPKIs that are already in the form cryptography writes: a named curve with an
uncompressed point (0x04 first), or Ed25519. A compressed point is not: it is re-encoded."""


def canonical_spki(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The CSR's SubjectPublicKeyInfo when its bytes are exactly what the CA would encode for that key
    (so they can go into the certificate as they are, once the key has been loaded and checked), else
    None. An EC point must also start with 0x04 (uncompressed)."""
    spki = spki_der(csr)
    for prefix, size in _CANONICAL.items():
        if len(spki) == len(prefix) + size and spki.startswith(prefix):
            return spki if size == 32 or spki[len(prefix)] == 0x04 else None
    return None


def public_key(csr: x509.CertificateSigningRequest) -> object:
    """The CSR's public key, from raw bytes where the SPKI has a known fixed prefix."""
    spki = spki_der(csr)
    for prefix, (kind, size) in _SPKI_PREFIXES.items():
        if len(spki) == len(prefix) + size and spki.startswith(prefix):
            raw = spki[len(prefix):]
            try:
                if kind == "ed25519":
                    return ed25519.Ed25519PublicKey.from_public_bytes(raw)
                curve: ec.EllipticCurve = ec.SECP256R1() if kind == "p256" else ec.SECP384R1()
                return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
            except ValueError:
                raise CsrError(f"the request's {kind} public key is not a valid point") from None
    try:
        return csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CsrError(f"the request's public key cannot be used: {exc}") from None
