"""The identity unit against the CA as its real server process: enrol with a bootstrap token,
renew over mTLS, install into sinks, audit everything, and refuse what must be refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tensorguard.control import RpcError, call
from tensorguard.identity.audit import Ed25519Verifier, verify_inclusion
from tensorguard.identity.audit.merkle import leaf_hash
from tensorguard.identity.audit.note import open_checkpoint
from tensorguard.identity.certinfo import pair_matches

from ...conftest import TGCTL, AgentDir, UnitProcess, start_unit, tgctl
from ..server.ca_process import Server, running_ca
from .nginx import HandshakeLoop, nginx_serving

TRUST_DOMAIN = "fleet.test"
NODE = "robot-7"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_ca(tmp_path_factory.mktemp("ca") / "ca", TRUST_DOMAIN) as server:
        yield server


def identity_config(agent_dir: AgentDir, ca: Server, *, sinks: str = "", node: str = NODE) -> str:
    state = agent_dir.root / "state"
    return f"""node_id = "{node}"

[identity]
enabled = true
server_url = "{ca.url}"
trust_domain = "{TRUST_DOMAIN}"
trust_anchor = "{ca.root_cert}"
bootstrap_token_file = "{agent_dir.root / 'token'}"
state_dir = "{state}"
{sinks}
"""


def write_token(agent_dir: AgentDir, token: str) -> Path:
    path = agent_dir.root / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path


def wait_state(sock: Path, state: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = call(sock, "identity.show")
        if info["state"] == state:
            return info
        assert time.monotonic() < deadline, f"identity never reached {state!r}: {info}"
        time.sleep(0.1)


def sink_pair(directory: Path) -> tuple[bytes, bytes]:
    return (directory / "key.pem").read_bytes(), (directory / "cert.pem").read_bytes()


def test_enrols_renews_installs_and_audits(agent_dir: AgentDir, units: list[UnitProcess], ca: Server) -> None:
    sink = agent_dir.root / "sink"
    sink.mkdir(mode=0o750)
    token = write_token(agent_dir, ca.token(NODE))
    agent_dir.write(identity_config(agent_dir, ca, sinks=f"""
[[identity.sink]]
name = "app"
directory = "{sink}"
"""))
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    info = wait_state(sock, "valid")
    assert info["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/robot/{NODE}"
    assert not token.exists()  # a used token is removed
    key, cert = sink_pair(sink)
    assert pair_matches(key, cert)
    assert x509.load_pem_x509_certificate(cert).serial_number == int(str(info["serial"]), 16)
    assert (sink / "key.pem").stat().st_mode & 0o777 == 0o600
    assert 3000 < float(info["expires_in_s"]) <= 3600  # type: ignore[arg-type]
    next_renewal = float(info["next_renewal_in_s"])  # type: ignore[arg-type]
    assert 0.4 * 3660 - 70 < next_renewal <= 0.5 * 3660  # jitter only earlier, from notBefore

    serials = {info["serial"]}
    for _ in range(2):
        renewed = tgctl(agent_dir, "identity", "renew")
        assert renewed.returncode == 0, renewed.stderr
        shown = call(sock, "identity.show")
        assert shown["serial"] not in serials
        serials.add(shown["serial"])
        key, cert = sink_pair(sink)
        assert pair_matches(key, cert)
        assert x509.load_pem_x509_certificate(cert).serial_number == int(str(shown["serial"]), 16)
    assert len(ca.store.issued()) >= 3

    text = tgctl(agent_dir, "identity", "show")
    assert text.returncode == 0 and "sink app (files): current" in text.stdout, text.stdout
    verified = tgctl(agent_dir, "--json", "identity", "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    result = json.loads(verified.stdout)
    assert result["ok"] and result["size"] >= 6  # enrol, install, renew, install, renew, install
    proof = json.loads(tgctl(agent_dir, "identity", "audit", "proof", "0").stdout)
    entry = proof["entry"].encode()
    assert json.loads(entry)["kind"] == "enrol"
    # a third party checks the entry against the signed checkpoint with the verifier key alone
    checkpoint = open_checkpoint(proof["checkpoint"].encode(), [Ed25519Verifier.from_vkey(result["vkey"])])
    assert checkpoint.size == proof["tree_size"] == result["size"]
    verify_inclusion(leaf_hash(entry), 0, checkpoint.size, [bytes.fromhex(h) for h in proof["proof"]],
                     checkpoint.root)

    # the used token cannot enrol again; the running identity is untouched
    used = agent_dir.root / "used-token"
    used.write_text(ca.token("robot-8"))  # a valid token, but for another node
    refused = tgctl(agent_dir, "identity", "enrol", "--token-file", str(used))
    assert refused.returncode != 0 and "robot-8" in refused.stderr, refused.stderr
    print(refused.stderr)
    assert call(sock, "identity.show")["state"] == "valid"
    prom = agent_dir.metrics / "tensorguard_identity.prom"
    deadline = time.monotonic() + 5
    while "tensorguard_identity_renewals_total 3" not in (prom.read_text() if prom.exists() else ""):
        assert time.monotonic() < deadline, prom.read_text() if prom.exists() else "no metrics file"
        time.sleep(0.2)
    expiry = next(line for line in prom.read_text().splitlines()
                  if line.startswith("tensorguard_identity_cert_expiry_seconds "))
    assert 3000 < float(expiry.split()[1]) <= 3600
    assert unit.stop() == 0


def test_an_expired_certificate_needs_a_new_token(agent_dir: AgentDir, units: list[UnitProcess],
                                                  tmp_path: Path) -> None:
    with running_ca(tmp_path / "ca", TRUST_DOMAIN, extra=("--cert-lifetime", "3s",
                                                          "--backdate", "1s")) as short:
        write_token(agent_dir, first := short.token(NODE))
        agent_dir.write(identity_config(agent_dir, short).replace(
            "state_dir", "renew_fraction = 0.9\nrenew_jitter = 0.0\nca_backdate_s = 1\nstate_dir"))
        unit = start_unit(agent_dir, "identity")
        units.append(unit)
        sock = agent_dir.socket("identity")
        wait_state(sock, "valid")
        assert unit.stop() == 0  # the robot is off while its certificate expires
        time.sleep(3.2)
        unit = start_unit(agent_dir, "identity")
        units.append(unit)
        info = wait_state(sock, "expired")
        assert "re-enrol with a new bootstrap token" in str(info["detail"])
        with pytest.raises(RpcError, match="expired"):
            call(sock, "identity.renew")  # the CA refuses mTLS with an expired certificate
        replay = agent_dir.root / "replay"
        replay.write_text(first)
        refused = tgctl(agent_dir, "identity", "enrol", "--token-file", str(replay))
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
        fresh = tgctl(agent_dir, "identity", "enrol", input=short.token(NODE) + "\n")
        assert fresh.returncode == 0, fresh.stderr
        assert call(sock, "identity.show")["state"] in ("valid", "renewing")
        assert unit.stop() == 0


def test_nginx_serves_every_renewal_without_a_failed_handshake(agent_dir: AgentDir,
                                                               units: list[UnitProcess], ca: Server) -> None:
    sink = agent_dir.root / "nginx-tls"
    sink.mkdir(mode=0o750)
    prefix = agent_dir.root / "nginx"
    write_token(agent_dir, ca.token("robot-9"))
    agent_dir.write(identity_config(agent_dir, ca, node="robot-9", sinks=f"""
[[identity.sink]]
name = "nginx"
directory = "{sink}"
reload_signal = "HUP"
reload_pidfile = "{prefix / 'nginx.pid'}"
"""))
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    wait_state(sock, "degraded")  # enrolled and installed; nginx is not running yet to reload
    with nginx_serving(prefix, sink / "fullchain.pem", sink / "key.pem") as nginx:
        loop = HandshakeLoop(nginx.port, ca.root_cert)
        with loop.running():
            deadline = time.monotonic() + 10
            while not loop.serials:
                assert time.monotonic() < deadline, loop.failures
                time.sleep(0.05)
            expected = [int(str(call(sock, "identity.show")["serial"]), 16)]
            assert loop.serials == expected
            for _ in range(5):
                renewed = tgctl(agent_dir, "--json", "identity", "renew")
                assert renewed.returncode == 0, renewed.stderr
                expected.append(int(json.loads(renewed.stdout)["serial"], 16))
                deadline = time.monotonic() + 15
                while expected[-1] not in loop.serials:
                    assert time.monotonic() < deadline, f"nginx never served {expected[-1]:x}"
                    time.sleep(0.02)
            time.sleep(1.0)  # the last reload's old worker has finished
            assert loop.last == expected[-1]
        print(f"{loop.handshakes} handshakes during 5 renewals, {len(loop.failures)} failed; "
              f"served serials: {[f'{s:x}'[:8] for s in loop.serials]}")
        assert loop.failures == []
        assert loop.serials == expected  # each renewal served, in order, none skipped
        assert "emerg" not in nginx.error_log()
    assert call(sock, "identity.show")["state"] == "valid"  # the reloads succeeded since
    assert unit.stop() == 0


def test_kill_9_at_random_moments_of_renewal_never_leaves_a_mismatched_pair(
        agent_dir: AgentDir, units: list[UnitProcess], ca: Server) -> None:
    sink = agent_dir.root / "sink"
    sink.mkdir(mode=0o750)
    live = agent_dir.root / "state" / "live"
    write_token(agent_dir, ca.token("robot-10"))
    agent_dir.write(identity_config(agent_dir, ca, node="robot-10", sinks=f"""
[[identity.sink]]
name = "app"
directory = "{sink}"
"""))
    rng = random.Random(7)
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    wait_state(sock, "valid")
    killed_during = completed = 0
    serial = call(sock, "identity.show")["serial"]
    for _ in range(12):
        renew = subprocess.Popen([*TGCTL, "--config", str(agent_dir.config), "identity", "renew"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.6))  # tgctl's start-up, then somewhere in the renewal
        unit.stop(signal.SIGKILL)
        killed_during += renew.wait(30) != 0
        for directory in (live, sink):
            key, cert = sink_pair(directory)
            assert pair_matches(key, cert), f"{directory}: key and certificate differ after kill -9"
        unit = start_unit(agent_dir, "identity")
        units.append(unit)
        info = wait_state(sock, "valid")
        assert sink_pair(sink) == sink_pair(live)  # a sink left behind is brought up to date
        assert x509.load_pem_x509_certificate(sink_pair(sink)[1]).serial_number == int(str(info["serial"]), 16)
        completed += info["serial"] != serial
        serial = info["serial"]
    print(f"{killed_during} of 12 renewal requests were cut off by kill -9; {completed} had installed "
          "the new certificate before the kill")
    assert killed_during > 0  # the kills did land during renewals
    verified = tgctl(agent_dir, "--json", "identity", "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert unit.stop() == 0
