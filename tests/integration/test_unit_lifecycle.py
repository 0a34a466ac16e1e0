"""Real `tensorguard` processes: readiness, watchdog, reload, stop, crash recovery, metrics."""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from tensorguard.control import ControlClient, RpcError, call
from tensorguard.control.protocol import CONFIG_INVALID

from ..conftest import AgentDir, UnitProcess, start_unit


def test_ready_only_after_socket_is_bound_and_status_is_sent(agent_dir: AgentDir,
                                                            units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "identity", wait_ready=False)
    units.append(unit)
    ready = unit.wait_for("READY=1")
    # READY=1 must not arrive before the socket accepts connections
    assert agent_dir.socket("identity").exists()
    assert "STATUS=config generation 1; identity: disabled" in ready
    assert call(agent_dir.socket("identity"), "sys.health")["status"] == "ok"
    mode = stat.S_IMODE(os.stat(agent_dir.socket("identity")).st_mode)
    assert mode == 0o660


def test_watchdog_pings_at_half_the_interval(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "fl", env={"WATCHDOG_USEC": "400000"})
    units.append(unit)
    unit.messages.clear()
    time.sleep(1.1)
    pings = [m for m in unit.read_notifications(0.1) if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 8, pings


def test_sighup_reload_valid_then_invalid(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "fl")
    units.append(unit)
    sock = agent_dir.socket("fl")
    agent_dir.drop_in("50.toml", "[fl]\nenabled = true\n")
    unit.proc.send_signal(signal.SIGHUP)
    unit.wait_for("fl: unavailable")
    health = call(sock, "sys.health")
    assert health["config_generation"] == 2
    assert health["status"] == "degraded"
    assert "no training takes place" in health["subsystem"]["detail"]

    agent_dir.drop_in("60.toml", "[network]\nfail_mode = 'ajar'\n")
    unit.proc.send_signal(signal.SIGHUP)
    unit.wait_for("config reload refused (1 error(s))")
    shown = call(sock, "config.show")
    assert shown["generation"] == 2
    assert shown["last_reload_error"][0]["key"] == "network.fail_mode"
    assert shown["last_reload_error"][0]["file"] == "agent.d/60.toml"
    assert unit.proc.poll() is None


def test_netguard_refuses_to_enable_without_interfaces_and_flows(agent_dir: AgentDir,
                                                                 units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "netguard")
    units.append(unit)
    agent_dir.drop_in("50.toml", "[network]\nenabled = true\n")
    with pytest.raises(RpcError) as info:
        call(agent_dir.socket("netguard"), "config.reload")
    keys = [e["key"] for e in info.value.data["errors"]]
    assert keys == ["network.interfaces", "network.protect"]
    assert "at least one uplink interface is needed" in info.value.message
    assert call(agent_dir.socket("netguard"), "net.status")["state"] == "disabled"


def test_config_reload_over_the_socket_refuses_and_keeps_running(agent_dir: AgentDir,
                                                                 units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    before = call(sock, "config.show")
    agent_dir.drop_in("50.toml", "[identity]\nrenew_fraction = 2\n")
    with pytest.raises(RpcError) as info:
        call(sock, "config.reload")
    assert info.value.code == CONFIG_INVALID
    assert "still running generation 1" in info.value.message
    assert info.value.data["errors"] == [{
        "file": "agent.d/50.toml", "key": "identity.renew_fraction", "value": "2",
        "message": "must be < 1"}]
    assert call(sock, "config.show")["config"] == before["config"]
    (agent_dir.drop_ins / "50.toml").unlink()
    assert call(sock, "config.reload") == {"generation": 1, "changed": False,
                                           "sources": [str(agent_dir.config)]}


def test_sigterm_removes_socket_and_marks_metrics_down(agent_dir: AgentDir,
                                                       units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "fl")
    units.append(unit)
    call(agent_dir.socket("fl"), "sys.version")
    deadline = time.monotonic() + 5
    prom = agent_dir.metrics / "tensorguard_fl.prom"
    while not prom.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'tensorguard_up{unit="fl"} 1' in prom.read_text()
    assert unit.stop() == 0
    assert not agent_dir.socket("fl").exists()
    text = prom.read_text()
    assert 'tensorguard_up{unit="fl"} 0' in text
    assert 'tensorguard_control_requests_total{method="sys.version",unit="fl"} 1' in text
    assert sorted(os.listdir(agent_dir.metrics)) == ["tensorguard_fl.prom"]
    unit.wait_for("STOPPING=1")


def test_kill_9_leaves_a_stale_socket_that_the_next_start_replaces(
        agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    first = start_unit(agent_dir, "identity")
    units.append(first)
    first.stop(signal.SIGKILL)
    assert agent_dir.socket("identity").exists()
    second = start_unit(agent_dir, "identity")
    units.append(second)
    assert call(agent_dir.socket("identity"), "sys.health")["pid"] == second.proc.pid


def test_second_instance_refuses_a_live_socket(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    units.append(start_unit(agent_dir, "identity"))
    other = start_unit(agent_dir, "identity", wait_ready=False)
    units.append(other)
    assert other.proc.wait(10) == 1
    assert "is served by another running process" in other.stderr_text()
    assert call(agent_dir.socket("identity"), "sys.health")["pid"] == units[0].proc.pid


def test_invalid_config_at_start_exits_78_naming_file_and_key(agent_dir: AgentDir,
                                                              units: list[UnitProcess]) -> None:
    agent_dir.drop_in("10-net.toml", "[network.defence]\nrate_hz = -5\n")
    unit = start_unit(agent_dir, "netguard", wait_ready=False)
    units.append(unit)
    assert unit.proc.wait(10) == 78
    assert "agent.d/10-net.toml: network.defence.rate_hz = -5: must be > 0" in unit.stderr_text()
    assert not agent_dir.socket("netguard").exists()
    assert any("STATUS=invalid config" in m for m in unit.read_notifications(0.2))


def test_unwritable_metrics_dir_does_not_stop_the_unit(agent_dir: AgentDir,
                                                       units: list[UnitProcess]) -> None:
    agent_dir.write('[agent.control]\nmax_clients = 4\n')
    agent_dir.config.write_text(agent_dir.config.read_text().replace(
        str(agent_dir.metrics), str(agent_dir.root / "no-such-dir")))
    unit = start_unit(agent_dir, "fl")
    units.append(unit)
    assert call(agent_dir.socket("fl"), "sys.health")["status"] == "ok"
    assert unit.stop() == 0
    assert "cannot write metrics" in unit.stderr_text()


def test_reload_applies_control_limits_live(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    agent_dir.drop_in("50.toml", "[agent.control]\nmax_frame_bytes = 2048\n")
    assert call(sock, "config.reload")["changed"] is True
    with ControlClient(sock) as client:
        answer = client.exchange(b'{"jsonrpc":"2.0","id":1,"method":"sys.health","params":{"x":"'
                                 + b"a" * 3000 + b'"}}\n')
        assert answer["error"]["code"] == -32001
        assert "2048" in answer["error"]["message"]


def test_agent_mode_serves_all_three_and_reloads_them_together(agent_dir: AgentDir,
                                                               units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "agent")
    units.append(unit)
    for name in ("netguard", "identity", "fl"):
        hello = call(agent_dir.socket(name), "sys.hello")
        assert hello["unit"] == name and hello["protocol"] == 1
        assert {"sys.health", "config.reload", "config.show"} <= set(hello["methods"])
    agent_dir.drop_in("50.toml", "[fl]\nenabled = true\n")
    call(agent_dir.socket("netguard"), "config.reload")
    assert call(agent_dir.socket("fl"), "sys.health")["subsystem"]["state"] == "unavailable"
    assert unit.stop() == 0
    assert sorted(os.listdir(agent_dir.sockets)) == []
