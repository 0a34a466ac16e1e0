"""The real server's rustls front against a client that sends a pathological certificate chain.

RUSTSEC-2023-0052: webpki 0.22.0 (Debian 12's) searches the certificates a client sends for a path to
the trust anchor, exponentially in the number of same-named candidates. The front verifies a robot's
certificate against the fleet intermediate alone and ignores the rest (tlsfront/src/client_auth.rs), so
a Certificate message with 100 certificates named like the intermediate must cost the front about what
an ordinary refused certificate costs: measured as the front process's utime+stime (/proc/PID/stat).

The bound is 2x the ordinary refusal (plus the readings' rounding): the front's only extra work is
receiving and splitting ~40 KB of certificates (~0.11 ms more than the ~0.27 ms of an ordinary refusal,
measured with /proc/PID/schedstat's nanoseconds: ~1.4x). A verifier that looks at them pays at
least one ECDSA check per same-named candidate it tries (~100 here, each ~1/10 of a whole refused
handshake), ~10x, even with webpki 0.22.2's budget; the front built to hand them to webpki 0.22.0 spent
20, 110, 490 and 1620 ms of CPU on one handshake with 5, 6, 7 and 8 decoys, and with 100 it was still
searching, on its only thread, after 10 s (the robot test below then timed out too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tensorguard.server.bench import _worker_pids
from tensorguard.server.ca import CAPaths
from tensorguard.server.timeutil import utc_now
from tensorguard.server.tlsfront import find_binary
from tests.integration.server.ca_process import PKCS10, Server, running_ca
from tests.unit.server.helpers import TRUST_DOMAIN, b64, key_pem, make_ca, make_csr, p256, spiffe

pytestmark = pytest.mark.skipif(find_binary() is None, reason="tensorguard-tlsfront is not built (make tlsfront)")

DECOYS = 100
"""Same-named CA certificates in the crafted chain: ~40 KB, within rustls' 64 KB handshake message limit."""
ROUNDS, PER_ROUND = 4, 250
"""Handshakes of each kind: ~0.3 ms of front CPU each, ~27 10-ms ticks in all for the ordinary kind.
utime+stime is exact CPU time truncated to ticks, so a before/after pair is off by less than 2 ticks."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server, TLS on the rustls front, one worker (so one front thread). A front stuck in a
    path search cannot take its SIGTERM: it is killed at the end."""
    with running_ca(tmp_path_factory.mktemp("chains") / "ca", TRUST_DOMAIN, extra=("--tls", "rustls")) as handle:
        front = _front_pid(handle)
        yield handle
    with contextlib.suppress(OSError):
        if Path(f"/proc/{front}/comm").read_text().startswith("tensorguard-tls"):
            os.kill(front, signal.SIGKILL)


def _front_pid(server: Server) -> int:
    (pid,) = [pid for pid in _worker_pids(server.proc.pid)
              if Path(f"/proc/{pid}/comm").read_text().startswith("tensorguard-tls")]
    return pid


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def _certificate(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
                 signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = utc_now()
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe("mallory"))]),
                                  critical=False))
    return builder.sign(signer, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _decoys(server: Server) -> list[x509.Certificate]:
    """CA certificates named exactly like the fleet intermediate (subject and issuer), each its own key."""
    name = x509.load_pem_x509_certificate(CAPaths(server.ca_dir).intermediate_cert.read_bytes()).subject
    decoys = []
    for _ in range(DECOYS):
        key = p256()
        decoys.append(_certificate(name, name, key.public_key(), key, ca=True))
    return decoys


def _context(server: Server, work: Path, label: str, chain: bytes, key: bytes) -> ssl.SSLContext:
    """A client context that sends ``chain`` (leaf first, then whatever follows) as its Certificate."""
    (work / f"{label}.pem").write_bytes(chain)
    (work / f"{label}.key").write_bytes(key)
    context = ssl.create_default_context(cafile=str(server.root_cert))
    context.load_cert_chain(work / f"{label}.pem", work / f"{label}.key")
    return context


def _refused(server: Server, context: ssl.SSLContext) -> str:
    """One handshake that the front must refuse; the client's error. TLS 1.3: the alert is read after the
    client's Finished (a request sent first could meet a reset instead)."""
    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    try:
        with context.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                                 server_hostname=host) as tls:
            data = tls.recv(1)
    except (ssl.SSLError, ConnectionError) as exc:
        return str(exc)
    except TimeoutError:
        return "no answer in 10 s"
    return f"not refused: read {data!r}"



def test_a_crafted_chain_of_same_named_cas_costs_the_front_no_more_than_an_ordinary_refusal(
        server: Server, tmp_path: Path) -> None:
    decoys = _decoys(server)
    intermediate_name = decoys[0].subject
    mallory = p256()
    leaf = _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]), intermediate_name,
                        mallory.public_key(), p256(), ca=False)  # named as issued by it, signed by none of them
    crafted = _context(server, tmp_path, "crafted", _pem(leaf, *decoys), key_pem(mallory))
    twin = make_ca(tmp_path / "twin", utc_now() - timedelta(minutes=5))  # the same names, other keys
    foreign_key = p256()
    foreign = twin.issue(make_csr(foreign_key), "foreign", utc_now())
    ordinary = _context(server, tmp_path, "ordinary", _pem(foreign), key_pem(foreign_key))
    for context in (crafted, ordinary):  # both reach the verifier (a too-long message is a decode_error)
        assert "HANDSHAKE_FAILURE" in _refused(server, context).upper()
    front = _front_pid(server)
    spent = {"crafted": 0, "ordinary": 0}
    started = time.monotonic()
    for _ in range(ROUNDS):  # interleaved, so that drift in the machine's load hits both kinds alike
        for kind, context in (("crafted", crafted), ("ordinary", ordinary)):
            before = _cpu_ticks(front)
            for _ in range(PER_ROUND):
                assert "HANDSHAKE_FAILURE" in _refused(server, context).upper()
            spent[kind] += _cpu_ticks(front) - before
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    handshakes = ROUNDS * PER_ROUND
    print(f"front CPU per refused handshake over {handshakes} each: crafted chain of {DECOYS + 1} certificates "
          f"{spent['crafted'] * tick_ms / handshakes:.3f} ms, ordinary foreign certificate "
          f"{spent['ordinary'] * tick_ms / handshakes:.3f} ms ({time.monotonic() - started:.1f} s)")
    assert spent["ordinary"] > 0
    assert spent["crafted"] <= 2 * spent["ordinary"] + 2 * ROUNDS, spent


def test_a_robot_is_accepted_alone_and_with_junk_after_its_certificate(server: Server, tmp_path: Path) -> None:
    cert_path, key_path, _ = server.enrol("robot-c", tmp_path)
    cert, key = cert_path.read_bytes(), key_path.read_bytes()
    junk = _pem(*_decoys(server)[:20]) + _pem(x509.load_pem_x509_certificate(server.root_cert.read_bytes()))
    for label, chain in (("alone", cert), ("junk", cert + junk)):
        context = _context(server, tmp_path, label, chain, key)
        with httpx.Client(verify=context, timeout=10) as client:
            response = client.post(f"{server.est}/simplereenroll", content=b64(make_csr(p256())), headers=PKCS10)
        assert response.status_code == 200, (label, response.text)
