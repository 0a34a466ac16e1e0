"""DER written directly, for the few fixed shapes TensorGuard encodes itself: the CA's certificates
(a TBS of fixed shape, signed over its SHA-256 digest; cryptography's builder took ~140 us per
certificate, this ~57 us, measured; tests check the bytes equal the builder's output) and the CSR a
PKCS#11 token signs (identity.pkcs11). Standard library only, so the agent and the server share it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

SEQUENCE, SET, OCTET_STRING, BIT_STRING, INTEGER, BOOLEAN_TRUE = 0x30, 0x31, 0x04, 0x03, 0x02, b"\x01\x01\xff"
UTF8_STRING, UTC_TIME, GENERALIZED_TIME = 0x0C, 0x17, 0x18
URI_NAME, DNS_NAME = 0x86, 0x82
"""GeneralName choices [6] uniformResourceIdentifier and [2] dNSName (IA5String, implicit tags)."""
ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
"""AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758: no parameters)."""
_VERSION_3 = bytes.fromhex("a003020102")
_COMMON_NAME = bytes.fromhex("0603550403")


def length(size: int) -> bytes:
    """A DER length: short form below 128, else long form with the fewest octets."""
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    """One element: tag, length, content."""
    return bytes([tag]) + length(len(content)) + content


def integer(value: int) -> bytes:
    """A non-negative INTEGER in its shortest two's-complement form (a leading 0 if the top bit is set)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"{dotted!r} is not an object identifier")
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out.extend(reversed(chunk))
    return tlv(0x06, bytes(out))


def time(value: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds, UTC."""
    utc = value.astimezone(UTC) if value.tzinfo is not None else value
    if 1950 <= utc.year < 2050:
        return tlv(UTC_TIME, utc.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(GENERALIZED_TIME, utc.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def whole_seconds(value: datetime) -> datetime:
    """The instant `time` encodes for ``value``, as an aware UTC datetime (naive means UTC there too)."""
    utc = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return utc.replace(microsecond=0)


def common_name(value: str) -> bytes:
    """The Name ``CN=<value>`` (UTF8String, as cryptography writes a common name)."""
    attribute = tlv(SEQUENCE, _COMMON_NAME + tlv(UTF8_STRING, value.encode("utf-8")))
    return tlv(SEQUENCE, tlv(SET, attribute))


def general_names(uris: Iterable[str], dns_names: Iterable[str]) -> bytes:
    """A subjectAltName value: URIs first, then DNS names (IA5String, so ASCII only)."""
    names = [tlv(URI_NAME, uri.encode("ascii")) for uri in uris]
    names.extend(tlv(DNS_NAME, name.encode("ascii")) for name in dns_names)
    return tlv(SEQUENCE, b"".join(names))


def extension(oid_der: bytes, critical: bool, value: bytes) -> bytes:
    """One Extension; ``critical`` FALSE is the DEFAULT, so it is left out."""
    return tlv(SEQUENCE, oid_der + (BOOLEAN_TRUE if critical else b"") + tlv(OCTET_STRING, value))


def read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at ``pos``; ValueError if it overruns."""
    if pos + 2 > len(data):
        raise ValueError("DER element is truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first >= 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("DER element has an invalid length")
        first = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + first > len(data):
        raise ValueError("DER element is truncated")
    return tag, pos, pos + first


def tbs_issuer(tbs: bytes) -> bytes:
    """The issuer Name (DER) of a TBSCertificate: after the optional [0] version, serial and signature."""
    _, pos, _ = read(tbs, 0)
    tag, _, end = read(tbs, pos)
    if tag == 0xA0:  # version
        tag, _, end = read(tbs, end)
    _, _, after_signature = read(tbs, end)  # ``end`` was the serial's end
    _, _, after_issuer = read(tbs, after_signature)
    return tbs[after_signature:after_issuer]


def key_identifier(spki: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits of a SubjectPublicKeyInfo."""
    _, start, _ = read(spki, 0)
    _, _, after_algorithm = read(spki, start)
    tag, bits, end = read(spki, after_algorithm)
    if tag != BIT_STRING or bits == end:
        raise ValueError("SubjectPublicKeyInfo has no public key BIT STRING")
    return hashlib.sha1(spki[bits + 1:end], usedforsecurity=False).digest()


def tbs_certificate(serial: int, issuer: bytes, validity: tuple[datetime, datetime], subject: bytes,
                    spki: bytes, *, extensions: Sequence[bytes]) -> bytes:
    """A v3 TBSCertificate signed with ecdsa-with-SHA256; ``issuer``, ``subject`` and ``spki`` are DER."""
    return tlv(SEQUENCE, b"".join((
        _VERSION_3, integer(serial), ECDSA_WITH_SHA256, issuer,
        tlv(SEQUENCE, time(validity[0]) + time(validity[1])), subject, spki,
        tlv(0xA3, tlv(SEQUENCE, b"".join(extensions))))))


def certificate(tbs: bytes, signature: bytes) -> bytes:
    """Certificate = TBS, the ecdsa-with-SHA256 identifier and the DER ECDSA signature as a BIT STRING."""
    return tlv(SEQUENCE, tbs + ECDSA_WITH_SHA256 + tlv(BIT_STRING, b"\x00" + signature))
