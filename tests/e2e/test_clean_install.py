"""Clean install of the built .debs on a fresh Debian 12 and a fresh Debian 13, booted with systemd.

What a user does, checked from outside the machine (every test runs once per release):

    apt-get install ./python3-tensorguard_*.deb ./tensorguard-agent_*.deb ./tensorguard-fl_*.deb
    (reboot)  systemctl status tensorguard-agent.target ; tgctl status
    a broken drop-in + systemctl reload: refused, old config kept
    systemctl reload tensorguard-agent.target: every running unit re-reads its config
    systemctl stop tensorguard-agent.target: no sockets left
    apt-get remove, apt-get purge

The harness is packaging/rootfs.py: a cached `debootstrap --variant=minbase`
bookworm or trixie (with systemd) extracted into a temporary directory, the packages
installed with apt-get in a chroot (their dependencies come from Debian's
archive; no pip), then booted with `systemd-nspawn --boot` and driven with
`nsenter`. Teardown always powers the container off, unmounts and deletes it.

Needs root, debootstrap, systemd-nspawn and the .debs in build/debs/ (or
TG_DEBS_DIR): run packaging/build-debs first. Skipped otherwise, except under
TG_REQUIRE_E2E=1 (make test), where a missing piece is a failure.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging"))
import rootfs  # noqa: E402  (packaging/rootfs.py, the harness)

REQUIRED = os.environ.get("TG_REQUIRE_E2E") == "1"
DEBS_DIR = Path(os.environ.get("TG_DEBS_DIR", REPO / "build" / "debs"))
AGENT_UNITS = ("tensorguard-netguard.service", "tensorguard-identity.service",
               "tensorguard-fl.service")
TARGET = "tensorguard-agent.target"
INSTALLED = ("python3-tensorguard", "tensorguard-agent", "tensorguard-fl")
# What an installed TensorGuard's python3 imports from, as the launchers set it up.
BUNDLE_PATH = ("import sys; sys.path.insert(0, \"/usr/lib/tensorguard/python\"); "
               "from tensorguard.bundle import use_bundled_binaries; use_bundled_binaries(); ")
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0"

pytestmark = pytest.mark.root


def unavailable(reason: str) -> None:
    """Skip, or fail when the e2e is required (TG_REQUIRE_E2E=1)."""
    if REQUIRED:
        pytest.fail(f"e2e required (TG_REQUIRE_E2E=1) but {reason}", pytrace=False)
    pytest.skip(reason)


def find_debs() -> dict[str, Path]:
    debs: dict[str, Path] = {}
    for deb in sorted(DEBS_DIR.glob("*.deb")):
        debs[deb.name.split("_", 1)[0]] = deb
    return debs


def check_prerequisites() -> dict[str, Path]:
    if os.geteuid() != 0:
        unavailable("the clean-install test needs root (debootstrap, chroot, systemd-nspawn)")
    for tool, pkg in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"),
                      ("nsenter", "util-linux"), ("zstd", "zstd"), ("chroot", "coreutils")):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is missing (apt-get install {pkg})")
    debs = find_debs()
    missing = [p for p in (*INSTALLED, "tensorguard-server") if p not in debs]
    if missing:
        unavailable(f"no {', '.join(missing)} .deb in {DEBS_DIR}: run packaging/build-debs "
                    "first (or set TG_DEBS_DIR)")
    return debs


@pytest.fixture(scope="module")
def progress(pytestconfig: pytest.Config) -> Iterator[None]:
    """Route the harness's progress lines past pytest's capture: this takes minutes."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def sink(line: str) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                print(line, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    old = rootfs.LOG_SINK
    rootfs.LOG_SINK = sink
    yield
    rootfs.LOG_SINK = old


@pytest.fixture(scope="module")
def debs(progress: None) -> dict[str, Path]:
    return check_prerequisites()


@pytest.fixture(scope="module", params=rootfs.SUITES)
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian release under test: every e2e module runs on each (Debian 12 and 13)."""
    return str(request.param)


@pytest.fixture(scope="module")
def machine(debs: dict[str, Path], suite: str) -> Iterator[rootfs.Container]:
    """Fresh ``suite`` + the .debs installed with apt-get, booted; always torn down."""
    t_start = time.monotonic()
    rootfs.reap_stale()

    # A CI time-out or `kill` sends SIGTERM: turn it into an interruption so
    # that the finally below still powers the container off and cleans up.
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, interrupted)
    tarball = rootfs.ensure_base_tarball(suite=suite)
    root = rootfs.Rootfs(tarball)
    box = rootfs.Container(root)
    try:
        # All .debs are copied to /root/debs; agent and fl are installed now.
        root.install_debs(list(debs.values()), packages=INSTALLED)
        with rootfs.step("boot with systemd-nspawn"):
            box.start()
            state = box.wait_running()
        rootfs.log(f"system state: {state}")
        if state != "running":
            failed = box.sh("systemctl --failed --no-legend --no-pager", check=False).stdout
            rootfs.log(f"failed units:\n{failed}")
        rootfs.log(f"machine ready after {time.monotonic() - t_start:.1f}s")
        yield box
    finally:
        with rootfs.step("teardown: power off, unmount, delete"):
            try:
                box.stop()
                left = box.processes()
            finally:
                root.close()
        signal.signal(signal.SIGTERM, old_handler)
        rootfs.log(f"e2e total {time.monotonic() - t_start:.1f}s")
        assert not left, f"processes left after teardown: {left}"
        assert not root.workdir.exists(), f"{root.workdir} not deleted"


# --------------------------------------------------------------------------- helpers


def sh(box: rootfs.Container, script: str, check: bool = True, timeout: float = 120
       ) -> subprocess.CompletedProcess[str]:
    r = box.sh(script, check=False, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"in the container: {script!r} exited {r.returncode}\n"
                    f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}", pytrace=False)
    return r


def unit_states(box: rootfs.Container, *units: str) -> dict[str, str]:
    r = box.exec(["systemctl", "is-active", *units], check=False)
    return dict(zip(units, r.stdout.split(), strict=False))


def diagnose(box: rootfs.Container, *units: str) -> str:
    names = " ".join(shlex.quote(u) for u in units)
    return sh(box, f"systemctl status --no-pager -l {names}; "
                   f"journalctl --no-pager -n 60 -u {' -u '.join(units)}", check=False).stdout


def wait_for(box: rootfs.Container, units: tuple[str, ...], want: str, timeout: float = 60
             ) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = unit_states(box, *units)
        if all(states.get(u) == want for u in units) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def tgctl_json(box: rootfs.Container, *args: str) -> tuple[int, dict]:
    r = box.exec(["tgctl", "--json", *args], check=False)
    try:
        return r.returncode, json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"tgctl --json {' '.join(args)}: not JSON (exit {r.returncode}):\n"
                    f"{r.stdout}\n{r.stderr}", pytrace=False)


def generation(box: rootfs.Container, unit: str) -> int:
    code, data = tgctl_json(box, "--unit", unit, "status")
    assert code == 0, data
    (row,) = data["units"]
    return int(row["config_generation"])


def tensorguard_processes(box: rootfs.Container) -> list[str]:
    return [p for p in box.processes() if "/usr/bin/tensorguard" in p or "tgctl" in p]


# --------------------------------------------------------------------------- tests


def test_check_units_on_built_debs(debs: dict[str, Path], tmp_path: Path) -> None:
    """packaging/check-units on the unit files exactly as the .debs ship them."""
    script = REPO / "packaging" / "check-units"
    if not script.exists():
        print(f"NOTE: {script} does not exist: unit check skipped")
        pytest.skip("packaging/check-units is absent")
    unpacked = tmp_path / "unpacked"
    for name in INSTALLED:
        subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(unpacked)], check=True)
    with rootfs.step("packaging/check-units --root <unpacked .debs>"):
        r = subprocess.run([str(script), "--root", str(unpacked)], text=True,
                           capture_output=True, timeout=300, check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"check-units failed:\n{r.stdout}\n{r.stderr}"


def test_installed_files(machine: rootfs.Container) -> None:
    """What apt-get install left: user, conffile mode, launchers, bundled pydantic 2."""
    box = machine
    assert sh(box, "getent group tensorguard").stdout.startswith("tensorguard:")
    assert "/usr/sbin/nologin" in sh(box, "getent passwd tensorguard").stdout
    assert sh(box, "stat -c '%a %U %G' /etc/tensorguard/agent.toml").stdout.split() == [
        "640", "root", "tensorguard"]
    assert sh(box, "test -d /etc/tensorguard/agent.d && ls -A /etc/tensorguard/agent.d"
              ).stdout.strip() == ""
    assert "/etc/tensorguard/agent.toml" in sh(
        box, "dpkg-query -W -f='${Conffiles}' tensorguard-agent").stdout
    # The launchers run the bundle (pydantic 2), with Debian's python3 only.
    r = sh(box, "head -1 /usr/bin/tgctl /usr/bin/tensorguard")
    assert r.stdout.count("#!/usr/bin/python3 -I") == 2, r.stdout
    r = sh(box, f"python3 -I -c '{BUNDLE_PATH} import pydantic, pydantic_core; "
                "print(pydantic.VERSION, pydantic.__file__, pydantic_core.__file__)'")
    assert r.stdout.startswith("2."), r.stdout
    assert "/usr/lib/tensorguard/python/pydantic/" in r.stdout
    # pydantic-core from the directory of the release's own Python (3.11 on 12, 3.13 on 13).
    pyver = sh(box, "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.strip()
    assert f"/usr/lib/tensorguard/python{pyver}/pydantic_core/" in r.stdout, r.stdout
    # Only programs and their licences: no documentation, agent skill files or Cython sources.
    stray = sh(box, "find /usr/lib/tensorguard \\( -name .agents -o -name '*.md' -o -name '*.rst' "
                    "-o -name '*.pyx' -o -name '*.pxd' -o -name '*.c' \\) -print").stdout.split()
    assert not stray, f"files that do not belong in the package: {stray[:20]}"
    # Byte-compiled at install time (py3compile), not shipped.
    sh(box, "ls /usr/lib/tensorguard/python/pydantic/__pycache__/*.pyc >/dev/null")
    # Completion for both commands, in bash (really completing) and zsh.
    for prog in ("tgctl", "tensorguard"):
        r = sh(box, f"bash -c 'source /usr/share/bash-completion/completions/{prog}; "
                    f"COMP_WORDS=({prog} \"\"); COMP_CWORD=1; _shtab_{prog}; echo ${{COMPREPLY[@]}}'")
        assert {"status", "config"} <= set(r.stdout.split()) if prog == "tgctl" else \
            {"server", "netguard"} <= set(r.stdout.split()), r.stdout
        sh(box, f"test -s /usr/share/zsh/vendor-completions/_{prog}")
    # The agent has no compiled Python extension: one build serves every supported CPython.
    r = sh(box, "dpkg -L tensorguard-agent | grep '[.]so$' || true", check=False)
    assert r.stdout.strip() == "", r.stdout
    # Nothing came from pip: neither pip nor Debian's pydantic 1 was pulled in.
    r = sh(box, "dpkg-query -W -f='${Package} ${Status}\\n' python3-pip python3-pydantic "
                "2>/dev/null | grep -c 'install ok installed' || true", check=False)
    assert r.stdout.strip() == "0", r.stdout
    sh(box, "tgctl --version && tensorguard --version")


def test_units_active_after_boot(machine: rootfs.Container) -> None:
    box = machine
    states = wait_for(box, (TARGET, *AGENT_UNITS), "active", timeout=60)
    bad = {u: s for u, s in states.items() if s != "active"}
    assert not bad, f"not active after boot: {bad}\n{diagnose(box, *AGENT_UNITS)}"
    enabled = box.exec(["systemctl", "is-enabled", TARGET], check=False).stdout.strip()
    assert enabled == "enabled", enabled


def test_tgctl_status_lists_three_running_units(machine: rootfs.Container) -> None:
    box = machine
    r = box.exec(["tgctl", "status"], check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"tgctl status exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    for unit in ("netguard", "identity", "fl"):
        line = next((ln for ln in r.stdout.splitlines() if ln.split()[:1] == [unit]), "")
        assert "running" in line and "not running" not in line, r.stdout
    code, data = tgctl_json(box, "status")
    assert code == 0
    assert sorted(u["unit"] for u in data["units"] if u["running"]) == ["fl", "identity",
                                                                         "netguard"]
    socks = sh(box, "ls /run/tensorguard").stdout.split()
    assert sorted(s for s in socks if s.endswith(".sock")) == [
        "fl.sock", "identity.sock", "netguard.sock"]


def test_broken_dropin_reload_is_refused_and_old_config_kept(machine: rootfs.Container) -> None:
    box = machine
    unit = "tensorguard-identity.service"
    before = generation(box, "identity")
    dropin = "/etc/tensorguard/agent.d/50-broken.toml"
    since = sh(box, "date +%s").stdout.strip()
    sh(box, f"printf '[network]\\nbogus = 1\\n' > {dropin}")
    try:
        r = box.exec(["systemctl", "reload", unit], check=False)
        journal = sh(box, f"journalctl --no-pager -u {unit} --since @{since}").stdout
        print(r.stdout, r.stderr, journal, sep="\n")
        assert r.returncode != 0, "systemctl reload accepted a broken drop-in"
        assert "bogus" in (r.stdout + r.stderr + journal), (
            f"the error does not name the bad key:\n{r.stderr}\n{journal}")
        assert unit_states(box, unit)[unit] == "active", diagnose(box, unit)
        assert generation(box, "identity") == before
        # The offline check says the same.
        v = box.exec(["tgctl", "config", "validate"], check=False)
        assert v.returncode != 0 and "bogus" in v.stdout + v.stderr, v
    finally:
        sh(box, f"rm -f {dropin}")
    r = box.exec(["systemctl", "reload", unit], check=False)
    assert r.returncode == 0, f"reload after removing the drop-in failed:\n{r.stderr}\n" + (
        diagnose(box, unit))
    assert unit_states(box, unit)[unit] == "active"
    assert generation(box, "identity") >= before
    assert box.exec(["tgctl", "status"], check=False).returncode == 0


def test_target_reload_reaches_every_running_unit(machine: rootfs.Container) -> None:
    """`systemctl reload tensorguard-agent.target` makes each running unit re-read its config."""
    box = machine
    units = ("netguard", "identity", "fl")
    before = {u: generation(box, u) for u in units}
    dropin = "/etc/tensorguard/agent.d/40-reload.toml"
    sh(box, f"printf '[agent]\\nlog_level = \"debug\"\\n' > {dropin}")
    try:
        r = box.exec(["systemctl", "reload", TARGET], check=False)
        assert r.returncode == 0, f"systemctl reload {TARGET}: {r.stdout}{r.stderr}"
        deadline = time.monotonic() + 30
        after = before
        while time.monotonic() < deadline:
            after = {u: generation(box, u) for u in units}
            if all(after[u] > before[u] for u in units):
                break
            time.sleep(0.5)
        assert all(after[u] > before[u] for u in units), (before, after)
        code, shown = tgctl_json(box, "--unit", "fl", "config", "show")
        assert code == 0 and shown["config"]["agent"]["log_level"] == "debug", shown
    finally:
        sh(box, f"rm -f {dropin}")
    assert box.exec(["systemctl", "reload", TARGET], check=False).returncode == 0
    states = unit_states(box, TARGET, *AGENT_UNITS)
    assert all(s == "active" for s in states.values()), (states, diagnose(box, *AGENT_UNITS))


def test_stop_target_leaves_no_socket(machine: rootfs.Container) -> None:
    box = machine
    sh(box, f"systemctl stop {TARGET}")
    # Stopping the target returns before its services are down (they are
    # ordered Before= it): wait for them.
    states = wait_for(box, AGENT_UNITS, "inactive", timeout=60)
    assert all(s == "inactive" for s in states.values()), (states, diagnose(box, *AGENT_UNITS))
    left = sh(box, "ls -A /run/tensorguard 2>/dev/null || true").stdout.split()
    assert not [f for f in left if f.endswith(".sock")], f"sockets left: {left}"
    assert not tensorguard_processes(box)
    assert box.exec(["tgctl", "status"], check=False).returncode == 3
    # And back up, for the removal test.
    sh(box, f"systemctl start {TARGET}")
    states = wait_for(box, AGENT_UNITS, "active", timeout=60)
    assert all(s == "active" for s in states.values()), (states, diagnose(box, *AGENT_UNITS))


def test_remove_stops_units_and_purge_removes_state(machine: rootfs.Container) -> None:
    box = machine
    env = "DEBIAN_FRONTEND=noninteractive"
    metrics = sh(box, "ls /var/lib/prometheus/node-exporter/ 2>/dev/null || true").stdout.split()
    print("metrics files before removal:", metrics)
    sh(box, "test -d /var/lib/tensorguard")

    with rootfs.step("apt-get remove tensorguard-fl tensorguard-agent python3-tensorguard"):
        r = sh(box, f"{env} apt-get remove -y -qq -o Dpkg::Use-Pty=0 "
                    "tensorguard-fl tensorguard-agent python3-tensorguard", timeout=300)
    print(r.stdout)
    states = unit_states(box, TARGET, *AGENT_UNITS)
    assert all(s in ("inactive", "unknown") for s in states.values()), states
    assert not tensorguard_processes(box), tensorguard_processes(box)
    assert not [f for f in sh(box, "ls -A /run/tensorguard 2>/dev/null || true").stdout.split()
                if f.endswith(".sock")]
    sh(box, "test ! -e /usr/bin/tgctl && test ! -e /usr/lib/tensorguard")
    # remove keeps configuration (dpkg's conffile handling) ...
    sh(box, "test -f /etc/tensorguard/agent.toml")

    with rootfs.step("apt-get purge tensorguard-fl tensorguard-agent python3-tensorguard"):
        r = sh(box, f"{env} apt-get purge -y -qq -o Dpkg::Use-Pty=0 "
                    "tensorguard-fl tensorguard-agent python3-tensorguard", timeout=300)
    print(r.stdout)
    # ... purge removes it, the state, runtime files and metrics.
    for path in ("/etc/tensorguard", "/var/lib/tensorguard", "/run/tensorguard"):
        assert sh(box, f"test -e {path} && echo present || echo gone").stdout.strip() == "gone", (
            f"{path} left after purge")
    prom = sh(box, "ls /var/lib/prometheus/node-exporter/ 2>/dev/null | grep '^tensorguard_' "
                   "|| true").stdout.split()
    assert not prom, f"metrics files left after purge: {prom}"
    assert "agent.toml" not in sh(box, "dpkg-statoverride --list").stdout
    r = sh(box, "dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n' 'tensorguard*' "
                "2>/dev/null || true", check=False)
    assert not [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("un ")], (
        r.stdout)
    left = sh(box, "systemctl list-unit-files 'tensorguard*' --no-legend", check=False).stdout
    assert left.strip() == "", left
    # Nothing else on this machine owns the textfile-collector directory that
    # the tmpfiles snippet created: purge removed it too.
    assert sh(box, "test -e /var/lib/prometheus/node-exporter && echo present || echo gone"
              ).stdout.strip() == "gone"


def main_pid(box: rootfs.Container, unit: str) -> int:
    return int(sh(box, f"systemctl show -p MainPID --value {unit}").stdout.strip() or 0)


def test_install_on_running_system(machine: rootfs.Container,
                                   debs: dict[str, Path]) -> None:
    """apt install on a booted machine (after the purge above): the maintainer
    scripts start the agent; tensorguard-fl starts only with an active target."""
    box = machine
    deb = {name: f"/root/debs/{path.name}" for name, path in debs.items()}
    with rootfs.step("apt-get install tensorguard-agent (systemd running)"):
        sh(box, f"{APT} install {deb['python3-tensorguard']} {deb['tensorguard-agent']}", timeout=300)
    core = (TARGET, "tensorguard-netguard.service", "tensorguard-identity.service")
    states = wait_for(box, core, "active", timeout=60)
    assert all(s == "active" for s in states.values()), (states, diagnose(box, *core[1:]))
    # Without tensorguard-fl, fl is "not installed" and does not make status fail.
    status = box.exec(["tgctl", "status"], check=False)
    print(status.stdout)
    assert status.returncode == 0, (status.stdout, status.stderr)
    assert "fl        not installed" in status.stdout, status.stdout

    # Agent stopped: installing tensorguard-fl must not start anything.
    sh(box, f"systemctl stop {TARGET}")
    wait_for(box, core[1:], "inactive", timeout=60)
    with rootfs.step("apt-get install tensorguard-fl (target stopped)"):
        sh(box, f"{APT} install {deb['tensorguard-fl']}", timeout=300)
    states = unit_states(box, TARGET, *AGENT_UNITS)
    assert all(s == "inactive" for s in states.values()), states

    sh(box, f"systemctl start {TARGET}")
    states = wait_for(box, (TARGET, *AGENT_UNITS), "active", timeout=60)
    assert all(s == "active" for s in states.values()), (states, diagnose(box, *AGENT_UNITS))
    assert box.exec(["tgctl", "status"], check=False).returncode == 0

    # Target active: an upgrade (here a reinstall) of tensorguard-fl restarts it.
    before = main_pid(box, "tensorguard-fl.service")
    with rootfs.step("apt-get install --reinstall tensorguard-fl (target active)"):
        sh(box, f"{APT} install --reinstall {deb['tensorguard-fl']}", timeout=300)
    states = wait_for(box, AGENT_UNITS, "active", timeout=60)
    assert all(s == "active" for s in states.values()), (states, diagnose(box, *AGENT_UNITS))
    assert main_pid(box, "tensorguard-fl.service") not in (0, before)

    # The control plane installs on a running system next to the agent, enabled but idle
    # (its ConditionPathExists= waits for `tensorguard server ca init`), and disturbs nothing;
    # tests/e2e/test_identity_e2e.py runs it.
    with rootfs.step("apt-get install tensorguard-server"):
        sh(box, f"{APT} install {deb['tensorguard-server']}", timeout=300)
    props = sh(box, "systemctl show -p ActiveState -p ConditionResult tensorguard-server.service").stdout
    assert sorted(props.split()) == ["ActiveState=inactive", "ConditionResult=no"], props
    states = unit_states(box, TARGET, *AGENT_UNITS)
    assert all(s == "active" for s in states.values()), states
    assert box.exec(["tgctl", "status"], check=False).returncode == 0
