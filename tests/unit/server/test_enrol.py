"""Enrolment decisions without a network: tokens, mTLS identity, refusals and their audit trail."""

from __future__ import annotations

import base64
import ssl
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tensorguard.server.enrol import EnrolmentError, EnrolmentService
from tensorguard.server.peer import PeerVerifier
from tensorguard.server.store import SQLiteStore
from tensorguard.server.tokens import new_token, token_hash

from .helpers import NOW, TRUST_DOMAIN, b64, make_ca, make_csr, p256, spiffe, tamper_signature


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(tmp_path: Path) -> tuple[EnrolmentService, SQLiteStore, Clock]:
    ca = make_ca(tmp_path / "ca")
    store = SQLiteStore(tmp_path / "ca" / "ca.sqlite3")
    clock = Clock(NOW)
    return EnrolmentService(ca, store, PeerVerifier(ca.cert, TRUST_DOMAIN), clock), store, clock


def _token(store: SQLiteStore, node: str, ttl: timedelta = timedelta(hours=1)) -> str:
    token = new_token()
    store.add_token(token_hash(token), node, NOW, NOW + ttl)
    return token


def _cert(answer: bytes) -> x509.Certificate:
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer))
    return cert


def _tls(cert: x509.Certificate) -> dict[str, object]:
    return {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))]}


def _refused(store: SQLiteStore, kind: str) -> list[tuple[str | None, str | None, object]]:
    return [(r.node, r.reason, r.fields.get("code")) for r in store.audit_records(f"est.{kind}.refused")]


def test_enrol_issues_once_and_audits(env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, store, _ = env
    token = _token(store, "r1")
    cert = _cert(service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {token}", "10.0.0.1:4000"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("r1")]
    (issued,) = store.issued()
    assert (issued.node_id, issued.kind, issued.serial) == ("r1", "enroll", format(cert.serial_number, "x"))
    (audit,) = store.audit_records("est.enroll.issued")
    assert (audit.node, audit.remote, audit.fields["serial"]) == ("r1", "10.0.0.1:4000", issued.serial)
    assert token not in str(audit.fields)
    with pytest.raises(EnrolmentError) as info:
        service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {token}", None)
    assert (info.value.status, info.value.code) == (401, "token_used")
    assert len(store.issued()) == 1
    assert _refused(store, "enroll") == [(None, info.value.reason, "token_used")]


@pytest.mark.parametrize(("authorization", "code"), [
    (None, "no_token"), ("Basic abc", "no_token"), ("Bearer ", "no_token"), ("Bearer nope", "bad_token"),
])
def test_missing_or_malformed_tokens(env: tuple[EnrolmentService, SQLiteStore, Clock],
                                     authorization: str | None, code: str) -> None:
    service, store, _ = env
    with pytest.raises(EnrolmentError) as info:
        service.enroll(b64(make_csr(p256())), authorization, None)
    assert (info.value.status, info.value.code) == (401, code)
    assert store.issued() == [] and len(_refused(store, "enroll")) == 1


def test_expired_token(env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, store, clock = env
    token = _token(store, "r1", ttl=timedelta(minutes=5))
    clock.now = NOW + timedelta(minutes=5)
    with pytest.raises(EnrolmentError) as info:
        service.enroll(b64(make_csr(p256())), f"Bearer {token}", None)
    assert (info.value.status, info.value.code) == (401, "token_expired")


def test_bad_requests_do_not_burn_the_token(env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, store, _ = env
    token = _token(store, "r1")
    bodies = [b"%%% garbage %%%", base64.b64encode(b"hello"),
              base64.b64encode(tamper_signature(make_csr(p256(), cn="r1")))]
    for body in bodies:
        with pytest.raises(EnrolmentError) as info:
            service.enroll(body, f"Bearer {token}", None)
        assert info.value.status == 400
    codes = [code for _, _, code in _refused(store, "enroll")]
    assert codes == ["bad_request", "bad_request", "bad_signature"]
    assert store.issued() == []
    service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {token}", None)  # still usable
    assert len(store.issued()) == 1


def test_a_csr_for_another_node_is_refused_and_burns_the_token(
        env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, store, _ = env
    token = _token(store, "r1")
    with pytest.raises(EnrolmentError) as info:
        service.enroll(b64(make_csr(p256(), cn="r2")), f"Bearer {token}", "10.0.0.9:1")
    assert (info.value.status, info.value.code) == (403, "name_not_allowed")
    assert "another node" in info.value.reason and "token was consumed" in info.value.reason
    assert _refused(store, "enroll") == [("r1", info.value.reason, "name_not_allowed")]
    with pytest.raises(EnrolmentError) as again:
        service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {token}", None)
    assert again.value.code == "token_used"
    assert store.issued() == []


def test_reenrol_with_the_current_certificate(env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, store, clock = env
    first = _cert(service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {_token(store, 'r1')}", None))
    clock.now = NOW + timedelta(minutes=40)
    second = _cert(service.reenroll(b64(make_csr(p256())), _tls(first), "10.0.0.1:1"))
    assert second.serial_number != first.serial_number
    assert second.not_valid_after == (clock.now + timedelta(hours=1)).replace(tzinfo=None)
    san = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("r1")]
    assert [r.kind for r in store.issued("r1")] == ["enroll", "reenroll"]
    (audit,) = store.audit_records("est.reenroll.issued")
    assert audit.fields["previous_serial"] == format(first.serial_number, "x")


def test_reenrol_refusals(env: tuple[EnrolmentService, SQLiteStore, Clock], tmp_path: Path) -> None:
    service, store, clock = env
    cert = _cert(service.enroll(b64(make_csr(p256(), cn="r1")), f"Bearer {_token(store, 'r1')}", None))
    other_ca = make_ca(tmp_path / "other")
    foreign = other_ca.issue(make_csr(p256()), "r1", NOW)
    cases: list[tuple[dict[str, object] | None, bytes, int, str]] = [
        (None, b64(make_csr(p256())), 401, "needs HTTPS"),
        ({"client_cert_chain": []}, b64(make_csr(p256())), 401, "no client certificate"),
        (_tls(foreign), b64(make_csr(p256())), 403, "signature does not verify"),
        (_tls(cert), b64(make_csr(p256(), cn="r2")), 403, "another node"),
        (_tls(cert), b"garbage", 400, "neither base64"),
    ]
    for tls, body, status, needle in cases:
        with pytest.raises(EnrolmentError) as info:
            service.reenroll(body, tls, None)
        assert info.value.status == status and needle in info.value.reason
    clock.now = NOW + timedelta(hours=1)  # the certificate's notAfter
    with pytest.raises(EnrolmentError) as expired:
        service.reenroll(b64(make_csr(p256())), _tls(cert), None)
    assert expired.value.status == 403 and "expired" in expired.value.reason
    assert len(_refused(store, "reenroll")) == len(cases) + 1
    assert [r.kind for r in store.issued()] == ["enroll"]


def test_a_certificate_of_another_trust_domain_is_not_a_robot(
        env: tuple[EnrolmentService, SQLiteStore, Clock]) -> None:
    service, _, _ = env
    server_cert = x509.load_pem_x509_certificate(
        service.ca.issue_server(p256().public_key(), ["ca.fleet.test"], NOW).public_bytes(
            serialization.Encoding.PEM))
    with pytest.raises(EnrolmentError, match="exactly one robot SPIFFE ID"):
        service.reenroll(b64(make_csr(p256())), _tls(server_cert), None)
