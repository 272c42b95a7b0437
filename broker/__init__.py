"""The Tessera broker: listeners, sessions, routing and configuration."""

from broker.config import BrokerConfig, ConfigError, LimitsConfig, ListenerConfig, load_config
from broker.router import Backplane, LocalBackplane, Router
from broker.server import Broker

__all__ = [
    "Backplane",
    "Broker",
    "BrokerConfig",
    "ConfigError",
    "LimitsConfig",
    "ListenerConfig",
    "LocalBackplane",
    "Router",
    "load_config",
]
