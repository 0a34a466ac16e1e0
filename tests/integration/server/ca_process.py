"""`tensorguard server serve` as a real process on 127.0.0.1, for the tests that need a CA."""

from __future__ import annotations

import base64
import contextlib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tensorguard.server.bench import stop_server
from tensorguard.server.ca import CAPaths
from tensorguard.server.store import SQLiteStore
from tests.unit.server.helpers import b64, key_pem, make_csr, p256

SERVER = [sys.executable, "-m", "tensorguard.server.cli"]
PKCS10 = {"Content-Type": "application/pkcs10"}


@dataclass
class Server:
    """A running `tensorguard server serve` and its CA directory."""

    proc: subprocess.Popen[str]
    url: str
    ca_dir: Path

    @property
    def est(self) -> str:
        return f"{self.url}/.well-known/est"

    @property
    def root_cert(self) -> Path:
        return CAPaths(self.ca_dir).root_cert

    @property
    def store(self) -> SQLiteStore:
        return SQLiteStore(CAPaths(self.ca_dir).database)

    def token(self, node: str, ttl: str | None = None) -> str:
        extra = ["--ttl", ttl] if ttl else []
        out = subprocess.run([*SERVER, "token", "create", "--dir", str(self.ca_dir), "--node-id", node,
                              *extra], capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    def enrol(self, node: str, directory: Path) -> tuple[Path, Path, x509.Certificate]:
        """Enrol ``node`` with a fresh token: (certificate PEM path, key PEM path, certificate)."""
        key = p256()
        with self.client() as client:
            response = client.post(f"{self.est}/simpleenroll", content=b64(make_csr(key, cn=node)),
                                   headers={**PKCS10, "Authorization": f"Bearer {self.token(node)}"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.content))
        key_path, cert_path = directory / f"{node}.key", directory / f"{node}.crt"
        key_path.write_bytes(key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path, cert

    def client(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.root_cert))
        if cert is not None:
            context.load_cert_chain(cert, key)
        return httpx.Client(verify=context, timeout=10)


@contextlib.contextmanager
def running_ca(ca_dir: Path, trust_domain: str, *, workers: int = 1,
               extra: tuple[str, ...] = ()) -> Iterator[Server]:
    """A fresh CA in ``ca_dir`` served until the block ends (SIGTERM, then SIGKILL if need be)."""
    subprocess.run([*SERVER, "ca", "init", "--dir", str(ca_dir), "--trust-domain", trust_domain,
                    "--host-name", "localhost", "--host-name", "127.0.0.1"],
                   capture_output=True, text=True, timeout=60, check=True)
    proc = subprocess.Popen([*SERVER, "serve", "--dir", str(ca_dir), "--port", "0", "--workers",
                             str(workers), "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on https://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        handle = Server(proc, line.split()[-1], ca_dir)
        deadline = time.monotonic() + 20
        with handle.client() as client:
            while True:
                try:
                    if client.get(f"{handle.url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        yield handle
    finally:
        stop_server(proc, timeout=15)
