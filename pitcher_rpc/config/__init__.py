"""Configuration: TOML validated whole into an immutable snapshot.

``parse_config``/``load_config`` return a frozen :class:`Config` or raise one
:class:`ConfigError` listing every issue as ``SOURCE:LINE: KEY: MESSAGE``.
"""

from __future__ import annotations

from .health import HealthPolicy
from .lines import LineIndex, find_line, format_key_path
from .model import (
    BALANCE_POLICIES,
    DEFAULT_IDEMPOTENT_METHODS,
    AdminConfig,
    ClusterConfig,
    ClusterTlsConfig,
    Config,
    HealthConfig,
    ListenAddress,
    ModuleConfig,
    NodeConfig,
    OverloadConfig,
    RouteConfig,
    ServerConfig,
    ServerTlsConfig,
    SniCertificate,
    UpstreamConfig,
    parse_listen,
)
from .validate import ConfigError, ConfigIssue, load_config, parse_config, validate_config

__all__ = [
    "BALANCE_POLICIES",
    "DEFAULT_IDEMPOTENT_METHODS",
    "AdminConfig",
    "ClusterConfig",
    "ClusterTlsConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "HealthConfig",
    "HealthPolicy",
    "LineIndex",
    "ListenAddress",
    "ModuleConfig",
    "NodeConfig",
    "OverloadConfig",
    "RouteConfig",
    "ServerConfig",
    "ServerTlsConfig",
    "SniCertificate",
    "UpstreamConfig",
    "find_line",
    "format_key_path",
    "load_config",
    "parse_config",
    "parse_listen",
    "validate_config",
]
