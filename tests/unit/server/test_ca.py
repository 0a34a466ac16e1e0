"""The CA: directory layout and modes, offline root, and every field of an issued certificate."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier

from tensorguard.server.ca import CAError, CAPaths, CertificateAuthority, init_ca, read_trust_domain
from tensorguard.server.files import InsecureKeyFile
from tensorguard.server.policy import IssuancePolicy, PolicyError

from .helpers import NOW, TRUST_DOMAIN, make_ca, make_csr, p256, spiffe

LEAF_EXTENSIONS = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
                   ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                   ExtensionOID.AUTHORITY_KEY_IDENTIFIER}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == issuer.subject


def test_init_writes_keys_0600_and_a_valid_chain(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    paths = CAPaths(tmp_path / "ca")
    for key in (paths.root_key, paths.intermediate_key, paths.server_key):
        assert _mode(key) == 0o600
    for cert in (paths.root_cert, paths.intermediate_cert, paths.server_cert, paths.bundle):
        assert _mode(cert) == 0o644
    assert _mode(paths.directory) == 0o700
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    inter = x509.load_pem_x509_certificate(paths.intermediate_cert.read_bytes())
    _verify(root, root)
    _verify(inter, root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    inter_bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert inter_bc.critical and inter_bc.value.ca and inter_bc.value.path_length == 0
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    _verify(server, inter)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert read_trust_domain(paths.directory) == TRUST_DOMAIN
    assert ca.cert == inter


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    make_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "root.key").read_bytes()
    with pytest.raises(CAError, match="already holds a CA"):
        init_ca(tmp_path / "ca", TRUST_DOMAIN, ["localhost"], NOW)
    assert (tmp_path / "ca" / "root.key").read_bytes() == before


def test_offline_root_the_ca_works_without_the_root_key(tmp_path: Path) -> None:
    make_ca(tmp_path / "ca")
    (tmp_path / "ca" / "root.key").unlink()
    ca = CertificateAuthority.load(tmp_path / "ca", IssuancePolicy(TRUST_DOMAIN))
    _verify(ca.issue(make_csr(p256(), cn="r1"), "r1", NOW), ca.cert)


@pytest.mark.parametrize("name", ["intermediate.key", "root.key"])
def test_keys_readable_by_others_are_refused(tmp_path: Path, name: str) -> None:
    make_ca(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / name, 0o640)
    with pytest.raises(InsecureKeyFile, match=f"{name}.*0640"):
        CertificateAuthority.load(tmp_path / "ca", IssuancePolicy(TRUST_DOMAIN))


def test_a_foreign_intermediate_is_refused(tmp_path: Path) -> None:
    make_ca(tmp_path / "a")
    make_ca(tmp_path / "b")
    (tmp_path / "a" / "root.crt").write_bytes((tmp_path / "b" / "root.crt").read_bytes())
    with pytest.raises(CAError, match="signature does not verify"):
        CertificateAuthority.load(tmp_path / "a", IssuancePolicy(TRUST_DOMAIN))


def test_issued_certificate_fields(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    key = p256()
    cert = ca.issue(make_csr(key, cn="robot-7"), "robot-7", NOW)
    _verify(cert, ca.cert)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robot-7")])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert {e.oid for e in cert.extensions} == LEAF_EXTENSIONS
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(spiffe("robot-7"))]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_before == (NOW - timedelta(seconds=60)).replace(tzinfo=None)
    assert cert.not_valid_after == (NOW + timedelta(hours=1)).replace(tzinfo=None)


def test_lifetime_and_backdate_follow_the_policy(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", lifetime=timedelta(minutes=10), backdate=timedelta(seconds=5))
    cert = ca.issue(make_csr(p256()), "r1", NOW)
    assert cert.not_valid_before == (NOW - timedelta(seconds=5)).replace(tzinfo=None)
    assert cert.not_valid_after == (NOW + timedelta(minutes=10)).replace(tzinfo=None)
    short = ca.issue(make_csr(p256()), "r1", NOW, lifetime=timedelta(seconds=2))
    assert short.not_valid_after == (NOW + timedelta(seconds=2)).replace(tzinfo=None)


def test_certificates_never_outlive_the_intermediate(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    late = ca.not_after - timedelta(minutes=5)
    cert = ca.issue(make_csr(p256()), "r1", late)
    assert cert.not_valid_after == ca.not_after.replace(tzinfo=None)
    with pytest.raises(CAError, match="not valid at"):
        ca.issue(make_csr(p256()), "r1", ca.not_after + timedelta(seconds=1))


def test_requested_extensions_are_not_copied(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    requested = [
        (x509.KeyUsage(True, True, True, True, True, True, True, False, False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.OCSPNoCheck(), False),
        (x509.TLSFeature([x509.TLSFeatureType.status_request]), False),
        (x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
    ]
    cert = ca.issue(make_csr(p256(), cn="r1", extensions=requested), "r1", NOW)
    assert {e.oid for e in cert.extensions} == LEAF_EXTENSIONS
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not ku.key_cert_sign and not ku.content_commitment
    assert ExtendedKeyUsageOID.CODE_SIGNING not in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value


def test_dns_names_only_when_the_policy_allows_them(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", dns_templates=("{node}.robots.fleet.test",))
    cert = ca.issue(make_csr(p256(), sans=[x509.DNSName("r1.robots.fleet.test")]), "r1", NOW)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(spiffe("r1")), x509.DNSName("r1.robots.fleet.test")]
    with pytest.raises(PolicyError):
        ca.issue(make_csr(p256(), sans=[x509.DNSName("r2.robots.fleet.test")]), "r1", NOW)


def test_key_usage_by_key_type(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    rsa_cert = ca.issue(make_csr(rsa.generate_private_key(65537, 2048), cn="r1"), "r1", NOW)
    assert rsa_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    ed_cert = ca.issue(make_csr(ed25519.Ed25519PrivateKey.generate(), algorithm=None), "r1", NOW)
    assert isinstance(ed_cert.public_key(), ed25519.Ed25519PublicKey)
    assert not ed_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    _verify(ed_cert, ca.cert)


def test_serials_are_random_positive_128_bit_and_unique(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    csr = make_csr(p256())
    serials = [ca.issue(csr, "r1", NOW).serial_number for _ in range(1000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**128 for s in serials)
    assert max(serials).bit_length() > 120  # random over the full range, not a counter
