"""Enrolment decisions, free of HTTP: who may get which certificate, and the audit trail of each answer.

simpleenroll is authorised by a one-time bootstrap token bound to a node; simplereenroll by the
robot's current certificate. Order of checks for a token: the request must parse and be correctly
self-signed with an allowed key *before* the token is touched (so a client bug does not burn it).
If the CSR then asks for a name the token's node may not have, nothing is issued and the token is
consumed (a token presented for another node's identity is treated as compromised). Otherwise the
certificate is signed, and the token is consumed in the same transaction that records the
certificate and its audit entry: if another request consumed it meanwhile, the signed certificate
is thrown away and the request is refused, so one token never yields two certificates.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from .ca import CAError, CertificateAuthority
from .csr import CsrError, decode_body
from .peer import PeerError, PeerVerifier
from .pkcs7 import certs_only
from .policy import (
    BAD_REQUEST,
    NAME_NOT_ALLOWED,
    Approved,
    PolicyError,
    approve,
    check_key_and_signature,
)
from .store import AuditSink, CAStore, IssuedRecord, RedeemError
from .timeutil import Clock
from .tokens import TokenFormatError, token_hash, token_ref

ENROLL, REENROLL = "enroll", "reenroll"


class EnrolmentError(Exception):
    """A refused request: HTTP ``status``, machine ``code`` and a ``reason`` naming what was wrong."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _policy_status(exc: PolicyError) -> int:
    return 403 if exc.code == NAME_NOT_ALLOWED else 400


@dataclass
class EnrolmentService:
    """Decides, issues, records and audits; the HTTP layer only moves bytes."""

    ca: CertificateAuthority
    store: CAStore
    peers: PeerVerifier
    clock: Clock
    audit: AuditSink | None = None
    """An extra sink that also receives every audit record (the store always keeps its own)."""

    def __post_init__(self) -> None:
        self.cacerts = base64.b64encode(certs_only(self.ca.chain_der))

    def _parse(self, body: bytes) -> tuple[x509.CertificateSigningRequest, Any]:
        try:
            csr = decode_body(body)
        except CsrError as exc:
            raise EnrolmentError(400, BAD_REQUEST, exc.reason) from None
        try:
            key = check_key_and_signature(csr, self.ca.policy.min_rsa_bits)
        except PolicyError as exc:
            raise EnrolmentError(_policy_status(exc), exc.code, exc.reason) from None
        return csr, key

    def _issue(self, approved: Approved, kind: str, now: datetime, *, remote: str | None,
               extra: dict[str, object], token: bytes | None = None) -> bytes:
        try:
            signed = self.ca.sign_der(approved, now)
        except CAError as exc:
            raise EnrolmentError(503, "ca_unavailable", str(exc)) from None
        serial = format(signed.serial, "x")
        not_after = signed.not_after
        record = IssuedRecord(serial, approved.node_id, kind, signed.not_before, not_after, now)
        audit = (f"est.{kind}.issued", {"time": now, "node": approved.node_id, "remote": remote,
                                        "serial": serial, "not_after": not_after.isoformat(), **extra})
        try:
            self.store.record_issued(record, audit, token)
        except RedeemError as exc:
            raise EnrolmentError(401, f"token_{exc.code}", exc.reason) from None
        if self.audit is not None:
            self.audit.append(*audit)
        return base64.b64encode(certs_only([signed.der]))

    def _refuse(self, kind: str, exc: EnrolmentError, now: datetime, *, remote: str | None,
                node: str | None, extra: dict[str, object]) -> EnrolmentError:
        fields = {"time": now, "node": node, "remote": remote, "reason": exc.reason, "code": exc.code,
                  "status": exc.status, **extra}
        self.store.append(f"est.{kind}.refused", fields)
        if self.audit is not None:
            self.audit.append(f"est.{kind}.refused", fields)
        return exc

    def enroll(self, body: bytes, authorization: str | None, remote: str | None) -> bytes:
        """simpleenroll: base64 certs-only PKCS#7 of the new certificate, or EnrolmentError."""
        now = self.clock()
        node: str | None = None
        extra: dict[str, object] = {}
        try:
            scheme, _, value = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise EnrolmentError(401, "no_token", "simpleenroll needs 'Authorization: Bearer "
                                     "<bootstrap token>'")
            try:
                digest = token_hash(value.strip())
            except TokenFormatError as exc:
                raise EnrolmentError(401, "bad_token", str(exc)) from None
            extra["token"] = token_ref(digest)
            csr, key = self._parse(body)
            try:
                node = self.store.token_node(digest, now)
            except RedeemError as exc:
                raise EnrolmentError(401, f"token_{exc.code}", exc.reason) from None
            try:
                approved = approve(csr, node, self.ca.policy, key)
            except PolicyError as exc:
                consumed = self._consume(digest, now)
                raise EnrolmentError(_policy_status(exc), exc.code, f"{exc.reason}{consumed}") from None
            return self._issue(approved, ENROLL, now, remote=remote, extra=extra, token=digest)
        except EnrolmentError as exc:
            raise self._refuse(ENROLL, exc, now, remote=remote, node=node, extra=extra) from None

    def _consume(self, digest: bytes, now: datetime) -> str:
        try:
            self.store.redeem_token(digest, now)
        except RedeemError:
            return ""  # a concurrent request consumed it first; either way it is gone
        return " (the token was consumed; ask for a new one)"

    def reenroll(self, body: bytes, tls: Mapping[str, Any] | None, remote: str | None) -> bytes:
        """simplereenroll: a new certificate for the node of the current, valid client certificate."""
        now = self.clock()
        node: str | None = None
        extra: dict[str, object] = {}
        try:
            try:
                peer = self.peers.verify(tls, now)
            except PeerError as exc:
                status = 401 if tls is None or not tls.get("client_cert_chain") else 403
                raise EnrolmentError(status, "bad_client_cert", exc.reason) from None
            node = peer.node_id
            extra["previous_serial"] = peer.serial
            csr, key = self._parse(body)
            try:
                approved = approve(csr, node, self.ca.policy, key)
            except PolicyError as exc:
                raise EnrolmentError(_policy_status(exc), exc.code, exc.reason) from None
            return self._issue(approved, REENROLL, now, remote=remote, extra=extra)
        except EnrolmentError as exc:
            raise self._refuse(REENROLL, exc, now, remote=remote, node=node, extra=extra) from None

    def refuse(self, kind: str, status: int, code: str, reason: str, remote: str | None) -> EnrolmentError:
        """Audit a refusal decided by the HTTP layer (body too large, wrong content type)."""
        error = EnrolmentError(status, code, reason)
        return self._refuse(kind, error, self.clock(), remote=remote, node=None, extra={})
