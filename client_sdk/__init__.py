"""Tessera client SDK.

import tessera_mq.client as tessera

async with tessera.connect("tls://127.0.0.1:7443", ca="ca.pem",
                           cert="alice.pem", key="alice-key.pem") as client:
    await client.publish("status.eu.node1", b"up")
    sub = await client.subscribe("status.>")
    async for msg in sub:
        print(msg.topic, msg.payload)
"""

import importlib
from typing import TYPE_CHECKING

from tessera_mq.client.protocol.errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ErrorCode,
    InvalidTopic,
    LocalProtocolError,
    NoResponders,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    TesseraError,
)

__version__ = "0.1.0"

# The client and credentials load on first use (PEP 562), so that importing the wire core
# (``tessera_mq.client.protocol``) does not pull in asyncio, ssl or the security layers.
_LAZY = {
    "Client": "tessera_mq.client.client",
    "ConnectionState": "tessera_mq.client.client",
    "Delivery": "tessera_mq.client.client",
    "HistoryGap": "tessera_mq.client.client",
    "IncomingRequest": "tessera_mq.client.client",
    "PublishBufferFull": "tessera_mq.client.client",
    "Reconnect": "tessera_mq.client.client",
    "Reply": "tessera_mq.client.client",
    "Service": "tessera_mq.client.client",
    "Subscription": "tessera_mq.client.client",
    "connect": "tessera_mq.client.client",
    "Kerberos": "tessera_mq.auth.credentials",
    "NTLM": "tessera_mq.auth.credentials",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera_mq.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from tessera_mq.auth.credentials import NTLM, Kerberos
    from tessera_mq.client.client import (
        Client,
        ConnectionState,
        Delivery,
        HistoryGap,
        IncomingRequest,
        PublishBufferFull,
        Reconnect,
        Reply,
        Service,
        Subscription,
        connect,
    )

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "Client",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ConnectionState",
    "Delivery",
    "ErrorCode",
    "HistoryGap",
    "IncomingRequest",
    "InvalidTopic",
    "Kerberos",
    "LocalProtocolError",
    "NTLM",
    "NoResponders",
    "PermissionDenied",
    "ProtocolError",
    "PublishBufferFull",
    "Reconnect",
    "RemoteProtocolError",
    "Reply",
    "RequestTimeout",
    "Service",
    "Subscription",
    "TesseraError",
    "__version__",
    "connect",
]
