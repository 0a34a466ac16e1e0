"""The CA as its real server process on 127.0.0.1: enrol, renew over mTLS, and every refusal."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from tensorguard.server.bench import _worker_pids
from tensorguard.server.ca import CAPaths, CertificateAuthority, _ca_cert
from tensorguard.server.engine import select
from tensorguard.server.policy import IssuancePolicy
from tensorguard.server.timeutil import utc_now
from tensorguard.server.tlsfront import find_binary
from tests.integration.server.ca_process import PKCS10, SERVER, Server, running_ca
from tests.unit.server.helpers import b64, key_pem, make_ca, make_csr, p256, spiffe, tamper_signature
from tests.unit.server.test_csr_hostile import CASES as HOSTILE_CASES
from tests.unit.server.test_csr_hostile import NODE as HOSTILE_NODE

TRUST_DOMAIN = "fleet.test"


@pytest.fixture(scope="module", params=[("--tls", "openssl"), ("--http", "h11", "--loop", "asyncio", "--tls", "openssl"),
                                        ("--tls", "rustls"), ("--http", "h11", "--loop", "asyncio", "--tls", "rustls")],
                ids=["openssl", "openssl-pure-python", "rustls", "rustls-pure-python"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every test runs against both stacks (httptools/uvloop when installed, and the h11/asyncio fallback),
    each with TLS in the workers (OpenSSL) and in the rustls front."""
    if "rustls" in request.param and find_binary() is None:
        pytest.skip("tensorguard-tlsfront is not built (make tlsfront)")
    with running_ca(tmp_path_factory.mktemp("server") / "ca", TRUST_DOMAIN, workers=2,
                    extra=request.param) as handle:
        yield handle


def _cert(response: httpx.Response) -> x509.Certificate:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
    return cert


def _issued(server: Server) -> int:
    return len(server.store.issued())


def _last_refusal(server: Server, kind: str) -> tuple[str | None, object]:
    record = server.store.audit_records(f"est.{kind}.refused")[-1]
    return record.reason, record.fields.get("status")


def test_cacerts_and_health(server: Server) -> None:
    with server.client() as client:
        response = client.get(f"{server.est}/cacerts")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/pkcs7-mime"
        chain = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        root = x509.load_pem_x509_certificate(CAPaths(server.ca_dir).root_cert.read_bytes())
        assert chain[-1] == root and len(chain) == 2
        health = client.get(f"{server.url}/healthz").json()
        assert health["status"] == "ok" and health["trust_domain"] == TRUST_DOMAIN
        assert client.get(f"{server.url}/docs").status_code == 200
        paths = client.get(f"{server.url}/openapi.json").json()["paths"]
        assert "/.well-known/est/simpleenroll" in paths and "/.well-known/est/simplereenroll" in paths


def test_enrol_then_replay_is_refused(server: Server, tmp_path: Path) -> None:
    key = p256()
    token = server.token("robot-1")
    with server.client() as client:
        headers = {**PKCS10, "Authorization": f"Bearer {token}"}
        cert = _cert(client.post(f"{server.est}/simpleenroll", content=b64(make_csr(key, cn="robot-1")),
                                 headers=headers))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("robot-1")]
        lifetime = cert.not_valid_after - cert.not_valid_before
        assert lifetime == timedelta(hours=1, seconds=60)
        before = _issued(server)
        replay = client.post(f"{server.est}/simpleenroll", content=b64(make_csr(p256(), cn="robot-1")),
                             headers=headers)
    assert replay.status_code == 401
    assert replay.json()["code"] == "token_used" and "single-use" in replay.json()["detail"]
    assert _issued(server) == before
    assert _last_refusal(server, "enroll") == (replay.json()["detail"], 401)


def test_renew_over_mtls(server: Server, tmp_path: Path) -> None:
    cert_path, key_path, first = server.enrol("robot-2", tmp_path)
    with server.client(cert_path, key_path) as client:
        response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(p256())), headers=PKCS10)
    second = _cert(response)
    assert second.serial_number != first.serial_number
    san = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("robot-2")]
    assert [r.kind for r in server.store.issued("robot-2")] == ["enroll", "reenroll"]
    # the robot's own address, also when the rustls front is between it and the worker
    remote = [r.remote for r in server.store.audit_records("est.reenroll.issued") if r.node == "robot-2"]
    assert len(remote) == 1 and remote[0] is not None and remote[0].startswith("127.0.0.1:")
    assert int(remote[0].rsplit(":", 1)[1]) != int(server.url.rsplit(":", 1)[1])


def test_renew_without_a_client_certificate_is_refused(server: Server) -> None:
    with server.client() as client:
        response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(p256())), headers=PKCS10)
    assert response.status_code == 401 and "no client certificate" in response.json()["detail"]


def test_renew_for_another_node_is_refused(server: Server, tmp_path: Path) -> None:
    cert_path, key_path, _ = server.enrol("robot-3", tmp_path)
    before = _issued(server)
    with server.client(cert_path, key_path) as client:
        response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(p256(), cn="robot-4")),
                               headers=PKCS10)
    assert response.status_code == 403 and "another node" in response.json()["detail"]
    assert _issued(server) == before
    assert _last_refusal(server, "reenroll") == (response.json()["detail"], 403)


def test_an_expired_certificate_cannot_renew(server: Server, tmp_path: Path) -> None:
    key = p256()
    ca = CertificateAuthority.load(server.ca_dir, IssuancePolicy(TRUST_DOMAIN))
    # Issued 3 minutes ago (the CA was created just now, backdated 5 minutes) for 2 seconds.
    expired = ca.issue(make_csr(key), "robot-5", utc_now() - timedelta(minutes=3), lifetime=timedelta(seconds=2))
    assert expired.not_valid_after < utc_now().replace(tzinfo=None)
    (tmp_path / "old.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "old.key").write_bytes(key_pem(key))
    before = _issued(server)
    with server.client(tmp_path / "old.crt", tmp_path / "old.key") as client:
        response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(key)), headers=PKCS10)
    assert response.status_code == 403
    assert f"(serial {expired.serial_number:x}) expired at" in response.json()["detail"]
    assert _issued(server) == before
    assert _last_refusal(server, "reenroll") == (response.json()["detail"], 403)


def test_a_certificate_from_another_ca_fails_the_handshake(server: Server, tmp_path: Path) -> None:
    """A twin CA with the very same names but other keys: only the handshake's signature check stops
    it, the app relies on that (PeerVerifier does not verify the signature a second time)."""
    key = p256()
    other = make_ca(tmp_path / "other", now=utc_now())
    ours = x509.load_pem_x509_certificate(CAPaths(server.ca_dir).intermediate_cert.read_bytes())
    assert other.cert.subject == ours.subject
    cert = other.issue(make_csr(key), "robot-2", utc_now())
    (tmp_path / "f.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "f.key").write_bytes(key_pem(key))
    before = _issued(server)
    with server.client(tmp_path / "f.crt", tmp_path / "f.key") as client, pytest.raises(httpx.TransportError):
        client.post(f"{server.est}/simplereenroll", content=b64(make_csr(key)), headers=PKCS10)
    assert _issued(server) == before


def test_a_second_intermediate_of_the_same_root_fails_the_handshake(server: Server, tmp_path: Path) -> None:
    """Only the serving intermediate is a trust anchor for client certificates, not the whole root."""
    paths = CAPaths(server.ca_dir)
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    root_key = serialization.load_pem_private_key(paths.root_key.read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    sibling_key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sibling intermediate")])
    sibling = _ca_cert(name, sibling_key.public_key(), issuer=root.subject, signer=root_key,
                       issuer_ski=root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value,
                       path_length=0, trust_domain=TRUST_DOMAIN, now=utc_now(), lifetime=timedelta(days=1))
    other = CertificateAuthority(sibling_key, sibling, root, IssuancePolicy(TRUST_DOMAIN))
    key = p256()
    cert = other.issue(make_csr(key), "robot-2", utc_now())
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                                     + sibling.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(key_pem(key))
    before = _issued(server)
    with server.client(tmp_path / "s.crt", tmp_path / "s.key") as client, pytest.raises(httpx.TransportError):
        client.post(f"{server.est}/simplereenroll", content=b64(make_csr(key)), headers=PKCS10)
    assert _issued(server) == before


def test_no_session_is_resumable(server: Server) -> None:
    """No TLS 1.3 tickets: a resumed session would carry the certificate of an older handshake."""
    context = ssl.create_default_context(cafile=str(server.root_cert))
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    sessions: list[ssl.SSLSession] = []
    for _ in range(2):
        with socket.create_connection((host, int(port))) as raw, \
                context.wrap_socket(raw, server_hostname=host, session=sessions[-1] if sessions else None) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(12) == b"HTTP/1.1 200"
            assert tls.version() == "TLSv1.3" and not tls.session_reused
            assert tls.session is not None
            sessions.append(tls.session)


def test_a_token_for_another_node_is_refused(server: Server) -> None:
    token = server.token("robot-6")
    before = _issued(server)
    with server.client() as client:
        response = client.post(f"{server.est}/simpleenroll", content=b64(make_csr(p256(), cn="robot-7")),
                               headers={**PKCS10, "Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "asks for another node" in response.json()["detail"]
    assert _issued(server) == before
    assert _last_refusal(server, "enroll") == (response.json()["detail"], 403)


def test_a_disallowed_san_is_refused(server: Server) -> None:
    token = server.token("robot-8")
    csr = make_csr(p256(), sans=[x509.DNSName("ca.fleet.test"), x509.UniformResourceIdentifier(spiffe("robot-8"))])
    before = _issued(server)
    with server.client() as client:
        response = client.post(f"{server.est}/simpleenroll", content=b64(csr),
                               headers={**PKCS10, "Authorization": f"Bearer {token}"})
    assert response.status_code == 403 and "DNS SAN ca.fleet.test is not allowed" in response.json()["detail"]
    assert _issued(server) == before


@pytest.mark.parametrize(("body", "headers", "status", "needle"), [
    (b"!!! not base64 !!!", PKCS10, 400, "neither base64"),
    (base64.b64encode(b"\x30\x03\x02\x01\x01"), PKCS10, 400, "not a DER PKCS#10"),
    (None, PKCS10, 400, "self-signature does not verify"),
    (b"A" * 20000, PKCS10, 413, "exceeds the limit of 16384 bytes"),
    (b"AAAA", {"Content-Type": "text/plain"}, 415, "must be application/pkcs10"),
], ids=["garbage", "not-a-csr", "bad-signature", "oversize", "content-type"])
def test_bad_input_gets_a_reason_and_an_audit_entry(server: Server, body: bytes | None,
                                                    headers: dict[str, str], status: int, needle: str) -> None:
    token = server.token("robot-9")
    if body is None:
        body = base64.b64encode(tamper_signature(make_csr(p256(), cn="robot-9")))
    before = _issued(server)
    with server.client() as client:
        response = client.post(f"{server.est}/simpleenroll", content=body,
                               headers={**headers, "Authorization": f"Bearer {token}"})
    assert response.status_code == status
    assert needle in response.json()["detail"]
    assert _issued(server) == before
    assert _last_refusal(server, "enroll") == (response.json()["detail"], status)
    assert token not in str(server.store.audit_records())


HOSTILE = ("cn-integer", "bmp-odd-length", "universal-code-point", "utf8-invalid", "san-x400", "san-edi-party",
           "san-directory-name", "version-1", "indefinite-length", "trailing-data",
           "rsa-end-of-contents-parameters")


def test_hostile_csrs_get_a_400_and_the_server_keeps_serving(server: Server) -> None:
    """Requests that used to crash the handler (HTTP 500) are refused with their reason, audited, and
    neither burn the token nor stop the workers."""
    cases = {name: (body, needle) for name, body, needle in HOSTILE_CASES}
    token = server.token(HOSTILE_NODE)
    headers = {**PKCS10, "Authorization": f"Bearer {token}"}
    before = _issued(server)
    with server.client() as client:
        for name in HOSTILE:
            body, needle = cases[name]
            response = client.post(f"{server.est}/simpleenroll", content=base64.b64encode(body), headers=headers)
            assert response.status_code == 400, (name, response.text)
            assert needle in response.json()["detail"], name
            assert _last_refusal(server, "enroll") == (response.json()["detail"], 400)
        assert _issued(server) == before
        _cert(client.post(f"{server.est}/simpleenroll", content=b64(make_csr(p256(), cn=HOSTILE_NODE)),
                          headers=headers))
        assert client.get(f"{server.url}/healthz").json()["status"] == "ok"


def test_oversize_chunked_body_is_cut_off(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"A" * 1024

    with server.client() as client:
        response = client.post(f"{server.est}/simpleenroll", content=chunks(),
                               headers={**PKCS10, "Authorization": f"Bearer {server.token('robot-10')}"})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_sigterm_stops_all_workers(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    subprocess.run([*SERVER, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN],
                   capture_output=True, text=True, timeout=60, check=True)
    proc = subprocess.Popen([*SERVER, "serve", "--dir", str(ca_dir), "--port", "0", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("listening on")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert f"2 worker(s), HTTP/1.1 on {select().describe()}, TLS on " in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("tls", ["openssl", "rustls"])
def test_no_process_outlives_a_killed_server(tmp_path: Path, tls: str) -> None:
    """SIGKILL gives the parent no chance to stop its workers (or the front): they follow it by themselves."""
    if tls == "rustls" and find_binary() is None:
        pytest.skip("tensorguard-tlsfront is not built (make tlsfront)")
    ca_dir = tmp_path / "ca"
    subprocess.run([*SERVER, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN],
                   capture_output=True, text=True, timeout=60, check=True)
    proc = subprocess.Popen([*SERVER, "serve", "--dir", str(ca_dir), "--port", "0", "--workers", "2", "--tls", tls],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("listening on")
        deadline = time.monotonic() + 15
        while len(children) < (3 if tls == "rustls" else 2) and time.monotonic() < deadline:
            time.sleep(0.1)
            children = _worker_pids(proc.pid)
        assert len(children) == (3 if tls == "rustls" else 2)
        proc.kill()
        proc.wait(timeout=15)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in children):
            assert time.monotonic() < deadline, f"still running after the server was killed: {children}"
            time.sleep(0.1)
    finally:
        for pid in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_serve_refuses_a_missing_ca(tmp_path: Path) -> None:
    out = subprocess.run([*SERVER, "serve", "--dir", str(tmp_path / "nope"), "--port", "0"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "ca init" in out.stderr


def test_serve_refuses_a_port_another_server_listens_on(tmp_path: Path) -> None:
    """Workers share their port through SO_REUSEPORT; that must never mean sharing it with a stale server."""
    ca_dir = tmp_path / "ca"
    subprocess.run([*SERVER, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN],
                   capture_output=True, text=True, timeout=60, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = subprocess.run([*SERVER, "serve", "--dir", str(ca_dir), "--port", str(port), "--workers", "2"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1 and "Address already in use" in out.stderr
