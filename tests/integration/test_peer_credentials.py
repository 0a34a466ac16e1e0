"""SO_PEERCRED with real second uids: a stranger is refused, a group member is let in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..conftest import AgentDir, UnitProcess, start_unit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")

STRANGER = (65533, 65533)     # uid and gid that no group grants anything
MEMBER = (65532, 65534)       # primary group nogroup (65534), the group the test config trusts

CLIENT = """
import json, sys
from tensorguard.control import ControlClient, RpcError
try:
    with ControlClient(sys.argv[1]) as c:
        print(json.dumps({"health": c.call("sys.health")["status"]}))
        try:
            print(json.dumps({"reload": c.call("config.reload")["generation"]}))
        except RpcError as e:
            print(json.dumps({"reload_error": [e.code, e.message]}))
except PermissionError as e:
    print(json.dumps({"connect_error": e.errno}))
"""


def run_as(uid_gid: tuple[int, int], socket_path: str) -> list[str]:
    uid, gid = uid_gid
    out = subprocess.run([sys.executable, "-c", CLIENT, socket_path], user=uid, group=gid,
                         extra_groups=[], capture_output=True, text=True, timeout=30, check=True,
                         env={"PATH": "/usr/bin:/bin"}, cwd="/")
    return out.stdout.splitlines()


def test_stranger_cannot_connect_to_0660_socket(public_agent_dir: AgentDir,
                                               units: list[UnitProcess]) -> None:
    public_agent_dir.write('[agent.control]\ngroup = "nogroup"\n')
    units.append(start_unit(public_agent_dir, "identity"))
    sock = str(public_agent_dir.socket("identity"))
    assert run_as(STRANGER, sock) == ['{"connect_error": 13}']
    assert run_as(MEMBER, sock) == ['{"health": "ok"}', '{"reload": 1}']


def test_peercred_decides_when_the_socket_is_world_accessible(public_agent_dir: AgentDir,
                                                              units: list[UnitProcess]) -> None:
    public_agent_dir.write('[agent.control]\ngroup = "nogroup"\nread_only_public = true\n')
    units.append(start_unit(public_agent_dir, "identity"))
    sock = str(public_agent_dir.socket("identity"))
    assert oct(os.stat(sock).st_mode & 0o777) == "0o666"
    stranger = run_as(STRANGER, sock)
    assert stranger[0] == '{"health": "ok"}'
    assert stranger[1].startswith('{"reload_error": [-32002, "permission denied: uid 65533 may not')
    assert run_as(MEMBER, sock) == ['{"health": "ok"}', '{"reload": 1}']


def test_reload_can_close_read_only_access_again(public_agent_dir: AgentDir,
                                                 units: list[UnitProcess]) -> None:
    public_agent_dir.write('[agent.control]\ngroup = "nogroup"\nread_only_public = true\n')
    units.append(start_unit(public_agent_dir, "fl"))
    sock = str(public_agent_dir.socket("fl"))
    public_agent_dir.drop_in("50.toml", "[agent.control]\nread_only_public = false\n")
    assert run_as(MEMBER, sock)[1] == '{"reload": 2}'
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    assert run_as(STRANGER, sock) == ['{"connect_error": 13}']
