"""Turning an EST request body into a parsed CSR and its public key, fast and with exact errors.

OpenSSL 3's generic key decoder costs ~0.2 ms per key; for the key types robots use (EC P-256/P-384,
Ed25519) the SubjectPublicKeyInfo has a fixed DER prefix, so the key is rebuilt from its raw bytes
instead (about ten times faster). Other keys take the generic path.

Before cryptography parses a request, `csrcheck` walks its DER strictly: a malformed or unreadable
part is refused with a reason naming it, never an exception from inside cryptography (an HTTP 500).
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import der
from .csrcheck import NOT_A_CSR, CsrError, check_request, element, object_identifier, oid_name

__all__ = ["CsrError", "canonical_spki", "decode_body", "load_der", "public_key", "spki_der"]

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


_PEM = re.compile(rb"-----BEGIN (NEW )?CERTIFICATE REQUEST-----(.*?)-----END (NEW )?CERTIFICATE REQUEST-----",
                  re.DOTALL)
_LAZY_FAILURES = (ValueError, KeyError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
"""What cryptography 38 raises reading hostile extensions it parses only on demand (a directoryName
whose value is an INTEGER is a KeyError, an x400Address an UnsupportedGeneralNameType)."""


def _pem_der(text: bytes) -> bytes:
    match = _PEM.match(text)
    if match is None:
        raise CsrError("PEM certificate request does not parse: no matching '-----END CERTIFICATE "
                       "REQUEST-----' line")
    try:
        return base64.b64decode(match.group(2).translate(None, _WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        raise CsrError("PEM certificate request does not parse: the text between its BEGIN and END lines "
                       "is not base64") from None


def _base64_der(text: bytes) -> bytes:
    try:
        return base64.b64decode(text.translate(None, _WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        raise CsrError("body is neither base64 (RFC 7030 application/pkcs10) nor a PEM certificate "
                       "request") from None


def load_der(data: bytes) -> x509.CertificateSigningRequest:
    """A request that passed `csrcheck.check_request`, with its extensions read once (cryptography caches
    them) so that nothing later trips over them."""
    extensions = check_request(data)
    try:
        csr = x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CsrError(f"{NOT_A_CSR}: {exc}") from None
    try:
        _ = csr.extensions
    except _LAZY_FAILURES as exc:
        raise CsrError(f"the request's extensions ({', '.join(extensions)}) do not parse: "
                       f"{str(exc) or type(exc).__name__}") from None
    return csr


def decode_body(body: bytes) -> x509.CertificateSigningRequest:
    """RFC 7030 sends base64 DER (line breaks allowed); PEM is accepted as a convenience."""
    stripped = body.strip(_WHITESPACE)
    if not stripped:
        raise CsrError("empty body: expected a base64 DER PKCS#10 certificate request")
    if not stripped.startswith(PEM_MARKERS):
        return load_der(_base64_der(stripped))
    data = _pem_der(stripped)
    try:
        return load_der(data)
    except CsrError as exc:
        raise CsrError(f"PEM certificate request does not parse: {exc.reason}") from None


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
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrError(_undecodable_key(spki, exc)) from None


def _undecodable_key(spki: bytes, exc: Exception) -> str:
    """Why a key cryptography could not load is refused, named by its algorithm."""
    algorithm = oid_name(_key_algorithm(spki))
    label = algorithm if algorithm[0].isalpha() else f"algorithm {algorithm}"
    if algorithm == "id-ecPublicKey":
        return (f"the request's public key ({label}) cannot be decoded: its curve is explicit parameters, "
                "an unknown curve or a bad point; use the named curve P-256 or P-384")
    first = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"the request's public key ({label}) cannot be decoded: {first.split('. ')[0]}"


def _key_algorithm(spki: bytes) -> str:
    """The dotted algorithm OID of a SubjectPublicKeyInfo (which `csrcheck` already found well formed)."""
    outer = element(spki, 0, len(spki), "subjectPublicKeyInfo")
    algorithm = element(spki, outer.start, outer.end, "subjectPublicKeyInfo algorithm")
    return object_identifier(spki, element(spki, algorithm.start, algorithm.end, "algorithm"), "algorithm")
