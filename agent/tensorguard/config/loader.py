"""Read agent.toml plus agent.d/*.toml, merge them, validate, and explain every error precisely."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .schema import AgentConfig

DEFAULT_CONFIG = Path("/etc/tensorguard/agent.toml")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_NESTING = 32  # tables and arrays; the schema needs 4, Python's stack gives out near 1000
_TOO_DEEP = f"nested deeper than {MAX_NESTING} levels"

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
    name = _display_name(directory, main.parent)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, f"cannot list: {exc.strerror}")]) from None
    try:
        reason = untrusted_reason(os.fstat(fd))
        if reason is not None:
            raise ConfigError([ConfigIssue(name, f"{reason}; refusing to trust it")])
        entries = sorted(os.listdir(fd), key=os.fsencode)
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, f"cannot list: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    return [directory / e for e in entries if e.endswith(".toml") and not e.startswith(".")]


def untrusted_reason(info: os.stat_result, euid: int | None = None) -> str | None:
    """Why a config file or agent.d/ must not be trusted (None: it may be).

    netguard runs as root and applies this config to the kernel, and identity installs
    certificates where it says: whoever can write a config file, or add one to agent.d/, steers
    those units. So a file or the directory must belong to root, or to the user running the
    loader (a developer's own tree, `tgctl config validate` run by a user), and must be writable
    by neither its group nor others.
    """
    euid = os.geteuid() if euid is None else euid
    if info.st_uid not in {0, euid}:
        allowed = "root" if euid == 0 else f"root or uid {euid} (the running user)"
        return f"is owned by uid {info.st_uid}, not {allowed}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH:
        return f"is world-writable (mode {mode:04o})"
    if mode & stat.S_IWGRP:
        return f"is group-writable (mode {mode:04o})"
    return None


def _display_name(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in _FILE_KINDS if test(mode)), "of an unknown kind")
    return f"is not a regular file ({kind}); refusing to read it"


def _read_bytes(path: Path, name: str) -> bytes:
    """The file's bytes, refusing what could block (FIFOs, devices), never end, or be planted.

    O_NONBLOCK makes opening a FIFO return at once, so fstat can refuse it; symlinks are
    followed (admins link drop-ins), and the checks apply to the file actually opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket (or a device without a driver)
            with contextlib.suppress(OSError):
                refusal = _not_regular(os.stat(path).st_mode)
                if refusal is not None:
                    raise ConfigError([ConfigIssue(name, refusal)]) from None
        raise ConfigError([ConfigIssue(name, f"cannot read: {exc.strerror}")]) from None
    try:
        info = os.fstat(fd)
        refusal = _not_regular(info.st_mode)
        if refusal is not None:
            raise ConfigError([ConfigIssue(name, refusal)])
        reason = untrusted_reason(info)
        if reason is not None:
            raise ConfigError([ConfigIssue(name, f"{reason}; refusing to trust it")])
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigIssue(name, f"is larger than {MAX_CONFIG_BYTES} bytes")])
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, f"cannot read: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(name, f"is larger than {MAX_CONFIG_BYTES} bytes")])
    return b"".join(chunks)


def _read_toml(path: Path, name: str) -> dict[str, Any]:
    raw = _read_bytes(path, name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(name, f"is not valid UTF-8 (byte offset {exc.start})")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(name, f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(name, _TOO_DEEP)]) from None
    except ValueError:  # int() past sys.get_int_max_str_digits(); tomllib raises nothing else
        raise ConfigError([ConfigIssue(name, _number_too_large(text))]) from None
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigError([ConfigIssue(name, _TOO_DEEP, _dotted(deep[:4]) + "...")])
    return data


def _number_too_large(text: str) -> str:
    """Say which line holds the integer Python refuses to convert (sys.get_int_max_str_digits)."""
    limit = sys.get_int_max_str_digits()
    # A value starts after '=', '[', ',' or '{'; a digit run in a string rarely looks like that.
    found = re.search(rf"[=\[,{{]\s*[+-]?[0-9_]{{{limit + 1},}}", text)
    where = f" (line {text.count(chr(10), 0, found.start()) + 1})" if found else ""
    return f"number too large: more than {limit} digits{where}"


def _too_deep(data: dict[str, Any]) -> Key | None:
    """The first key path nested deeper than MAX_NESTING, found without recursion."""
    stack: list[tuple[Key, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_NESTING:
            return path
        if isinstance(value, dict):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    return None


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
