"""RFC 7030 certs-only PKCS#7 (CMS SignedData without signers), DER-encoded by hand.

cryptography's ``serialize_certificates`` takes ~0.2 ms through OpenSSL's PKCS7 object model, which is
a large share of one issuance; the structure is fixed, so it is encoded directly here (tests check the
bytes are identical to cryptography's output).
"""

from __future__ import annotations

from collections.abc import Sequence

# ContentInfo.contentType = id-signedData; SignedData.version = 1; digestAlgorithms = {};
# encapContentInfo = { id-data, [0] empty OCTET STRING } (what OpenSSL writes).
_SIGNED_DATA_OID = bytes.fromhex("06092a864886f70d010702")
_SIGNED_DATA_HEAD = bytes.fromhex("020101" "3100" "300f06092a864886f70d010701a0020400")
_EMPTY_SET = bytes.fromhex("3100")


def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def certs_only(certificates_der: Sequence[bytes]) -> bytes:
    """A degenerate SignedData carrying ``certificates_der`` in the given order (as OpenSSL does)."""
    if not certificates_der:
        raise ValueError("a certs-only PKCS#7 needs at least one certificate")
    certs = _tlv(0xA0, b"".join(certificates_der))
    signed_data = _tlv(0x30, _SIGNED_DATA_HEAD + certs + _EMPTY_SET)
    return _tlv(0x30, _SIGNED_DATA_OID + _tlv(0xA0, signed_data))
