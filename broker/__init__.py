"""The Tessera broker: listeners, sessions, routing and configuration."""

from broker.backplane import Backplane, LocalBackplane, Publication
from broker.config import BrokerConfig, ConfigError, LimitsConfig, ListenerConfig, load_config
from broker.hub import Hub
from broker.router import Router
from broker.server import Broker
from broker.store import NullStore, Store

__all__ = [
    "Backplane",
    "Broker",
    "BrokerConfig",
    "ConfigError",
    "Hub",
    "LimitsConfig",
    "ListenerConfig",
    "LocalBackplane",
    "NullStore",
    "Publication",
    "Router",
    "Store",
    "load_config",
]
