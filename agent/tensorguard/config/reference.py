"""Generate the documented example config and the README reference from the schema itself."""

from __future__ import annotations

import json
import math
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .schema import AgentConfig


@dataclass(frozen=True)
class KeyDoc:
    """Documentation of one configuration key."""

    key: str
    default: Any
    allowed: str
    doc: str


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string; control characters are escaped, other characters kept as they are."""
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """Render a scalar or array of scalars as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def dumps(data: dict[str, Any]) -> str:
    """Serialise nested tables of scalars to TOML; None values are left out (TOML has no null)."""
    lines: list[str] = []
    _dump_table(data, (), lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(data: dict[str, Any], prefix: tuple[str, ...], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"\n[{'.'.join(prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {toml_value(value)}")
    for key, value in tables.items():
        _dump_table(value, (*prefix, key), lines)


def _sub_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _allowed(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("allowed"), str):
        return str(extra["allowed"])
    annotation = info.annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if annotation is bool:
        return "true | false"
    bounds = []
    for meta in info.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{symbol} {getattr(meta, attr)}")
    kind = {int: "integer", float: "number", str: "string"}.get(annotation, "value")  # type: ignore[arg-type]
    return f"{kind} " + ", ".join(bounds) if bounds else kind


def iter_keys(model: type[BaseModel] = AgentConfig, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of the schema, in declaration order."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _sub_model(info)
        if sub is not None:
            yield from iter_keys(sub, key + ".")
        else:
            yield KeyDoc(key, info.get_default(call_default_factory=True), _allowed(info),
                         info.description or "")


def example_config() -> str:
    """The shipped /etc/tensorguard/agent.toml: every key, commented out at its default."""
    out = [
        "# TensorGuard agent configuration, shared by tensorguard-netguard, -identity and -fl.",
        "#",
        "# Every key is shown commented out at its default. Prefer drop-ins in",
        "# /etc/tensorguard/agent.d/*.toml (merged in name order, later files win) to editing",
        "# this file. Check a change with `tgctl config validate`, apply it with",
        "# `systemctl reload tensorguard-agent.target` (an invalid config is refused and the",
        "# running one is kept).",
    ]
    section = None
    for doc in iter_keys():
        table, _, leaf = doc.key.rpartition(".")
        if table != section:
            section = table
            out += ["", f"[{table}]"]
        out.append("")
        out += [f"# {line}" for line in textwrap.wrap(doc.doc, 94)]
        out.append(f"# Allowed: {doc.allowed}.")
        if doc.default is None:
            out.append(f"#{leaf} =")
        else:
            out.append(f"#{leaf} = {toml_value(doc.default)}")
    return "\n".join(out) + "\n"


def markdown_reference() -> str:
    """The configuration table embedded in README.md."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for doc in iter_keys():
        default = "unset" if doc.default is None else f"`{toml_value(doc.default)}`"
        rows.append(f"| `{doc.key}` | {default} | {doc.allowed} | {doc.doc} |")
    return "\n".join(rows) + "\n"
