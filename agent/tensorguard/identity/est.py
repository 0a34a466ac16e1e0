"""EST client (RFC 7030, with RFC 8951's base64 rules) over the standard library's HTTPS, so a
robot needs no HTTP stack beyond Python's own.

Enrolment authenticates with a one-time bootstrap token (``Authorization: Bearer``);
re-enrolment with the current certificate in the TLS handshake (mTLS). The server is always
authenticated against the configured trust anchor, never the system's web PKI.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs7

WELL_KNOWN = "/.well-known/est"
MAX_RESPONSE = 256 * 1024


class EstError(Exception):
    """The CA refused the request (4xx): retrying the same request will not help."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the CA refused the request: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class EstUnavailable(Exception):
    """The CA could not be reached or answered 5xx: retry later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ClientCredential:
    """The current certificate and key, presented for re-enrolment."""

    cert_file: Path
    key_file: Path


class EstClient:
    """Talks to one EST server, authenticated by ``trust_anchor`` (PEM file of CA certificates)."""

    def __init__(self, base_url: str, trust_anchor: Path, *, timeout: float = 15.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"EST server URL must be https://HOST[:PORT][/PREFIX], got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.trust_anchor = trust_anchor
        self.timeout = timeout

    def _context(self, credential: ClientCredential | None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.trust_anchor))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if credential is not None:
            context.load_cert_chain(str(credential.cert_file), str(credential.key_file))
        return context

    def _request(self, method: str, path: str, *, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 credential: ClientCredential | None = None) -> tuple[str, bytes]:
        try:
            context = self._context(credential)
        except (OSError, ssl.SSLError) as exc:
            raise EstUnavailable(f"cannot set up TLS ({exc})") from None
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=context)
        try:
            conn.request(method, f"{self.prefix}{WELL_KNOWN}/{path}", body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE + 1)
        except ssl.SSLCertVerificationError as exc:
            raise EstUnavailable(f"the server at {self.host}:{self.port} failed verification against "
                                 f"{self.trust_anchor}: {exc.verify_message}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EstUnavailable(f"cannot reach {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        if response.status >= 500 or response.status == 429:
            retry = response.getheader("Retry-After")
            raise EstUnavailable(f"the CA answered HTTP {response.status}",
                                 float(retry) if retry and retry.isdigit() else None)
        if response.status >= 400:
            raise EstError(response.status, reason_of(data))
        if response.status != 200:
            raise EstUnavailable(f"the CA answered HTTP {response.status}, expected 200")
        if len(data) > MAX_RESPONSE:
            raise EstError(response.status, f"response larger than {MAX_RESPONSE} bytes")
        return response.getheader("Content-Type", ""), data

    def cacerts(self) -> list[x509.Certificate]:
        """The CA's current certificates (RFC 7030 4.1)."""
        _, data = self._request("GET", "cacerts")
        return parse_certs_only(data)

    def simpleenroll(self, csr: x509.CertificateSigningRequest, token: str) -> list[x509.Certificate]:
        """First enrolment with a bootstrap token (RFC 7030 4.2.1)."""
        _, data = self._request("POST", "simpleenroll", body=_csr_body(csr), headers={
            "Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64",
            "Authorization": f"Bearer {token}"})
        return parse_certs_only(data)

    def simplereenroll(self, csr: x509.CertificateSigningRequest,
                       credential: ClientCredential) -> list[x509.Certificate]:
        """Renewal authenticated by the current certificate (RFC 7030 4.2.2)."""
        _, data = self._request("POST", "simplereenroll", body=_csr_body(csr), headers={
            "Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"},
            credential=credential)
        return parse_certs_only(data)


def _csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.encodebytes(csr.public_bytes(Encoding.DER))


def reason_of(data: bytes) -> str:
    text = data[:500].decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            detail = json.loads(data).get("detail", text)
            return str(detail)[:500]
        except (ValueError, AttributeError):
            pass
    return text or "no reason given"


def parse_certs_only(data: bytes) -> list[x509.Certificate]:
    """A base64 certs-only PKCS#7 (RFC 7030 4.1.3 / 4.2.3) -> its certificates."""
    try:
        der = base64.b64decode(b"".join(data.split()), validate=True)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise EstError(200, f"the CA's response is not a base64 certs-only PKCS#7 ({exc})") from None
    if not certs:
        raise EstError(200, "the CA's response holds no certificate")
    return list(certs)


def pick_leaf(certs: Sequence[x509.Certificate], public_key_der: bytes) -> tuple[x509.Certificate,
                                                                                    list[x509.Certificate]]:
    """Split an enrolment response into the certificate for our key and the rest (the chain)."""
    leaf = [c for c in certs
            if c.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            == public_key_der]
    if len(leaf) != 1:
        raise EstError(200, "the CA's response holds no certificate for the key we sent")
    return leaf[0], [c for c in certs if c is not leaf[0]]
