"""Events: one frozen dataclass per wire operation, plus the events the core itself produces.

A frame on the wire is a msgpack map whose ``op`` key names the operation; docs/protocol.md
lists every field. Drivers receive these from :meth:`Connection.receive_data` and pass them to
:meth:`Connection.send`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera_mq.client.protocol.errors import ErrorCode
from tessera_mq.client.protocol.limits import (
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
    "Reply",
    "Request",
    "Response",
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
    #: Optional capabilities the broker offers (``retain``, ``request``, ``group``, ``history``,
    #: ``sender``; docs/protocol.md section 16); ``None``: an older broker, none of them.
    features: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    sid: int  #: client-chosen subscription id, unique among the connection's live subscriptions
    pattern: str
    group: str | None = None  #: queue group: each message goes to one member of the group
    serve: bool = False  #: the subscription receives requests (``req``), not publishes
    since: int | None = None  #: resume after this history sequence number...
    epoch: str | None = None  #: ...of this stream epoch (``None``: whatever epoch is current)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    sid: int


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    headers: dict[str, str] | None = None
    ack: int | None = None  #: when set, the broker answers ``ok``/``error`` carrying this id
    retain: bool = False  #: keep as the topic's last value (an empty payload clears it)


@dataclass(frozen=True, slots=True)
class Message:
    """Broker -> client delivery. Byte-identical for every subscriber of one publish: it names
    the topic, not the subscription; the client dispatches it to its matching subscriptions."""

    topic: str
    payload: bytes
    headers: dict[str, str] | None = None
    #: For this subscription only (retained snapshot, recovery, queue group, request); when
    #: ``None`` the client dispatches by topic to its plain subscriptions.
    sid: int | None = None
    retained: bool = False  #: a stored last value sent because the subscription is new
    sender: str | None = None  #: the publisher's identity ``mechanism:name``, stamped by the broker
    seq: int | None = None  #: history sequence number in the stream ``epoch``
    epoch: str | None = None
    reply: int | None = None  #: a request: answer it with ``reply {token: reply}``


@dataclass(frozen=True, slots=True)
class Ok:
    """Broker -> client: the request with this ``sid`` (sub/unsub) or ``ack`` (pub) succeeded.

    For a ``sub`` on a topic space with history, ``epoch`` and ``seq`` name the stream position
    at the moment the subscription started; ``recovered`` answers a ``sub`` with ``since``."""

    sid: int | None = None
    ack: int | None = None
    epoch: str | None = None
    seq: int | None = None
    recovered: bool | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """Client -> broker: a request to one responder per group (``NoResponders`` if none)."""

    rid: int  #: client-chosen, unique among the client's pending requests
    topic: str
    payload: bytes
    headers: dict[str, str] | None = None
    timeout_ms: int | None = None  #: the broker answers REQUEST_TIMEOUT after this long


@dataclass(frozen=True, slots=True)
class Reply:
    """Client (responder) -> broker: the answer to the request delivered with ``reply=token``."""

    token: int
    payload: bytes
    headers: dict[str, str] | None = None
    ack: int | None = None  #: when set, ``ok {ack}`` or ``error {ack}`` (request gone)


@dataclass(frozen=True, slots=True)
class Response:
    """Broker -> client (requester): the first reply to request ``rid``."""

    rid: int
    payload: bytes
    headers: dict[str, str] | None = None
    sender: str | None = None  #: the responder's identity, stamped by the broker


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
    rid: int | None = None  #: the failed request (NO_RESPONDERS, REQUEST_TIMEOUT, ...)


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
    rid: int | None = None


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
    | Request
    | Reply
    | Response
    | Rejected
    | ProtocolFailure
    | EndOfStream
)
