"""tgctl against real units: output, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess

from ..conftest import AgentDir, UnitProcess, start_unit, tgctl


def test_status_all_running(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    units.append(start_unit(agent_dir, "agent"))
    out = tgctl(agent_dir, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["UNIT", "STATE", "VERSION", "CONFIG", "SUBSYSTEM"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["netguard", "running", "0.1.0", "gen", "1"],
        ["identity", "running", "0.1.0", "gen", "1"],
        ["fl", "running", "0.1.0", "gen", "1"],
    ]
    data = json.loads(tgctl(agent_dir, "--json", "status").stdout)
    assert [u["unit"] for u in data["units"]] == ["netguard", "identity", "fl"]
    assert all(u["running"] and u["subsystem"]["state"] == "disabled" for u in data["units"])


def test_status_with_a_unit_down_exits_3(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    units.append(start_unit(agent_dir, "identity"))
    out = tgctl(agent_dir, "status")
    assert out.returncode == 3
    assert "netguard  not running" in out.stdout
    assert "identity  running" in out.stdout
    assert tgctl(agent_dir, "--unit", "identity", "status").returncode == 0
    down = json.loads(tgctl(agent_dir, "--json", "--unit", "fl", "status").stdout)
    assert down["units"][0]["running"] is False


def test_config_validate(agent_dir: AgentDir) -> None:
    assert tgctl(agent_dir, "config", "validate").returncode == 0
    agent_dir.drop_in("10-net.toml", "[network.defence]\nrate_hz = -5\n[network]\nbogus = 1\n")
    out = tgctl(agent_dir, "config", "validate")
    assert out.returncode == 1
    assert "agent.d/10-net.toml: network.defence.rate_hz = -5: must be > 0" in out.stdout
    assert "agent.d/10-net.toml: network.bogus = 1: unknown key (allowed: enabled, interfaces" in out.stdout
    data = json.loads(tgctl(agent_dir, "--json", "config", "validate").stdout)
    assert data["valid"] is False and len(data["errors"]) == 2
    (agent_dir.root / "elsewhere").mkdir()
    other = agent_dir.root / "elsewhere" / "agent.toml"
    other.write_text("[agent]\nlog_level = 'debug'\n")
    assert tgctl(agent_dir, "config", "validate", str(other)).returncode == 0


def test_config_show_and_reload(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    units.append(start_unit(agent_dir, "agent"))
    shown = tgctl(agent_dir, "config", "show")
    assert shown.returncode == 0
    assert shown.stdout.startswith("# running config of netguard, generation 1\n")
    assert f'socket_dir = "{agent_dir.sockets}"' in shown.stdout
    agent_dir.drop_in("50.toml", "[identity]\nkey_type = 'rsa'\n")
    refused = tgctl(agent_dir, "config", "reload")
    assert refused.returncode == 1
    assert "identity: config refused, still running generation 1" in refused.stderr
    assert "agent.d/50.toml: identity.key_type = \"rsa\": must be one of" in refused.stderr
    agent_dir.drop_in("50.toml", "[identity]\nkey_type = 'ed25519'\n")
    ok = tgctl(agent_dir, "--unit", "identity", "config", "reload")
    assert ok.returncode == 0 and "identity: reloaded, config generation 2" in ok.stdout
    assert "key_type = \"ed25519\"" in tgctl(agent_dir, "--unit", "fl", "config", "show").stdout


def test_commands_when_nothing_runs(agent_dir: AgentDir) -> None:
    assert tgctl(agent_dir, "config", "reload").returncode == 3
    out = tgctl(agent_dir, "--unit", "fl", "config", "show")
    assert out.returncode == 3 and "fl: not running" in out.stderr


def test_usage_errors_exit_2_and_help_documents_exit_codes(agent_dir: AgentDir) -> None:
    assert tgctl(agent_dir, "frobnicate").returncode == 2
    help_text = tgctl(agent_dir, "--help").stdout
    assert "3  a unit asked for is not running" in help_text


def test_example_and_completion(agent_dir: AgentDir) -> None:
    example = tgctl(agent_dir, "config", "example").stdout
    assert "#rate_hz = 50.0" in example
    script = tgctl(agent_dir, "completion", "bash").stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    words = subprocess.run(
        ["bash", "-c", script + '\nCOMP_WORDS=(tgctl --unit fl config ""); COMP_CWORD=4; _shtab_tgctl; '
         'echo "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True).stdout.split()
    assert {"validate", "show", "reload", "example"} <= set(words)


def test_net_commands_with_netguard_disabled(agent_dir: AgentDir, units: list[UnitProcess]) -> None:
    units.append(start_unit(agent_dir, "netguard"))
    status = tgctl(agent_dir, "net", "status")
    assert status.returncode == 0 and "netguard: disabled: [network] enabled = false" in status.stdout
    stats = tgctl(agent_dir, "net", "stats")
    assert stats.returncode == 1
    assert "netguard: netguard is not running ([network] enabled = false)" in stats.stderr
    assert tgctl(agent_dir, "--unit", "fl", "net", "status").returncode == 2
