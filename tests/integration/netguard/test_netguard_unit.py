"""The netguard unit as systemd runs it, managing a robot namespace: shaping, stats, reload,
crash recovery and complete clean-up."""

from __future__ import annotations

import itertools
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorguard.control import RpcError, call
from tensorguard.netguard.datapath import system_slice
from tensorguard.netguard.kernel.tc import cgroup2_root

from ...conftest import AgentDir, UnitProcess, start_unit, tgctl
from ...netns import Link, require_root_netns, veth_pair
from .test_pace_nfqueue import capture, send
from .test_tc_bpf import CGROUP_SENDER

PROTECTED, UNPROTECTED = 5300, 5301
RATE = 200.0
BPFFS = Path("/sys/fs/bpf")


def setup_module() -> None:
    require_root_netns()
    mounts = Path("/proc/mounts").read_text().splitlines()
    if not any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    if not (Path(__file__).resolve().parents[3] / "bpf" / "build" / "netguard.bpf.o").exists():
        subprocess.run(["make", "-C", str(Path(__file__).resolve().parents[3] / "bpf")], check=True)


@pytest.fixture
def robot() -> Iterator[Link]:
    with veth_pair(40) as link:
        yield link


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = BPFFS / f"tensorguard-test-{secrets.token_hex(3)}"
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def network_config(link: Link, pin_dir: Path, *, fail_mode: str = "closed", kind: str = "cbr",
                   rate: float = RATE, interfaces: str | None = None) -> str:
    return f"""
[network]
enabled = true
interfaces = {interfaces or f'["{link.robot_if}"]'}
netns = "{link.robot_ns}"
pin_dir = "{pin_dir}"
fail_mode = "{fail_mode}"

[[network.protect]]
name = "cmd"
destination = "{link.peer_ip}/32"
protocol = "udp"
ports = "{PROTECTED}"

[network.defence]
kind = "{kind}"
rate_hz = {rate}
max_added_delay_ms = 2000
"""


def kernel_state(link: Link, pin_dir: Path) -> dict[str, object]:
    """Everything netguard may leave behind, listed from the kernel."""
    return {
        "qdiscs": "clsact" in link.robot("tc", "qdisc", "show", "dev", link.robot_if).stdout,
        "chains": "TENSORGUARD" in link.robot("iptables-save").stdout
                  + link.robot("ip6tables-save").stdout,
        "pins": pin_dir.exists() and any(pin_dir.iterdir()),
        "queue": link.robot("cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout.strip(),
    }


CLEAN = {"qdiscs": False, "chains": False, "pins": False, "queue": ""}


def deliver(link: Link, n: int, port: int) -> list[float]:
    with capture(link, [port], n, timeout=n / RATE + 3) as got:
        send(link, link.peer_ip, n, [port])
    return sorted(float(ts) for _, ts, *_ in got)  # type: ignore[arg-type]


def test_shapes_reports_and_cleans_up(agent_dir: AgentDir, units: list[UnitProcess], robot: Link,
                                      pin_dir: Path) -> None:
    agent_dir.write(network_config(robot, pin_dir))
    unit = start_unit(agent_dir, "netguard")
    units.append(unit)
    sock = agent_dir.socket("netguard")
    status = call(sock, "net.status")
    assert status["state"] == "running", status
    assert status["interfaces"] == {robot.robot_if: {"attached": True, "mode": "fail_closed"}}
    assert kernel_state(robot, pin_dir)["qdiscs"] and kernel_state(robot, pin_dir)["chains"]

    times = deliver(robot, 60, PROTECTED)
    assert len(times) == 60
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert abs(statistics.median(gaps) - 1 / RATE) < 0.0005, statistics.median(gaps)
    fast = deliver(robot, 60, UNPROTECTED)
    assert len(fast) == 60 and fast[-1] - fast[0] < 0.1  # not paced

    stats = call(sock, "net.stats")
    egress = next(s for s in stats if s["flow"] == "cmd" and s["direction"] == "egress")
    assert egress["packets"] == 60 and egress["dropped"] == 0 and egress["unshaped"] == 0
    assert sum(egress["size_hist"]) == 60
    assert call(sock, "net.status")["pacer"]["released"] == 60
    flows = call(sock, "net.flows")
    assert any(f["remote_port"] == PROTECTED for f in flows)

    shown = tgctl(agent_dir, "net", "stats")
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:4] == [robot.robot_if, "cmd", "egress", "60"]
               for line in shown.stdout.splitlines()), shown.stdout
    status = tgctl(agent_dir, "net", "status")
    assert "netguard: running: 1 protected flow(s)" in status.stdout
    assert f"{robot.robot_if}: eBPF attached, mode fail_closed" in status.stdout
    assert "pacer (queue 18260): 60 released" in status.stdout
    flows_out = tgctl(agent_dir, "net", "flows").stdout
    assert f"{robot.peer_ip}:{PROTECTED}" in flows_out and "udp" in flows_out
    switched = tgctl(agent_dir, "net", "defence", "cbr", "--rate", "100")
    assert switched.returncode == 0 and "cbr at 100 Hz" in switched.stdout

    deadline = time.monotonic() + 5
    prom = agent_dir.metrics / "tensorguard_netguard.prom"
    while "tensorguard_net_pacer_released_total 60" not in (prom.read_text() if prom.exists() else ""):
        assert time.monotonic() < deadline, prom.read_text() if prom.exists() else "no metrics file"
        time.sleep(0.2)
    assert (f'tensorguard_net_packets_total{{direction="egress",flow="cmd",interface="{robot.robot_if}"}} 60'
            in prom.read_text())

    assert unit.stop() == 0
    assert kernel_state(robot, pin_dir) == CLEAN
    assert tgctl(agent_dir, "net", "status").returncode == 3


def test_reload_swaps_defence_and_refuses_what_cannot_apply(
        agent_dir: AgentDir, units: list[UnitProcess], robot: Link, pin_dir: Path) -> None:
    agent_dir.write(network_config(robot, pin_dir, rate=100.0))
    unit = start_unit(agent_dir, "netguard")
    units.append(unit)
    sock = agent_dir.socket("netguard")
    agent_dir.write(network_config(robot, pin_dir, rate=400.0))
    assert call(sock, "config.reload")["generation"] == 2
    times = deliver(robot, 40, PROTECTED)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert abs(statistics.median(gaps) - 1 / 400.0) < 0.0005

    agent_dir.write(network_config(robot, pin_dir, interfaces='["nosuch0"]'))
    with pytest.raises(RpcError) as info:
        call(sock, "config.reload")
    assert 'network.interfaces[0] = "nosuch0": no such interface' in info.value.message
    agent_dir.write(network_config(robot, pin_dir, rate=60000.0))
    with pytest.raises(RpcError, match="exceeds the pace path's capacity"):
        call(sock, "config.reload")
    assert call(sock, "sys.health")["config_generation"] == 2  # both refused
    assert call(sock, "net.status")["interfaces"][robot.robot_if]["attached"]

    # a new fail mode needs a new pacer and new rules (queue bypass): restarted, still pacing
    agent_dir.write(network_config(robot, pin_dir, rate=400.0, fail_mode="open"))
    assert call(sock, "config.reload")["generation"] == 3
    assert call(sock, "net.status")["interfaces"][robot.robot_if]["mode"] == "fail_open"
    assert "--queue-bypass" in robot.robot("iptables-save").stdout
    times = deliver(robot, 40, PROTECTED)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 40 and abs(statistics.median(gaps) - 1 / 400.0) < 0.0005

    status = call(sock, "net.defence.set", {"kind": "cbr", "rate_hz": 50.0})
    assert status["state"] == "running" and "50 Hz" in status["detail"]
    with pytest.raises(RpcError, match="invalid defence"):
        call(sock, "net.defence.set", {"kind": "magic"})
    assert unit.stop() == 0
    assert kernel_state(robot, pin_dir) == CLEAN


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_kill_9_fails_as_configured_and_next_start_recovers(
        agent_dir: AgentDir, units: list[UnitProcess], robot: Link, pin_dir: Path, fail_mode: str) -> None:
    agent_dir.write(network_config(robot, pin_dir, fail_mode=fail_mode))
    first = start_unit(agent_dir, "netguard")
    units.append(first)
    first.stop(signal.SIGKILL)
    with capture(robot, [PROTECTED], 20, timeout=2) as got:
        send(robot, robot.peer_ip, 20, [PROTECTED])
    assert len(got) == (20 if fail_mode == "open" else 0), f"fail-{fail_mode} after kill -9"

    second = start_unit(agent_dir, "netguard")  # cleans the leftovers, then runs again
    units.append(second)
    assert len(deliver(robot, 20, PROTECTED)) == 20
    assert second.stop() == 0
    assert kernel_state(robot, pin_dir) == CLEAN


def test_unknown_interface_at_start_is_refused_before_the_kernel_changes(
        agent_dir: AgentDir, units: list[UnitProcess], robot: Link, pin_dir: Path) -> None:
    agent_dir.write(network_config(robot, pin_dir, interfaces=f'["{robot.robot_if}", "nosuch0"]'))
    unit = start_unit(agent_dir, "netguard", wait_ready=False)
    units.append(unit)
    assert unit.proc.wait(20) == 78
    assert 'network.interfaces[1] = "nosuch0": no such interface' in unit.stderr_text()
    assert kernel_state(robot, pin_dir) == CLEAN


@pytest.fixture
def unit_slice() -> Iterator[Path]:
    """``system.slice`` of the cgroup v2 hierarchy, where netguard looks for protected units."""
    slice_dir = system_slice()
    if cgroup2_root() is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    created = not slice_dir.exists()
    if created:
        slice_dir.mkdir()
    yield slice_dir
    if created:
        for _ in range(50):  # bounded: emptied once the test's cgroups are gone
            try:
                slice_dir.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def send_from_cgroup(link: Link, cgroup: Path, n: int) -> None:
    res = subprocess.run([sys.executable, "-c", CGROUP_SENDER, str(cgroup / "cgroup.procs"),
                          link.robot_ns, link.peer_ip, str(PROTECTED), str(n)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr


def wait_unit_state(sock: Path, unit: str, running: bool, not_id: int | None = None) -> tuple[dict, float]:
    start = time.monotonic()
    while True:
        state = call(sock, "net.status")["units"][unit]
        if state["running"] == running and (not_id is None or state["cgroup_id"] != not_id):
            return state, time.monotonic() - start
        assert time.monotonic() - start < 5, f"netguard did not notice {unit}: {state}"
        time.sleep(0.005)


def test_unit_scoped_flow_follows_the_unit_across_restarts(
        agent_dir: AgentDir, units: list[UnitProcess], robot: Link, pin_dir: Path,
        unit_slice: Path) -> None:
    name = f"tg-test-{secrets.token_hex(3)}.service"
    cgroup = unit_slice / name
    agent_dir.write(network_config(robot, pin_dir).replace(
        'ports = "5300"', f'ports = "5300"\nunit = "{name}"'))
    netguard = start_unit(agent_dir, "netguard")  # the protected unit is not running yet
    units.append(netguard)
    sock = agent_dir.socket("netguard")
    assert call(sock, "net.status")["units"] == {name: {"running": False, "cgroup_id": None}}
    shown = tgctl(agent_dir, "net", "status").stdout
    assert f"unit {name}: not running; protected again as soon as it starts" in shown
    try:
        ids = []
        for attempt in range(2):  # the unit starts, then restarts: a new cgroup each time
            cgroup.mkdir()
            state, noticed = wait_unit_state(sock, name, True)
            print(f"start {attempt}: netguard re-applied the selectors {noticed * 1e3:.1f} ms after "
                  "the unit's cgroup appeared")
            ids.append(state["cgroup_id"])
            before = call(sock, "net.status")["pacer"]["released"]
            with capture(robot, [PROTECTED], 30, timeout=30 / RATE + 3) as got:
                send_from_cgroup(robot, cgroup, 30)
            assert len(got) == 30
            assert call(sock, "net.status")["pacer"]["released"] - before == 30  # paced, not leaked
            times = sorted(float(ts) for _, ts, *_ in got)  # type: ignore[arg-type]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert abs(statistics.median(gaps) - 1 / RATE) < 0.0005, statistics.median(gaps)

            before = call(sock, "net.status")["pacer"]["released"]
            fast = deliver(robot, 20, PROTECTED)  # same destination, another sender: not the unit's
            assert len(fast) == 20 and call(sock, "net.status")["pacer"]["released"] == before
            cgroup.rmdir()  # the unit stops
            wait_unit_state(sock, name, False)
        assert ids[0] != ids[1]
    finally:
        if cgroup.exists():
            cgroup.rmdir()
    assert netguard.stop() == 0
    assert kernel_state(robot, pin_dir) == CLEAN
