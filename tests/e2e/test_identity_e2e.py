"""Machine identity end to end: the packaged CA issues, the hardened identity unit enrols and renews.

On a fresh Debian 12 and a fresh Debian 13 booted with systemd (the harness of test_clean_install.py), what an
operator does with the two packages:

    apt-get install ./tensorguard-agent_*.deb ./tensorguard-server_*.deb
    tensorguard server ca init ...; systemctl start tensorguard-server
    tensorguard server token create ...  -> /var/lib/tensorguard/identity/bootstrap-token (tensorguard, 0600)
    CA root -> /etc/tensorguard/ca.pem; [identity] drop-in with a files sink; restart identity
    tgctl identity show | renew | audit verify

The identity unit runs exactly as packaged (User=tensorguard, ProtectSystem=strict, seccomp, no
capabilities) plus the one documented drop-in a sink outside its state directory needs
(ReadWritePaths=); the server runs as packaged (user tensorguard-server, PrivateUsers=). Every
request goes over real HTTPS on 127.0.0.1 inside the container: EST enrolment with the bootstrap
token, then renewal over mTLS with the current certificate.

Needs root, debootstrap, systemd-nspawn and the .debs in build/debs/ (make debs); skipped
otherwise, except under TG_REQUIRE_E2E=1, where a missing piece is a failure.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .test_clean_install import (  # noqa: F401  (debs and progress are fixtures used below)
    APT,
    REPO,
    debs,
    diagnose,
    progress,
    rootfs,
    sh,
    suite,
    tgctl_json,
    unit_states,
    wait_for,
)

pytestmark = pytest.mark.root

INSTALLED = ("python3-tensorguard", "tensorguard-agent", "tensorguard-server")
SERVER = "tensorguard-server.service"
IDENTITY = "tensorguard-identity.service"
CA_DIR = "/var/lib/tensorguard/ca"
PRIVDIR = "/usr/lib/tensorguard/python"
TRUST_DOMAIN = "fleet.example"
NODE = "robot-e2e"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/robot/{NODE}"
PORT = 8443
SERVER_URL = f"https://127.0.0.1:{PORT}"
TOKEN_FILE = "/var/lib/tensorguard/identity/bootstrap-token"
SINK_DIR = "/srv/robot-tls"
SINK_DROPIN = "/etc/systemd/system/tensorguard-identity.service.d/50-sink.conf"
IDENTITY_DROPIN = "/etc/tensorguard/agent.d/50-identity.toml"
PKCS11_DROPIN = "/etc/systemd/system/tensorguard-identity.service.d/60-pkcs11.conf"
PKCS11_PIN = "/etc/tensorguard/pkcs11-pin"


@dataclass
class Enrolment:
    """What the enrolment fixture leaves for the tests: the first certificate and its token."""

    token: str
    show: dict[str, Any]
    started_at: str  # `date +%s` in the container before the identity unit was restarted


@pytest.fixture(scope="module")
def machine(debs: dict[str, Path], suite: str) -> Iterator[rootfs.Container]:  # noqa: F811
    """Fresh ``suite`` + tensorguard-agent and tensorguard-server, booted; always torn down."""
    with rootfs.booted(list(debs.values()), INSTALLED, suite=suite) as box:
        yield box


def journal(box: rootfs.Container, unit: str, since: str = "") -> str:
    flag = f"--since @{since}" if since else "-b"
    return sh(box, f"journalctl --no-pager -o cat -u {unit} {flag}").stdout


def wait_journal(box: rootfs.Container, unit: str, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = journal(box, unit)
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def main_uid(box: rootfs.Container, unit: str) -> int:
    """The real uid (as the host's PID namespace sees it) of the unit's main process."""
    pid = sh(box, f"systemctl show -p MainPID --value {unit}").stdout.strip()
    assert pid not in ("", "0"), f"{unit} has no main process\n{diagnose(box, unit)}"
    status = sh(box, f"cat /proc/{pid}/status").stdout
    uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
    return int(uid_line.split()[1])


def uid_of(box: rootfs.Container, user: str) -> int:
    return int(sh(box, f"id -u {user}").stdout.strip())


def identity_show(box: rootfs.Container) -> dict[str, Any]:
    code, data = tgctl_json(box, "identity", "show")
    assert code == 0, data
    return data


@pytest.fixture(scope="module")
def serving(machine: rootfs.Container) -> rootfs.Container:
    """The operator's first steps on the control plane: ca init (as root), start the unit."""
    box = machine
    with rootfs.step("tensorguard server ca init + start tensorguard-server"):
        sh(box, f"tensorguard server ca init --dir {CA_DIR} --trust-domain {TRUST_DOMAIN} "
                "--host-name 127.0.0.1 --host-name localhost")
        sh(box, f"systemctl start {SERVER}")
        states = wait_for(box, (SERVER,), "active", timeout=30)
        assert states[SERVER] == "active", diagnose(box, SERVER)
        text = wait_journal(box, SERVER, f"listening on {SERVER_URL}")
    assert f"listening on {SERVER_URL}" in text, f"server never listened:\n{diagnose(box, SERVER)}"
    # The .deb bundles uvicorn's C parser and libuv loop; Debian's own would not be picked.
    assert "HTTP/1.1 on httptools 0.9.0 on uvloop 0.23.0" in text, diagnose(box, SERVER)
    # The robots' TLS ends in the packaged rustls front, running as the unit's user under its sandbox.
    assert "TLS on rustls (/usr/lib/tensorguard/tensorguard-tlsfront)" in text, diagnose(box, SERVER)
    owners = sh(box, "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = tensorguard-tls ] && "
                     "stat -c %U $p; done; true").stdout.split()
    assert owners == ["tensorguard-server"], diagnose(box, SERVER)
    return box


@pytest.fixture(scope="module")
def enrolled(serving: rootfs.Container) -> Enrolment:
    """The robot's side: token file, trust anchor, [identity] drop-in with a files sink outside
    the state directory (plus the unit drop-in that makes it writable), restart, wait for valid."""
    box = serving
    with rootfs.step("token create, identity drop-ins, restart identity, wait until valid"):
        # As root, while the server runs (README.Debian's way): the token is on stdout only.
        token = box.exec(["tensorguard", "server", "token", "create", "--dir", CA_DIR,
                          "--node-id", NODE, "--ttl", "10m"]).stdout.strip()
        assert token and " " not in token
        # Secrets through stdin only: never in a command line (ps) or a test log.
        box.exec(["install", "-o", "tensorguard", "-g", "tensorguard", "-m", "0600",
                  "/dev/stdin", TOKEN_FILE], input=token + "\n")
        sh(box, f"install -m 0644 {CA_DIR}/root.crt /etc/tensorguard/ca.pem")
        sh(box, f"install -d -o tensorguard -g tensorguard -m 0750 {SINK_DIR}")
        sh(box, f"mkdir -p {Path(SINK_DROPIN).parent} && "
                f"printf '[Service]\\nReadWritePaths={SINK_DIR}\\n' > {SINK_DROPIN} && "
                "systemctl daemon-reload")
        box.exec(["tee", IDENTITY_DROPIN], input=(
            f'[agent]\nnode_id = "{NODE}"\n\n'
            f'[identity]\nenabled = true\nserver_url = "{SERVER_URL}"\n'
            f'trust_domain = "{TRUST_DOMAIN}"\n\n'
            f'[[identity.sink]]\nname = "robot-tls"\nkind = "files"\ndirectory = "{SINK_DIR}"\n'))
        sh(box, "tgctl config validate")
        started_at = sh(box, "date +%s").stdout.strip()
        sh(box, f"systemctl restart {IDENTITY}")
        deadline = time.monotonic() + 60
        show = identity_show(box)
        while show["state"] != "valid" and time.monotonic() < deadline:
            time.sleep(0.5)
            show = identity_show(box)
    assert show["state"] == "valid", (
        f"identity not valid after 60 s: {json.dumps(show, indent=2)}\n"
        f"{diagnose(box, IDENTITY, SERVER)}")
    assert box.exec(["test", "-e", TOKEN_FILE], check=False).returncode == 1, "the used token was left"
    return Enrolment(token, show, started_at)


# --------------------------------------------------------------------------- the control plane


def test_check_units_on_built_server_deb(debs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """packaging/check-units on tensorguard-server.service exactly as the .deb ships it."""
    unpacked = tmp_path / "unpacked"
    for name in INSTALLED:  # the agent's /usr/bin/tensorguard is the unit's ExecStart=
        subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(unpacked)], check=True)
    r = subprocess.run([str(REPO / "packaging" / "check-units"), "--root", str(unpacked)],
                       text=True, capture_output=True, timeout=300, check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"check-units failed:\n{r.stdout}\n{r.stderr}"
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(SERVER))
    assert row.split()[-1] == "OK" and float(row.split()[1]) <= 2.0, row


def test_server_installed_idle_until_ca_exists(machine: rootfs.Container) -> None:
    """Installed, enabled, its own user, bundle from the .deb: and skipped (not failed) until ca init."""
    box = machine
    assert "/usr/sbin/nologin" in sh(box, "getent passwd tensorguard-server").stdout
    assert sh(box, f"systemctl is-enabled {SERVER}").stdout.strip() == "enabled"
    props = sh(box, f"systemctl show -p ActiveState -p ConditionResult -p Result {SERVER}").stdout
    assert sorted(props.split()) == ["ActiveState=inactive", "ConditionResult=no", "Result=success"], (
        props)
    assert "/etc/default/tensorguard-server" in sh(
        box, "dpkg-query -W -f='${Conffiles}' tensorguard-server").stdout
    # FastAPI and uvicorn from the bundle (uvloop from the release's Python's directory),
    # cryptography from Debian (38.x on 12, 43.x on 13).
    r = sh(box, f"python3 -I -c 'import sys; sys.path.insert(0, \"{PRIVDIR}\"); "
                "from tensorguard.bundle import use_bundled_binaries; use_bundled_binaries(); "
                "import fastapi, uvicorn, cryptography; "
                "print(fastapi.__file__, uvicorn.__file__, cryptography.__file__, "
                "cryptography.__version__)'")
    fastapi_file, uvicorn_file, crypto_file, crypto_version = r.stdout.split()
    assert fastapi_file.startswith(f"{PRIVDIR}/fastapi/"), fastapi_file
    assert uvicorn_file.startswith(f"{PRIVDIR}/uvicorn/"), uvicorn_file
    assert crypto_file.startswith("/usr/lib/python3/dist-packages/cryptography/"), crypto_file
    assert int(crypto_version.split(".")[0]) >= 38, crypto_version
    sh(box, f"ls {PRIVDIR}/fastapi/__pycache__/*.pyc >/dev/null")  # py3compile at install
    r = sh(box, "dpkg-query -W -f='${Package} ${Status}\\n' python3-pip python3-fastapi "
                "python3-uvicorn python3-pydantic 2>/dev/null | grep -c 'install ok installed' || true",
           check=False)
    assert r.stdout.strip() == "0", r.stdout


def test_ca_directory_belongs_to_the_server_user(serving: rootfs.Container) -> None:
    """ca init ran as root; starting the unit handed the CA to tensorguard-server, 0700/0600."""
    box = serving
    assert sh(box, f"stat -c '%a %U' {CA_DIR}").stdout.split() == ["700", "tensorguard-server"]
    keys = sh(box, f"stat -c '%n %a %U' {CA_DIR}/intermediate.key {CA_DIR}/server.key").stdout
    for line in keys.splitlines():
        assert line.split()[1:] == ["600", "tensorguard-server"], keys
    assert main_uid(box, SERVER) == uid_of(box, "tensorguard-server")


def test_server_answers_https_with_the_ca_chain(serving: rootfs.Container) -> None:
    """/healthz and EST cacerts over HTTPS, verified against the new root only."""
    box = serving
    script = (
        "import json, ssl, urllib.request\n"
        f"ctx = ssl.create_default_context(cafile='{CA_DIR}/root.crt')\n"
        "out = {}\n"
        "for path in ('/healthz', '/.well-known/est/cacerts'):\n"
        f"    with urllib.request.urlopen('{SERVER_URL}' + path, context=ctx, timeout=10) as r:\n"
        "        out[path] = [r.status, r.headers.get('Content-Type', ''), len(r.read())]\n"
        "print(json.dumps(out))\n")
    r = box.exec(["python3", "-I", "-c", script], check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{diagnose(box, SERVER)}"
    out = json.loads(r.stdout)
    assert out["/healthz"][0] == 200, out
    status, ctype, size = out["/.well-known/est/cacerts"]
    assert status == 200 and "pkcs7" in ctype and size > 0, out


# --------------------------------------------------------------------------- the robot


def test_identity_enrolled_with_the_bootstrap_token(machine: rootfs.Container,
                                                    enrolled: Enrolment) -> None:
    box = machine
    show = enrolled.show
    assert show["spiffe_id"] == SPIFFE_ID, show
    assert show["expires_in_s"] > 0 and show["phase"], show
    assert [(s["name"], s["current"]) for s in show["sinks"]] == [("robot-tls", True)], show
    assert show["last_error"] is None, show
    # The hardened unit as packaged: user tensorguard, not root.
    assert main_uid(box, IDENTITY) == uid_of(box, "tensorguard")
    code, status = tgctl_json(box, "--unit", "identity", "status")
    assert code == 0, status


def test_bootstrap_token_is_single_use(machine: rootfs.Container, enrolled: Enrolment) -> None:
    """The CA refuses the used token again; the identity keeps its certificate."""
    box = machine
    r = box.exec(["tgctl", "identity", "enrol"], input=enrolled.token + "\n", check=False)
    assert r.returncode != 0, f"a used bootstrap token enrolled again:\n{r.stdout}"
    show = identity_show(box)
    assert show["state"] == "valid" and show["serial"] == enrolled.show["serial"], show


def test_renew_changes_the_serial(machine: rootfs.Container, enrolled: Enrolment) -> None:
    """tgctl identity renew: a new certificate over mTLS, installed into the sink."""
    box = machine
    before = identity_show(box)["serial"]
    code, done = tgctl_json(box, "identity", "renew")
    assert code == 0, f"{done}\n{diagnose(box, IDENTITY, SERVER)}"
    assert done["serial"] != before, done
    show = identity_show(box)
    assert show["state"] == "valid", show
    assert show["serial"] == done["serial"] and show["renewals"] >= 1, show
    assert [(s["name"], s["current"]) for s in show["sinks"]] == [("robot-tls", True)], show


def test_sink_holds_the_current_matching_key_and_cert(machine: rootfs.Container,
                                                      enrolled: Enrolment) -> None:
    """The sink's key.pem and cert.pem are a pair, the cert is the current one, modes are strict."""
    box = machine
    script = (
        "import json\n"
        "from cryptography import x509\n"
        "from cryptography.hazmat.primitives import serialization as s\n"
        f"cert = x509.load_pem_x509_certificate(open('{SINK_DIR}/cert.pem', 'rb').read())\n"
        f"key = s.load_pem_private_key(open('{SINK_DIR}/key.pem', 'rb').read(), None)\n"
        "spki = lambda k: k.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)\n"
        "san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value\n"
        "print(json.dumps({'match': spki(key.public_key()) == spki(cert.public_key()),\n"
        "                  'serial': format(cert.serial_number, 'x'),\n"
        "                  'uris': san.get_values_for_type(x509.UniformResourceIdentifier),\n"
        "                  'issuer': cert.issuer.rfc4514_string()}))\n")
    r = box.exec(["python3", "-I", "-c", script], check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    sink = json.loads(r.stdout)
    assert sink["match"], sink
    assert sink["uris"] == [SPIFFE_ID], sink
    assert "Intermediate CA" in sink["issuer"], sink
    serial = identity_show(box)["serial"]
    assert int(str(serial), 16) == int(sink["serial"], 16), (serial, sink)
    modes = sh(box, f"stat -L -c '%n %a %U' {SINK_DIR}/key.pem {SINK_DIR}/cert.pem").stdout
    assert modes.split() == [f"{SINK_DIR}/key.pem", "600", "tensorguard",
                             f"{SINK_DIR}/cert.pem", "644", "tensorguard"], modes


def test_audit_log_verifies(machine: rootfs.Container, enrolled: Enrolment) -> None:
    box = machine
    code, result = tgctl_json(box, "identity", "audit", "verify")
    assert code == 0 and result["ok"], result
    # At least the enrolment and the renewal are in the log.
    assert result["size"] >= 2, result


def test_journals_have_no_traceback(machine: rootfs.Container, enrolled: Enrolment) -> None:
    """Neither the hardened identity unit nor the server logged a traceback (a sandbox refusal
    shows up as a PermissionError traceback: SystemCallErrorNumber=EPERM)."""
    box = machine
    ident = journal(box, IDENTITY, since=enrolled.started_at)
    server = journal(box, SERVER)
    print(ident, server, sep="\n")
    assert "Traceback" not in ident, ident
    assert "Traceback" not in server, server
    states = unit_states(box, IDENTITY, SERVER)
    assert states == {IDENTITY: "active", SERVER: "active"}, states
    restarts = sh(box, f"systemctl show -p NRestarts --value {IDENTITY} {SERVER}").stdout.split()
    assert restarts == ["0", "0"], restarts
    # The token is never logged.
    assert enrolled.token not in ident + server


def test_pkcs11_key_on_softhsm_under_the_hardened_unit(machine: rootfs.Container,
                                                        enrolled: Enrolment) -> None:
    """key_store = "pkcs11" with softhsm2 and README's unit drop-in: a renewal authenticated by the
    file key moves the identity onto the token; the next renewal signs its handshake on the token
    (curl + OpenSSL's pkcs11 engine) and deletes the replaced key."""
    box = machine
    with rootfs.step("apt-get install softhsm2 python3-pykcs11 curl libengine-pkcs11-openssl"):
        sh(box, f"{APT} install softhsm2 python3-pykcs11 curl libengine-pkcs11-openssl", timeout=300)
    pin = secrets.token_hex(8)
    box.exec(["install", "-o", "tensorguard", "-g", "tensorguard", "-m", "0600", "/dev/stdin",
              PKCS11_PIN], input=pin + "\n")
    # The token belongs to the unit's user (softhsm's token directory is root:softhsm 2770).
    sh(box, "adduser --quiet tensorguard softhsm")
    init = box.exec(["runuser", "-u", "tensorguard", "--", "softhsm2-util", "--init-token", "--free",
                     "--label", "tensorguard", "--so-pin", secrets.token_hex(8), "--pin", pin],
                    check=False)
    assert init.returncode == 0, f"{init.stdout}\n{init.stderr}"
    sh(box, f"printf '[Service]\\nSupplementaryGroups=softhsm\\nReadWritePaths=/var/lib/softhsm/tokens\\n' "
            f"> {PKCS11_DROPIN} && systemctl daemon-reload")
    text = box.exec(["cat", IDENTITY_DROPIN]).stdout
    box.exec(["tee", IDENTITY_DROPIN], input=text.replace(
        "[identity]\n", '[identity]\nkey_store = "pkcs11"\n', 1) + f'\n[identity.pkcs11]\npin_file = "{PKCS11_PIN}"\n')
    sh(box, "tgctl config validate")
    since = sh(box, "date +%s").stdout.strip()
    sh(box, f"systemctl restart {IDENTITY}")
    states = wait_for(box, (IDENTITY,), "active", timeout=30)
    assert states[IDENTITY] == "active", diagnose(box, IDENTITY)
    serials = []
    for _ in range(2):
        code, done = tgctl_json(box, "identity", "renew")
        assert code == 0, f"{done}\n{diagnose(box, IDENTITY, SERVER)}"
        serials.append(done["serial"])
        live_key = sh(box, "cat /var/lib/tensorguard/identity/live/key.pem").stdout
        sink_key = sh(box, f"cat {SINK_DIR}/key.pem").stdout
        assert live_key.startswith("pkcs11:") and "token=tensorguard" in live_key, live_key
        assert sink_key == live_key, (sink_key, live_key)
        # Exactly one private key on the token: the live one (the replaced one was deleted).
        script = (
            "import PyKCS11\n"
            "lib = PyKCS11.PyKCS11Lib(); lib.load('/usr/lib/softhsm/libsofthsm2.so')\n"
            "slot = next(s for s in lib.getSlotList(tokenPresent=True)\n"
            "            if lib.getTokenInfo(s).label.strip() == 'tensorguard')\n"
            "session = lib.openSession(slot)\n"
            f"session.login(open('{PKCS11_PIN}').read().strip())\n"
            "keys = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])\n"
            "print(len(keys), *[session.getAttributeValue(k, [PyKCS11.CKA_LABEL])[0] for k in keys])\n")
        r = box.exec(["runuser", "-u", "tensorguard", "--", "python3", "-I", "-c", script], check=False)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        count, *labels = r.stdout.split()
        assert count == "1" and f"object={labels[0]}" in live_key, (r.stdout, live_key)
    assert len(set(serials)) == 2, serials
    show = identity_show(box)
    assert show["state"] == "valid" and show["serial"] == serials[-1], show
    ident = journal(box, IDENTITY, since=since)
    assert "Traceback" not in ident, ident
    assert pin not in ident, "the PIN reached the journal"


def test_server_upgrade_restarts_it(machine: rootfs.Container, enrolled: Enrolment,
                                    debs: dict[str, Path]) -> None:  # noqa: F811
    """An upgrade (here a reinstall) restarts the running server; robots keep renewing."""
    box = machine
    before = sh(box, f"systemctl show -p MainPID --value {SERVER}").stdout.strip()
    with rootfs.step("apt-get install --reinstall tensorguard-server (server running)"):
        sh(box, f"{APT} install --reinstall /root/debs/{debs['tensorguard-server'].name}",
           timeout=300)
    states = wait_for(box, (SERVER,), "active", timeout=30)
    assert states[SERVER] == "active", diagnose(box, SERVER)
    after = sh(box, f"systemctl show -p MainPID --value {SERVER}").stdout.strip()
    assert after not in ("0", before), (before, after)
    # Type=exec: "active" comes before the new process listens; until then a renewal is
    # refused cleanly ("cannot reach", exit 1), never an internal error.
    deadline = time.monotonic() + 30
    while True:
        r = box.exec(["tgctl", "--json", "identity", "renew"], check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        assert "cannot reach" in r.stderr, r.stderr
        time.sleep(0.5)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{diagnose(box, SERVER)}"
    assert json.loads(r.stdout)["serial"] != enrolled.show["serial"]


def test_remove_and_purge_keep_the_ca(machine: rootfs.Container, enrolled: Enrolment) -> None:
    """remove stops the server; purging either package never deletes the fleet's CA."""
    box = machine
    with rootfs.step("apt-get remove, then purge, tensorguard-server"):
        sh(box, f"{APT} remove tensorguard-server", timeout=300)
        assert unit_states(box, SERVER)[SERVER] in ("inactive", "unknown")
        assert "tensorguard server serve" not in "\n".join(box.processes())
        purge = sh(box, f"{APT} purge tensorguard-server 2>&1", timeout=300).stdout
    assert f"the CA in {CA_DIR} is left in place" in purge, purge
    sh(box, f"test -f {CA_DIR}/intermediate.key && test ! -e /etc/default/tensorguard-server")
    with rootfs.step("apt-get purge tensorguard-agent"):
        sh(box, f"{APT} purge tensorguard-agent", timeout=300)
    left = sh(box, "ls -A /var/lib/tensorguard").stdout.split()
    assert left == ["ca"], left  # the agent's own state (identity, netguard) is gone
    sh(box, f"test -f {CA_DIR}/intermediate.key")
