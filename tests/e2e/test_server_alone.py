"""The control plane on a host of its own: tensorguard-server installs and runs no robot agent.

On a fresh Debian 12 and 13 booted with systemd:

    apt-get install ./python3-tensorguard_*.deb ./tensorguard-server_*.deb
    tensorguard server ca init ...; systemctl start tensorguard-server

No agent unit is installed, enabled or running, no tgctl, no agent group or configuration; the
server itself starts, says READY to systemd, and answers over HTTPS. Purging both packages leaves
nothing of TensorGuard but the CA directory the operator created.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_clean_install import (  # noqa: F401  (debs, progress and suite are fixtures used below)
    APT,
    debs,
    diagnose,
    progress,
    rootfs,
    sh,
    suite,
    wait_for,
)

pytestmark = pytest.mark.root

INSTALLED = ("python3-tensorguard", "tensorguard-server")
SERVER = "tensorguard-server.service"
CA_DIR = "/var/lib/tensorguard/ca"


@pytest.fixture(scope="module")
def machine(debs: dict[str, Path], suite: str) -> Iterator[rootfs.Container]:  # noqa: F811
    """Fresh ``suite`` + the control plane alone, booted; always torn down."""
    with rootfs.booted(list(debs.values()), INSTALLED, suite=suite) as box:
        yield box


def agent_processes(box: rootfs.Container) -> list[str]:
    return [p for p in box.processes()
            if any(f"tensorguard {unit}" in p for unit in ("netguard", "identity", "fl", "agent"))]


def test_no_agent_unit_exists(machine: rootfs.Container) -> None:
    box = machine
    files = sh(box, "systemctl list-unit-files 'tensorguard*' --no-legend --no-pager").stdout
    names = sorted(line.split()[0] for line in files.splitlines() if line.strip())
    assert names == [SERVER], files
    loaded = sh(box, "systemctl list-units --all 'tensorguard*' --no-legend --no-pager --plain").stdout
    assert [line.split()[0] for line in loaded.splitlines() if line.strip()] in ([], [SERVER]), loaded
    for path in ("/usr/bin/tgctl", "/etc/tensorguard/agent.toml", "/run/tensorguard",
                 "/usr/lib/tensorguard/bpf"):
        assert sh(box, f"test -e {path} && echo present || echo gone").stdout.strip() == "gone", path
    assert sh(box, "getent group tensorguard", check=False).returncode != 0
    owners = sh(box, "dpkg-query -W -f='${Package}\\n' 'tensorguard*' 'python3-tensorguard' "
                     "2>/dev/null").stdout.split()
    assert sorted(owners) == sorted(INSTALLED), owners
    assert not agent_processes(box)


def test_server_runs_without_the_agent(machine: rootfs.Container) -> None:
    box = machine
    sh(box, f"tensorguard server ca init --dir {CA_DIR} --trust-domain fleet.example "
            "--host-name 127.0.0.1")
    sh(box, f"systemctl start {SERVER}")
    states = wait_for(box, (SERVER,), "active", timeout=60)
    assert states[SERVER] == "active", diagnose(box, SERVER)
    script = (
        "import ssl, sys, time, urllib.request\n"
        f"ctx = ssl.create_default_context(cafile='{CA_DIR}/root.crt')\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        with urllib.request.urlopen('https://127.0.0.1:8443/healthz', context=ctx,"
        " timeout=5) as r:\n"
        "            print(r.status); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
        "sys.exit(1)\n")
    r = box.exec(["python3", "-c", script], check=False, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "200", (r.stdout, r.stderr, diagnose(box, SERVER))
    assert not agent_processes(box), agent_processes(box)
    files = sh(box, "systemctl list-unit-files 'tensorguard*' --no-legend --no-pager").stdout
    assert [line.split()[0] for line in files.splitlines() if line.strip()] == [SERVER], files


def test_purge_leaves_only_the_ca(machine: rootfs.Container) -> None:
    box = machine
    with rootfs.step("apt-get purge tensorguard-server python3-tensorguard"):
        sh(box, f"{APT} purge tensorguard-server python3-tensorguard", timeout=300)
    assert sh(box, "test -e /usr/lib/tensorguard && echo present || echo gone").stdout.strip() == "gone"
    assert sh(box, f"test -d {CA_DIR} && echo present || echo gone").stdout.strip() == "present"
    assert not [p for p in box.processes() if "/usr/bin/tensorguard" in p]
