"""Mutated CSRs (byte flips, truncation, insertion, length and tag changes, duplicated elements) never
escape the CSR parser as anything but CsrError, nor the policy as anything but PolicyError, and the EST
endpoints never answer 5xx. TENSORGUARD_FUZZ_EXAMPLES raises the example count for a longer run."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorguard import der
from tensorguard.server.app import create_app
from tensorguard.server.csr import CsrError, decode_body
from tensorguard.server.est import EstFastPath
from tensorguard.server.policy import IssuancePolicy, PolicyError, approve, check_key_and_signature
from tensorguard.server.settings import ServerSettings
from tensorguard.server.store import SQLiteStore
from tensorguard.server.tokens import new_token, token_hash

from . import rawcsr as raw
from .helpers import NOW, TRUST_DOMAIN, make_ca, make_csr, p256, spiffe
from .helpers import der as der_of

EXAMPLES = int(os.environ.get("TENSORGUARD_FUZZ_EXAMPLES", "0")) or None
NODE = "r1"
POLICY = IssuancePolicy(TRUST_DOMAIN, dns_templates=("{node}.robots.fleet.test",))
Signer = Callable[[bytes], bytes]
RSA_WITH_SHA256 = der.tlv(der.SEQUENCE, der.oid("1.2.840.113549.1.1.11") + b"\x05\x00")
INTERESTING_TAGS = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x1A,
                    0x1B, 0x1C, 0x1E, 0x1F, 0x30, 0x31, 0x80, 0x81, 0x82, 0x86, 0x87, 0x88, 0xA0, 0xA3, 0xA4,
                    0xA5, 0xFF]


@dataclass(frozen=True)
class Seed:
    """A valid request, its CertificationRequestInfo, and how to sign a changed one with the same key."""

    der: bytes
    info: bytes
    algorithm: bytes
    sign: Signer


def _from_csr(csr: x509.CertificateSigningRequest, sign: Signer) -> Seed:
    whole = der_of(csr)
    info = csr.tbs_certrequest_bytes
    _, start, _ = der.read(whole, 0)
    _, _, algorithm_end = der.read(whole, start + len(info))
    return Seed(whole, info, whole[start + len(info):algorithm_end], sign)


def _seeds() -> list[Seed]:
    ec_key, ed_key, rsa_key = p256(), ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)
    ec_sign: Signer = lambda data: ec_key.sign(data, ec.ECDSA(hashes.SHA256()))  # noqa: E731
    sans = [x509.UniformResourceIdentifier(spiffe(NODE)), x509.DNSName("r1.robots.fleet.test")]
    rsa_sign: Signer = lambda data: rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # noqa: E731
    rsa_info = raw.info(rsa_key, raw.name((raw.COMMON_NAME, der.tlv(raw.BMP, NODE.encode("utf-16-be")))),
                        attributes=der.tlv(0xA0, der.tlv(der.SEQUENCE, der.oid("1.2.840.113549.1.9.7") + der.tlv(
                            der.SET, der.tlv(raw.PRINTABLE, b"secret")))))
    rsa_hand_built = der.tlv(der.SEQUENCE, rsa_info + RSA_WITH_SHA256 + der.tlv(
        der.BIT_STRING, b"\x00" + rsa_sign(rsa_info)))
    hand_built = raw.info(ec_key, raw.name((raw.COMMON_NAME, der.tlv(raw.BMP, NODE.encode("utf-16-be")))), (
        raw.san(der.tlv(raw.URI, spiffe(NODE).encode())),
        raw.extension(raw.BASIC_CONSTRAINTS, b"\x30\x00", critical=True),
        raw.extension(der.oid("2.5.29.15"), b"\x03\x02\x07\x80", critical=True)))
    return [
        _from_csr(make_csr(ec_key, cn=NODE, sans=sans), ec_sign),
        _from_csr(make_csr(ed_key, cn=NODE, sans=sans[:1], algorithm=None), ed_key.sign),
        _from_csr(make_csr(rsa_key, sans=sans[:1]), rsa_sign),
        Seed(raw.signed(ec_key, hand_built), hand_built, der.ECDSA_WITH_SHA256, ec_sign),
        Seed(rsa_hand_built, rsa_info, RSA_WITH_SHA256, rsa_sign),
    ]


SEEDS = _seeds()


def _headers(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, header length, content length) of every element reachable in ``data``, leniently."""
    found: list[tuple[int, int, int]] = []

    def walk(pos: int, end: int, depth: int) -> None:
        while pos < end and depth < 12:
            try:
                tag, start, stop = der.read(data, pos)
            except ValueError:
                return
            if stop > end:
                return
            found.append((pos, start - pos, stop - start))
            if tag & 0x20:
                walk(start, stop, depth + 1)
            elif tag in (der.OCTET_STRING, der.BIT_STRING):  # extension values and keys hold DER too
                walk(start + (tag == der.BIT_STRING), stop, depth + 1)
            pos = stop

    walk(0, len(data), 0)
    return found


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """One structural or byte-level change to ``data``."""
    headers = _headers(data)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "retag", "duplicate"]))
    if kind in ("length", "retag", "duplicate") and headers:
        offset, header, size = draw(st.sampled_from(headers))
        if kind == "retag":
            tag = draw(st.sampled_from(INTERESTING_TAGS) | st.integers(0, 255))
            return data[:offset] + bytes([tag]) + data[offset + 1:]
        if kind == "duplicate":
            element = data[offset:offset + header + size]
            return data[:offset] + element + data[offset:]
        length = draw(st.sampled_from([b"\x80", b"\x81\x05", b"\x84\xff\xff\xff\xff", b"\x89" + b"\x01" * 9,
                                       der.length(size + 1), der.length(max(size - 1, 0)),
                                       b"\x82" + size.to_bytes(2, "big") if size < 65536 else b"\x80"])
                      | st.integers(0, 0x7F).map(lambda n: bytes([n])))
        return data[:offset + 1] + length + data[offset + header:]
    position = draw(st.integers(0, max(len(data) - 1, 0)))
    if kind == "flip" and data:
        return data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
    if kind == "truncate":
        return data[:position]
    if kind == "delete":
        return data[:position] + data[position + draw(st.integers(1, 16)):]
    return data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed request with 1-4 mutations, either of its whole DER or of its signed part, then re-signed
    (so that the mutation gets past the signature check, into the subject and extensions)."""
    seed = draw(st.sampled_from(SEEDS))
    resign = draw(st.booleans())
    data = seed.info if resign else seed.der
    for _ in range(draw(st.integers(1, 4))):
        data = draw(mutation(data))
    if not resign:
        return data
    return der.tlv(der.SEQUENCE, data + seed.algorithm + der.tlv(der.BIT_STRING, b"\x00" + seed.sign(data)))


def _parse_and_approve(body: bytes) -> None:
    """What enrolment does with a body, up to signing: only the project's own errors may come out."""
    try:
        csr = decode_body(body)
    except CsrError as exc:
        assert exc.reason
        return
    try:
        key = check_key_and_signature(csr, POLICY.min_rsa_bits)
        approve(csr, NODE, POLICY, key)
    except PolicyError as exc:
        assert exc.reason


@settings(max_examples=EXAMPLES or 1500, deadline=None, derandomize=not EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_the_parser_and_policy_raise_only_their_own_errors(data: bytes) -> None:
    _parse_and_approve(base64.b64encode(data))


def test_every_seed_is_a_valid_request() -> None:
    """The mutations start from requests the CA would sign (else they would test little)."""
    for seed in SEEDS:
        csr = decode_body(base64.b64encode(seed.der))
        approve(csr, NODE, POLICY)
        resigned = der.tlv(der.SEQUENCE, seed.info + seed.algorithm + der.tlv(
            der.BIT_STRING, b"\x00" + seed.sign(seed.info)))
        approve(decode_body(base64.b64encode(resigned)), NODE, POLICY)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstFastPath, SQLiteStore, dict[str, object]]]:
    directory = tmp_path_factory.mktemp("fuzz") / "ca"
    make_ca(directory, dns_templates=POLICY.dns_templates)
    store = SQLiteStore(directory / "ca.sqlite3")
    settings_ = ServerSettings(ca_dir=directory, dns_templates=POLICY.dns_templates)
    fast = create_app(settings_, clock=lambda: NOW, store=store)
    cert = fast.endpoints.service.ca.issue(make_csr(p256()), NODE, NOW)
    tls: dict[str, object] = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))]}
    yield fast, store, tls


@settings(max_examples=max((EXAMPLES or 0) // 5, 250), deadline=None, derandomize=not EXAMPLES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=mutated(), renew=st.booleans())
def test_the_endpoints_never_answer_5xx(app: tuple[EstFastPath, SQLiteStore, dict[str, object]],
                                        data: bytes, renew: bool) -> None:
    fast, store, tls = app
    headers = {"content-type": "application/pkcs10"}
    if not renew:
        token = new_token()
        store.add_token(token_hash(token), NODE, NOW, NOW + timedelta(hours=1))
        headers["authorization"] = f"Bearer {token}"
    kind = "reenroll" if renew else "enroll"
    before = len(store.audit_records(f"est.{kind}.refused"))

    async def run() -> httpx.Response:
        async def with_tls(scope, receive, send):  # type: ignore[no-untyped-def]
            if renew:
                scope.setdefault("extensions", {})["tls"] = tls
            await fast(scope, receive, send)

        transport = httpx.ASGITransport(app=with_tls, raise_app_exceptions=False, client=("10.9.8.7", 1))
        async with httpx.AsyncClient(transport=transport, base_url="https://ca.test") as client:
            path = "/.well-known/est/simplereenroll" if renew else "/.well-known/est/simpleenroll"
            return await client.post(path, content=base64.b64encode(data), headers=headers)

    response = asyncio.run(run())
    assert response.status_code in (200, 400, 403, 413), response.text
    if response.status_code != 200:
        detail = response.json()["detail"]
        assert detail
        refusals = store.audit_records(f"est.{kind}.refused")
        assert len(refusals) == before + 1 and refusals[-1].reason == detail
