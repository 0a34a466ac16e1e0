"""Static checks of the systemd units, sysusers and tmpfiles snippets in systemd/ (no root).

They pin the contract between the units and the Python side (paths, notify protocol, reload
command, sandbox exceptions) so that a unit edit that breaks it fails here, and run
packaging/check-units (systemd-analyze security/verify) when systemd-analyze is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
SERVICES = ("netguard", "identity", "fl")
TARGET = "tensorguard-agent.target"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit file -> {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: assignment outside a section: {line}"
        assert not line.endswith("\\"), f"{path.name}: keep assignments on one line: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit(SYSTEMD / f"tensorguard-{name}.service")


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}: expected exactly one assignment, got {values}"
    return values[0]


def words(section: dict[str, list[str]], key: str) -> set[str]:
    return {w for v in section.get(key, []) for w in v.split()}


@pytest.mark.parametrize("name", SERVICES)
def test_service_contract(name: str) -> None:
    unit = service(name)
    u, s, i = unit["Unit"], unit["Service"], unit["Install"]
    assert one(s, "Type") == "notify"
    assert one(s, "NotifyAccess") == "main"
    assert one(s, "ExecStart") == f"/usr/bin/tensorguard {name} --config /etc/tensorguard/agent.toml"
    assert one(s, "ExecReload") == f"/usr/bin/tgctl --unit {name} config reload"
    assert one(s, "WatchdogSec") == "30s"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "StateDirectory") == f"tensorguard/{name}"
    assert one(s, "StateDirectoryMode") == "0700"
    assert one(s, "UMask") == "0077"
    # the shared socket directory comes from tmpfiles, never from a per-unit RuntimeDirectory=
    # (stopping one unit would remove the others' sockets)
    assert "RuntimeDirectory" not in s
    assert "/run/tensorguard" in s.get("ReadWritePaths", [])
    assert "-/var/lib/prometheus/node-exporter" in s.get("ReadWritePaths", [])
    assert one(s, "ProtectSystem") == "strict"
    # systemd 252 leaves /run writable under ProtectSystem=strict + ProtectKernelTunables=
    assert "/run" in s.get("ReadOnlyPaths", [])
    assert one(u, "PartOf") == TARGET
    assert TARGET in words(u, "Before")
    assert TARGET in words(i, "WantedBy")
    assert "StartLimitIntervalSec" in u and "StartLimitBurst" in u
    assert all(not d.startswith("man:") for d in words(u, "Documentation"))  # no man pages shipped


@pytest.mark.parametrize("name", ["identity", "fl"])
def test_unprivileged_units(name: str) -> None:
    s = service(name)["Service"]
    assert one(s, "User") == "tensorguard"
    assert one(s, "Group") == "tensorguard"
    assert s.get("CapabilityBoundingSet") == [""]
    assert words(s, "RestrictAddressFamilies") == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_netguard_privileges() -> None:
    s = service("netguard")["Service"]
    assert "User" not in s  # uid 0, bounded capabilities (see the unit's header)
    assert one(s, "Group") == "tensorguard"  # socket + metrics group, ACL on the metrics dir
    # CAP_SYS_NICE + RestrictRealtime=no: the pacer thread runs SCHED_FIFO
    assert words(s, "CapabilityBoundingSet") == {"CAP_NET_ADMIN", "CAP_BPF", "CAP_NET_RAW",
                                                 "CAP_SYS_NICE"}
    assert one(s, "RestrictRealtime") == "no"
    assert words(s, "RestrictAddressFamilies") == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    # bpf is part of @privileged: it must be re-allowed after the deny list
    filters = s.get("SystemCallFilter", [""])
    assert filters[0] == "@system-service"
    deny = max(k for k, v in enumerate(filters) if v.startswith("~"))
    assert any("bpf" in v.split() for v in filters[deny + 1:])
    assert any("sched_setscheduler" in v.split() for v in filters[deny + 1:])
    assert "-/sys/fs/bpf/tensorguard" in s.get("ReadWritePaths", [])


def test_target_wants_all_units() -> None:
    t = parse_unit(SYSTEMD / TARGET)
    assert words(t["Unit"], "Wants") == {f"tensorguard-{n}.service" for n in SERVICES}
    assert "Requires" not in t["Unit"]  # tensorguard-fl.service may be absent
    assert words(t["Install"], "WantedBy") == {"multi-user.target"}


def snippet_lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_sysusers() -> None:
    (line,) = snippet_lines(SYSTEMD / "tensorguard.conf")
    assert line[:2] == ["u", "tensorguard"]
    assert line[-2:] == ["/var/lib/tensorguard", "/usr/sbin/nologin"]


def test_tmpfiles() -> None:
    lines = {(ln[0], ln[1]): ln for ln in snippet_lines(SYSTEMD / "tensorguard.tmpfiles")}
    assert lines["d", "/run/tensorguard"][2:5] == ["1771", "root", "tensorguard"]
    # the metrics dir may belong to prometheus: create if missing, never re-own
    assert lines["d", "/var/lib/prometheus/node-exporter"][2:5] == ["-", "-", "-"]
    assert lines["a+", "/var/lib/prometheus/node-exporter"][-1] == "group:tensorguard:rwx"
    assert lines["d-", "/sys/fs/bpf/tensorguard"][2:5] == ["0700", "root", "root"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_check_units() -> None:
    p = subprocess.run([str(REPO / "packaging/check-units")], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
