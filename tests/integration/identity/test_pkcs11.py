"""The identity key on a real softhsm2 token: generated there, never extractable, signing CSRs,
enrolled with the real CA server process and renewed over mTLS done by the token's key (curl and
OpenSSL's pkcs11 engine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tensorguard.control import call
from tensorguard.identity.est import EstClient, EstError, EstUnavailable, pick_leaf
from tensorguard.identity.keys import build_csr, cert_spiffe_ids, generate_key, public_der, spiffe_id
from tensorguard.identity.pkcs11 import (
    LABEL_PREFIX,
    Pkcs11Error,
    Pkcs11KeyStore,
    build_csr_pkcs11,
    certification_request_info,
    new_label,
    read_pin,
)
from tensorguard.identity.pkcs11_est import (
    Pkcs11Credential,
    engine_problem,
    key_uri,
    simplereenroll_pkcs11,
)
from tests.conftest import AgentDir, UnitProcess, start_unit, tgctl
from tests.integration.server.ca_process import Server, running_ca

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN = "tensorguard"
ODD_TOKEN = "fleet key;v=1/%"  # needs percent-encoding in a PKCS#11 URI
PIN = "4711-robot"
TRUST_DOMAIN = "fleet.test"
NODE = "robot-p11"

try:
    import PyKCS11  # noqa: F401
    HAVE_BINDING = True
except ImportError:
    HAVE_BINDING = False

needs_softhsm = pytest.mark.skipif(
    not (shutil.which("softhsm2-util") and MODULE.is_file() and HAVE_BINDING),
    reason="needs softhsm2 (apt install softhsm2) and PyKCS11 (apt install python3-pykcs11)")
ENGINE_PROBLEM = engine_problem()
needs_engine = pytest.mark.skipif(ENGINE_PROBLEM is not None, reason=f"mTLS with a token key: {ENGINE_PROBLEM}")


@dataclass
class Hsm:
    """A softhsm2 token directory of its own, with the PIN in a file as an operator writes it."""

    root: Path
    pin_file: Path

    def store(self, token: str = TOKEN, pin: str = PIN) -> Pkcs11KeyStore:
        return Pkcs11KeyStore(MODULE, token, pin)

    def credential(self, cert_file: Path, label: str, token: str = TOKEN,
                   pin_file: Path | None = None) -> Pkcs11Credential:
        return Pkcs11Credential(cert_file, MODULE, token, label, pin_file or self.pin_file)


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    if not (shutil.which("softhsm2-util") and MODULE.is_file() and HAVE_BINDING):
        pytest.skip("needs softhsm2 and PyKCS11")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as patch:
        # softhsm2 reads its config once per process, at the first C_Initialize: every token this
        # file uses is made before any test opens a store
        patch.setenv("SOFTHSM2_CONF", str(conf))
        for label in (TOKEN, ODD_TOKEN):
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                            "--so-pin", "so-secret-1"], check=True, capture_output=True, timeout=60)
        yield Hsm(root, write_secret(root / "pin", PIN + "\n"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory, hsm: Hsm) -> Iterator[Server]:
    with running_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN) as server:
        yield server


def token_value_readable(label: str) -> tuple[str, str]:
    """Ask the token, from another process and straight through PyKCS11's low-level C_GetAttributeValue,
    for the private key's CKA_VALUE and CKA_EXTRACTABLE: the return codes the token gives."""
    script = textwrap.dedent(f"""
        import PyKCS11
        from PyKCS11 import LowLevel
        lib = PyKCS11.PyKCS11Lib()
        lib.load({str(MODULE)!r})
        slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == {TOKEN!r})
        session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
        session.login({PIN!r})
        (key,) = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, {label!r})])
        for name in ("CKA_VALUE", "CKA_EXTRACTABLE"):
            template = LowLevel.ckattrlist(1)
            template[0].SetType(getattr(PyKCS11, name))
            rv = session.lib.C_GetAttributeValue(session.session, key, template)
            if rv == PyKCS11.CKR_OK and name == "CKA_EXTRACTABLE":
                rv = session.lib.C_GetAttributeValue(session.session, key, template)
                print(name, "TRUE" if template[0].GetBool() else "FALSE")
            else:
                print(name, PyKCS11.CKR[rv])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    return out[1], out[3]


# -- the PKCS#10 encoder, against cryptography's own ----------------------------------------------


@pytest.mark.parametrize("node", ["robot-7", "r" * 60])
def test_request_info_is_byte_identical_to_cryptography(node: str) -> None:
    key = generate_key("ecdsa-p256")
    expected = build_csr(key, TRUST_DOMAIN, node).tbs_certrequest_bytes
    assert certification_request_info(public_der(key), TRUST_DOMAIN, node) == expected


# -- the token -------------------------------------------------------------------------------------


@needs_softhsm
def test_generated_key_signs_and_cannot_leave_the_token(hsm: Hsm) -> None:
    label = new_label()
    with hsm.store() as store:
        spki = store.generate(label)
        public = serialization.load_der_public_key(spki)
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        assert store.public_key_der(label) == spki
        signature = store.sign(label, b"renewal of robot-7")
        public.verify(signature, b"renewal of robot-7", ec.ECDSA(hashes.SHA256()))  # raises if wrong
        with pytest.raises(InvalidSignature):
            public.verify(signature, b"renewal of robot-8", ec.ECDSA(hashes.SHA256()))
        protection = store.protection(label)
        assert protection.sensitive and not protection.extractable
        assert protection.always_sensitive and protection.never_extractable and protection.local
        assert label in store.labels()
    assert token_value_readable(label) == ("CKR_ATTRIBUTE_SENSITIVE", "FALSE")
    with hsm.store() as store:
        assert store.delete(label) == 2  # the private and the public key
        assert store.delete(label) == 0
        assert label not in store.labels()


@needs_softhsm
def test_csr_signed_by_the_token_is_valid_and_asks_for_the_spiffe_id(hsm: Hsm) -> None:
    label = new_label()
    with hsm.store() as store:
        spki = store.generate(label)
        der = build_csr_pkcs11(store, label, TRUST_DOMAIN, NODE)
        store.delete(label)
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == spki
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NODE
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id(TRUST_DOMAIN, NODE)]
    assert csr.signature_hash_algorithm is not None and csr.signature_hash_algorithm.name == "sha256"


@needs_softhsm
def test_stores_in_threads_share_the_login_and_do_not_end_each_other(hsm: Hsm) -> None:
    """The identity unit signs in a worker thread while another store may be open (pruning at start)."""
    label = new_label()
    with hsm.store() as store:
        public = serialization.load_der_public_key(store.generate(label))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    first, second = hsm.store(), hsm.store()  # the second login finds the user logged in already
    first.close()  # no C_Logout: the second session keeps working
    failures: list[BaseException] = []

    def sign_many(index: int) -> None:
        try:
            with hsm.store() as store:
                for n in range(10):
                    message = f"thread {index} message {n}".encode()
                    public.verify(store.sign(label, message), message, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=sign_many, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert second.delete(label) == 2
    second.close()
    with pytest.raises(Pkcs11Error, match=r"session on PKCS#11 token 'tensorguard' .* is closed"):
        second.labels()


@needs_softhsm
def test_wrong_pin_names_the_token_and_not_the_pin(hsm: Hsm, tmp_path: Path) -> None:
    with pytest.raises(Pkcs11Error) as caught:
        hsm.store(pin="0000-wrong")
    message = str(caught.value)
    assert f"wrong PIN for PKCS#11 token {TOKEN!r}" in message and str(MODULE) in message
    assert "0000-wrong" not in message
    wrong = write_secret(tmp_path / "pin", "0000-wrong\n")
    with pytest.raises(Pkcs11Error, match="wrong PIN for PKCS#11 token"):
        Pkcs11KeyStore(MODULE, TOKEN, read_pin(wrong))
    with hsm.store() as store:  # the right PIN still works afterwards
        assert isinstance(store.labels(), list)


@needs_softhsm
def test_unknown_token_and_missing_module_say_what_is_there(hsm: Hsm, tmp_path: Path) -> None:
    with pytest.raises(Pkcs11Error, match=r"no token labelled 'nope' in PKCS#11 module .*tokens present: .*'tensorguard'"):
        hsm.store(token="nope")
    with pytest.raises(Pkcs11Error, match=f"the PKCS#11 module {tmp_path}/none.so does not exist"):
        Pkcs11KeyStore(tmp_path / "none.so", TOKEN, PIN)


@needs_softhsm
def test_ed25519_is_refused_and_leaves_nothing_behind(hsm: Hsm) -> None:
    label = new_label()
    with hsm.store() as store:
        with pytest.raises(Pkcs11Error, match=r"ed25519 is not supported on a PKCS#11 token.*libp11"):
            store.generate(label, "ed25519")
        assert label not in store.labels()


@needs_softhsm
def test_rotation_keeps_the_current_key_and_prunes_the_rest(hsm: Hsm) -> None:
    old, current, leftover = new_label(), new_label(), new_label()
    with hsm.store() as store:
        for label in (old, current, leftover):
            store.generate(label)
        with pytest.raises(Pkcs11Error, match="already exists"):
            store.generate(current)
        present = set(store.labels())
        assert {old, current, leftover} <= present
        assert set(store.prune(keep={current})) == present - {current}
    with hsm.store() as store:
        assert [label for label in store.labels() if label.startswith(LABEL_PREFIX)] == [current]
        store.sign(current, b"still usable")
        store.delete(current)


def test_pin_file_rules(tmp_path: Path) -> None:
    assert read_pin(write_secret(tmp_path / "a", "1234\n")) == "1234"
    assert read_pin(write_secret(tmp_path / "b", "12 34\r\n", 0o640)) == "12 34"
    with pytest.raises(Pkcs11Error, match=f"{tmp_path}/c has mode 644: it must be 0600 or 0640"):
        read_pin(write_secret(tmp_path / "c", "1234\n", 0o644))
    with pytest.raises(Pkcs11Error, match="must hold exactly one non-empty line"):
        read_pin(write_secret(tmp_path / "d", "\n"))
    with pytest.raises(Pkcs11Error, match="must hold exactly one non-empty line"):
        read_pin(write_secret(tmp_path / "e", "1234\n5678\n"))
    with pytest.raises(Pkcs11Error, match=f"cannot read the PKCS#11 PIN file {tmp_path}/f: No such file"):
        read_pin(tmp_path / "f")
    for name in "ce":
        with pytest.raises(Pkcs11Error) as caught:
            read_pin(tmp_path / name)
        assert "1234" not in str(caught.value) and "5678" not in str(caught.value)


# -- OpenSSL's pkcs11 engine and the CA ------------------------------------------------------------


@needs_softhsm
@needs_engine
def test_engine_finds_the_key_by_uri_even_with_an_odd_token_label(hsm: Hsm, tmp_path: Path) -> None:
    label = new_label()
    with hsm.store(ODD_TOKEN) as store:
        spki = store.generate(label)
    pin = write_secret(tmp_path / "pin", PIN)  # the engine reads pin-source files verbatim
    out = subprocess.run(["openssl", "pkey", "-engine", "pkcs11", "-inform", "ENG", "-pubout", "-outform", "DER",
                          "-in", key_uri(ODD_TOKEN, label, f"file:{pin}")],
                         env={**os.environ, "PKCS11_MODULE_PATH": str(MODULE)}, capture_output=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == spki
    assert key_uri(ODD_TOKEN, label).startswith("pkcs11:token=fleet%20key%3Bv%3D1%2F%25;object=")


def enrol(hsm: Hsm, ca: Server, tmp_path: Path, node: str = NODE) -> tuple[str, Path, x509.Certificate]:
    """First enrolment with a bootstrap token, the key on the token: (label, cert.pem, leaf)."""
    label = new_label()
    with hsm.store() as store:
        spki = store.generate(label)
        der = build_csr_pkcs11(store, label, TRUST_DOMAIN, node)
    certs = EstClient(ca.url, ca.root_cert).simpleenroll(x509.load_der_x509_csr(der), ca.token(node))
    leaf, _ = pick_leaf(certs, spki)
    cert_file = tmp_path / f"{label}.pem"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return label, cert_file, leaf


@needs_softhsm
@needs_engine
def test_enrol_then_renew_over_mtls_with_the_token_key(hsm: Hsm, ca: Server, tmp_path: Path) -> None:
    label, cert_file, leaf = enrol(hsm, ca, tmp_path)
    assert cert_spiffe_ids(leaf) == [spiffe_id(TRUST_DOMAIN, NODE)]

    renewed = new_label()
    with hsm.store() as store:
        spki = store.generate(renewed)
        der = build_csr_pkcs11(store, renewed, TRUST_DOMAIN, NODE)
    certs = simplereenroll_pkcs11(ca.url, ca.root_cert, hsm.credential(cert_file, label), der)
    new_leaf, _ = pick_leaf(certs, spki)

    new_public = new_leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    assert new_public == spki
    assert new_public != leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert new_leaf.serial_number != leaf.serial_number
    assert cert_spiffe_ids(new_leaf) == [spiffe_id(TRUST_DOMAIN, NODE)]
    # the CA saw the old certificate in the handshake (its serial is what it audits as previous)
    issued = ca.store.audit_records("est.reenroll.issued")[-1]
    assert issued.node == NODE
    assert issued.fields["previous_serial"] == f"{leaf.serial_number:x}"

    # rotation: once the new certificate is in place the old key goes, and with it the old identity
    with hsm.store() as store:
        assert store.delete(label) == 2
    with pytest.raises(EstUnavailable, match=rf"key '{label}' on PKCS#11 token '{TOKEN}'"):
        simplereenroll_pkcs11(ca.url, ca.root_cert, hsm.credential(cert_file, label), der)
    with hsm.store() as store:
        store.delete(renewed)


@needs_softhsm
@needs_engine
def test_certificate_of_another_key_is_not_presented(hsm: Hsm, ca: Server, tmp_path: Path) -> None:
    """TLS is done by the token key the credential names: a certificate for another key fails locally."""
    _, cert_file, _ = enrol(hsm, ca, tmp_path)
    other = new_label()
    with hsm.store() as store:
        store.generate(other)
        der = build_csr_pkcs11(store, other, TRUST_DOMAIN, NODE)
    before = len(ca.store.audit_records("est.reenroll"))
    with pytest.raises(EstUnavailable, match="cannot set up TLS with the certificate"):
        simplereenroll_pkcs11(ca.url, ca.root_cert, hsm.credential(cert_file, other), der)
    assert len(ca.store.audit_records("est.reenroll")) == before  # never reached the CA
    with hsm.store() as store:
        store.prune(keep=())


@needs_softhsm
@needs_engine
def test_refusals_and_outages_mean_what_they_mean_for_est(hsm: Hsm, ca: Server, tmp_path: Path) -> None:
    label, cert_file, _ = enrol(hsm, ca, tmp_path)
    with hsm.store() as store:
        other = new_label()
        store.generate(other)
        foreign = build_csr_pkcs11(store, other, TRUST_DOMAIN, "robot-someone-else")
    # 4xx: the CA's reason comes back as EstError
    with pytest.raises(EstError) as refused:
        simplereenroll_pkcs11(ca.url, ca.root_cert, hsm.credential(cert_file, label), foreign)
    assert refused.value.status == 403
    assert refused.value.reason == ca.store.audit_records("est.reenroll.refused")[-1].reason
    # wrong PIN: a clear error naming the token, never the PIN
    wrong = write_secret(tmp_path / "wrong-pin", "0000-wrong\n")
    with pytest.raises(EstUnavailable) as caught:
        simplereenroll_pkcs11(ca.url, ca.root_cert, hsm.credential(cert_file, label, pin_file=wrong), foreign)
    assert f"on PKCS#11 token {TOKEN!r}" in str(caught.value) and "0000-wrong" not in str(caught.value)
    # nobody listening: EstUnavailable naming the address
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EstUnavailable, match=f"cannot reach 127.0.0.1:{port}"):
        simplereenroll_pkcs11(f"https://127.0.0.1:{port}", ca.root_cert, hsm.credential(cert_file, label),
                              foreign, timeout=5)
    # a server that the trust anchor does not vouch for
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(cert_file.read_bytes())
    with pytest.raises(EstUnavailable, match="failed verification against"):
        simplereenroll_pkcs11(ca.url, stranger, hsm.credential(cert_file, label), foreign)
    with hsm.store() as store:
        store.prune(keep=())


@needs_softhsm
def test_missing_engine_is_named(hsm: Hsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    monkeypatch.setenv("OPENSSL_ENGINES", str(tmp_path))  # an engine directory without pkcs11.so
    problem = engine_problem()
    assert problem is not None and "libengine-pkcs11-openssl" in problem
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"")
    with pytest.raises(EstUnavailable, match="pkcs11 engine is not installed"):
        simplereenroll_pkcs11("https://127.0.0.1:9", tmp_path / "ca.pem", hsm.credential(cert, "k1"), b"\x30\x00")
    with pytest.raises(EstUnavailable, match="nothing-here is not installed"):
        simplereenroll_pkcs11("https://127.0.0.1:9", tmp_path / "ca.pem", hsm.credential(cert, "k1"), b"\x30\x00",
                              curl=str(tmp_path / "nothing-here"))


@needs_softhsm
@needs_engine
def test_the_identity_unit_keeps_its_key_on_the_token(hsm: Hsm, ca: Server, agent_dir: AgentDir,
                                                      units: list[UnitProcess]) -> None:
    """key_store = "pkcs11" end to end: the unit enrols and renews with keys that never leave the
    token, deletes each replaced key, and sinks get the key's URI instead of a key file."""
    sink = agent_dir.root / "sink"
    sink.mkdir(mode=0o750)
    token_file = write_secret(agent_dir.root / "token", ca.token("robot-p11-unit") + "\n")
    agent_dir.write(f"""node_id = "robot-p11-unit"

[identity]
enabled = true
server_url = "{ca.url}"
trust_domain = "{TRUST_DOMAIN}"
trust_anchor = "{ca.root_cert}"
bootstrap_token_file = "{token_file}"
state_dir = "{agent_dir.root / 'state'}"
key_store = "pkcs11"

[[identity.sink]]
name = "app"
directory = "{sink}"

[identity.pkcs11]
module = "{MODULE}"
token_label = "{TOKEN}"
pin_file = "{hsm.pin_file}"
""")
    unit = start_unit(agent_dir, "identity", env={"SOFTHSM2_CONF": str(hsm.root / "softhsm2.conf")})
    units.append(unit)
    sock = agent_dir.socket("identity")
    deadline = time.monotonic() + 20
    while call(sock, "identity.show")["state"] != "valid":
        assert time.monotonic() < deadline, call(sock, "identity.show")
        time.sleep(0.1)
    live = agent_dir.root / "state" / "live"
    first_label = (live / "key.label").read_text().strip()
    assert (sink / "key.pem").read_text().startswith(f"pkcs11:token={TOKEN};object={first_label}")
    assert "PRIVATE KEY" not in (live / "key.pem").read_text()
    renewed = tgctl(agent_dir, "identity", "renew")
    assert renewed.returncode == 0, renewed.stderr
    second_label = (live / "key.label").read_text().strip()
    assert second_label != first_label
    with hsm.store() as store:
        labels = store.labels()
        assert second_label in labels and first_label not in labels  # the replaced key is gone
        cert = x509.load_pem_x509_certificate((live / "cert.pem").read_bytes())
        assert public_der_of(cert) == store.public_key_der(second_label)
    assert unit.stop() == 0


def public_der_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
