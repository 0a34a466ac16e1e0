"""Odd but well-formed-enough requests get a 400 naming what is wrong, audited, from both EST endpoints."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Iterator, Mapping
from datetime import timedelta

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tensorguard import der
from tensorguard.server.app import create_app
from tensorguard.server.est import EstFastPath
from tensorguard.server.settings import ServerSettings
from tensorguard.server.store import SQLiteStore
from tensorguard.server.tokens import new_token, token_hash

from . import rawcsr as raw
from .helpers import NOW, b64, make_ca, make_csr, p256, spiffe

EST = "/.well-known/est"
NODE = "r1"
KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
GOOD_URI = raw.URI, spiffe(NODE).encode()


def _signed(subject: bytes = b"\x30\x00", extensions: tuple[bytes, ...] = (), **kwargs: bytes) -> bytes:
    return raw.request(KEY, subject, extensions, **kwargs)


def _unsigned(request_info: bytes, signature: bytes = b"\x00\x30\x00") -> bytes:
    return der.tlv(der.SEQUENCE, request_info + der.ECDSA_WITH_SHA256 + der.tlv(der.BIT_STRING, signature))


def _spki(algorithm: str, parameters: bytes, key: bytes) -> bytes:
    identifier = der.tlv(der.SEQUENCE, der.oid(algorithm) + parameters)
    return der.tlv(der.SEQUENCE, identifier + der.tlv(der.BIT_STRING, key))


def _with_spki(spki: bytes) -> bytes:
    return _unsigned(der.tlv(der.SEQUENCE, b"\x02\x01\x00\x30\x00" + spki + b"\xa0\x00"))


def _body(element: bytes) -> bytes:
    """The content of a DER element (what follows its tag and length)."""
    _, start, _ = der.read(element, 0)
    return element[start:]


def _relength(element: bytes, octets: int) -> bytes:
    """``element`` with its length written in ``octets`` long-form octets (not minimal DER)."""
    content = _body(element)
    return bytes([element[0], 0x80 | octets]) + len(content).to_bytes(octets, "big") + content


def _rsa_signed(request_info: bytes, parameters: bytes = b"\x05\x00") -> bytes:
    """An RSA request: its signature is checked by OpenSSL's own decoder, stricter than cryptography's."""
    algorithm = der.tlv(der.SEQUENCE, der.oid("1.2.840.113549.1.1.11") + parameters)
    signature = RSA_KEY.sign(request_info, padding.PKCS1v15(), hashes.SHA256())
    return der.tlv(der.SEQUENCE, request_info + algorithm + der.tlv(der.BIT_STRING, b"\x00" + signature))


def _challenge(value: bytes) -> bytes:
    """[0] attributes holding one challengePassword with ``value``."""
    return der.tlv(0xA0, der.tlv(der.SEQUENCE, der.oid("1.2.840.113549.1.9.7") + der.tlv(der.SET, value)))


_GOOD = _signed(raw.cn(raw.UTF8, NODE.encode()), (raw.san(der.tlv(*GOOD_URI)),))
_INFO = raw.info(KEY, raw.cn(raw.UTF8, NODE.encode()))
_P256 = der.oid("1.2.840.10045.3.1.7")

CASES: list[tuple[str, bytes, str]] = [
    # Subject attribute values: wrong string encodings and non-string types.
    ("bmp-odd-length", _signed(raw.cn(raw.BMP, b"\x00r\x001\x00")), "commonName is a BMPString of 5 bytes"),
    ("bmp-lone-surrogate", _signed(raw.cn(raw.BMP, b"\xd8\x00")), "commonName is not valid BMPString"),
    ("universal-length", _signed(raw.cn(raw.UNIVERSAL, b"\x00\x00\x00r\x00")),
     "commonName is a UniversalString of 5 bytes"),
    ("universal-code-point", _signed(raw.cn(raw.UNIVERSAL, b"\x00\x11\x00\x00")),
     "commonName is not valid UniversalString"),
    ("universal-surrogate", _signed(raw.cn(raw.UNIVERSAL, b"\x00\x00\xdc\x00")),
     "commonName is not valid UniversalString"),
    ("cn-integer", _signed(raw.cn(der.INTEGER, b"\x05")), "subject attribute 1: commonName is an INTEGER, expected a string"),
    ("cn-boolean", _signed(raw.cn(0x01, b"\xff")), "commonName is a BOOLEAN, expected a string"),
    ("cn-sequence", _signed(raw.cn(der.SEQUENCE, b"")), "commonName is a SEQUENCE, expected a string"),
    ("cn-bit-string", _signed(raw.cn(der.BIT_STRING, b"\x00r1")), "commonName is a BIT STRING, expected"),
    ("cn-octet-string", _signed(raw.cn(der.OCTET_STRING, b"r1")), "commonName is an OCTET STRING, expected"),
    ("cn-videotex", _signed(raw.cn(0x15, b"r1")), "commonName is a VideotexString, expected"),
    ("cn-general-string", _signed(raw.cn(0x1B, b"r1")), "commonName is a GeneralString, expected"),
    ("cn-utc-time", _signed(raw.cn(der.UTC_TIME, b"r1")), "commonName is a UTCTime, expected"),
    ("utf8-invalid", _signed(raw.cn(raw.UTF8, b"r\xff1")), "commonName is not valid UTF-8 (byte 0xff at offset 1)"),
    ("utf8-overlong", _signed(raw.cn(raw.UTF8, b"\xc0\xaf")), "commonName is not valid UTF-8"),
    ("printable-non-ascii", _signed(raw.cn(raw.PRINTABLE, b"r\xe91")),
     "commonName is not a valid PrintableString (byte 0xe9 at offset 1)"),
    ("ia5-non-ascii", _signed(raw.cn(raw.IA5, b"\xc3\xa9")), "commonName is not a valid IA5String"),
    ("organization-integer", _signed(raw.name((raw.COMMON_NAME, der.tlv(raw.UTF8, b"r1")),
                                              (raw.ORGANIZATION, der.integer(7)))),
     "subject attribute 2: organizationName is an INTEGER, expected a string"),
    ("attribute-without-value", _signed(der.tlv(der.SEQUENCE, der.tlv(der.SET, der.tlv(
        der.SEQUENCE, raw.COMMON_NAME)))), "subject attribute 1: expected an attribute type and a value"),
    ("empty-rdn", _signed(der.tlv(der.SEQUENCE, der.tlv(der.SET, b""))), "subject attribute set 1 is empty"),
    # subjectAltName choices the CA never issues, and malformed ones.
    ("san-x400", _signed(extensions=(raw.san(der.tlv(raw.X400, b"")),)),
     "subjectAltName entry 1 is an x400Address"),
    ("san-edi-party", _signed(extensions=(raw.san(der.tlv(raw.EDI_PARTY, der.tlv(0x81, b"x"))),)),
     "subjectAltName entry 1 is an ediPartyName"),
    ("san-registered-id", _signed(extensions=(raw.san(der.tlv(*GOOD_URI), der.tlv(raw.REGISTERED_ID, b"\x2a\x03")),)),
     "subjectAltName entry 2 is a registeredID"),
    ("san-other-name", _signed(extensions=(raw.san(der.tlv(raw.OTHER_NAME, der.oid("1.2.3") + der.tlv(
        0xA0, der.tlv(raw.UTF8, b"x")))),)), "subjectAltName entry 1 is an otherName"),
    ("san-directory-name", _signed(extensions=(raw.san(der.tlv(raw.DIRECTORY, raw.cn(raw.UTF8, b"r1"))),)),
     "subjectAltName entry 1 is a directoryName"),
    ("san-uri-non-ascii", _signed(extensions=(raw.san(der.tlv(raw.URI, b"spiffe://\xff")),)),
     "subjectAltName entry 1 (uniformResourceIdentifier) is not ASCII (byte 0xff at offset 9)"),
    ("san-dns-non-ascii", _signed(extensions=(raw.san(der.tlv(raw.DNS, b"\xe9.test")),)),
     "subjectAltName entry 1 (dNSName) is not ASCII"),
    ("san-ip-length", _signed(extensions=(raw.san(der.tlv(raw.IP, b"\x7f\x00\x01")),)),
     "subjectAltName entry 1 (iPAddress) has 3 bytes, expected 4 (IPv4) or 16 (IPv6)"),
    ("san-unknown-tag", _signed(extensions=(raw.san(der.tlv(0x89, b"x")),)),
     "subjectAltName entry 1 has tag 0x89, which is no GeneralName"),
    ("san-not-a-sequence", _signed(extensions=(raw.extension(raw.SUBJECT_ALT_NAME, der.tlv(der.SET, b"")),)),
     "extension subjectAltName: expected a SEQUENCE of GeneralNames"),
    ("san-trailing-bytes", _signed(extensions=(raw.extension(raw.SUBJECT_ALT_NAME, b"\x30\x00\x00"),)),
     "extension subjectAltName: 1 byte after the GeneralNames"),
    ("issuer-alt-name-x400", _signed(extensions=(raw.extension(raw.ISSUER_ALT_NAME, der.tlv(
        der.SEQUENCE, der.tlv(raw.X400, b""))),)), "issuerAltName"),
    # Extensions.
    ("duplicate-extension", _signed(extensions=(raw.san(der.tlv(*GOOD_URI)), raw.san(der.tlv(*GOOD_URI)))),
     "extension subjectAltName (2.5.29.17) appears twice"),
    ("critical-explicit-false", _signed(extensions=(der.tlv(der.SEQUENCE, raw.SUBJECT_ALT_NAME + b"\x01\x01\x00"
                                                            + der.tlv(der.OCTET_STRING, b"\x30\x00")),)),
     "extension subjectAltName: critical FALSE must be left out"),
    ("critical-not-boolean", _signed(extensions=(der.tlv(der.SEQUENCE, raw.SUBJECT_ALT_NAME + b"\x01\x01\x01"
                                                         + der.tlv(der.OCTET_STRING, b"\x30\x00")),)),
     "extension subjectAltName: critical must be TRUE (0xff)"),
    ("extension-without-value", _signed(extensions=(der.tlv(der.SEQUENCE, raw.SUBJECT_ALT_NAME),)),
     "extension subjectAltName: expected extnID, critical and an OCTET STRING value"),
    ("two-extension-requests", _signed(attributes=der.tlv(0xA0, 2 * der.tlv(der.SEQUENCE, raw.EXTENSION_REQUEST
                                                                             + der.tlv(der.SET, b"\x30\x00")))),
     "attribute extensionRequest appears twice"),
    ("extension-request-two-values", _signed(attributes=der.tlv(0xA0, der.tlv(
        der.SEQUENCE, raw.EXTENSION_REQUEST + der.tlv(der.SET, b"\x30\x00\x30\x00")))),
     "attribute extensionRequest: expected exactly one value, got 2"),
    ("basic-constraints-garbage", _signed(extensions=(raw.extension(raw.BASIC_CONSTRAINTS, b"\x01\x01\xff"),)),
     "the request's extensions (basicConstraints) do not parse"),
    # The envelope: versions, lengths, tags, trailing data.
    ("version-1", _signed(version=b"\x02\x01\x01"), "version must be 0 (v1), not 1"),
    ("version-not-integer", _signed(version=b"\x04\x01\x00"), "version must be INTEGER 0"),
    ("trailing-data", _GOOD + b"\x00\x00", "2 bytes of trailing data after the request"),
    ("truncated", _GOOD[:-7], "runs past the end"),
    ("indefinite-length", b"\x30\x80" + _body(_GOOD) + b"\x00\x00", "indefinite length"),
    ("huge-length", b"\x30\x84\x7f\xff\xff\xff" + _body(_GOOD), "runs past the end"),
    ("length-of-nine-octets", b"\x30\x89" + b"\x00" * 8 + b"\x10" + _body(_GOOD), "length of 9 octets"),
    ("non-minimal-length", _relength(_GOOD, 3), "not in minimal DER form"),
    ("high-tag-number", b"\x1f\x81\x00" + _GOOD[1:], "multi-octet tag"),
    ("wrong-outer-tag", b"\x31" + _GOOD[1:], "not a DER PKCS#10 certificate request: expected a SEQUENCE, found a SET"),
    ("missing-signature", der.tlv(der.SEQUENCE, _INFO + der.ECDSA_WITH_SHA256), "expected 3 elements (certificationRequestInfo, signatureAlgorithm, signature), got 2"),
    ("missing-attributes", _signed(attributes=b""), "certificationRequestInfo: expected 4 elements (version, subject, subjectPublicKeyInfo, attributes), got 3"),
    # Public keys and signatures.
    ("signature-unused-bits", _unsigned(_INFO, b"\x03\x30\x00"), "signature: BIT STRING with 3 unused bits"),
    ("signature-empty-bit-string", _unsigned(_INFO, b""), "signature: empty BIT STRING"),
    ("spki-unknown-curve", _with_spki(_spki("1.2.840.10045.2.1", der.oid("1.2.3.4"), b"\x00\x04" + b"\x01" * 64)),
     "public key (id-ecPublicKey) cannot be decoded"),
    ("spki-explicit-curve", _with_spki(_spki("1.2.840.10045.2.1", der.tlv(der.SEQUENCE, der.integer(1)),
                                             b"\x00\x04" + b"\x01" * 64)),
     "public key (id-ecPublicKey) cannot be decoded"),
    ("spki-unknown-algorithm", _with_spki(_spki("1.2.3.4", b"", b"\x00\x01")),
     "public key (algorithm 1.2.3.4) cannot be decoded"),
    ("spki-bad-point", _with_spki(_spki("1.2.840.10045.2.1", _P256, b"\x00\x04" + b"\x01" * 64)),
     "p256 public key is not a valid point"),
    ("spki-unused-bits", _with_spki(_spki("1.2.840.10045.2.1", _P256, b"\x01\x04" + b"\x01" * 64)),
     "subjectPublicKey: BIT STRING with 1 unused bit"),
    ("spki-no-algorithm-oid", _with_spki(der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, b"")
                                               + der.tlv(der.BIT_STRING, b"\x00\x01"))),
     "subjectPublicKeyInfo algorithm: expected an OBJECT IDENTIFIER"),
    ("bad-oid", _with_spki(der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, b"\x06\x02\x2a\x80")
                                  + der.tlv(der.BIT_STRING, b"\x00\x01"))), "is not a valid OBJECT IDENTIFIER"),
    # What OpenSSL's decoder (RSA signatures) refuses although cryptography's parser took it (fuzz finds).
    ("rsa-end-of-contents-parameters", _rsa_signed(raw.info(RSA_KEY), b"\x00\x00"),
     "signatureAlgorithm element 2: an end-of-contents marker (tag 0)"),
    ("rsa-attribute-non-minimal-integer", _rsa_signed(raw.info(RSA_KEY, attributes=_challenge(b"\x02\x02\x00\x05"))),
     "attribute challengePassword value 1: INTEGER 0005 is not in minimal DER form"),
    ("rsa-attribute-long-boolean", _rsa_signed(raw.info(RSA_KEY, attributes=_challenge(b"\x01\x02\xff\xff"))),
     "attribute challengePassword value 1: a BOOLEAN is one octet"),
    ("rsa-null-with-content", _rsa_signed(raw.info(RSA_KEY), b"\x05\x01\x00"),
     "signatureAlgorithm parameters: a NULL has no content"),
    ("rsa-constructed-octet-string", _rsa_signed(raw.info(RSA_KEY, attributes=_challenge(b"\x24\x03\x04\x01x"))),
     "constructed encoding of a primitive type (tag 0x24), which is BER"),
    ("tampered-signature", _GOOD[:-3] + bytes([_GOOD[-3] ^ 1]) + _GOOD[-2:], "self-signature does not verify"),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstFastPath, SQLiteStore]]:
    directory = tmp_path_factory.mktemp("hostile") / "ca"
    make_ca(directory)
    store = SQLiteStore(directory / "ca.sqlite3")
    yield create_app(ServerSettings(ca_dir=directory), clock=lambda: NOW, store=store), store


def _post(target: EstFastPath, path: str, body: bytes, headers: dict[str, str],
          tls: Mapping[str, object] | None = None) -> httpx.Response:
    """POST through the real app; an exception inside it comes back as the 500 a server would send."""
    async def run() -> httpx.Response:
        async def with_tls(scope, receive, send):  # type: ignore[no-untyped-def]
            if tls is not None:
                scope.setdefault("extensions", {})["tls"] = tls
            await target(scope, receive, send)

        transport = httpx.ASGITransport(app=with_tls, raise_app_exceptions=False, client=("10.9.8.7", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="https://ca.test") as client:
            return await client.post(path, content=body, headers=headers)
    return asyncio.run(run())


def _token(store: SQLiteStore) -> str:
    token = new_token()
    store.add_token(token_hash(token), NODE, NOW, NOW + timedelta(hours=1))
    return token


def _tls(fast: EstFastPath) -> dict[str, object]:
    cert = fast.endpoints.service.ca.issue(make_csr(p256()), NODE, NOW)
    return {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))]}


@pytest.mark.parametrize(("body", "needle"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
@pytest.mark.parametrize("route", ["fast", "fastapi"])
def test_simpleenroll_refuses_with_a_reason_and_keeps_the_token(
        app: tuple[EstFastPath, SQLiteStore], body: bytes, needle: str, route: str) -> None:
    fast, store = app
    target = fast if route == "fast" else fast.fallback
    token = _token(store)
    headers = {"content-type": "application/pkcs10", "authorization": f"Bearer {token}"}
    response = _post(target, f"{EST}/simpleenroll", base64.b64encode(body), headers)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    refusal = store.audit_records("est.enroll.refused")[-1]
    assert (refusal.reason, refusal.fields.get("status")) == (response.json()["detail"], 400)
    # The token was not burnt and the server still serves: the same token now enrols a good request.
    again = _post(target, f"{EST}/simpleenroll", b64(make_csr(p256(), cn=NODE)), headers)  # type: ignore[arg-type]
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(("body", "needle"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_simplereenroll_refuses_with_a_reason(app: tuple[EstFastPath, SQLiteStore], body: bytes,
                                             needle: str) -> None:
    fast, store = app
    response = _post(fast, f"{EST}/simplereenroll", base64.b64encode(body),
                     {"content-type": "application/pkcs10"}, _tls(fast))
    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    refusal = store.audit_records("est.reenroll.refused")[-1]
    assert (refusal.reason, refusal.fields.get("status"), refusal.node) == (response.json()["detail"], 400, NODE)


def test_the_hand_built_good_request_is_issued(app: tuple[EstFastPath, SQLiteStore]) -> None:
    """The builder the cases above start from makes requests the CA signs (so each case tests one change)."""
    fast, store = app
    headers = {"content-type": "application/pkcs10", "authorization": f"Bearer {_token(store)}"}
    assert _post(fast, f"{EST}/simpleenroll", base64.b64encode(_GOOD), headers).status_code == 200
    headers = {"content-type": "application/pkcs10", "authorization": f"Bearer {_token(store)}"}
    body = base64.b64encode(_signed(raw.cn(raw.BMP, "r1".encode("utf-16-be"))))
    assert _post(fast, f"{EST}/simpleenroll", body, headers).status_code == 200


def test_an_unknown_critical_extension_is_ignored_not_copied(app: tuple[EstFastPath, SQLiteStore]) -> None:
    """The CA copies nothing from a request but its key and checked names, so a critical ask is moot."""
    fast, store = app
    headers = {"content-type": "application/pkcs10", "authorization": f"Bearer {_token(store)}"}
    body = _signed(extensions=(raw.extension(der.oid("1.2.3.4"), b"\x05\x00", critical=True),))
    response = _post(fast, f"{EST}/simpleenroll", base64.b64encode(body), headers)
    assert response.status_code == 200
    assert b"\x06\x03\x2a\x03\x04" not in base64.b64decode(response.content)


def test_pem_goes_through_the_same_checks(app: tuple[EstFastPath, SQLiteStore]) -> None:
    fast, store = app
    body = _signed(raw.cn(der.INTEGER, b"\x05"))
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(body) + b"-----END CERTIFICATE REQUEST-----\n"
    headers = {"content-type": "application/pkcs10", "authorization": f"Bearer {_token(store)}"}
    response = _post(fast, f"{EST}/simpleenroll", pem, headers)
    assert response.status_code == 400 and "commonName is an INTEGER" in response.json()["detail"]
