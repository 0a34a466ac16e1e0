"""Declare a service's control methods once (``@export``); the socket server and tests call them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .protocol import INVALID_PARAMS, METHOD_NOT_FOUND, RpcError

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__tensorguard_export__"


@dataclass(frozen=True)
class ExportInfo:
    """What ``@export`` records on a function."""

    name: str
    read_only: bool


def export(name: str, *, read_only: bool = False) -> Callable[[F], F]:
    """Publish a method on the control socket under ``name``.

    ``read_only`` methods change nothing and may be opened to every local user by config.
    """

    def mark(func: F) -> F:
        setattr(func, _MARK, ExportInfo(name, read_only))
        return func

    return mark


@dataclass(frozen=True)
class Method:
    """An exported method bound to its service, with a validator for its parameters."""

    name: str
    read_only: bool
    doc: str
    func: Callable[..., Any]
    params: type[BaseModel]
    order: tuple[str, ...]

    async def call(self, params: list[Any] | dict[str, Any]) -> Any:
        if isinstance(params, list):
            if len(params) > len(self.order):
                raise RpcError(
                    INVALID_PARAMS,
                    f"invalid params: {self.name} takes at most {len(self.order)} positional "
                    f"parameter(s), got {len(params)}",
                )
            params = dict(zip(self.order, params, strict=False))
        try:
            args = self.params.model_validate(params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise RpcError(INVALID_PARAMS, f"invalid params for {self.name}: {problems}") from None
        result = self.func(**{k: getattr(args, k) for k in self.order})
        if inspect.isawaitable(result):
            result = await result
        return result


def _params_model(func: Callable[..., Any], name: str) -> tuple[type[BaseModel], tuple[str, ...]]:
    hints = get_type_hints(func)
    fields: dict[str, Any] = {}
    order = []
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{name}: exported methods take named parameters only")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
        order.append(param.name)
    model = create_model(
        f"Params_{name.replace('.', '_')}",
        __config__=ConfigDict(extra="forbid", strict=True),
        **fields,
    )
    return model, tuple(order)


def collect(*services: object) -> dict[str, Method]:
    """All exported methods of ``services``; a name exported twice is a programming error."""
    methods: dict[str, Method] = {}
    for service in services:
        for attr in dir(type(service)):
            info = getattr(getattr(type(service), attr, None), _MARK, None)
            if not isinstance(info, ExportInfo):
                continue
            if info.name in methods:
                raise ValueError(f"method {info.name!r} is exported twice")
            bound = getattr(service, attr)
            model, order = _params_model(bound, info.name)
            doc = (inspect.getdoc(bound) or "").splitlines()
            methods[info.name] = Method(
                info.name, info.read_only, doc[0] if doc else "", bound, model, order
            )
    return methods


def lookup(methods: dict[str, Method], name: str) -> Method:
    try:
        return methods[name]
    except KeyError:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {name}") from None


