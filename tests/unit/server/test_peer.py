"""Client certificates: only robots of this CA's intermediate, checked by issuer bytes and signature."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tensorguard import der
from tensorguard.server.asgitls import TLSExtension
from tensorguard.server.ca import CertificateAuthority, init_ca
from tensorguard.server.peer import PeerError, PeerVerifier
from tensorguard.server.policy import IssuancePolicy

from .helpers import NOW, TRUST_DOMAIN, make_ca, make_csr, p256


def _tls(cert: x509.Certificate) -> dict[str, object]:
    return {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))]}


def test_a_robot_of_this_intermediate_is_accepted(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert = ca.issue(make_csr(p256()), "r1", NOW)
    peer = PeerVerifier(ca.cert, TRUST_DOMAIN).verify(_tls(cert), NOW)
    assert (peer.node_id, peer.serial) == ("r1", format(cert.serial_number, "x"))


def test_another_intermediate_is_named_in_the_refusal(tmp_path: Path) -> None:
    ours = make_ca(tmp_path / "ours")
    init_ca(tmp_path / "other", "other.test", ["localhost"], NOW)
    other = CertificateAuthority.load(tmp_path / "other", IssuancePolicy("other.test"))
    foreign = other.issue(make_csr(p256()), "r1", NOW)
    with pytest.raises(PeerError, match=r"issued by CN=TensorGuard Intermediate CA other\.test,O=TensorGuard, "
                       "not by this CA's intermediate"):
        PeerVerifier(ours.cert, TRUST_DOMAIN).verify(_tls(foreign), NOW)


def test_same_names_but_another_key_fails_the_signature(tmp_path: Path) -> None:
    ours, twin = make_ca(tmp_path / "ours"), make_ca(tmp_path / "twin")  # identical names, other keys
    assert ours.cert.subject == twin.cert.subject
    forged = twin.issue(make_csr(p256()), "r1", NOW)
    with pytest.raises(PeerError, match="signature does not verify"):
        PeerVerifier(ours.cert, TRUST_DOMAIN).verify(_tls(forged), NOW)


def test_a_verifier_trusting_the_handshake_still_checks_issuer_name_and_spiffe_id(tmp_path: Path) -> None:
    ours = make_ca(tmp_path / "ours")
    init_ca(tmp_path / "other", "other.test", ["localhost"], NOW)
    other = CertificateAuthority.load(tmp_path / "other", IssuancePolicy("other.test"))
    verifier = PeerVerifier(ours.cert, TRUST_DOMAIN, signature_checked_by_tls=True)
    with pytest.raises(PeerError, match="not by this CA's intermediate"):
        verifier.verify(_tls(other.issue(make_csr(p256()), "r1", NOW)), NOW)
    assert verifier.verify(_tls(ours.issue(make_csr(p256()), "r1", NOW)), NOW).node_id == "r1"


def test_dates_come_from_the_app_clock(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert = ca.issue(make_csr(p256()), "r1", NOW)
    verifier = PeerVerifier(ca.cert, TRUST_DOMAIN)
    with pytest.raises(PeerError, match="expired at"):
        verifier.verify(_tls(cert), NOW + timedelta(hours=1))
    with pytest.raises(PeerError, match="not valid before"):
        verifier.verify(_tls(cert), NOW - timedelta(minutes=2))


def test_tbs_issuer_with_and_without_the_version_field(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert = ca.issue(make_csr(p256()), "r1", NOW)
    issuer = ca.cert.subject.public_bytes()
    assert der.tbs_issuer(cert.tbs_certificate_bytes) == issuer
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v1")])
    v1 = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(7).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1)))
    v1_tbs = v1.sign(key, hashes.SHA256()).tbs_certificate_bytes
    _, start, _ = der.read(v1_tbs, 0)
    _, _, after_version = der.read(v1_tbs, start)
    without_version = der.tlv(der.SEQUENCE, v1_tbs[after_version:der.read(v1_tbs, 0)[2]])
    assert der.tbs_issuer(without_version) == name.public_bytes() == der.tbs_issuer(v1_tbs)


def test_the_tls_extension_has_the_asgi_keys_and_names_the_subject_only_when_asked(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert = ca.issue(make_csr(p256()), "r1", NOW)
    der_bytes = cert.public_bytes(serialization.Encoding.DER)
    tls = TLSExtension(der_bytes, "SERVER PEM", "TLSv1.3")
    assert "client_cert_name" not in tls._values  # not parsed until someone reads it
    assert dict(tls) == {
        "server_cert": "SERVER PEM", "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der_bytes)],
        "client_cert_name": cert.subject.rfc4514_string(), "client_cert_error": None,
        "tls_version": 0x0304, "cipher_suite": None}
    assert PeerVerifier(ca.cert, TRUST_DOMAIN).verify(tls, NOW).node_id == "r1"
    with pytest.raises(KeyError):
        tls["client_cert_der"]
    anonymous = TLSExtension(None, None, "TLSv1.2")
    assert (anonymous["client_cert_chain"], anonymous["client_cert_name"], anonymous["tls_version"]) == \
        ([], None, 0x0303)
    with pytest.raises(PeerError, match="no client certificate was presented"):
        PeerVerifier(ca.cert, TRUST_DOMAIN).verify(anonymous, NOW)
