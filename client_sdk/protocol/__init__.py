"""The Tessera wire core: framing, codec, events, connection state, topics, errors and limits.

Pure and synchronous (sans-I/O): it imports neither asyncio nor socket. The broker and the SDK
drive it; another language implements docs/protocol.md.
"""

from client_sdk.protocol.codec import decode, encode, encode_frame, encode_message_frame
from client_sdk.protocol.connection import Connection, Role, State
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
from client_sdk.protocol.events import (
    Close,
    EndOfStream,
    Error,
    Event,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    ProtocolFailure,
    Publish,
    Rejected,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from client_sdk.protocol.framing import FrameDecoder, FrameTooLarge
from client_sdk.protocol.topics import matches, validate_pattern, validate_topic

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "Close",
    "Connection",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "EndOfStream",
    "Error",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "FrameTooLarge",
    "Hello",
    "InvalidTopic",
    "LocalProtocolError",
    "Message",
    "Ok",
    "PermissionDenied",
    "Ping",
    "Pong",
    "ProtocolError",
    "ProtocolFailure",
    "Publish",
    "Rejected",
    "RemoteProtocolError",
    "Role",
    "State",
    "Subscribe",
    "TesseraError",
    "Unsubscribe",
    "Welcome",
    "decode",
    "encode",
    "encode_frame",
    "encode_message_frame",
    "matches",
    "validate_pattern",
    "validate_topic",
]
