"""Small pieces: key files, durations, SPIFFE names, the CLI's token command."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from tensorguard.server.ca import CAPaths
from tensorguard.server.files import InsecureKeyFile, read_secret, write_secret
from tensorguard.server.spiffe import check_node_id, check_trust_domain, parse_robot_id, robot_id
from tensorguard.server.store import SQLiteStore
from tensorguard.server.timeutil import parse_duration, utc_now
from tensorguard.server.tokens import token_hash

SERVER = [sys.executable, "-m", "tensorguard.server.cli"]


def test_secrets_are_written_0600_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret(tmp_path / "k", b"secret")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    assert read_secret(tmp_path / "k") == b"secret"
    os.chmod(tmp_path / "k", 0o604)
    with pytest.raises(InsecureKeyFile, match="0604"):
        read_secret(tmp_path / "k")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600),
                                               ("7d", 604800), ("500ms", 0.5), (" 2 h ", 7200)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "1w", "-1h", "0", "1.5.2s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_spiffe_names() -> None:
    assert robot_id("fleet.test", "r-1") == "spiffe://fleet.test/robot/r-1"
    assert parse_robot_id("spiffe://fleet.test/robot/r-1", "fleet.test") == "r-1"
    assert parse_robot_id("spiffe://fleet.test/robot/r-1/x", "fleet.test") is None
    assert parse_robot_id("spiffe://other.test/robot/r-1", "fleet.test") is None
    assert parse_robot_id("spiffe://fleet.test/host/r-1", "fleet.test") is None
    for bad in ("", "-a", "a/b", "a" * 64, "..", "a b"):
        with pytest.raises(ValueError, match="node id"):
            check_node_id(bad)
    with pytest.raises(ValueError, match="trust domain"):
        check_trust_domain("Fleet.Test")


def test_cli_ca_init_and_token_create(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init = subprocess.run([*SERVER, "ca", "init", "--dir", str(ca), "--trust-domain", "fleet.test"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    again = subprocess.run([*SERVER, "ca", "init", "--dir", str(ca), "--trust-domain", "fleet.test"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    made = subprocess.run([*SERVER, "token", "create", "--dir", str(ca), "--node-id", "r1", "--ttl", "30m"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert made.stdout == token + "\n"  # the token and nothing else on stdout
    assert token not in made.stderr and "r1" in made.stderr
    store = SQLiteStore(CAPaths(ca).database)
    assert store.token_node(token_hash(token), utc_now()) == "r1"
    (audit,) = store.audit_records("token.created")
    assert audit.node == "r1" and token not in str(audit.fields)
    bad = subprocess.run([*SERVER, "token", "create", "--dir", str(ca), "--node-id", "../x"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "node id" in bad.stderr


def test_cli_help_lists_the_commands() -> None:
    out = subprocess.run([*SERVER, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for word in ("ca", "token", "serve", "bench", "simpleenroll", "simplereenroll", "cacerts"):
        assert word in out
