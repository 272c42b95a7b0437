"""Tessera client SDK.

async with client_sdk.connect("tls://127.0.0.1:7443", ca="ca.pem",
                              cert="alice.pem", key="alice-key.pem") as client:
    await client.publish("status.eu.node1", b"up")
    sub = await client.subscribe("status.>")
    async for msg in sub:
        print(msg.topic, msg.payload)
"""

from auth.credentials import NTLM, Kerberos
from client_sdk.client import Client, Delivery, Subscription, connect
from client_sdk.protocol.errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ErrorCode,
    InvalidTopic,
    LocalProtocolError,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    TesseraError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "Client",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "Delivery",
    "ErrorCode",
    "InvalidTopic",
    "Kerberos",
    "LocalProtocolError",
    "NTLM",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "Subscription",
    "TesseraError",
    "__version__",
    "connect",
]
