"""Certificates the CA encodes itself are byte for byte what cryptography's CertificateBuilder writes."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorguard import der
from tensorguard.server.ca import CertificateAuthority
from tensorguard.server.csr import canonical_spki
from tensorguard.server.policy import approve

from .helpers import NOW, make_ca, make_csr, p256, spiffe

NODE = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def _key_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def builder_reference(ca: CertificateAuthority, issued: x509.Certificate, subject: x509.Name,
                      names: list[x509.GeneralName], key: object, not_before: datetime, not_after: datetime,
                      eku: list[x509.ObjectIdentifier]) -> x509.Certificate:
    """The certificate as cryptography's builder writes it (same serial, key and validity)."""
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
               .public_key(key).serial_number(issued.serial_number)  # type: ignore[arg-type]
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(isinstance(key, rsa.RSAPublicKey)), critical=True)
               .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
               .add_extension(aki, critical=False))
    return builder.sign(ca.key, hashes.SHA256())


def _check_same(ca: CertificateAuthority, ours: x509.Certificate, reference: x509.Certificate) -> None:
    assert ours.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == reference.signature_algorithm_oid
    key = ca.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(ours.signature, ours.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("der") / "ca", dns_templates=("{node}.robots.test", "{node}.b.test"))


PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
KEYS: dict[str, Callable[[], PrivateKey]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_robot_certificates_match_the_builder_for_every_key_type(ca: CertificateAuthority, kind: str) -> None:
    key = KEYS[kind]()
    dns = [x509.DNSName("r-1.robots.test"), x509.DNSName("r-1.b.test")]
    csr = make_csr(key, cn="r-1", sans=[x509.UniformResourceIdentifier(spiffe("r-1")), *dns],
                   algorithm=None if kind == "ed25519" else hashes.SHA256())
    now = NOW + timedelta(microseconds=987654)  # fractions of a second are dropped, as the builder does
    ours = ca.sign(approve(csr, "r-1", ca.policy), now)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r-1")])
    reference = builder_reference(ca, ours, subject, [x509.UniformResourceIdentifier(spiffe("r-1")), *dns],
                                  csr.public_key(), now - ca.policy.backdate, now + ca.policy.lifetime,
                                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    _check_same(ca, ours, reference)


def test_a_compressed_point_key_is_written_uncompressed_as_the_builder_does(ca: CertificateAuthority) -> None:
    key = p256()
    compressed = key.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.CompressedPoint)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), compressed)
    ours = ca.sign(approve(make_csr(key), "r-2", ca.policy, public), NOW)
    reference = builder_reference(ca, ours, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r-2")]),
                                  [x509.UniformResourceIdentifier(spiffe("r-2"))], public,
                                  NOW - ca.policy.backdate, NOW + ca.policy.lifetime,
                                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    _check_same(ca, ours, reference)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=NODE, micros=st.integers(0, 999_999), seconds=st.integers(0, 600 * 86400),
       lifetime=st.integers(1, 86400 * 800))
def test_any_node_and_time_matches_the_builder(ca: CertificateAuthority, node: str, micros: int, seconds: int,
                                                lifetime: int) -> None:
    key = p256()
    now = NOW + timedelta(seconds=seconds, microseconds=micros)
    ours = ca.sign(approve(make_csr(key, cn=node), node, ca.policy), now, timedelta(seconds=lifetime))
    not_after = min(now + timedelta(seconds=lifetime), ca.not_after)  # never outlives the intermediate
    reference = builder_reference(ca, ours, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]),
                                  [x509.UniformResourceIdentifier(spiffe(node))], key.public_key(),
                                  now - ca.policy.backdate, not_after,
                                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    _check_same(ca, ours, reference)


def test_the_api_server_certificate_matches_the_builder(ca: CertificateAuthority) -> None:
    key = p256().public_key()
    hosts = ["ca.fleet.test", "127.0.0.1", "::1"]
    ours = ca.issue_server(key, hosts, NOW, timedelta(days=30))
    names: list[x509.GeneralName] = [x509.DNSName("ca.fleet.test"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    reference = builder_reference(ca, ours, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
                                  names, key, NOW - ca.policy.backdate, NOW + timedelta(days=30),
                                  [ExtendedKeyUsageOID.SERVER_AUTH])
    _check_same(ca, ours, reference)


@pytest.mark.parametrize("when", [datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
                                  datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                                  datetime(2050, 1, 1, tzinfo=UTC), datetime(2120, 6, 1, 1, 2, 3, tzinfo=UTC)])
def test_times_switch_to_generalized_time_in_2050_like_the_builder(tmp_path: Path, when: datetime) -> None:
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(when - timedelta(days=1)).not_valid_after(when)
            .sign(key, hashes.SHA256()))
    tbs = cert.tbs_certificate_bytes
    assert der.time(when - timedelta(days=1)) + der.time(when) in tbs
    assert der.time(when)[0] == (der.UTC_TIME if when.year < 2050 else der.GENERALIZED_TIME)


@pytest.mark.parametrize(("value", "encoded"), [
    (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"), (256, "02020100"),
    (2 ** 127, "021100" + "80" + "00" * 15), (2 ** 128 - 1, "021100" + "ff" * 16)])
def test_integers_are_minimal_and_positive(value: int, encoded: str) -> None:
    assert der.integer(value).hex() == encoded


def test_negative_integers_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        der.integer(-1)


@pytest.mark.parametrize(("dotted", "encoded"), [
    ("2.5.29.17", "0603551d11"), ("1.2.840.10045.4.3.2", "06082a8648ce3d040302"),
    ("1.3.6.1.5.5.7.3.2", "06082b06010505070302"), ("2.999.3", "0603883703")])
def test_object_identifiers(dotted: str, encoded: str) -> None:
    assert der.oid(dotted).hex() == encoded


@pytest.mark.parametrize("bad", ["1", "3.1", "1.40", "a.b"])
def test_bad_object_identifiers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        der.oid(bad)


@pytest.mark.parametrize(("size", "encoded"), [(0, "00"), (127, "7f"), (128, "8180"), (255, "81ff"),
                                               (256, "820100"), (65536, "83010000")])
def test_lengths(size: int, encoded: str) -> None:
    assert der.length(size).hex() == encoded


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_key_identifier_is_cryptographys_method_1(kind: str) -> None:
    public = KEYS[kind]().public_key()
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert der.key_identifier(spki) == x509.SubjectKeyIdentifier.from_public_key(public).digest


@pytest.mark.parametrize("spki", [b"", b"\x30\x05\x30\x03\x06\x01\x00", bytes.fromhex("3007300306010004" "00"),
                                  bytes.fromhex("30 84 ff ff ff ff".replace(" ", ""))])
def test_key_identifier_refuses_broken_der(spki: bytes) -> None:
    with pytest.raises(ValueError):
        der.key_identifier(spki)


def _csr_with_compressed_point(key: ec.EllipticCurvePrivateKey, node: str) -> x509.CertificateSigningRequest:
    """A correctly self-signed PKCS#10 whose SPKI carries the compressed point (cryptography never
    writes one; other clients may)."""
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    algorithm = der.tlv(der.SEQUENCE, der.oid("1.2.840.10045.2.1") + der.oid("1.2.840.10045.3.1.7"))
    spki = der.tlv(der.SEQUENCE, algorithm + der.tlv(der.BIT_STRING, b"\x00" + point))
    info = der.tlv(der.SEQUENCE, der.integer(0) + der.common_name(node) + spki + b"\xa0\x00")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_csr(der.tlv(der.SEQUENCE, info + der.ECDSA_WITH_SHA256
                                          + der.tlv(der.BIT_STRING, b"\x00" + signature)))


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_canonical_spki_is_exactly_what_the_ca_would_encode(kind: str) -> None:
    key = KEYS[kind]()
    csr = make_csr(key, algorithm=None if kind == "ed25519" else hashes.SHA256())
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert canonical_spki(csr) == (None if kind == "rsa2048" else spki)


def test_a_request_with_a_compressed_point_gets_the_uncompressed_key_in_its_certificate(
        ca: CertificateAuthority) -> None:
    key = p256()
    csr = _csr_with_compressed_point(key, "r-3")
    assert canonical_spki(csr) is None
    approved = approve(csr, "r-3", ca.policy)
    assert approved.spki is None
    cert = ca.sign(approved, NOW)
    assert cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_sign_der_reports_the_serial_and_dates_it_encoded(ca: CertificateAuthority) -> None:
    csr = make_csr(p256(), cn="r-4")
    now = NOW + timedelta(microseconds=123456)
    signed = ca.sign_der(approve(csr, "r-4", ca.policy), now)
    cert = x509.load_der_x509_certificate(signed.der)
    assert signed.serial == cert.serial_number
    assert signed.not_before == cert.not_valid_before.replace(tzinfo=UTC)
    assert signed.not_after == cert.not_valid_after.replace(tzinfo=UTC)
    assert signed.not_before.microsecond == 0 and signed.not_before.tzinfo is UTC
