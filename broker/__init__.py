"""The Tessera broker: listeners, sessions, routing and configuration."""

from tessera_mq.broker.backplane import Backplane, LocalBackplane, Publication
from tessera_mq.broker.config import (
    BrokerConfig,
    ConfigError,
    LimitsConfig,
    ListenerConfig,
    load_config,
)
from tessera_mq.broker.hub import Hub
from tessera_mq.broker.router import Router
from tessera_mq.broker.server import Broker
from tessera_mq.broker.store import NullStore, Store

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
