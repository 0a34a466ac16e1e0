"""The runner's subsystem hooks: start before READY, refuse an unappliable reload, stop on exit."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tensorguard.config import ConfigError, LoadedConfig
from tensorguard.service.runner import EX_CONFIG, EX_OK, Runner
from tensorguard.service.sdnotify import Notifier
from tensorguard.service.store import ConfigStore
from tensorguard.service.unit import UnitService

from ..conftest import AgentDir


class Recorder(UnitService):
    """A unit whose subsystem cannot run on interface "missing0"."""

    name = "recorder"
    section = "network"
    not_built = "n/a"

    def __init__(self, store: ConfigStore) -> None:
        super().__init__(store)
        self.events: list[str] = []

    def _refuse(self, loaded: LoadedConfig) -> None:
        if "missing0" in loaded.config.network.interfaces:
            raise ConfigError([loaded.issue("network.interfaces[0]", "no such interface", '"missing0"')])

    async def start(self) -> None:
        self._refuse(self.store.current)
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    def check_config(self, new: LoadedConfig) -> None:
        self._refuse(new)
        self.events.append("check")

    def apply_config(self, new: LoadedConfig) -> None:
        self.events.append(f"apply {new.config.network.interfaces}")


def run_until_stopped(runner: Runner, during: list[str]) -> int:
    async def main() -> int:
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)
        for step in during:
            (runner.store.drop_in_dir or runner.store.path.parent / "agent.d").joinpath(
                "50.toml").write_text(step)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.1)
        runner.stop_event.set()
        return await task
    return asyncio.run(main())


def test_start_check_apply_stop(agent_dir: AgentDir) -> None:
    store = ConfigStore(agent_dir.config)
    unit = Recorder(store)
    runner = Runner([unit], store, Notifier({}))
    code = run_until_stopped(runner, ['[network]\ninterfaces = ["missing0"]\n',
                                      '[network]\ninterfaces = ["eth7"]\n'])
    assert code == EX_OK
    assert unit.events == ["start", "check", "apply ['eth7']", "stop"]
    assert store.generation == 2 and store.reloads_refused == 1
    assert store.last_error is None
    assert not agent_dir.socket("recorder").exists()


def test_start_refused_by_the_subsystem_exits_78_and_cleans_up(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", '[network]\ninterfaces = ["missing0"]\n')
    store = ConfigStore(agent_dir.config)
    unit = Recorder(store)
    assert asyncio.run(Runner([unit], store, Notifier({})).run()) == EX_CONFIG
    assert unit.events == []
    assert not agent_dir.socket("recorder").exists()


def test_issue_is_located_in_the_file_that_set_the_key(agent_dir: AgentDir) -> None:
    agent_dir.drop_in("10.toml", '[network]\ninterfaces = ["missing0"]\n')
    loaded = ConfigStore(agent_dir.config).current
    assert str(loaded.issue("network.interfaces[0]", "no such interface", '"missing0"')) == \
        'agent.d/10.toml: network.interfaces[0] = "missing0": no such interface'
    assert loaded.issue("agent.log_level", "x").file == "agent.toml"
    assert Path(loaded.sources[0]).name == "agent.toml"
