"""The shipped example config and the README table are generated from the schema and kept equal."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tensorguard.config import load_config
from tensorguard.config.reference import dumps, example_config, iter_keys, markdown_reference, toml_string
from tensorguard.config.schema import AgentConfig

from ..conftest import REPO


def test_shipped_example_config_is_the_generated_one() -> None:
    shipped = (REPO / "packaging" / "agent.toml").read_text()
    assert shipped == example_config(), "run `make docs` to regenerate packaging/agent.toml"


def test_readme_reference_is_the_generated_one() -> None:
    assert markdown_reference() in (REPO / "README.md").read_text(), \
        "run `make docs` to regenerate the README's configuration reference"


def test_example_config_loads_to_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(example_config())
    assert load_config(tmp_path / "agent.toml").config == AgentConfig()


def test_every_key_is_documented() -> None:
    for doc in iter_keys():
        assert doc.doc.endswith("."), doc.key
        assert doc.allowed, doc.key
        assert f"#{doc.key.rpartition('.')[2]} =" in example_config()


def test_uncommented_example_is_valid_and_equal_to_defaults(tmp_path: Path) -> None:
    lines = [line[1:] if re.match(r"^#[a-z_]+ = ", line) else line
             for line in example_config().splitlines()]
    (tmp_path / "agent.toml").write_text("\n".join(lines) + "\n")
    assert load_config(tmp_path / "agent.toml").config == AgentConfig()


def test_dumps_round_trips_the_running_config() -> None:
    data = AgentConfig().model_dump(mode="json")
    assert AgentConfig.model_validate(tomllib.loads(dumps(data))) == AgentConfig()


@given(st.text())
def test_toml_string_round_trips(value: str) -> None:
    assert tomllib.loads(f"k = {toml_string(value)}")["k"] == value
