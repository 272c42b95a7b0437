"""Tessera client SDK.

async with client_sdk.connect("tls://127.0.0.1:7443", ca="ca.pem",
                              cert="alice.pem", key="alice-key.pem") as client:
    await client.publish("status.eu.node1", b"up")
    sub = await client.subscribe("status.>")
    async for msg in sub:
        print(msg.topic, msg.payload)
"""

import importlib
from typing import TYPE_CHECKING

from client_sdk.protocol.errors import (
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
# (``client_sdk.protocol``) does not pull in asyncio, ssl or the security layers.
_LAZY = {
    "Client": "client_sdk.client",
    "ConnectionState": "client_sdk.client",
    "Delivery": "client_sdk.client",
    "HistoryGap": "client_sdk.client",
    "IncomingRequest": "client_sdk.client",
    "PublishBufferFull": "client_sdk.client",
    "Reconnect": "client_sdk.client",
    "Reply": "client_sdk.client",
    "Service": "client_sdk.client",
    "Subscription": "client_sdk.client",
    "connect": "client_sdk.client",
    "Kerberos": "auth.credentials",
    "NTLM": "auth.credentials",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'client_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from auth.credentials import NTLM, Kerberos
    from client_sdk.client import (
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
