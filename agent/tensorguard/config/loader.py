"""Read agent.toml plus agent.d/*.toml, merge them, validate, and explain every error precisely."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .schema import AgentConfig

DEFAULT_CONFIG = Path("/etc/tensorguard/agent.toml")
MAX_CONFIG_BYTES = 1024 * 1024

Key = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One thing wrong with the configuration, located by file and dotted key."""

    file: str
    message: str
    key: str | None = None
    value: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.key is not None:
            where += f": {self.key}"
            if self.value is not None:
                where += f" = {self.value}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, str | None]:
        return {"file": self.file, "key": self.key, "value": self.value, "message": self.message}


class ConfigError(Exception):
    """The configuration cannot be used; ``issues`` says every reason found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration and where it came from."""

    config: AgentConfig
    sources: tuple[str, ...]
    digest: str
    origins: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def issue(self, key: str, message: str, value: str | None = None) -> ConfigIssue:
        """An issue about ``key`` (dotted, list items as [i]) in the file that set it."""
        probe = key
        while probe and probe not in self.origins:
            probe = probe.rpartition("[")[0] if probe.endswith("]") else probe.rpartition(".")[0]
        return ConfigIssue(self.origins.get(probe, Path(self.sources[0]).name), message, key, value)


def drop_in_dir_for(main: Path) -> Path:
    return main.parent / "agent.d"


def load_config(main: Path = DEFAULT_CONFIG, drop_in_dir: Path | None = None) -> LoadedConfig:
    """Load ``main`` and the drop-ins (merged in name order); raise ConfigError listing all issues."""
    files, merged, origin, issues = read_merged(main, drop_in_dir)
    if issues:
        raise ConfigError(issues)
    try:
        config = AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin, _display_name(main, main.parent))) from None
    digest = hashlib.sha256(
        json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()
    return LoadedConfig(
        config=config,
        sources=tuple(str(p) for p in files),
        digest=digest,
        origins={".".join(map(str, k)): v for k, v in origin.items()},
    )


def read_merged(
    main: Path, drop_in_dir: Path | None = None
) -> tuple[list[Path], dict[str, Any], dict[Key, str], list[ConfigIssue]]:
    """The files, their merged unvalidated data, which file set each key, and read errors."""
    drop_in_dir = drop_in_dir_for(main) if drop_in_dir is None else drop_in_dir
    issues: list[ConfigIssue] = []
    try:
        files = [main, *_drop_ins(drop_in_dir, main)]
    except ConfigError as exc:
        files, issues = [main], list(exc.issues)
    merged: dict[str, Any] = {}
    origin: dict[Key, str] = {}
    for path in files:
        name = _display_name(path, main.parent)
        try:
            data = _read_toml(path, name)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        _merge(merged, data, (), name, origin)
    return files, merged, origin, issues


def _drop_ins(directory: Path, main: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir(), key=lambda p: os.fsencode(p.name))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(_display_name(directory, main.parent), f"cannot list: {exc.strerror}")]
        ) from None
    return [p for p in entries if p.suffix == ".toml" and not p.name.startswith(".")]


def _display_name(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _read_toml(path: Path, name: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError([ConfigIssue(name, "is not a regular file")])
            if info.st_mode & stat.S_IWOTH:
                raise ConfigError([ConfigIssue(name, "is world-writable; refusing to trust it")])
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(name, f"is larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(name, f"is not valid UTF-8 (byte offset {exc.start})")]
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(name, f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(name, "TOML nesting is too deep")]) from None


def _merge(
    into: dict[str, Any], data: dict[str, Any], prefix: Key, name: str, origin: dict[Key, str]
) -> None:
    """Tables merge key by key; any other value (arrays included) replaces what was there."""
    for key, value in data.items():
        path = (*prefix, key)
        origin[path] = name
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, path, name, origin)
        else:
            into[key] = _copy(value)
            if isinstance(value, dict):
                _record(value, path, name, origin)


def _record(data: dict[str, Any], prefix: Key, name: str, origin: dict[Key, str]) -> None:
    for key, value in data.items():
        origin[(*prefix, key)] = name
        if isinstance(value, dict):
            _record(value, (*prefix, key), name, origin)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _explain(exc: ValidationError, origin: dict[Key, str], main_name: str) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc: Key = tuple(err["loc"])
        file = _origin_of(loc, origin, main_name)
        key = _dotted(loc)
        value = _render(err.get("input")) if err["type"] not in {"missing"} else None
        issues.append(ConfigIssue(file, _message(err, loc), key or None, value))
    return issues


def _origin_of(loc: Key, origin: dict[Key, str], default: str) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origin:
            return origin[loc[:end]]
    return default


def _dotted(loc: Key) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _render(value: Any) -> str | None:
    if isinstance(value, dict):
        return None
    text = json.dumps(value, default=str) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
}


def _message(err: Any, loc: Key) -> str:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {bounds[kind]} {limit}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in {"too_short", "string_too_short"}:
        return f"must have at least {ctx.get('min_length')} element(s)/character(s)"
    if kind in {"too_long", "string_too_long"}:
        return f"must have at most {ctx.get('max_length')} element(s)/character(s)"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    msg: str = err["msg"]
    return msg[0].lower() + msg[1:] if msg else kind


def _allowed_keys(loc: Key) -> list[str]:
    model: type[BaseModel] = AgentConfig
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
