"""The control socket server, in-process: every malformed frame gets an error and serving goes on."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorguard.control import (
    AccessPolicy,
    ControlClient,
    ControlServer,
    RpcError,
    ServerLimits,
    SocketInUse,
    collect,
    export,
)
from tensorguard.control.protocol import (
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    PERMISSION_DENIED,
    TOO_MANY_CLIENTS,
)


class Echo:
    def __init__(self) -> None:
        self.writes = 0

    @export("echo.say", read_only=True)
    def say(self, text: str) -> str:
        return text

    @export("echo.write")
    def write(self) -> int:
        self.writes += 1
        return self.writes

    @export("echo.boom", read_only=True)
    def boom(self) -> None:
        raise RuntimeError("secret detail")

    @export("echo.unserialisable", read_only=True)
    def unserialisable(self) -> Any:
        return {1, 2}

    @export("echo.sleep", read_only=True)
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


class Served:
    """A ControlServer running on its own event loop thread."""

    def __init__(self, path: Path, limits: ServerLimits, policy: AccessPolicy) -> None:
        self.service = Echo()
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, collect(self.service), limits, policy)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def drain() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(drain(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def own_policy(read_only_public: bool = False) -> AccessPolicy:
    """Only root and the test's own uid: the group is one that does not exist."""
    return AccessPolicy("tg-no-such-group", read_only_public)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "echo.sock", ServerLimits(max_frame_bytes=4096, client_timeout_s=2.0,
                                                     max_clients=8), own_policy())
    yield s
    s.close()


def exchange(client: ControlClient, frame: bytes) -> Any:
    return client.exchange(frame)


def test_call_and_socket_mode(served: Served) -> None:
    with ControlClient(served.server.path) as client:
        assert client.call("echo.say", {"text": "hi"}) == "hi"
        assert client.call("echo.say", ["positional"]) == "positional"
    assert stat.S_IMODE(os.stat(served.server.path).st_mode) == 0o660


@pytest.mark.parametrize(("frame", "code"), [
    (b"not json\n", PARSE_ERROR),
    (b"\xff\xff\n", PARSE_ERROR),
    (b"{}\n", INVALID_REQUEST),
    (b"[]\n", INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"nope"}\n', METHOD_NOT_FOUND),
    (b'{"jsonrpc":"2.0","id":1,"method":"echo.say","params":{"text":1}}\n', INVALID_PARAMS),
    (b'{"jsonrpc":"2.0","id":1,"method":"echo.boom"}\n', INTERNAL_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"method":"echo.unserialisable"}\n', INTERNAL_ERROR),
])
def test_errors_have_their_codes_and_serving_goes_on(served: Served, frame: bytes, code: int) -> None:
    with ControlClient(served.server.path) as client:
        answer = exchange(client, frame)
        assert answer["error"]["code"] == code
        assert "secret detail" not in json.dumps(answer)
        assert client.call("echo.say", {"text": "still here"}) == "still here"


def test_batch_and_notifications(served: Served) -> None:
    with ControlClient(served.server.path) as client:
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "echo.say", "params": {"text": "a"}},
            {"jsonrpc": "2.0", "method": "echo.write"},  # notification: runs, no answer
            {"jsonrpc": "2.0", "id": 2, "method": "missing"},
            5,
        ]
        answers = exchange(client, json.dumps(batch).encode() + b"\n")
        assert [a.get("result") for a in answers] == ["a", None, None]
        assert [a.get("error", {}).get("code") for a in answers] == [None, METHOD_NOT_FOUND,
                                                                       INVALID_REQUEST]
        assert served.service.writes == 1
        # a lone notification gets no answer: the next answer belongs to the next request
        client._sock.sendall(b'{"jsonrpc":"2.0","method":"echo.write"}\n')  # type: ignore[union-attr]
        assert client.call("echo.write") == 3


def test_oversize_frame_is_skipped_with_an_error(served: Served) -> None:
    with ControlClient(served.server.path) as client:
        huge = b'{"jsonrpc":"2.0","id":1,"method":"echo.say","params":{"text":"' + b"x" * 20000 + b'"}}\n'
        answer = exchange(client, huge)
        assert answer["error"]["code"] == FRAME_TOO_LARGE
        assert "4096" in answer["error"]["message"]
        assert client.call("echo.say", {"text": "after"}) == "after"
        # the same, split over many writes, and followed by a request in the same write
        sock = client._sock
        assert sock is not None
        for _ in range(5):
            sock.sendall(b"y" * 3000)
        sock.sendall(b'\n{"jsonrpc":"2.0","id":9,"method":"echo.say","params":{"text":"z"}}\n')
        assert json.loads(client.read_line())["error"]["code"] == FRAME_TOO_LARGE
        assert json.loads(client.read_line())["result"] == "z"


def test_idle_client_is_disconnected(served: Served) -> None:
    with ControlClient(served.server.path) as client:
        assert client._sock is not None
        client._sock.sendall(b'{"jsonrpc":')  # a slow, incomplete request
        start = time.monotonic()
        assert client._sock.recv(100) == b""
        assert 1.5 < time.monotonic() - start < 5


def test_many_concurrent_clients(tmp_path: Path) -> None:
    s = Served(tmp_path / "x.sock", ServerLimits(max_clients=64), own_policy())

    def one(i: int) -> str:
        with ControlClient(s.server.path) as client:
            client.call("echo.sleep", {"seconds": 0.05})
            return str(client.call("echo.say", {"text": str(i)}))

    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(200)))
    finally:
        s.close()
    assert results == [str(i) for i in range(200)]


def test_clients_over_the_limit_are_refused(served: Served) -> None:
    held = [ControlClient(served.server.path).connect() for _ in range(8)]
    try:
        for client in held:
            client.call("echo.say", {"text": "x"})
        extra = ControlClient(served.server.path).connect()
        assert json.loads(extra.read_line())["error"]["code"] == TOO_MANY_CLIENTS
        extra.close()
    finally:
        for client in held:
            client.close()
    assert served.server.stats.refused == 1


def test_close_removes_socket_and_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as after kill -9
    s = Served(path, ServerLimits(), own_policy())
    with pytest.raises(SocketInUse, match="served by another running process"):
        Served(path, ServerLimits(), own_policy())
    s.close()
    assert not path.exists()


def test_regular_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    path.write_text("important")
    with pytest.raises(SocketInUse, match="is not a socket"):
        Served(path, ServerLimits(), own_policy())
    assert path.read_text() == "important"


def test_read_only_access_when_caller_is_not_privileged(tmp_path: Path) -> None:
    s = Served(tmp_path / "x.sock", ServerLimits(), AccessPolicy("tg-no-such-group", True,
                                                                  owner_uid=-2))
    try:
        if os.geteuid() == 0:
            pytest.skip("root is always privileged; the second-uid test covers this as root")
        assert stat.S_IMODE(os.stat(s.server.path).st_mode) == 0o666
        with ControlClient(s.server.path) as client:
            assert client.call("echo.say", {"text": "ok"}) == "ok"
            with pytest.raises(RpcError) as info:
                client.call("echo.write")
            assert info.value.code == PERMISSION_DENIED
    finally:
        s.close()


FRAMES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2, None]),
        "method": st.one_of(st.sampled_from(["echo.say", "echo.write", "sys.x", ""]), st.integers()),
        "params": st.one_of(st.dictionaries(st.sampled_from(["text", "x"]), st.integers() | st.text(max_size=3)),
                            st.lists(st.integers(), max_size=3), st.text(max_size=3)),
        "id": st.one_of(st.integers(), st.text(max_size=4), st.floats(allow_nan=False), st.none()),
    }).map(lambda v: json.dumps(v).encode()),
)


KNOWN_CODES = {PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR,
               FRAME_TOO_LARGE, PERMISSION_DENIED}


def is_notification_only(frame: bytes) -> bool:
    try:
        obj = json.loads(frame)
    except ValueError:
        return False
    items = obj if isinstance(obj, list) and obj else [obj]
    return all(isinstance(i, dict) and "id" not in i and i.get("jsonrpc") == "2.0"
               and isinstance(i.get("method"), str) and i["method"]
               and set(i) <= {"jsonrpc", "method", "params"}
               and isinstance(i.get("params", {}), dict | list) for i in items)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=FRAMES)
def test_malformed_frames_get_errors_and_never_stop_the_server(served: Served, frame: bytes) -> None:
    frame = frame.replace(b"\n", b" ")
    with ControlClient(served.server.path, timeout=5) as client:
        sock = client._sock
        assert sock is not None
        sock.sendall(frame + b"\n" + b'{"jsonrpc":"2.0","id":"marker","method":"echo.say","params":["m"]}\n')
        answers = []
        while True:
            answer = json.loads(client.read_line())
            if isinstance(answer, dict) and answer.get("id") == "marker":
                assert answer["result"] == "m"
                break
            answers.append(answer)
    assert len(answers) <= 1, answers
    if not answers:
        assert not frame.strip() or is_notification_only(frame), frame
        return
    for item in answers[0] if isinstance(answers[0], list) else answers:
        assert set(item) == {"jsonrpc", "id", "result"} or set(item) == {"jsonrpc", "id", "error"}
        if "error" in item:
            assert item["error"]["code"] in KNOWN_CODES
            assert isinstance(item["error"]["message"], str) and item["error"]["message"]
