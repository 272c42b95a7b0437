"""Events: one frozen dataclass per wire operation, plus the events the core itself produces.

A frame on the wire is a msgpack map whose ``op`` key names the operation; docs/protocol.md
lists every field. Drivers receive these from :meth:`Connection.receive_data` and pass them to
:meth:`Connection.send`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client_sdk.protocol.errors import ErrorCode
from client_sdk.protocol.limits import (
    DEFAULT_HEARTBEAT_MS,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
)

__all__ = [
    "Close",
    "EndOfStream",
    "Error",
    "Event",
    "Hello",
    "Message",
    "Ok",
    "Ping",
    "Pong",
    "ProtocolFailure",
    "Publish",
    "Rejected",
    "Subscribe",
    "Unsubscribe",
    "Welcome",
]


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> broker, first frame after the security handshake."""

    version: int = PROTOCOL_VERSION
    client: str = ""  #: free-form client name and version, e.g. ``tessera-py/0.1.0``
    heartbeat_ms: int | None = None  #: the interval the client would like; the broker decides


@dataclass(frozen=True, slots=True)
class Welcome:
    """Broker -> client, the answer to ``hello``: the session is open."""

    version: int = PROTOCOL_VERSION
    server: str = ""
    mechanism: str = ""  #: how the broker authenticated the client (``x509``, ``kerberos``, ...)
    identity: str = ""  #: the authenticated name within that mechanism
    max_frame: int = MAX_FRAME_BYTES  #: largest frame body the broker accepts (and sends)
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS  #: the broker pings after this much silence


@dataclass(frozen=True, slots=True)
class Subscribe:
    sid: int  #: client-chosen subscription id, unique among the connection's live subscriptions
    pattern: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    sid: int


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    headers: dict[str, str] | None = None
    ack: int | None = None  #: when set, the broker answers ``ok``/``error`` carrying this id


@dataclass(frozen=True, slots=True)
class Message:
    """Broker -> client delivery. Byte-identical for every subscriber of one publish: it names
    the topic, not the subscription; the client dispatches it to its matching subscriptions."""

    topic: str
    payload: bytes
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Ok:
    """Broker -> client: the request with this ``sid`` (sub/unsub) or ``ack`` (pub) succeeded."""

    sid: int | None = None
    ack: int | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """An error answer. ``sid``/``ack`` name the request it answers, if any; ``topic`` is set on
    a refused publish that asked for no acknowledgement."""

    code: int
    message: str = ""
    sid: int | None = None
    ack: int | None = None
    topic: str | None = None
    dropped: int | None = None  #: with SLOW_CONSUMER: deliveries the broker discarded for us


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    """Either side: the sender will send nothing more; the receiver closes the transport."""

    code: int = ErrorCode.NORMAL
    reason: str = ""


# --- produced by the core itself, never sent -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected:
    """The core refused a frame and the connection stays open: a broker has answered the bad
    request with an error frame (example: a ``sub`` with an invalid pattern); a client has
    ignored a frame it cannot handle (an unknown operation). Drivers log it."""

    code: ErrorCode
    message: str
    sid: int | None = None
    ack: int | None = None


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """The peer broke the protocol; the core queued a ``close`` frame and stopped reading.
    The driver flushes ``data_to_send()`` and closes the transport."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The transport reached EOF. ``clean`` if a ``close`` frame was exchanged first."""

    clean: bool = field(default=False)


Event = (
    Hello
    | Welcome
    | Subscribe
    | Unsubscribe
    | Publish
    | Message
    | Ok
    | Error
    | Ping
    | Pong
    | Close
    | Rejected
    | ProtocolFailure
    | EndOfStream
)
