"""The CA: an offline-capable root and an online intermediate that signs robot certificates.

`init_ca` creates both keys (P-256) in a CA directory; `CertificateAuthority.load` needs only the
intermediate, so the root key can be moved off the host after init and kept offline. Certificates the
intermediate signs are encoded by `der` and signed over their SHA-256 digest (see there why).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import der
from .files import InsecureKeyFile, read_secret, write_public, write_secret
from .policy import Approved, IssuancePolicy, approve
from .spiffe import SCHEME, check_trust_domain
from .timeutil import as_utc

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=730)
SERVER_LIFETIME = timedelta(days=365)


@dataclass(frozen=True)
class Signed:
    """A certificate the CA has just signed: its DER, and the serial and dates as encoded in it."""

    der: bytes
    serial: int
    not_before: datetime
    not_after: datetime


class CAError(RuntimeError):
    """The CA directory or its keys cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CAPaths:
    """Where everything lives inside a CA directory."""

    directory: Path

    @property
    def root_key(self) -> Path:
        return self.directory / "root.key"

    @property
    def root_cert(self) -> Path:
        return self.directory / "root.crt"

    @property
    def intermediate_key(self) -> Path:
        return self.directory / "intermediate.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.directory / "intermediate.crt"

    @property
    def bundle(self) -> Path:
        """Intermediate then root: what the API server trusts client certificates against."""
        return self.directory / "ca-bundle.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def server_cert(self) -> Path:
        """The API's TLS certificate followed by the intermediate (a full chain for clients)."""
        return self.directory / "server.crt"

    @property
    def metadata(self) -> Path:
        return self.directory / "ca.json"

    @property
    def database(self) -> Path:
        return self.directory / "ca.sqlite3"


def random_serial() -> int:
    """128 random bits, positive and non-zero (RFC 5280 allows up to 20 octets)."""
    return int.from_bytes(secrets.token_bytes(16), "big") or 1


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def _ca_cert(subject: x509.Name, key: ec.EllipticCurvePublicKey, *, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, issuer_ski: x509.SubjectKeyIdentifier | None,
             path_length: int, trust_domain: str, now: datetime, lifetime: timedelta) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski or ski)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
        .serial_number(random_serial()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def _host_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def init_ca(directory: Path, trust_domain: str, host_names: list[str], now: datetime) -> None:
    """Create root, intermediate and the API's server certificate; never overwrites an existing CA."""
    check_trust_domain(trust_domain)
    if not host_names:
        raise CAError("at least one host name (or IP address) is needed for the API's certificate")
    paths = CAPaths(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [p for p in (paths.root_key, paths.intermediate_key, paths.root_cert,
                            paths.intermediate_cert, paths.metadata) if p.exists()]
    if existing:
        raise CAError(f"{directory} already holds a CA ({existing[0].name} exists); refusing to overwrite it")
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TensorGuard")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME,
                                                   f"TensorGuard Root CA {trust_domain}")])
    root = _ca_cert(root_name, root_key.public_key(), issuer=root_name, signer=root_key, issuer_ski=None,
                    path_length=1, trust_domain=trust_domain, now=now, lifetime=ROOT_LIFETIME)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([org, x509.NameAttribute(
        NameOID.COMMON_NAME, f"TensorGuard Intermediate CA {trust_domain}")])
    inter = _ca_cert(inter_name, inter_key.public_key(), issuer=root_name, signer=root_key,
                     issuer_ski=_ski(root), path_length=0, trust_domain=trust_domain, now=now,
                     lifetime=INTERMEDIATE_LIFETIME)
    write_secret(paths.root_key, _key_pem(root_key))
    write_secret(paths.intermediate_key, _key_pem(inter_key))
    write_public(paths.root_cert, _pem(root))
    write_public(paths.intermediate_cert, _pem(inter))
    write_public(paths.bundle, _pem(inter) + _pem(root))
    ca = CertificateAuthority(inter_key, inter, root, IssuancePolicy(trust_domain))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = ca.issue_server(server_key.public_key(), host_names, now)
    write_secret(paths.server_key, _key_pem(server_key))
    write_public(paths.server_cert, _pem(server) + _pem(inter))
    write_public(paths.metadata, json.dumps({"trust_domain": trust_domain, "created": now.isoformat(),
                                             "host_names": host_names}, indent=2).encode() + b"\n")


def read_trust_domain(directory: Path) -> str:
    """The trust domain fixed at `ca init` (stored in ca.json)."""
    path = CAPaths(directory).metadata
    try:
        data = json.loads(path.read_text())
        return check_trust_domain(str(data["trust_domain"]))
    except FileNotFoundError:
        raise CAError(f"{path} not found: run `tensorguard server ca init --dir {directory}` first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CAError(f"{path}: cannot read the trust domain: {exc}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CAError(f"{path} not found") from None
    except ValueError as exc:
        raise CAError(f"{path}: not a PEM certificate: {exc}") from None


class CertificateAuthority:
    """Signs approved requests with the intermediate; the root key is never needed here."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, root: x509.Certificate,
                 policy: IssuancePolicy) -> None:
        cert_key = cert.public_key()
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or \
                cert_key.public_numbers() != key.public_key().public_numbers():
            raise CAError("the intermediate key does not match the intermediate certificate")
        self.key = key
        self.cert = cert
        self.root = root
        self.policy = policy
        self.not_after = as_utc(cert.not_valid_after)
        self.not_before = as_utc(cert.not_valid_before)
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(cert))
        # Fixed parts are DER-encoded once, by cryptography itself.
        self._issuer = cert.subject.public_bytes()
        self._aki = _raw(aki, critical=False)
        self._basic = _raw(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        self._ku_sign = _raw(_leaf_key_usage(key_encipherment=False), critical=True)
        self._ku_rsa = _raw(_leaf_key_usage(key_encipherment=True), critical=True)
        both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        self._eku = _raw(x509.ExtendedKeyUsage(both), critical=False)
        self._eku_server = _raw(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        self.chain_der = [c.public_bytes(serialization.Encoding.DER) for c in (cert, root)]

    @classmethod
    def load(cls, directory: Path, policy: IssuancePolicy) -> CertificateAuthority:
        """Load the intermediate (0600 key) and the root certificate; the root key may be absent."""
        paths = CAPaths(directory)
        if paths.root_key.exists():
            mode = stat.S_IMODE(os.stat(paths.root_key).st_mode)
            if mode & 0o077:
                raise InsecureKeyFile(f"{paths.root_key}: root key has mode {mode:04o}; chmod 600 it (or "
                                      "better, move it off this host)")
        try:
            key_pem = read_secret(paths.intermediate_key)
        except FileNotFoundError:
            raise CAError(f"{paths.intermediate_key} not found: is {directory} a CA directory?") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CAError(f"{paths.intermediate_key}: cannot load the key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{paths.intermediate_key}: expected an EC key, found {type(key).__name__}")
        cert, root = _load_cert(paths.intermediate_cert), _load_cert(paths.root_cert)
        if cert.issuer != root.subject:
            raise CAError(f"{paths.intermediate_cert} was not issued by {paths.root_cert}")
        root_key = root.public_key()
        assert isinstance(root_key, ec.EllipticCurvePublicKey)
        algorithm = cert.signature_hash_algorithm
        assert algorithm is not None
        try:
            root_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        except Exception:
            raise CAError(f"{paths.intermediate_cert}: signature does not verify with {paths.root_cert}"
                          ) from None
        return cls(key, cert, root, policy)

    def issue(self, csr: x509.CertificateSigningRequest, node_id: str, now: datetime,
              lifetime: timedelta | None = None) -> x509.Certificate:
        """Check ``csr`` against the policy for ``node_id`` and sign it (raises PolicyError)."""
        return self.sign(approve(csr, node_id, self.policy), now, lifetime)

    def sign(self, approved: Approved, now: datetime, lifetime: timedelta | None = None) -> x509.Certificate:
        """Sign an approved request; notAfter never outlives the intermediate."""
        return x509.load_der_x509_certificate(self.sign_der(approved, now, lifetime).der)

    def sign_der(self, approved: Approved, now: datetime, lifetime: timedelta | None = None) -> Signed:
        """`sign`, returning the DER and the fields the registry needs without parsing it back."""
        if now >= self.not_after or now < self.not_before:
            raise CAError(f"the intermediate certificate is not valid at {now.isoformat()} (valid "
                          f"{self.not_before.isoformat()} to {self.not_after.isoformat()})")
        not_after = min(now + (lifetime or self.policy.lifetime), self.not_after)
        key = approved.public_key
        key_usage = self._ku_rsa if isinstance(key, rsa.RSAPublicKey) else self._ku_sign
        san = der.general_names([approved.spiffe_id], approved.dns_names)
        spki = approved.spki or key.public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        return self._build(der.common_name(approved.node_id), spki, (now, not_after),
                           (key_usage, self._eku), san)

    def _build(self, subject: bytes, spki: bytes, validity: tuple[datetime, datetime],
               usages: tuple[bytes, bytes], san: bytes) -> Signed:
        """Encode and sign: exactly what CertificateBuilder would write with these extensions in this
        order (basicConstraints, keyUsage, extKeyUsage, subjectAltName, SKI, AKI)."""
        now, not_after = validity
        ski = der.extension(_SKI, False, der.tlv(der.OCTET_STRING, der.key_identifier(spki)))
        extensions = (self._basic, *usages, der.extension(_SAN, False, san), ski, self._aki)
        serial = random_serial()
        not_before = now - self.policy.backdate
        tbs = der.tbs_certificate(serial, self._issuer, (not_before, not_after), subject, spki,
                                  extensions=extensions)
        signature = self.key.sign(hashlib.sha256(tbs).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
        return Signed(der.certificate(tbs, signature), serial, der.whole_seconds(not_before),
                      der.whole_seconds(not_after))

    def issue_server(self, key: ec.EllipticCurvePublicKey, host_names: list[str], now: datetime,
                     lifetime: timedelta = SERVER_LIFETIME) -> x509.Certificate:
        """The API's own TLS certificate (serverAuth only) for its DNS names and IP addresses."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_names[0])]).public_bytes()
        san = x509.SubjectAlternativeName(_host_names(host_names)).public_bytes()
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        signed = self._build(subject, spki, (now, min(now + lifetime, self.not_after)),
                             (self._ku_sign, self._eku_server), san)
        return x509.load_der_x509_certificate(signed.der)


_SAN = der.oid(x509.SubjectAlternativeName.oid.dotted_string)
_SKI = der.oid(x509.SubjectKeyIdentifier.oid.dotted_string)


def _raw(value: x509.ExtensionType, critical: bool) -> bytes:
    """An Extension whose value cryptography itself encoded, ready to go into a TBSCertificate."""
    return der.extension(der.oid(value.oid.dotted_string), critical, value.public_bytes())


def _leaf_key_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)
