"""Configuration: the schema, the loader with drop-ins, and generated documentation."""

from .loader import (
    DEFAULT_CONFIG,
    ConfigError,
    ConfigIssue,
    LoadedConfig,
    drop_in_dir_for,
    load_config,
)
from .schema import AgentConfig

__all__ = [
    "DEFAULT_CONFIG",
    "AgentConfig",
    "ConfigError",
    "ConfigIssue",
    "LoadedConfig",
    "drop_in_dir_for",
    "load_config",
]
