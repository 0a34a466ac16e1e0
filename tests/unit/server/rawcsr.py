"""Hand-assembled PKCS#10 requests (with tensorguard.der), for the shapes cryptography refuses to build."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tensorguard import der

COMMON_NAME = der.oid("2.5.4.3")
ORGANIZATION = der.oid("2.5.4.10")
EXTENSION_REQUEST = der.oid("1.2.840.113549.1.9.14")
SUBJECT_ALT_NAME = der.oid("2.5.29.17")
BASIC_CONSTRAINTS = der.oid("2.5.29.19")
ISSUER_ALT_NAME = der.oid("2.5.29.18")
UTF8, PRINTABLE, IA5, UNIVERSAL, BMP = 0x0C, 0x13, 0x16, 0x1C, 0x1E
OTHER_NAME, RFC822, DNS, X400, DIRECTORY, EDI_PARTY, URI, IP, REGISTERED_ID = (
    0xA0, 0x81, 0x82, 0xA3, 0xA4, 0xA5, 0x86, 0x87, 0x88)
"""GeneralName choices as their (implicit or explicit) context tags."""
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def name(*attributes: tuple[bytes, bytes]) -> bytes:
    """A Name with one RDN per (attribute OID DER, value TLV) pair."""
    return der.tlv(der.SEQUENCE, b"".join(der.tlv(der.SET, der.tlv(der.SEQUENCE, oid + value))
                                          for oid, value in attributes))


def cn(tag: int, content: bytes) -> bytes:
    """The Name CN=<content> with the value under ``tag`` (any tag, any bytes)."""
    return name((COMMON_NAME, der.tlv(tag, content)))


def extension(oid: bytes, value: bytes, critical: bool = False) -> bytes:
    return der.extension(oid, critical, value)


def san(*names: bytes) -> bytes:
    """A subjectAltName extension holding the given GeneralName TLVs."""
    return extension(SUBJECT_ALT_NAME, der.tlv(der.SEQUENCE, b"".join(names)))


def spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def extension_request(extensions: Sequence[bytes]) -> bytes:
    """The [0] attributes of a request asking for ``extensions`` (none: an empty [0])."""
    if not extensions:
        return der.tlv(0xA0, b"")
    attribute = der.tlv(der.SEQUENCE, EXTENSION_REQUEST + der.tlv(der.SET, der.tlv(der.SEQUENCE,
                                                                                    b"".join(extensions))))
    return der.tlv(0xA0, attribute)


def info(key: PrivateKey, subject: bytes = b"\x30\x00", extensions: Sequence[bytes] = (),
         *, attributes: bytes | None = None, version: bytes = b"\x02\x01\x00") -> bytes:
    """A CertificationRequestInfo with ``key``'s SubjectPublicKeyInfo."""
    tail = extension_request(extensions) if attributes is None else attributes
    return der.tlv(der.SEQUENCE, version + subject + spki(key) + tail)


def signed(key: ec.EllipticCurvePrivateKey, request_info: bytes) -> bytes:
    """The CertificationRequest of ``request_info``, correctly self-signed with ECDSA-SHA256."""
    signature = key.sign(request_info, ec.ECDSA(hashes.SHA256()))
    return der.tlv(der.SEQUENCE, request_info + der.ECDSA_WITH_SHA256 + der.tlv(der.BIT_STRING,
                                                                                 b"\x00" + signature))


def request(key: ec.EllipticCurvePrivateKey, subject: bytes = b"\x30\x00", extensions: Sequence[bytes] = (),
            **kwargs: bytes) -> bytes:
    """A whole signed request: ``subject`` Name DER, ``extensions`` Extension DERs."""
    return signed(key, info(key, subject, extensions, **kwargs))
