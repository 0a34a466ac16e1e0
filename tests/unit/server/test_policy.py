"""Policy: what a CSR may ask for, and which keys and signatures are accepted."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from tensorguard.server import csr as csrmod
from tensorguard.server.policy import (
    BAD_SIGNATURE,
    KEY_NOT_ALLOWED,
    NAME_NOT_ALLOWED,
    IssuancePolicy,
    PolicyError,
    approve,
    check_key_and_signature,
)

from .helpers import TRUST_DOMAIN, der, make_csr, p256, spiffe, tamper_signature

POLICY = IssuancePolicy(TRUST_DOMAIN, dns_templates=("{node}.robots.fleet.test",))


def test_plain_csr_is_approved_for_its_node() -> None:
    key = p256()
    approved = approve(make_csr(key, cn="r1"), "r1", POLICY)
    assert approved.node_id == "r1"
    assert approved.spiffe_id == spiffe("r1")
    assert approved.dns_names == ()
    assert approved.public_key.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


def test_empty_subject_and_own_spiffe_id_are_allowed() -> None:
    csr = make_csr(p256(), sans=[x509.UniformResourceIdentifier(spiffe("r1"))])
    assert approve(csr, "r1", POLICY).spiffe_id == spiffe("r1")


def test_allowed_dns_name_is_kept_lowercased() -> None:
    csr = make_csr(p256(), cn="r1", sans=[x509.DNSName("R1.robots.fleet.test")])
    assert approve(csr, "r1", POLICY).dns_names == ("r1.robots.fleet.test",)


@pytest.mark.parametrize(("csr_kwargs", "needle"), [
    ({"cn": "r2"}, "asks for another node"),
    ({"cn": "r1", "attributes": [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")]}, "O=evil"),
    ({"sans": [x509.UniformResourceIdentifier(spiffe("r2"))]}, spiffe("r2")),
    ({"sans": [x509.UniformResourceIdentifier("spiffe://other.test/robot/r1")]}, "other.test"),
    ({"sans": [x509.DNSName("r2.robots.fleet.test")]}, "DNS SAN r2.robots.fleet.test is not allowed"),
    ({"sans": [x509.DNSName("ca.fleet.test")]}, "not allowed"),
    ({"sans": [x509.RFC822Name("a@b.test")]}, "RFC822Name SANs are not allowed"),
    ({"extensions": [(x509.BasicConstraints(ca=True, path_length=None), True)]}, "CA certificate"),
])
def test_names_the_node_may_not_have_are_refused(csr_kwargs: dict[str, object], needle: str) -> None:
    csr = make_csr(p256(), **csr_kwargs)  # type: ignore[arg-type]
    with pytest.raises(PolicyError) as info:
        approve(csr, "r1", POLICY)
    assert info.value.code == NAME_NOT_ALLOWED
    assert needle in info.value.reason


def test_dns_names_need_a_template() -> None:
    csr = make_csr(p256(), sans=[x509.DNSName("r1.robots.fleet.test")])
    with pytest.raises(PolicyError, match="allowed: none"):
        approve(csr, "r1", IssuancePolicy(TRUST_DOMAIN))


def test_a_tampered_signature_is_refused() -> None:
    csr = x509.load_der_x509_csr(tamper_signature(make_csr(p256(), cn="r1")))
    with pytest.raises(PolicyError) as info:
        check_key_and_signature(csr)
    assert info.value.code == BAD_SIGNATURE
    assert "self-signature does not verify" in info.value.reason


def test_a_csr_signed_by_another_key_is_refused() -> None:
    real = make_csr(p256(), cn="r1")
    forged = make_csr(p256(), cn="r1")
    # The body of one request with the signature of another: parses, does not verify.
    spliced = der(forged).replace(forged.tbs_certrequest_bytes, real.tbs_certrequest_bytes)
    with pytest.raises(PolicyError, match="self-signature"):
        check_key_and_signature(x509.load_der_x509_csr(spliced))


@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: ed25519.Ed25519PrivateKey.generate(),
    lambda: rsa.generate_private_key(65537, 2048),
], ids=["p256", "p384", "ed25519", "rsa2048"])
def test_allowed_key_types(make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = make_csr(key, cn="r1", algorithm=algorithm)
    checked = check_key_and_signature(csr)
    assert checked.public_bytes(*_spki()) == csr.public_key().public_bytes(*_spki())


@pytest.mark.parametrize(("make_key", "needle"), [
    (lambda: rsa.generate_private_key(65537, 1024), "1024 bits is too small"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1 is not allowed"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1 is not allowed"),
    (lambda: ed448.Ed448PrivateKey.generate(), "keys are not allowed"),
    (lambda: dsa.generate_private_key(2048), "keys are not allowed"),
], ids=["rsa1024", "secp256k1", "p521", "ed448", "dsa"])
def test_refused_key_types(make_key: object, needle: str) -> None:
    key = make_key()  # type: ignore[operator]
    algorithm = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256()
    with pytest.raises(PolicyError) as info:
        check_key_and_signature(make_csr(key, cn="r1", algorithm=algorithm))
    assert info.value.code == KEY_NOT_ALLOWED
    assert needle in info.value.reason


def test_sha1_signatures_are_refused() -> None:
    with pytest.raises(PolicyError) as info:
        check_key_and_signature(make_csr(p256(), cn="r1", algorithm=hashes.SHA1()))
    assert info.value.code == BAD_SIGNATURE


def test_fast_key_path_matches_the_generic_decoder() -> None:
    for key in (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
                ed25519.Ed25519PrivateKey.generate()):
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        csr = make_csr(key, cn="r1", algorithm=algorithm)
        fast = csrmod.public_key(csr)
        assert type(fast).__name__ == type(csr.public_key()).__name__
        assert fast.public_bytes(*_spki()) == csrmod.spki_der(csr)  # type: ignore[attr-defined]


def test_bad_node_ids_are_refused() -> None:
    with pytest.raises(PolicyError, match="node id"):
        approve(make_csr(p256()), "../etc", POLICY)


@pytest.mark.parametrize("kwargs", [
    {"trust_domain": "Fleet.Test"},
    {"trust_domain": "fleet.test", "lifetime": timedelta(0)},
    {"trust_domain": "fleet.test", "backdate": timedelta(hours=2)},
    {"trust_domain": "fleet.test", "dns_templates": ("robots.fleet.test",)},
    {"trust_domain": "fleet.test", "dns_templates": ("{node}.*.test",)},
])
def test_policy_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        IssuancePolicy(**kwargs)  # type: ignore[arg-type]


def _spki() -> tuple[object, object]:
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
