"""Hostile config files: huge numbers, deep nesting, FIFOs, foreign or writable files end in one clear error."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from tensorguard.config import ConfigError, load_config
from tensorguard.config.loader import untrusted_reason

from ..conftest import AgentDir

NOBODY = 65534


def issues_of(agent: AgentDir) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(agent.config)
    return [str(i) for i in info.value.issues]


# a. numbers Python refuses to convert (int_max_str_digits)

def test_integer_with_too_many_digits_names_file_and_line(agent_dir: AgentDir) -> None:
    digits = sys.get_int_max_str_digits() + 1
    agent_dir.drop_in("10.toml", "[server]\n# a comment\nport = " + "1" * digits + "\n")
    assert issues_of(agent_dir) == [
        f"agent.d/10.toml: number too large: more than {digits - 1} digits (line 3)"]


def test_integer_with_underscores_and_sign_is_located(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "[server]\nport = -" + "1_2" * 3000 + "\n")
    assert issues_of(agent_dir) == [
        f"agent.d/10.toml: number too large: more than {sys.get_int_max_str_digits()} digits (line 2)"]


def test_long_digit_run_inside_a_string_is_fine(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", '[server]\nhost = "' + "1" * 5000 + '"\n')
    (issue,) = issues_of(agent_dir)
    assert issue.startswith("agent.d/10.toml: server.host = ") and "at most 253" in issue


# b. nesting deep enough to exhaust the interpreter's stack

@pytest.mark.parametrize("text", [
    "[agent]\nnode_id = " + "[" * 1000 + "]" * 1000 + "\n",
    "[agent]\nnode_id = " + "{a = " * 1000 + "1" + "}" * 1000 + "\n",
    "x = " + "[{a = " * 500 + "1" + "}]" * 500 + "\n",
    "[" + ".".join(["a"] * 1000) + "]\n",
    "[agent." + ".".join(["a"] * 600) + "]\nb = 1\n",
    "agent." + ".".join(["a"] * 600) + " = 1\n",
])
def test_deep_nesting_is_refused_with_a_clear_error(agent_dir: AgentDir, text: str) -> None:
    agent_dir.write("[agent.control]\nmax_clients = 3\n")  # the drop-in merges into a table
    agent_dir.drop_in("10.toml", text)
    (issue,) = issues_of(agent_dir)
    assert issue.startswith("agent.d/10.toml: ") and "nested deeper than 32 levels" in issue, issue


def test_nesting_the_schema_needs_is_accepted(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "[network.defence.front]\nmax_dummies = 3\n"
                      '[[identity.sink]]\ndirectory = "/d"\nreload_command = ["x"]\n')
    assert load_config(agent_dir.config).config.network.defence.front.max_dummies == 3


# c. files that are not regular: reading them could block forever or never end

def test_fifo_drop_in_is_refused_without_waiting_for_a_writer(agent_dir: AgentDir) -> None:
    fifo = agent_dir.drop_ins / "10.toml"
    os.mkfifo(fifo)
    _unblock_later(fifo)
    started = time.monotonic()
    found = issues_of(agent_dir)
    assert time.monotonic() - started < 2
    assert found == ["agent.d/10.toml: is not a regular file (a FIFO); refusing to read it"]


def test_fifo_main_config_is_refused(agent_dir: AgentDir) -> None:
    agent_dir.config.unlink()
    os.mkfifo(agent_dir.config)
    _unblock_later(agent_dir.config)
    assert issues_of(agent_dir) == ["agent.toml: is not a regular file (a FIFO); refusing to read it"]


def _unblock_later(fifo: Path) -> None:
    """Open the FIFO's write end in 5 s: a loader stuck in open() goes on, so the test fails, not hangs."""

    def unblock() -> None:
        time.sleep(5)
        with contextlib.suppress(OSError):  # ENXIO: no reader (the loader did not block)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()


def test_socket_drop_in_is_refused(agent_dir: AgentDir) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(agent_dir.drop_ins / "10.toml"))
        assert issues_of(agent_dir) == [
            "agent.d/10.toml: is not a regular file (a socket); refusing to read it"]


def test_device_drop_in_is_refused(agent_dir: AgentDir) -> None:
    (agent_dir.drop_ins / "10.toml").symlink_to("/dev/zero")
    assert issues_of(agent_dir) == [
        "agent.d/10.toml: is not a regular file (a character device); refusing to read it"]


def test_symlink_to_a_trusted_regular_file_is_followed(agent_dir: AgentDir) -> None:
    target = agent_dir.root / "shared.toml"
    target.write_text("[server]\nport = 9\n")
    (agent_dir.drop_ins / "10.toml").symlink_to(target)
    assert load_config(agent_dir.config).config.server.port == 9


def test_huge_sparse_file_is_refused_without_reading_it(agent_dir: AgentDir) -> None:
    with (agent_dir.drop_ins / "10.toml").open("wb") as handle:
        handle.truncate(8 << 30)
    started = time.monotonic()
    assert issues_of(agent_dir) == ["agent.d/10.toml: is larger than 1048576 bytes"]
    assert time.monotonic() - started < 1


# d. who may write the files: the agent runs as root, so only root (or the running user) may

def test_world_writable_drop_in_directory_is_refused(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", "[server]\nport = 9\n")
    os.chmod(agent_dir.drop_ins, 0o777)
    assert issues_of(agent_dir) == [
        "agent.d: is world-writable (mode 0777); refusing to trust it"]


def test_sticky_world_writable_drop_in_directory_is_refused(agent_dir: AgentDir) -> None:
    os.chmod(agent_dir.drop_ins, 0o1777)
    assert issues_of(agent_dir) == [
        "agent.d: is world-writable (mode 1777); refusing to trust it"]


def test_group_writable_drop_in_is_refused(agent_dir: AgentDir) -> None:
    os.chmod(agent_dir.drop_in("10.toml", ""), 0o664)
    assert issues_of(agent_dir) == ["agent.d/10.toml: is group-writable (mode 0664); refusing to trust it"]


def test_group_writable_main_config_is_refused(agent_dir: AgentDir) -> None:
    os.chmod(agent_dir.config, 0o620)
    assert issues_of(agent_dir) == ["agent.toml: is group-writable (mode 0620); refusing to trust it"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_drop_in_owned_by_another_user_is_refused(agent_dir: AgentDir) -> None:
    os.chown(agent_dir.drop_in("10.toml", "[server]\nport = 9\n"), NOBODY, NOBODY)
    assert issues_of(agent_dir) == [
        f"agent.d/10.toml: is owned by uid {NOBODY}, not root; refusing to trust it"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_drop_in_directory_owned_by_another_user_is_refused(agent_dir: AgentDir) -> None:
    os.chown(agent_dir.drop_ins, NOBODY, NOBODY)
    assert issues_of(agent_dir) == [f"agent.d: is owned by uid {NOBODY}, not root; refusing to trust it"]


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


def test_policy_accepts_root_or_the_running_user_and_no_other_writer() -> None:
    regular = stat.S_IFREG
    assert untrusted_reason(_stat(regular | 0o644, 0), euid=0) is None
    assert untrusted_reason(_stat(regular | 0o640, 0), euid=1000) is None
    assert untrusted_reason(_stat(regular | 0o600, 1000), euid=1000) is None
    assert untrusted_reason(_stat(stat.S_IFDIR | 0o755, 1000), euid=1000) is None
    assert untrusted_reason(_stat(regular | 0o644, 1001), euid=1000) == \
        "is owned by uid 1001, not root or uid 1000 (the running user)"
    assert untrusted_reason(_stat(regular | 0o644, 1000), euid=0) == "is owned by uid 1000, not root"
    assert untrusted_reason(_stat(regular | 0o646, 0), euid=0) == "is world-writable (mode 0646)"
    assert untrusted_reason(_stat(stat.S_IFDIR | 0o775, 0), euid=0) == "is group-writable (mode 0775)"
