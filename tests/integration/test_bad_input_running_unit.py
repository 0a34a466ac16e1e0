"""A running unit fed 200+ malformed configs and 200+ malformed frames: it refuses each, keeps going."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from tensorguard.control import ControlClient, RpcError, call
from tensorguard.control.protocol import CONFIG_INVALID

from ..conftest import AgentDir, UnitProcess, start_unit
from ..unit.test_config_fuzz import malformed
from ..unit.test_control_server import FRAMES, KNOWN_CODES


def test_malformed_configs_never_change_the_running_config(agent_dir: AgentDir,
                                                           units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "identity")
    units.append(unit)
    sock = agent_dir.socket("identity")
    before = call(sock, "config.show")
    seen = []

    @settings(max_examples=220, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=malformed())
    def feed(case: tuple[bytes, str | None]) -> None:
        text, _key = case
        agent_dir.drop_in("10-fuzz.toml", text)
        try:
            call(sock, "config.reload")
        except RpcError as exc:
            assert exc.code == CONFIG_INVALID
            errors = exc.data["errors"]
            assert errors and all(e["file"] == "agent.d/10-fuzz.toml" and e["message"] for e in errors)
        else:
            raise AssertionError(f"reload accepted {text!r}")
        seen.append(text)

    feed()
    assert len(seen) >= 200
    after = call(sock, "config.show")
    assert (after["generation"], after["config"], after["digest"]) == (
        before["generation"], before["config"], before["digest"])
    assert unit.proc.poll() is None
    assert call(sock, "sys.health")["config_generation"] == 1


def test_malformed_frames_get_errors_from_a_real_unit(agent_dir: AgentDir,
                                                      units: list[UnitProcess]) -> None:
    unit = start_unit(agent_dir, "netguard")
    units.append(unit)
    sock = agent_dir.socket("netguard")
    answered = []

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(frame=FRAMES)
    def feed(frame: bytes) -> None:
        frame = frame.replace(b"\n", b" ")
        with ControlClient(sock, timeout=5) as client:
            assert client._sock is not None
            client._sock.sendall(frame + b"\n" +
                                 b'{"jsonrpc":"2.0","id":"marker","method":"sys.version"}\n')
            while True:
                answer = json.loads(client.read_line())
                if isinstance(answer, dict) and answer.get("id") == "marker":
                    break
                for item in answer if isinstance(answer, list) else [answer]:
                    if "error" in item:
                        assert item["error"]["code"] in KNOWN_CODES
                answered.append(answer)

    feed()
    assert len(answered) >= 200
    assert unit.proc.poll() is None
    assert call(sock, "sys.health")["status"] == "ok"
