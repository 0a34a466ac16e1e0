"""Loading agent.toml with drop-ins: merging rules and errors that name file, key and limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensorguard.config import ConfigError, load_config
from tensorguard.service.store import ConfigStore

from ..conftest import AgentDir


def issues_of(agent: AgentDir) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(agent.config)
    return [str(i) for i in info.value.issues]


def test_defaults_are_valid(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("")
    loaded = load_config(tmp_path / "agent.toml")
    assert loaded.config.agent.socket_dir == "/run/tensorguard"
    assert loaded.config.network.defence.kind == "none"
    assert loaded.sources == (str(tmp_path / "agent.toml"),)


def test_error_names_drop_in_key_value_and_limit(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10-net.toml", "[network.defence]\nrate_hz = -5\n")
    assert issues_of(agent_dir) == ["agent.d/10-net.toml: network.defence.rate_hz = -5: must be > 0"]


def test_every_error_is_reported_not_just_the_first(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10-a.toml", '[agent]\nlog_level = "loud"\n[fl]\nsuperlink = "nohost"\n')
    agent_dir.drop_in("20-b.toml", "[identity]\nrenew_fraction = 1.0\nbogus = true\n")
    found = issues_of(agent_dir)
    assert "agent.d/10-a.toml: agent.log_level = \"loud\": must be one of 'debug', 'info', " \
           "'warning' or 'error'" in found
    assert 'agent.d/10-a.toml: fl.superlink = "nohost": must be HOST:PORT with a port in 1..65535' in found
    assert "agent.d/20-b.toml: identity.renew_fraction = 1.0: must be < 1" in found
    assert any(f.startswith("agent.d/20-b.toml: identity.bogus = true: unknown key (allowed: enabled,")
               for f in found)
    assert len(found) == 4


def test_unknown_section_lists_the_allowed_ones(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "[netwrok]\nenabled = true\n")
    (issue,) = issues_of(agent_dir)
    assert issue.startswith("agent.d/10.toml: netwrok: unknown key (allowed: agent, network, identity")


def test_types_are_not_coerced(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", '[server]\nport = "8000"\n[network]\nenabled = 1\n')
    assert sorted(issues_of(agent_dir)) == [
        'agent.d/10.toml: network.enabled = 1: must be true or false',
        'agent.d/10.toml: server.port = "8000": must be an integer',
    ]


def test_list_item_errors_carry_the_index(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", '[network]\ninterfaces = ["eth0", "bad/name"]\n')
    (issue,) = issues_of(agent_dir)
    assert issue.startswith('agent.d/10.toml: network.interfaces[1] = "bad/name": must be a network')


def test_drop_ins_merge_in_name_order_tables_merge_arrays_replace(agent_dir: AgentDir) -> None:
    agent_dir.write('[network]\ninterfaces = ["eth0"]\nfail_mode = "open"\n')
    agent_dir.drop_in("20-b.toml", '[network]\ninterfaces = ["wlan0"]\n[network.defence]\nrate_hz = 20.0\n')
    agent_dir.drop_in("10-a.toml", '[network]\ninterfaces = ["eth1", "eth2"]\n[network.defence]\nrate_hz = 10.0\nkind = "cbr"\n')
    agent_dir.drop_in("30-ignored.toml.dpkg-dist", "[network]\nenabled = nonsense\n")
    agent_dir.drop_in(".hidden.toml", "garbage = = =\n")
    loaded = load_config(agent_dir.config)
    net = loaded.config.network
    assert net.interfaces == ["wlan0"]
    assert net.fail_mode == "open"
    assert (net.defence.kind, net.defence.rate_hz) == ("cbr", 20.0)
    assert [Path(s).name for s in loaded.sources] == ["agent.toml", "10-a.toml", "20-b.toml"]
    assert loaded.origins["network.defence.kind"] == "agent.d/10-a.toml"
    assert loaded.origins["network.defence.rate_hz"] == "agent.d/20-b.toml"


def test_toml_syntax_error_names_file_and_line(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "[agent]\nlog_level = \n")
    (issue,) = issues_of(agent_dir)
    assert issue.startswith("agent.d/10.toml: TOML syntax error: Invalid value (at line 2, column 13)")


def test_invalid_utf8_is_reported(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", b"[agent]\nnode_id = \"\xff\"\n")
    assert issues_of(agent_dir) == ["agent.d/10.toml: is not valid UTF-8 (byte offset 19)"]


def test_missing_main_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path}/nope.toml: cannot read: No such file or directory" \
        .replace(f"{tmp_path}/", "")


def test_world_writable_file_is_refused(agent_dir: AgentDir) -> None:
    path = agent_dir.drop_in("10.toml", "")
    os.chmod(path, 0o666)
    assert issues_of(agent_dir) == ["agent.d/10.toml: is world-writable (mode 0666); refusing to trust it"]


def test_directory_named_like_a_drop_in_is_reported(agent_dir: AgentDir) -> None:
    (agent_dir.drop_ins / "10.toml").mkdir()
    (issue,) = issues_of(agent_dir)
    assert issue.startswith("agent.d/10.toml: ")


def test_oversized_file_is_refused(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "#" * (1024 * 1024 + 1))
    assert issues_of(agent_dir) == ["agent.d/10.toml: is larger than 1048576 bytes"]


def test_reload_keeps_old_config_on_error_and_refuses_restart_only_keys(agent_dir: AgentDir) -> None:
    store = ConfigStore(agent_dir.config, clock=lambda: 1000.0)
    before = store.describe()
    agent_dir.drop_in("50.toml", "[agent]\nlog_level = 3\n")
    with pytest.raises(ConfigError):
        store.reload()
    assert store.describe()["config"] == before["config"]
    assert store.generation == 1 and store.reloads_refused == 1
    assert store.last_error is not None
    agent_dir.drop_in("50.toml", '[agent]\nsocket_dir = "/elsewhere"\n')
    with pytest.raises(ConfigError, match=r"agent.socket_dir = '/elsewhere': cannot change while running"):
        store.reload()
    agent_dir.drop_in("50.toml", '[agent]\nlog_level = "debug"\n')
    result = store.reload()
    assert (result.generation, result.changed) == (2, True)
    assert store.reload().changed is False
    assert store.last_error is None
