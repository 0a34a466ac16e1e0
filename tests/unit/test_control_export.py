"""@export: methods declared once, parameters validated strictly before the method runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tensorguard.control import RpcError, collect, export
from tensorguard.control.protocol import INVALID_PARAMS


class Sample:
    @export("s.add", read_only=True)
    def add(self, a: int, b: int = 2) -> int:
        """Add two integers."""
        return a + b

    @export("s.slow")
    async def slow(self, name: str) -> str:
        await asyncio.sleep(0)
        return name.upper()

    def not_exported(self) -> None:
        raise AssertionError


def call(method: str, params: Any) -> Any:
    return asyncio.run(collect(Sample())[method].call(params))


def test_collect_finds_only_exported_methods() -> None:
    methods = collect(Sample())
    assert sorted(methods) == ["s.add", "s.slow"]
    assert methods["s.add"].read_only and not methods["s.slow"].read_only
    assert methods["s.add"].doc == "Add two integers."


def test_named_positional_default_and_async() -> None:
    assert call("s.add", {"a": 1, "b": 5}) == 6
    assert call("s.add", [1]) == 3
    assert call("s.slow", {"name": "x"}) == "X"


@pytest.mark.parametrize(("params", "fragment"), [
    ({}, "a: Field required"),
    ({"a": "1"}, "a: Input should be a valid integer"),
    ({"a": True}, "a: Input should be a valid integer"),
    ({"a": 1, "c": 3}, "c: Extra inputs are not permitted"),
    ([1, 2, 3], "takes at most 2 positional parameter(s), got 3"),
])
def test_bad_params_are_invalid_params_errors(params: Any, fragment: str) -> None:
    with pytest.raises(RpcError) as info:
        call("s.add", params)
    assert info.value.code == INVALID_PARAMS
    assert fragment in info.value.message


def test_exporting_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="exported twice"):
        collect(Sample(), Sample())
