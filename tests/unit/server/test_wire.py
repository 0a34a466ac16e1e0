"""Wire formats: request bodies (base64 DER, PEM, garbage) and certs-only PKCS#7 answers."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tensorguard.server.csr import CsrError, decode_body
from tensorguard.server.pkcs7 import certs_only

from .helpers import NOW, b64, der, make_ca, make_csr, p256


def test_base64_with_line_breaks_and_pem_both_decode() -> None:
    csr = make_csr(p256(), cn="r1")
    wrapped = base64.encodebytes(der(csr)).replace(b"\n", b"\r\n")
    assert decode_body(wrapped) == csr
    assert decode_body(b"  " + b64(csr) + b"\n") == csr
    assert decode_body(csr.public_bytes(serialization.Encoding.PEM)) == csr


@pytest.mark.parametrize(("body", "needle"), [
    (b"", "empty body"),
    (b"   \r\n", "empty body"),
    (b"not base64 at all!", "neither base64"),
    (b"QUJD=QUJD", "neither base64"),
    (base64.b64encode(b"\x30\x03\x02\x01\x01"), "not a DER PKCS#10"),
    (base64.b64encode(b"hello world"), "not a DER PKCS#10"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "PEM certificate"),
])
def test_garbage_is_refused_with_a_reason(body: bytes, needle: str) -> None:
    with pytest.raises(CsrError, match=needle):
        decode_body(body)


def test_truncated_der_is_refused() -> None:
    with pytest.raises(CsrError):
        decode_body(base64.b64encode(der(make_csr(p256()))[:-10]))


def test_certs_only_matches_cryptography_byte_for_byte(tmp_path: object) -> None:
    ca = make_ca(tmp_path / "ca")  # type: ignore[operator]
    leaf = ca.issue(make_csr(p256()), "r1", NOW)
    for chain in ([leaf], [ca.cert, ca.root], [ca.root, ca.cert, leaf]):
        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        expected = pkcs7.serialize_certificates(chain, serialization.Encoding.DER)
        assert certs_only(ders) == expected
        assert pkcs7.load_der_pkcs7_certificates(certs_only(ders)) == chain


def test_certs_only_needs_a_certificate() -> None:
    with pytest.raises(ValueError, match="at least one"):
        certs_only([])
